"""A real Airflow end to end: api-server + scheduler + dag-processor on 127.0.0.1, SQLite.

One test, in order:
1. a trigger with a bad conf is refused by the REST API (400) before any run exists;
2. ``neuroflow_encoding`` is triggered through the REST API (/api/v2, JWT) with a conf and
   succeeds; the manifest is read back from the local S3 server;
3. ``neuroflow_maps_consumer`` runs on the Asset event and writes the gallery index;
4. ``neuroflow_watch`` (first look at the dataset) triggers the same analysis, which
   recomputes nothing (features and fits reused, identical manifest);
5. the watched dataset's version is bumped in S3: ``neuroflow_watch`` triggers a run for the
   new version, a third watch run triggers nothing, the consumer indexes both analyses.
Every process it starts is in its own process group and is stopped at the end, even on failure.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, demo_config, make_bucket

pytestmark = [pytest.mark.slow, pytest.mark.integration]

AIRFLOW = [sys.executable, "-m", "airflow"]
RUN_TIMEOUT_S = 240


class Services:
    """Child processes, each the leader of its own process group; stop() ends every one."""

    def __init__(self, env: dict[str, str], logs: Path, port: int):
        self.env = env
        self.logs = logs
        self.port = port
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def launch(self) -> None:
        """Migrate the SQLite DB, create the ``gpu`` pool, start api-server, scheduler, dag-processor."""
        for args in (["db", "migrate"],
                     # GPU-bound tasks of neuroflow_encoding run in this pool (one device here)
                     ["pools", "set", "gpu", "1", "GPU-bound tasks (features, fits)"]):
            done = subprocess.run([*AIRFLOW, *args], env=self.env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=180)
            assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1")
        self.start("scheduler", "scheduler")
        self.start("dag-processor", "dag-processor")

    def start(self, name: str, *args: str) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([*AIRFLOW, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(self.logs))
        out.close()
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"airflow {name} exited with code {proc.returncode}:\n{self.tail(name)}")

    def tail(self, name: str, n: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def stop(self) -> None:
        for _, proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, proc in self.procs:  # whatever is left of each group (task runners included)
            _signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group this test created for this child (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


class Api:
    """The Airflow 3 public REST API (/api/v2) with a JWT from the simple auth manager."""

    def __init__(self, base: str):
        import httpx

        self.base = base
        self.http = httpx.Client(base_url=base, timeout=30)
        token = self.http.get("/auth/token").json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params):
        # SQLite serialises writers: under load a read can meet "database is locked" (500);
        # reads are idempotent, so retry those a few times before failing.
        for attempt in range(5):
            r = self.http.get(f"/api/v2{path}", params=params)
            if r.status_code < 500 or attempt == 4:
                break
            time.sleep(1 + attempt)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict):
        return self.http.post(f"/api/v2{path}", json=body)

    def patch(self, path: str, body: dict):
        r = self.http.patch(f"/api/v2{path}", json=body)
        r.raise_for_status()
        return r.json()

    def runs(self, dag_id: str) -> dict[str, dict]:
        return {r["dag_run_id"]: r for r in self.get(f"/dags/{dag_id}/dagRuns", limit=100)["dag_runs"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1):
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
                        map_index=map_index, deserialize=True)["value"]


def _wait(what: str, fn, services: Services, timeout: float = RUN_TIMEOUT_S, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n--- scheduler log ---\n"
                         f"{services.tail('scheduler')}")


def _run_done(api: Api, services: Services, dag_id: str, run_id: str) -> dict:
    def finished():
        try:
            run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}")
        except Exception:  # noqa: BLE001 - not created yet
            return None
        return run if run["state"] in ("success", "failed") else None

    run = _wait(f"{dag_id} run {run_id}", finished, services)
    if run["state"] != "success":
        tis = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        bad = [(t["task_id"], t["map_index"], t["state"]) for t in tis if t["state"] != "success"]
        raise AssertionError(f"{dag_id} run {run_id} ended {run['state']}: {bad}\n{services.tail('scheduler')}")
    return run


def _trigger(api: Api, dag_id: str, conf: dict | None = None, run_id: str | None = None) -> str:
    body = {"logical_date": None, "conf": conf or {}}
    if run_id:
        body["dag_run_id"] = run_id
    r = api.post(f"/dags/{dag_id}/dagRuns", body)
    assert r.status_code in (200, 201), r.text
    return r.json()["dag_run_id"]


def _consumer_runs_done(api: Api, services: Services, n: int) -> list[dict]:
    def done():
        runs = [r for r in api.runs("neuroflow_maps_consumer").values() if r["run_type"] == "asset_triggered"]
        if any(r["state"] == "failed" for r in runs):
            raise AssertionError(f"a consumer run failed: {runs}\n{services.tail('scheduler')}")
        ok = [r for r in runs if r["state"] == "success"]
        return ok if len(ok) >= n else None

    return _wait(f"{n} asset-triggered neuroflow_maps_consumer run(s)", done, services)


@pytest.fixture
def airflow(tmp_path, s3_url):
    """Airflow's own services on a free port of 127.0.0.1, with their own AIRFLOW_HOME (SQLite).

    Yields (services, base URL); the test calls ``services.launch()`` once its environment
    is complete. Everything started is stopped at teardown, whatever happened.
    """
    from pipelines.devserver import free_port

    home = tmp_path / "airflow-home"
    logs = tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),  # shared by api-server and scheduler, never on disk
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(logs / "tasks"),
        "NEUROFLOW_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    })
    services = Services(env, logs, port)
    try:
        yield services, f"http://127.0.0.1:{port}"
    finally:
        services.stop()
        alive = [name for name, p in services.procs if p.poll() is None]
        assert not alive, f"still running after stop(): {alive}"


def test_real_scheduler_end_to_end(airflow, tiny_bert_dir, results_bucket):
    import httpx

    from pipelines.config import parse_config
    from pipelines.consume import read_manifest
    from pipelines.demo import DEMO_SOURCE
    from pipelines.s3 import s3_client
    from pipelines.resultstore import ResultStore, copy_tree_to_s3

    t0 = time.monotonic()
    services, base = airflow
    # the watched dataset: a private copy this test may bump
    make_bucket("e2e-sources")
    copy_tree_to_s3(DEMO_SOURCE, "s3://e2e-sources/ds002322")
    config = demo_config(tiny_bert_dir, results_bucket, subjects=("18",))
    config["dataset"]["source"] = "s3://e2e-sources/ds002322"
    # the watch list, as the Airflow Variable neuroflow_watchlist (environment secrets backend)
    services.env["AIRFLOW_VAR_NEUROFLOW_WATCHLIST"] = json.dumps(
        {"datasets": [{"source": "s3://e2e-sources/ds002322", "config": config}]})
    services.launch()

    def api_up():
        try:
            return Api(base)
        except (httpx.HTTPError, KeyError, ValueError):
            return None

    api = _wait("the api-server", api_up, services, timeout=120, every=1)
    for dag_id in ("neuroflow_encoding", "neuroflow_maps_consumer", "neuroflow_watch"):
        _wait(f"{dag_id} to be parsed", lambda d=dag_id: api.http.get(f"/api/v2/dags/{d}").status_code == 200,
              services, timeout=120, every=1)
    for dag_id in ("neuroflow_encoding", "neuroflow_maps_consumer", "neuroflow_watch"):
        api.patch(f"/dags/{dag_id}", {"is_paused": False})
    t_up = time.monotonic() - t0

    # 1. a bad conf is refused before a run starts
    bad = json.loads(json.dumps(config))
    bad["model"]["alphass"] = [1]
    r = api.post("/dags/neuroflow_encoding/dagRuns", {"logical_date": None, "conf": {"config": bad}})
    assert r.status_code == 400, r.text
    assert api.runs("neuroflow_encoding") == {}

    # 2. trigger through the REST API with a conf, wait, read the manifest from S3
    run1 = _trigger(api, "neuroflow_encoding", {"config": config})
    _run_done(api, services, "neuroflow_encoding", run1)
    cfg = parse_config(config)
    manifest_uri = f"{cfg.publish_prefix}/manifest.json"
    manifest = read_manifest(manifest_uri)
    assert manifest["status"] == "complete" and manifest["subjects"] == ["18"]
    assert manifest["provenance"]["airflow_run_id"] == run1
    fit = api.xcom("neuroflow_encoding", run1, "fit_subject", 0)
    assert fit["reused"] is False
    tis = api.get(f"/dags/neuroflow_encoding/dagRuns/{run1}/taskInstances")["task_instances"]
    assert {t["rendered_map_index"] for t in tis if t["task_id"] == "fit_subject"} == {"sub-18"}
    assert {t["pool"] for t in tis if t["task_id"] in ("fit_subject", "extract_features")} == {"gpu"}
    # the publish task emitted the results Assets' events: all published maps, and this dataset's
    events = api.get("/assets/events", source_run_id=run1, limit=100)["asset_events"]
    by_uri = {e["uri"].rstrip("/"): e["extra"] for e in events}
    assert by_uri["neuroflow://published-maps"]["manifest_uri"] == manifest_uri
    assert by_uri[f"{results_bucket}/ds002322"]["manifest_uri"] == manifest_uri
    t_run1 = time.monotonic() - t0

    # 3. the consumer DAG runs on the Asset event and indexes the analysis
    _consumer_runs_done(api, services, 1)
    store = ResultStore(results_bucket)
    index = json.loads(store.get_bytes("index.json"))
    assert [a["manifest"] for a in index["analyses"]] == [manifest_uri[len(results_bucket) + 1:]]
    assert b"report.html" in store.get_bytes("index.html")

    # 4. the watcher's first look at the dataset triggers the same analysis: nothing recomputed
    before = store.get_bytes(manifest_uri[len(results_bucket) + 1:])
    watch1 = _trigger(api, "neuroflow_watch")
    _run_done(api, services, "neuroflow_watch", watch1)
    triggered = [r for r in api.runs("neuroflow_encoding") if r.startswith("watch__")]
    assert len(triggered) == 1 and "1.0.4" in triggered[0], triggered
    _run_done(api, services, "neuroflow_encoding", triggered[0])
    assert [api.xcom("neuroflow_encoding", triggered[0], "extract_features", i)["computed"] for i in (0, 1)] \
        == [False, False]
    assert api.xcom("neuroflow_encoding", triggered[0], "fit_subject", 0)["reused"] is True
    assert store.get_bytes(manifest_uri[len(results_bucket) + 1:]) == before
    t_watch1 = time.monotonic() - t0

    # 5. bump the dataset's version in S3: the watcher triggers exactly one run for it
    src = s3_client("e2e-sources")
    changes = src.get_object(Bucket="e2e-sources", Key="ds002322/CHANGES")["Body"].read()
    src.put_object(Bucket="e2e-sources", Key="ds002322/CHANGES",
                   Body=b"1.0.5 2026-01-02\n  - e2e test: a new snapshot\n" + changes)
    watch2 = _trigger(api, "neuroflow_watch")
    _run_done(api, services, "neuroflow_watch", watch2)
    new = [r for r in api.runs("neuroflow_encoding") if r.startswith("watch__") and r not in triggered]
    assert len(new) == 1 and "__1.0.5__" in new[0], new
    conf = api.get(f"/dags/neuroflow_encoding/dagRuns/{new[0]}")["conf"]
    assert conf["config"]["dataset"]["version"] == "1.0.5"
    watch3 = _trigger(api, "neuroflow_watch")
    _run_done(api, services, "neuroflow_watch", watch3)
    assert len([r for r in api.runs("neuroflow_encoding") if r.startswith("watch__")]) == 2  # never twice
    _run_done(api, services, "neuroflow_encoding", new[0])
    new_cfg = parse_config({**config, "dataset": {**config["dataset"], "version": "1.0.5"}})
    assert read_manifest(f"{new_cfg.publish_prefix}/manifest.json")["dataset"]["version"] == "1.0.5"
    state = json.loads(store.get_bytes("_state/watch/ds002322.json"))
    assert [(s["version"], s["status"]) for s in state["seen"]] == [("1.0.4", "triggered"), ("1.0.5", "triggered")]

    # the consumer ran on each publish (events may be coalesced): the index lists both analyses
    def indexed_both():
        runs = api.runs("neuroflow_maps_consumer").values()
        assert not [r for r in runs if r["state"] == "failed"], runs
        return len(json.loads(store.get_bytes("index.json"))["analyses"]) == 2 and all(
            r["state"] == "success" for r in runs)

    _wait("the index to list both analyses", indexed_both, services, timeout=120)
    print(f"\ne2e timings: services up {t_up:.0f} s, first run done {t_run1:.0f} s, "
          f"watch re-run done {t_watch1:.0f} s, total {time.monotonic() - t0:.0f} s")
