"""infra/: what cannot run here (compose, Helm, IAM) is checked statically; the dask part runs.

- the compose file has the services a scaled-out deployment needs, every image is pinned, and
  no secret is written in any file;
- the Helm values for the official Airflow chart and the dask chart say the same things
  (CeleryExecutor, a GPU worker set on queue ``gpu``, pinned images, secrets by name only);
- the S3 policies are least-privilege: evaluated here for what each role may and may not do;
- the fit sends its work to an existing dask cluster when ``compute.dask`` names a scheduler
  (a real ``dask scheduler`` and ``dask worker`` started as separate processes).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, demo_config

INFRA = REPO / "infra"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|PRIVATE|(^|_)KEY$|ACCESS_KEY", re.I)


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yaml").read_text())


def helm(name: str) -> dict:
    return yaml.safe_load((INFRA / "helm" / name).read_text())


def policy(name: str) -> dict:
    return json.loads((INFRA / "s3-policies" / name).read_text())


def airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


# --- compose -----------------------------------------------------------------------------

def test_compose_has_celery_airflow_minio_dask_and_a_gpu_worker():
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
            "dask-scheduler", "dask-worker", "dask-worker-gpu"} <= set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # GPU-bound tasks go to the queue the GPU worker (and only it) listens on
    assert env["NEUROFLOW_GPU_QUEUE"] == "gpu"
    gpu = services["airflow-worker-gpu"]
    assert gpu["command"][:3] == ["airflow", "celery", "worker"]
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    cpu = services["airflow-worker"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "default"
    for name in ("airflow-worker-gpu", "dask-worker-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        assert services[name]["profiles"] == ["gpu"]  # `docker compose up` works without a GPU
    assert services["dask-worker"]["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert "--nthreads" in services["dask-worker"]["command"]
    # the gpu pool exists before anything is scheduled
    assert "airflow pools set gpu" in " ".join(services["airflow-init"]["command"])
    # DAGs and the config templates the watcher reads are mounted where the DAG files look for them
    assert "../dags:/opt/airflow/dags:ro" in services["airflow-scheduler"]["volumes"]
    assert "../configs:/opt/airflow/configs:ro" in services["airflow-scheduler"]["volumes"]


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def test_every_image_is_pinned():
    services = compose()["services"]
    for name, svc in services.items():
        assert "image" in svc, f"{name}: no image"
        assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned to a version"
        if "build" not in svc:  # third-party images: an exact release, not a moving major tag
            tag = svc["image"].rpartition(":")[2]
            assert re.search(r"\d+\.\d+|RELEASE\.\d{4}", tag), f"{name}: {svc['image']} is a moving tag"
    dockerfile = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^ARG AIRFLOW_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base == f"apache/airflow:{airflow_version()}-python3.11"  # the same Airflow as requirements.lock
    assert "requirements.lock" in dockerfile
    for values in (helm("airflow-values.yaml"), ):
        assert values["airflowVersion"] == airflow_version()
        assert _pinned(f"{values['defaultAirflowRepository']}:{values['defaultAirflowTag']}")
    dask = helm("dask-values.yaml")
    for part in (dask["scheduler"], dask["worker"], *dask["additional_worker_groups"]):
        assert _pinned(f"{part['image']['repository']}:{part['image']['tag']}")


def _literal_secrets_in_compose(node, path=""):
    """(path, value) of every secret-looking environment value that is not a ${VAR} reference."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}"
            if isinstance(value, str) and SECRETISH.search(str(key)) and not value.startswith("${"):
                found.append((here, value))
            found += _literal_secrets_in_compose(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _literal_secrets_in_compose(value, f"{path}[{i}]")
    elif isinstance(node, str):
        for m in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", node):  # credentials inside a URL
            if not m.group(2).startswith("${"):
                found.append((path, node))
    return found


def test_no_secret_is_written_in_any_infra_file():
    data = compose()
    found = [(p, v) for p, v in _literal_secrets_in_compose(data)
             if not p.endswith("AWS_ACCESS_KEY_ID")]  # a user name (neuroflow-pipeline), not a secret
    assert found == []
    # every ${VAR:?} the stack needs is listed, empty, in .env.example
    needed = set(re.findall(r"\$\{([A-Z0-9_]+):\?", (INFRA / "docker-compose.yaml").read_text()))
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert needed <= set(example)
    assert all(example[k] == "" for k in example if SECRETISH.search(k) or k.startswith(("MINIO_ROOT",)))
    # nothing that looks like a key, a token or a password anywhere under infra/
    patterns = [r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
                r"(?i)password([ \t]*=[ \t]*|:[ \t]+)['\"]?(?![$'\"])[^\s'\"]{4,}",
                r"(?i)(secret|token)([ \t]*=[ \t]*|:[ \t]+)['\"]?(?![$'\"])[A-Za-z0-9+/=_-]{16,}"]
    for path in INFRA.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for pat in patterns:
                hits = [m.group(0) for m in re.finditer(pat, text) if "SecretName" not in m.group(0)]
                assert not hits, f"{path.relative_to(REPO)}: {hits}"
    values = helm("airflow-values.yaml")
    for key in ("fernetKey", "webserverSecretKey", "apiSecretKey", "jwtSecret"):
        assert not values.get(key), f"{key} written in the values; use {key}SecretName"
    assert values["data"]["metadataSecretName"] and "metadataConnection" not in values["data"]


def test_minio_init_creates_the_policies_users_and_buckets():
    script = (INFRA / "minio-init.sh").read_text()
    for name in ("pipeline", "watch", "gallery", "reader"):
        assert f"{name}.json" in script and (INFRA / "s3-policies" / f"{name}.json").is_file()
    assert "mc mb --ignore-existing local/openneuro.org local/neuroflow-results" in script
    assert "set -eu" in script


# --- helm --------------------------------------------------------------------------------

def test_airflow_chart_values_run_celery_with_a_gpu_worker_set():
    values = helm("airflow-values.yaml")
    assert values["executor"] == "CeleryExecutor"
    assert values["postgresql"]["enabled"] is False and values["redis"]["enabled"] is True
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert values[key]
    assert values["dags"]["gitSync"]["enabled"] and values["dags"]["gitSync"]["subPath"] == "dags"
    env = {e["name"]: e["value"] for e in values["env"]}
    assert env["NEUROFLOW_GPU_QUEUE"] == "gpu"
    celery = values["workers"]["celery"]
    assert celery["queue"] == "default" and celery["enableDefault"] is True
    (gpu,) = [s for s in celery["sets"] if s["name"] == "gpu"]
    assert gpu["queue"] == "gpu"
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert values["dagProcessor"]["enabled"] and values["triggerer"]["enabled"]
    role = celery["serviceAccount"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.endswith(":role/neuroflow-pipeline")  # S3 access by role, bound to pipeline.json


def test_dask_chart_values_have_cpu_and_gpu_workers_of_the_neuroflow_image():
    values = helm("dask-values.yaml")
    airflow = helm("airflow-values.yaml")
    image = (airflow["defaultAirflowRepository"], airflow["defaultAirflowTag"])
    for part in (values["scheduler"], values["worker"], *values["additional_worker_groups"]):
        assert (part["image"]["repository"], part["image"]["tag"]) == image  # same versions as the submitters
    assert values["worker"]["threads_per_worker"] == 1
    (gpu,) = values["additional_worker_groups"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and "--resources" in gpu["extraArgs"]
    assert values["jupyter"]["enabled"] is False
    assert "env" not in values["worker"] or all("AWS" not in e["name"] for e in values["worker"]["env"])


# --- S3 policies, evaluated ----------------------------------------------------------------

def allowed(doc: dict, action: str, resource: str, prefix: str | None = None) -> bool:
    """A small IAM evaluator: explicit Deny wins, else any matching Allow (wildcards, StringLike)."""
    verdict = False
    for st in doc["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if not any(fnmatch.fnmatchcase(action, a) for a in actions):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in resources):
            continue
        cond = st.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if cond is not None and (prefix is None or not any(fnmatch.fnmatchcase(prefix, c) for c in cond)):
            continue
        if st["Effect"] == "Deny":
            return False
        verdict = True
    return verdict


SRC = "arn:aws:s3:::openneuro.org"
RES = "arn:aws:s3:::neuroflow-results"
WRITES = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:PutObjectAcl", "s3:PutBucketPolicy")


@pytest.mark.parametrize("name", ["pipeline.json", "watch.json", "gallery.json", "reader.json"])
def test_policies_are_least_privilege(name):
    doc = policy(name)
    assert doc["Version"] == "2012-10-17"
    for st in doc["Statement"]:
        assert st["Effect"] == "Allow" and st.get("Sid")
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert not [a for a in actions if "*" in a], f"{name}: wildcard action in {st['Sid']}"
        assert "*" not in resources and not [r for r in resources if r.startswith("arn:aws:s3:::*")]
        assert all(a.startswith("s3:") for a in actions)
    # sources are read-only for everyone
    for action in WRITES:
        assert not allowed(doc, action, f"{SRC}/ds002322/CHANGES")
        assert not allowed(doc, action, SRC)
    # nobody may delete a published result, nor change bucket settings
    assert not allowed(doc, "s3:DeleteObject", f"{RES}/ds002322/1.0.4/a-0123456789ab/manifest.json")
    assert not allowed(doc, "s3:PutBucketPolicy", RES)


def test_each_role_can_do_its_job_and_nothing_more():
    pipeline, watch, gallery, reader = (policy(f"{n}.json") for n in ("pipeline", "watch", "gallery", "reader"))
    manifest = f"{RES}/ds002322/1.0.4/alice-demo-0123456789ab/manifest.json"
    # the pipeline reads sources and writes results (artifacts, caches, manifest)
    assert allowed(pipeline, "s3:GetObject", f"{SRC}/ds002322/CHANGES") and allowed(pipeline, "s3:ListBucket", SRC)
    for key in (manifest, f"{RES}/_cache/features/x.npz", f"{RES}/_work/a/sub-18/results-x.npz"):
        assert allowed(pipeline, "s3:PutObject", key) and allowed(pipeline, "s3:GetObject", key)
    assert allowed(pipeline, "s3:ListBucket", RES)
    assert not allowed(pipeline, "s3:PutObject", "arn:aws:s3:::some-other-bucket/x")
    # the watcher reads sources and writes only its own state
    assert allowed(watch, "s3:GetObject", f"{SRC}/ds002322/dataset_description.json")
    assert allowed(watch, "s3:PutObject", f"{RES}/_state/watch/ds002322.json")
    assert not allowed(watch, "s3:PutObject", manifest) and not allowed(watch, "s3:GetObject", manifest)
    # the gallery reads results and writes the index only
    assert allowed(gallery, "s3:GetObject", manifest) and allowed(gallery, "s3:ListBucket", RES)
    assert allowed(gallery, "s3:PutObject", f"{RES}/index.json")
    assert allowed(gallery, "s3:PutObject", f"{RES}/index.html")
    assert allowed(gallery, "s3:PutObject", f"{RES}/ds002322/1.0.4/comparison.json")  # each version's comparison
    assert not allowed(gallery, "s3:PutObject", f"{RES}/ds002322/1.0.4/x/report.html")
    assert not allowed(gallery, "s3:PutObject", manifest) and not allowed(gallery, "s3:GetObject", f"{SRC}/x")
    # readers read results, nothing else
    assert allowed(reader, "s3:GetObject", manifest)
    assert not any(allowed(reader, a, f"{RES}/index.json") for a in WRITES)


def test_the_infra_readme_explains_the_way_from_demo_to_cluster():
    text = (INFRA / "README.md").read_text()
    for needle in ("airflow pools set gpu", "compute.dask", "tcp://", "--profile gpu", "infra/.env",
                   "NEUROFLOW_GPU_QUEUE", "helm upgrade --install", "s3-policies"):
        assert needle in text, needle


# --- an existing dask cluster, for real ---------------------------------------------------

@pytest.fixture
def dask_cluster(tmp_path):
    """`dask scheduler` and one `dask worker` as separate processes on 127.0.0.1 (as in compose)."""
    from pipelines.devserver import free_port

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"{n}.log", "wb") for n in ("scheduler", "worker")]
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0", "--no-show"],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                       "--nworkers", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                      env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True))
        from dask.distributed import Client

        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout="2s") as client:
                    if client.scheduler_info()["workers"]:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(0.5)
        yield address
    finally:
        from pipelines.compute import close_clients

        close_clients()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in logs:
            log.close()


@pytest.mark.slow
@pytest.mark.integration
def test_the_fit_uses_an_existing_dask_cluster_named_in_the_config(dask_cluster, openneuro_demo, results_bucket,
                                                                   tmp_path):
    import numpy as np
    from dask.distributed import Client

    from pipelines.config import parse_config
    from pipelines.cache import load_npz as _load_npz
    from pipelines.steps import extract_features, fit_subject
    from pipelines.resultstore import ResultStore

    base = demo_config(Path("/unused"), results_bucket, subjects=("sim01",))
    base["features"] = [base["features"][0]]  # word rate: the cluster, not the model, is under test
    results = {}
    for dask in (dask_cluster, "none"):
        cfg = parse_config({**base, "compute": {**base["compute"], "dask": dask}})
        feats = [extract_features(cfg, "wordrate", cache_dir=tmp_path / "cache")]
        fit = fit_subject(cfg, "sim01", feats, cache_dir=tmp_path / "cache")
        assert fit["reused"] is False and fit["n_targets"] > 64  # large enough to be sharded
        results[dask] = _load_npz(ResultStore(results_bucket).get_bytes(fit["result_rel"]))
    with Client(dask_cluster, timeout="5s") as client:
        ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert ran, "the scheduler never received a task"
    # Every target fitted once, with the same alpha and r; a float32 near-tie between two
    # adjacent alphas may flip with the GEMM blocking (seen: 1 target in 3,666), never more.
    same = results[dask_cluster]["wordrate__alpha"] == results["none"]["wordrate__alpha"]
    assert same.mean() >= 0.999, f"{(~same).sum()} targets got another alpha"
    np.testing.assert_allclose(results[dask_cluster]["wordrate__r"][same], results["none"]["wordrate__r"][same],
                               atol=1e-5)
    np.testing.assert_allclose(results[dask_cluster]["wordrate__r"], results["none"]["wordrate__r"], atol=2e-3)
