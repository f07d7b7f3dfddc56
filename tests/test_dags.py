"""The DAG files: they parse cleanly and light, carry the promised settings, and run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, demo_config

DAG_IDS = {"neuroflow_encoding"}


@pytest.fixture(scope="session")
def airflow_db():
    """`airflow db migrate` on the test's SQLite home (what `dag.test()` needs)."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
