"""`make demo`: the main job end to end on the embedded defaults.

1. a real S3 server (moto's server mode) on 127.0.0.1, with a bucket playing OpenNeuro;
2. the bundled demo dataset (real Alice data + one simulated subject) uploaded to
   s3://openneuro.org/ds002322;
3. the `neuroflow_encoding` DAG run by Airflow on SQLite (`airflow dags test`), with a
   local dask cluster and the packaged pretrained MiniLM;
4. the published results copied to ./demo-output (verified against the manifest), since
   the in-memory S3 server stops with the demo; a summary, the report path and, last,
   the manifest URI are printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.consume import get_artifact, list_analyses, read_manifest  # noqa: E402
from pipelines.demo import build_demo_dataset, packaged_model_dir  # noqa: E402
from pipelines.devserver import aws_env, create_public_bucket, start_s3_server, stop  # noqa: E402
from pipelines.run import format_summary  # noqa: E402
from pipelines.resultstore import copy_tree_to_s3
from pipelines.storage import s3_client  # noqa: E402


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    work = ROOT / ".demo"
    out = ROOT / "demo-output"
    work.mkdir(exist_ok=True)
    t0 = time.monotonic()
    url, server = start_s3_server(log_path=str(work / "s3server.log"))
    os.environ.update(aws_env(url))
    try:
        say(f"S3 server on {url}")
        client = s3_client("neuroflow-results")
        create_public_bucket("openneuro.org")
        client.create_bucket(Bucket="neuroflow-results")
        say("building the demo dataset (real Alice ROI data + simulated subject sub-sim01)")
        dataset = build_demo_dataset(work / "ds002322", model_dir=packaged_model_dir())
        n = copy_tree_to_s3(dataset, "s3://openneuro.org/ds002322")
        say(f"uploaded {n} files to s3://openneuro.org/ds002322")

        config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        for feat in config["features"]:
            if feat.get("model") == "MODEL_DIR":
                feat["model"] = str(packaged_model_dir())
        env = {**os.environ, **airflow_env(work), "NEUROFLOW_CACHE": str(work / "cache")}
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say("running DAG neuroflow_encoding with `airflow dags test` (log: .demo/airflow-dags-test.log)")
        with open(work / "airflow-dags-test.log", "wb") as log:
            proc = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "neuroflow_encoding",
                                   "--conf", json.dumps({"config": config})],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        rows = list_analyses("s3://neuroflow-results")
        if proc.returncode != 0 or not rows:
            say(f"the DAG run failed (exit {proc.returncode}); see .demo/airflow-dags-test.log")
            return 1
        manifest_uri = rows[0]["manifest_uri"]
        manifest = read_manifest(manifest_uri)
        local = out / manifest["analysis_id"]
        for art in manifest["artifacts"]:
            get_artifact(manifest_uri, art["path"], local / art["path"])
        (local / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        say(f"done in {time.monotonic() - t0:.0f} s; the S3 server stops now, a verified copy is in {local}")
        for line in format_summary(manifest["metrics"]):
            print(line)
        print(f"published maps: {manifest_uri.rsplit('/', 1)[0]}/ (local copy: {local})")
        print(f"report: {local / 'report.html'}")
        print(manifest_uri)
        return 0
    finally:
        stop(server)


def airflow_env(work: Path) -> dict[str, str]:
    return {
        "AIRFLOW_HOME": str(work / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


if __name__ == "__main__":
    sys.exit(main())
