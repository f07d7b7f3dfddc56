#!/bin/sh
# Buckets, least-privilege users and policies for the compose stack (run once by `minio-init`).
# Credentials come from the environment (infra/.env), never from this file.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"

# sources: a public, read-only mirror of OpenNeuro's bucket name (the demo dataset is copied in);
# results: everything neuroflow publishes
mc mb --ignore-existing local/openneuro.org local/neuroflow-results
mc anonymous set download local/openneuro.org
mc mirror --overwrite /infra/demo/ds002322 local/openneuro.org/ds002322

add_user() {  # name, secret, policy file
  mc admin policy create local "$1" "/infra/s3-policies/$3"
  mc admin user add local "$1" "$2"
  mc admin policy attach local "$1" --user "$1" || true  # already attached on a re-run
}
add_user neuroflow-pipeline "$NEUROFLOW_PIPELINE_S3_SECRET" pipeline.json
add_user neuroflow-watch "$NEUROFLOW_WATCH_S3_SECRET" watch.json
add_user neuroflow-gallery "$NEUROFLOW_GALLERY_S3_SECRET" gallery.json
add_user neuroflow-reader "$NEUROFLOW_READER_S3_SECRET" reader.json
echo "minio-init: buckets, users and policies are in place"
