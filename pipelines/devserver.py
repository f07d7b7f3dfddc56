"""A real S3-compatible HTTP server on 127.0.0.1 (moto's server mode) for tests and the demo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3_server(port: int | None = None, log_path: str | None = None) -> tuple[str, subprocess.Popen]:
    """Start ``moto.server`` on 127.0.0.1 in a child process; wait until it answers."""
    port = port or free_port()
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 test server exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return url, proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the S3 test server did not answer on {url} within 30 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def aws_env(url: str) -> dict[str, str]:
    """Environment that points boto3 (and Airflow's amazon provider) at `url`."""
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "neuroflow-local", "AWS_SECRET_ACCESS_KEY": "neuroflow-local",
            "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server() -> Iterator[str]:
    url, proc = start_s3_server()
    old = {k: os.environ.get(k) for k in aws_env(url)}
    os.environ.update(aws_env(url))
    try:
        yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


def create_public_bucket(name: str) -> None:
    """A bucket anyone may list and read without signing, as the real OpenNeuro bucket."""
    import json

    from .s3 import client_for, endpoint_url

    client = client_for(False, endpoint_url())
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_bucket_policy(Bucket=name, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                       "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{name}", f"arn:aws:s3:::{name}/*"]}],
    }))
