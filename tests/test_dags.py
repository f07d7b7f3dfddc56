"""The DAG files: they parse cleanly and light, carry the promised settings, and run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, demo_config

DAG_IDS = {"neuroflow_encoding", "neuroflow_watch", "neuroflow_maps_consumer"}


@pytest.fixture(scope="session")
def airflow_db():
    """`airflow db migrate` on the test's SQLite home (what `dag.test()` needs)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the pool neuroflow_encoding's GPU-bound tasks run in (as on a real deployment)
    subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "gpu", "1", "GPU-bound tasks"], check=True,
                   env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return os.environ["AIRFLOW_HOME"]


@pytest.fixture(scope="session")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def test_dagbag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert DAG_IDS <= set(dagbag.dags)


def test_every_dag_has_tags_retries_timeouts_and_no_catchup(dagbag):
    for dag_id in DAG_IDS:
        dag = dagbag.dags[dag_id]
        assert dag.tags and "neuroflow" in dag.tags
        assert dag.catchup is False
        for t in dag.tasks:
            assert t.retries >= 1, t.task_id
            assert t.execution_timeout is not None, t.task_id


def test_parsing_dags_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag({str(REPO / 'dags')!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "heavy = [m for m in ('torch', 'transformers', 'himalaya', 'dask', 'distributed', 'nilearn', "
        "'nibabel', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY="))
    assert line == "HEAVY=", f"parsing dags/ imported {line[6:]}"


def test_a_bad_trigger_conf_is_refused_before_a_run(dagbag, tiny_bert_dir):
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.dags["neuroflow_encoding"]
    good = demo_config(tiny_bert_dir, "s3://x")
    params = ParamsDict(dag.params)
    params["config"] = good
    params.validate()  # the real config passes the schema
    bad = json.loads(json.dumps(good))
    bad["model"]["alphass"] = [1]
    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match="alphass|Additional properties"):
        params["config"] = bad
        params.validate()


@pytest.mark.integration
@pytest.mark.reliability
def test_a_trigger_conf_with_extra_keys_fails_before_any_work(airflow_db, dagbag, tiny_bert_dir, results_bucket,
                                                              ledger):
    from airflow.utils.state import DagRunState

    from pipelines.resultstore import ResultStore

    with ledger.bad_input("trigger conf with an extra top-level key"):
        config = demo_config(tiny_bert_dir, results_bucket, subjects=("18",))
        run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config, "outptu": "s3://elsewhere"})
        assert run.state == DagRunState.FAILED
        states = {ti.task_id: ti.state for ti in run.get_task_instances()}
        assert states["prepare"] == "failed" and states.get("publish") != "success"
        assert list(ResultStore(results_bucket).list()) == []  # nothing computed, nothing published


