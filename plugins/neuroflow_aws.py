"""S3 credentials for neuroflow tasks from an Airflow connection, never from files.

``export_aws_connection()`` reads the connection ``NEUROFLOW_AWS_CONN_ID`` (default
``neuroflow_s3``; an ``aws`` connection: login = access key id, password = secret key, extra
``endpoint_url`` and ``region_name``) and exports it as the standard AWS environment of the
task process, which ``pipelines.storage`` reads. The secret is registered with Airflow's
secrets masker, so it appears as ``***`` in task logs. Without that connection the standard
AWS environment (or instance role) is used as it is.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "neuroflow_s3"


def export_aws_connection(conn_id: str | None = None) -> str | None:
    """Export the connection's credentials to ``AWS_*``; return its id, or None when it does not exist."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.log import mask_secret

    conn_id = conn_id or os.environ.get("NEUROFLOW_AWS_CONN_ID", DEFAULT_CONN_ID)
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    extra = conn.extra_dejson or {}
    if conn.password:
        mask_secret(conn.password)
    values = {"AWS_ACCESS_KEY_ID": conn.login, "AWS_SECRET_ACCESS_KEY": conn.password,
              "AWS_ENDPOINT_URL": extra.get("endpoint_url"), "AWS_DEFAULT_REGION": extra.get("region_name")}
    for name, value in values.items():
        if value:
            os.environ[name] = str(value)
    log.info("S3 credentials from Airflow connection %r (access key %s, endpoint %s)", conn_id,
             conn.login, extra.get("endpoint_url") or "AWS default")
    return conn_id