@pytest.mark.slow
@pytest.mark.integration
def test_dag_test_runs_the_analysis_and_publishes(airflow_db, dagbag, openneuro_demo, tiny_bert_dir,
                                                  results_bucket, tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState

    from pipelines.config import parse_config
    from pipelines.consume import read_manifest

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    config = demo_config(tiny_bert_dir, results_bucket)
    dag = dagbag.dags["neuroflow_encoding"]
    run = dag.test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    cfg = parse_config(config)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["status"] == "complete" and manifest["subjects"] == ["18", "sim01"]
    assert manifest["provenance"]["airflow_run_id"] == run.run_id


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.reliability
def test_one_bad_subject_publishes_the_others_and_fails_the_run(airflow_db, dagbag, demo_tree, tiny_bert_dir,
                                                                results_bucket, tmp_path, monkeypatch, ledger):
    from airflow.utils.state import DagRunState

    from pipelines.config import parse_config
    from pipelines.consume import read_manifest

    from .conftest import source_with_a_truncated_subject

    with ledger.fault("one bad subject among good ones (Airflow)"):
        monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
        source = source_with_a_truncated_subject(demo_tree, tmp_path, "dag-bad-subject-src")
        config = demo_config(tiny_bert_dir, results_bucket, subjects=("22", "23"))
        config["dataset"]["source"] = source
        run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config})
        assert run.state == DagRunState.FAILED  # the run state says a subject failed
        states = {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}
        assert states[("fit_subject", 0)] == "success" and states[("fit_subject", 1)] == "failed"
        assert states[("publish", -1)] == "success" and states[("check_complete", -1)] == "failed"
        manifest = read_manifest(f"{parse_config(config).publish_prefix}/manifest.json")
        assert manifest["status"] == "partial" and manifest["subjects"] == ["22", "23"]
        assert manifest["subject_info"]["22"]["status"] == "ok" and "22" in manifest["metrics"]
        bad = manifest["subject_info"]["23"]
        assert bad["status"] == "failed" and "sub-23" in bad["error"] and "samples" in bad["error"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.reliability
def test_s3_credentials_come_from_a_connection_and_its_secret_stays_out_of_logs(
        airflow_db, dagbag, openneuro_demo, tiny_bert_dir, results_bucket, tmp_path, monkeypatch, capfd, caplog,
        ledger):
    import logging
    import secrets
    from pathlib import Path

    from airflow.sdk.log import redact
    from airflow.utils.state import DagRunState

    with ledger.fault("S3 secret from an Airflow connection kept out of task logs"):
        secret = "nf-" + secrets.token_hex(16)
        monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("AIRFLOW_CONN_NEUROFLOW_S3", json.dumps({
            "conn_type": "aws", "login": "neuroflow-ci-key", "password": secret,
            "extra": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}))
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(name)  # nothing but the connection says where S3 is and who we are
        monkeypatch.setenv("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        capfd.readouterr()
        caplog.set_level(logging.INFO)
        run = dagbag.dags["neuroflow_encoding"].test(
            run_conf={"config": demo_config(tiny_bert_dir, results_bucket, subjects=("18",))})
        assert run.state == DagRunState.SUCCESS
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the tasks took the connection's credentials
        out = capfd.readouterr()
        logs = "".join(p.read_text(errors="replace") for p in Path(os.environ["AIRFLOW_HOME"]).rglob("*.log"))
        everything = out.out + out.err + logs + caplog.text
        assert "neuroflow-ci-key" in everything  # the task logs were captured
        assert secret not in everything
        assert secret not in str(redact(f"aws_secret_access_key={secret}"))  # masked wherever it is logged


# --- schedules, pools, assets ------------------------------------------------------------

def test_schedules_watch_on_a_timetable_and_the_consumer_on_the_results_asset(dagbag):
    encoding, watch, consumer = (dagbag.dags[d] for d in ("neuroflow_encoding", "neuroflow_watch",
                                                          "neuroflow_maps_consumer"))
    assert encoding.timetable.__class__.__name__ == "NullTimetable"  # triggered by hand, CLI, API or the watcher
    assert watch.timetable.__class__.__name__ == "CronTriggerTimetable"
    assert watch.max_active_runs == 1
    published = [o for o in encoding.task_dict["publish"].outlets
                 if getattr(o, "name", "") == "neuroflow_published_maps"]
    assert len(published) == 1
    assert [a.name for a in consumer.timetable.asset_condition.objects] == ["neuroflow_published_maps"]
    assert [a.uri for a in consumer.timetable.asset_condition.objects] == [published[0].uri]
    aliases = [o.name for o in encoding.task_dict["publish"].outlets if o.__class__.__name__ == "AssetAlias"]
    assert aliases == ["neuroflow_results"]  # resolved at run time to the dataset's Asset {output}/{dataset}


def test_gpu_bound_tasks_queue_on_the_gpu_pool(dagbag):
    dag = dagbag.dags["neuroflow_encoding"]
    pools = {t.task_id: t.pool for t in dag.tasks}
    assert pools["extract_features"] == pools["fit_subject"] == pools["fit_layer"] == "gpu"
    gpu = ("extract_features", "fit_subject", "fit_layer")
    assert {p for t, p in pools.items() if t not in gpu} == {"default_pool"}


def test_mapped_tasks_have_readable_map_indexes(dagbag):
    dag = dagbag.dags["neuroflow_encoding"]
    assert dag.task_dict["fit_subject"].map_index_template == "sub-{{ subject_label }}"
    assert dag.task_dict["extract_features"].map_index_template == "{{ feature_label }}"
    assert dag.task_dict["fit_layer"].map_index_template == "sub-{{ unit_label }}"


# --- dag.test(): the watcher and the consumer ------------------------------------------

def _xcoms(run, task_id: str) -> dict[int, object]:
    """{map_index: return value} of one task of a finished run."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids=task_id,
                                                  key="return_value")).all()
        return {r.map_index: XComModel.deserialize_value(r) for r in rows}


def _encoding_runs(prefix: str) -> dict[str, dict]:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.scalars(select(DagRun).where(DagRun.dag_id == "neuroflow_encoding",
                                                    DagRun.run_id.like(f"{prefix}%"))).all()
        return {r.run_id: r.conf for r in runs}


def _asset_events(uri: str) -> list[dict]:
    """The extras of every event on the Asset at `uri`."""
    from sqlalchemy import select

    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                               .where(AssetModel.uri.in_([uri, uri + "/"]))).all()
        return [dict(r.extra or {}) for r in rows]


@pytest.fixture
def watched_source(s3_url, request) -> str:
    """A small dataset of its own (CHANGES says 1.0.4) that the test may bump."""
    from .conftest import make_bucket
    from pipelines.s3 import s3_client

    bucket = "watched-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    make_bucket(bucket)
    client = s3_client(bucket)
    for key, body in {"dataset_description.json": '{"Name": "x", "BIDSVersion": "1.9.0"}',
                      "CHANGES": "1.0.4 2020-06-22\n", "sub-18/func/sub-18_task-alice_bold.json": "{}"}.items():
        client.put_object(Bucket=bucket, Key=f"ds002322/{key}", Body=body.encode())
    return f"s3://{bucket}/ds002322"


@pytest.mark.integration
def test_dag_test_watch_triggers_encoding_once_per_snapshot(airflow_db, dagbag, watched_source, tiny_bert_dir,
                                                            results_bucket, monkeypatch):
    from airflow.utils.state import DagRunState

    from pipelines.s3 import s3_client

    config = demo_config(tiny_bert_dir, results_bucket, subjects=("18",))
    monkeypatch.setenv("AIRFLOW_VAR_NEUROFLOW_WATCHLIST", json.dumps(
        {"datasets": [{"source": watched_source, "config": config}]}))
    dag = dagbag.dags["neuroflow_watch"]
    prefix = "watch__ds002322__"
    assert dag.test().state == DagRunState.SUCCESS
    first = {k: v for k, v in _encoding_runs(prefix).items()
             if v["config"]["dataset"]["source"] == watched_source}
    assert len(first) == 1
    (run_id, conf), = first.items()
    assert "__1.0.4__" in run_id and conf["config"]["dataset"]["version"] == "1.0.4"
    assert conf["config"]["output"] == results_bucket

    assert dag.test().state == DagRunState.SUCCESS  # nothing new: nothing triggered
    assert {k for k, v in _encoding_runs(prefix).items() if v["config"]["dataset"]["source"] == watched_source} \
        == {run_id}

    bucket, _, key = watched_source[5:].partition("/")
    s3_client(bucket).put_object(Bucket=bucket, Key=f"{key}/CHANGES", Body=b"1.0.5 2026-01-02\n1.0.4 2020-06-22\n")
    run = dag.test()
    assert run.state == DagRunState.SUCCESS
    now = {k: v for k, v in _encoding_runs(prefix).items() if v["config"]["dataset"]["source"] == watched_source}
    assert len(now) == 2 and any("__1.0.5__" in k for k in now)
    new_run_id = next(k for k in now if "__1.0.5__" in k)
    assert _xcoms(run, "record")[-1]["triggered"] == [new_run_id]
    assert _rendered_map_indexes(run, "trigger_encoding") == [new_run_id]  # readable: the run it triggered


def _rendered_map_indexes(run, task_id: str) -> list[str]:
    from sqlalchemy import select

    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == run.dag_id,
                                                         TaskInstance.run_id == run.run_id,
                                                         TaskInstance.task_id == task_id)).all()
        return sorted(t.rendered_map_index for t in tis)


@pytest.mark.integration
def test_dag_test_watch_fails_visibly_when_a_dataset_cannot_be_read(airflow_db, dagbag, tiny_bert_dir,
                                                                     results_bucket, monkeypatch):
    from airflow.utils.state import DagRunState

    config = demo_config(tiny_bert_dir, results_bucket, subjects=("18",))
    monkeypatch.setenv("AIRFLOW_VAR_NEUROFLOW_WATCHLIST", json.dumps(
        {"datasets": [{"source": "s3://no-such-bucket-at-all/ds000001", "config": config}]}))
    assert dagbag.dags["neuroflow_watch"].test().state == DagRunState.FAILED


@pytest.mark.integration
def test_dag_test_consumer_writes_the_gallery(airflow_db, dagbag, results_bucket):
    from airflow.utils.state import DagRunState

    from pipelines.resultstore import ResultStore

    from .test_gallery import manifest, publish_fake

    rel = publish_fake(results_bucket, manifest())
    run = dagbag.dags["neuroflow_maps_consumer"].test(run_conf={"output": results_bucket})
    assert run.state == DagRunState.SUCCESS
    assert _rendered_map_indexes(run, "update_gallery") == [results_bucket]
    store = ResultStore(results_bucket)
    index = json.loads(store.get_bytes("index.json"))
    assert [a["manifest"] for a in index["analyses"]] == [rel]
    assert rel.replace("manifest.json", "report.html") in store.get_bytes("index.html").decode()


# --- incremental reprocessing, counted --------------------------------------------------

def _recomputed(run) -> list[str]:
    """The stages a run actually computed: features per space, fits per (subject, space)."""
    out = [f"features:{v['feature']}" for v in _xcoms(run, "extract_features").values() if v["computed"]]
    for unit in _xcoms(run, "fit_layer").values():  # the layers of a sweep, each its own task
        if unit["computed"]:
            out.append(f"fit:sub-{unit['subject']}:{unit['feature']}_{unit['space']}")
    for fit in _xcoms(run, "fit_subject").values():
        # `computed_features` (per feature space) when fit_subject reports it, else all or nothing
        done = fit.get("computed_features", [] if fit["reused"] else sorted(fit["metrics"]))
        out += [f"fit:sub-{fit['subject']}:{f}" for f in done]
    return sorted(out)


@pytest.mark.slow
@pytest.mark.integration
def test_retriggering_recomputes_nothing_and_a_layer_change_only_its_feature_space(
        airflow_db, dagbag, openneuro_demo, tiny_bert_dir, results_bucket, tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState

    from pipelines.config import parse_config
    from pipelines.resultstore import ResultStore

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    dag = dagbag.dags["neuroflow_encoding"]
    store = ResultStore(results_bucket)
    config = demo_config(tiny_bert_dir, results_bucket, subjects=("18",))
    manifest_rel = parse_config(config).publish_prefix[len(results_bucket) + 1:] + "/manifest.json"
    lm = config["features"][1]["name"]

    first = dag.test(run_conf={"config": config})
    assert first.state == DagRunState.SUCCESS
    assert _recomputed(first) == sorted(["features:wordrate", f"features:{lm}", "fit:sub-18:wordrate",
                                         f"fit:sub-18:{lm}"])
    manifest = store.get_bytes(manifest_rel)
    # the publish task emitted an event on the dataset's results Asset, with the manifest URI
    events = _asset_events(f"{results_bucket}/ds002322")
    assert [e["manifest_uri"] for e in events] == [f"{results_bucket}/{manifest_rel}"]

    again = dag.test(run_conf={"config": config})  # the same analysis, re-triggered
    assert again.state == DagRunState.SUCCESS
    assert _recomputed(again) == []
    assert store.get_bytes(manifest_rel) == manifest  # identical, byte for byte

    config["features"][1]["layer"] = 1  # one feature space's layer changes
    changed = dag.test(run_conf={"config": config})
    assert changed.state == DagRunState.SUCCESS
    recomputed = _recomputed(changed)
    assert [s for s in recomputed if s.startswith("features:")] == [f"features:{lm}"]
    fits = [s for s in recomputed if s.startswith("fit:")]
    assert fits == [f"fit:sub-18:{lm}"]


@pytest.mark.slow
@pytest.mark.integration
def test_the_cli_and_the_dag_run_the_same_steps_to_the_same_manifest(airflow_db, dagbag, demo_tree, tiny_bert_dir,
                                                                     results_bucket, tmp_path, monkeypatch):
    """One dataset with a good and a bad subject, through the DAG and through `run_analysis` (what
    `neuroflow run` calls): the same failure policy gives the same partial manifest."""
    from airflow.utils.state import DagRunState

    from pipelines.config import parse_config
    from pipelines.consume import read_manifest
    from pipelines.resultstore import ResultStore
    from pipelines.run import run_analysis

    from .conftest import source_with_a_truncated_subject

    source = source_with_a_truncated_subject(demo_tree, tmp_path, "same-steps-src")
    config = demo_config(tiny_bert_dir, results_bucket, subjects=("22", "23"))
    config["dataset"]["source"] = source
    cfg = parse_config(config)
    uri = f"{cfg.publish_prefix}/manifest.json"

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "dag-cache"))
    run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config})
    assert run.state == DagRunState.FAILED  # check_complete: a subject failed
    from_dag = read_manifest(uri)

    store = ResultStore(results_bucket)
    for obj in store.list():  # a clean start for the command line's run
        store.client.delete_object(Bucket=store.bucket, Key=obj.key)
    result = run_analysis(cfg, cache_dir=tmp_path / "cli-cache")
    from_cli = read_manifest(uri)

    def comparable(manifest: dict) -> dict:
        m = json.loads(json.dumps(manifest))
        for key in ("started", "finished", "airflow_run_id"):
            m["provenance"].pop(key)
        return m

    assert result["status"] == "partial" and from_dag["status"] == "partial"
    assert from_dag["subject_info"]["23"]["status"] == "failed" and "samples" in from_dag["subject_info"]["23"]["error"]
    assert comparable(from_cli) == comparable(from_dag)


@pytest.mark.slow
@pytest.mark.integration
def test_a_layer_sweep_fits_each_layer_in_its_own_task(airflow_db, dagbag, openneuro_demo, tiny_bert_dir,
                                                       results_bucket, tmp_path, monkeypatch):
    """Issue 17: one mapped fit_layer task per (subject, layer); fit_subject then only assembles, and
    the published scores equal those of `run_analysis`, which fits the layers inside fit_subject."""
    from airflow.utils.state import DagRunState

    from pipelines.config import parse_config
    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    config = demo_config(tiny_bert_dir, results_bucket, subjects=("18", "sim01"))
    config["features"][1]["layer"] = "all"
    lm = config["features"][1]["name"]
    run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    units = _xcoms(run, "fit_layer")
    n_spaces = len(next(v for v in _xcoms(run, "extract_features").values() if v["feature"] == lm)["spaces"])
    assert n_spaces > 2 and len(units) == 2 * n_spaces  # every subject x every layer
    assert all(u["computed"] and u["error"] is None for u in units.values())
    for fit in _xcoms(run, "fit_subject").values():  # the sweep's layers were fitted already
        assert not [f for f in fit["computed_features"] if f.startswith(f"{lm}_")]
        assert fit["computed_features"] == ["wordrate"]
    manifest = read_manifest(f"{parse_config(config).publish_prefix}/manifest.json")
    assert manifest["status"] == "complete"

    # the same analysis through run_analysis, into another bucket: the same scores
    other = f"{results_bucket}-cli"
    from .conftest import make_bucket

    make_bucket(other.removeprefix("s3://"))
    config["output"] = other
    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cli-cache"))
    run_analysis(parse_config(config))
    cli = read_manifest(f"{parse_config(config).publish_prefix}/manifest.json")
    assert set(manifest["metrics"]["18"]) == {"wordrate", *(f"{lm}_layer{k}" for k in range(n_spaces))}
    assert manifest["metrics"] == cli["metrics"]
