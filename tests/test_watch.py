"""The watcher's decisions: version and inputs read from the source, one trigger per snapshot."""
from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from pipelines.config import AnalysisConfig, parse_config
from pipelines.errors import ConfigError, DatasetError
from pipelines.s3 import s3_client
from pipelines.resultstore import ResultStore
from pipelines.watch import (WatchState, confirm, load_watchlist, plan_all, plan_entry, read_snapshot,
                             template_config)

from .conftest import REPO, demo_config, make_bucket

pytestmark = pytest.mark.integration

CHANGES = "1.0.4 2020-06-22\n  - updated audio\n1.0.3 2020-02-24\n  - funding\n"
DOI = "10.18112/openneuro.ds002322.v1.0.4"


@pytest.fixture
def source(s3_url, request) -> str:
    """A tiny BIDS-like dataset in its own bucket, which the test may change."""
    import re

    bucket = "src-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    make_bucket(bucket)
    files = {
        "dataset_description.json": json.dumps({"Name": "x", "BIDSVersion": "1.9.0", "DatasetDOI": DOI}),
        "CHANGES": CHANGES,
        "stimuli/story.TextGrid": "words",
        "sub-18/func/sub-18_task-alice_bold.json": '{"RepetitionTime": 2}',
        "sub-99/func/sub-99_task-alice_bold.json": '{"RepetitionTime": 2}',
    }
    for key, body in files.items():
        put(f"s3://{bucket}/ds002322", key, body)
    return f"s3://{bucket}/ds002322"


def put(source: str, key: str, body: str) -> None:
    bucket, _, prefix = source[5:].partition("/")
    s3_client(bucket).put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body.encode())


def entry_for(source: str, output: str, **overrides):
    config = demo_config(Path("/models/tiny-bert"), output, subjects=("18",))
    config["dataset"]["source"] = source
    return load_watchlist(json.dumps({"datasets": [{"source": source, "config": config, **overrides}]}))[0]


# --- the watch list -------------------------------------------------------------------

def test_the_repository_watch_list_points_at_the_demo_config():
    entries = load_watchlist(REPO / "dags" / "watched_datasets.yaml")
    assert [(e.source, e.config, e.state_name) for e in entries] == [
        ("s3://openneuro.org/ds002322", "configs/demo.yaml", "ds002322")]
    data = template_config(entries[0])
    assert data["name"] == "alice-demo" and data["dataset"]["source"] == "s3://openneuro.org/ds002322"
    assert "MODEL_DIR" not in json.dumps(data)  # the demo's placeholder resolves to the packaged MiniLM
    parse_config(data)


def test_set_overrides_apply_to_the_template(tmp_path):
    entries = load_watchlist(json.dumps({"datasets": [{"source": "s3://openneuro.org/ds002322",
                                                       "config": "configs/demo.yaml",
                                                       "set": {"output": "s3://lab-results/neuro",
                                                               "features.1.layer": 2}}]}), base_dir=REPO / "dags")
    data = template_config(entries[0])
    assert data["output"] == "s3://lab-results/neuro" and data["features"][1]["layer"] == 2


@pytest.mark.parametrize("text, match", [
    ('{"datasets": [{"source": "s3://a/ds1", "config": "c.yaml", "confg": 1}]}', "unknown key.*confg"),
    ('{"datasets": [{"config": "c.yaml"}]}', "no 'source'"),
    ('{"datasets": [{"source": "s3://a/ds1", "config": "c.yaml"}, {"source": "s3://b/ds1", "config": "c.yaml"}]}',
     "share the name"),
    ('{"datasets": {"source": "s3://a/ds1"}}', "must be a list"),
    ('{"datasets": [{"source": "s3://a/ds1", "config": "c.yaml", "name": "../x"}]}', "name"),
])
def test_a_bad_watch_list_is_refused_with_a_message(text, match):
    with pytest.raises(ConfigError, match=match):
        load_watchlist(text)


# --- what the source holds -----------------------------------------------------------

def test_the_version_comes_from_changes_then_the_doi(source):
    assert read_snapshot(source).version == "1.0.4"
    put(source, "CHANGES", "v1.1.0 2026-01-01\n - new\n" + CHANGES)
    assert read_snapshot(source).version == "1.1.0"
    bucket, _, prefix = source[5:].partition("/")
    s3_client(bucket).delete_object(Bucket=bucket, Key=f"{prefix}/CHANGES")
    assert read_snapshot(source).version == "1.0.4"  # DatasetDOI ...v1.0.4


def test_a_local_folder_is_watched_too(tmp_path):
    root = tmp_path / "ds1"
    (root / "sub-01").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x"}))
    (root / "CHANGES").write_text("2.0.0 2026-01-01\n")
    (root / "sub-01" / "a.tsv").write_text("1")
    snap = read_snapshot(str(root), ["01"])
    assert snap.version == "2.0.0" and snap.n_files == 3


def test_the_fingerprint_follows_the_subjects_inputs_only(source):
    before = read_snapshot(source, ["18"])
    put(source, "sub-99/func/sub-99_task-alice_bold.json", '{"RepetitionTime": 3}')
    assert read_snapshot(source, ["18"]).fingerprint == before.fingerprint  # another subject's file
    put(source, "sub-18/func/sub-18_task-alice_bold.json", '{"RepetitionTime": 3}')
    assert read_snapshot(source, ["18"]).fingerprint != before.fingerprint
    put(source, "stimuli/story.TextGrid", "other words")
    assert read_snapshot(source, ["18"]).fingerprint != before.fingerprint


# --- deciding and recording -------------------------------------------------------------

def test_first_look_triggers_then_nothing_until_a_new_version(source, results_bucket):
    entry = entry_for(source, results_bucket)
    plan = plan_entry(entry)
    assert plan is not None and plan["version"] == "1.0.4" and plan["reason"].startswith("first look")
    assert plan["run_id"].startswith("watch__ds002322__1.0.4__")
    # the conf passes the encoding DAG's Param schema and pins the version found
    import jsonschema

    jsonschema.validate(plan["conf"]["config"], AnalysisConfig.model_json_schema())
    assert plan["conf"]["config"]["dataset"] == {**plan["conf"]["config"]["dataset"], "source": source,
                                                 "version": "1.0.4"}
    assert confirm(plan) is True
    assert plan_entry(entry) is None
    assert plan_entry(entry) is None

    put(source, "CHANGES", "1.0.5 2026-01-02\n  - new snapshot\n" + CHANGES)
    new = plan_entry(entry)
    assert new is not None and new["version"] == "1.0.5" and "1.0.4 -> 1.0.5" in new["reason"]
    assert new["conf"]["config"]["dataset"]["version"] == "1.0.5" and new["run_id"] != plan["run_id"]
    confirm(new)
    assert plan_entry(entry) is None
    state = json.loads(ResultStore(results_bucket).get_bytes("_state/watch/ds002322.json"))
    assert [(s["version"], s["status"]) for s in state["seen"]] == [("1.0.4", "triggered"), ("1.0.5", "triggered")]


def test_changed_inputs_within_a_version_trigger_again(source, results_bucket):
    entry = entry_for(source, results_bucket)
    confirm(plan_entry(entry))
    put(source, "sub-99/func/sub-99_task-alice_bold.json", "{}")
    assert plan_entry(entry) is None  # not an input of this analysis
    put(source, "sub-18/func/sub-18_task-alice_bold.json", '{"RepetitionTime": 2.0}')
    again = plan_entry(entry)
    assert again is not None and again["reason"] == "inputs changed within version 1.0.4"


def test_a_changed_analysis_config_triggers_again(source, results_bucket):
    confirm(plan_entry(entry_for(source, results_bucket)))
    changed = plan_entry(entry_for(source, results_bucket, set={"features.1.layer": 1}))
    assert changed is not None and changed["reason"].startswith("analysis changed")


def test_two_watchers_racing_trigger_once(source, results_bucket):
    entry = entry_for(source, results_bucket)
    barrier = threading.Barrier(4)
    results, errors = [], []

    def watcher(i):
        try:
            barrier.wait()
            results.append(plan_entry(entry, watcher=f"w{i}"))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=watcher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len([r for r in results if r is not None]) == 1


def test_the_loser_of_a_conditional_write_reads_again_and_backs_off(source, results_bucket, monkeypatch):
    """Both watchers read 'nothing seen'; the second one's write is refused by the server."""
    entry = entry_for(source, results_bucket)
    real_read = WatchState.read
    first = plan_entry(entry, watcher="a")
    assert first is not None
    stale = {"n": 0}

    def read_stale_once(self):
        stale["n"] += 1
        return ({"schema_version": 1, "seen": []}, None) if stale["n"] == 1 else real_read(self)

    monkeypatch.setattr(WatchState, "read", read_stale_once)
    assert plan_entry(entry, watcher="b") is None
    assert stale["n"] == 2  # refused (If-None-Match), read again, saw the claim
    state = json.loads(ResultStore(results_bucket).get_bytes("_state/watch/ds002322.json"))
    assert [s["watcher"] for s in state["seen"]] == ["a"]


def test_an_unconfirmed_claim_is_retried_with_the_same_run_id_once_stale(source, results_bucket):
    entry = entry_for(source, results_bucket)
    plan = plan_entry(entry)  # the watcher died before triggering: never confirmed
    assert plan_entry(entry) is None  # another watcher may still be on it
    from pipelines.watch import _now

    later = _now() + timedelta(hours=2)
    again = plan_entry(entry, now=later)
    assert again is not None and again["run_id"] == plan["run_id"] and "never confirmed" in again["reason"]
    confirm(again)
    assert plan_entry(entry, now=later + timedelta(hours=5)) is None


def test_one_unreachable_dataset_does_not_hide_the_others(source, results_bucket):
    good = entry_for(source, results_bucket)
    bad = entry_for("s3://no-such-bucket-here/ds000001", results_bucket)
    out = plan_all([bad, good])
    assert [p["name"] for p in out["plans"]] == ["ds002322"]
    assert [e["name"] for e in out["errors"]] == ["ds000001"] and "bucket" in out["errors"][0]["error"]


def test_an_unreadable_state_is_an_error_naming_it(source, results_bucket):
    ResultStore(results_bucket).put_bytes(b"not json", "_state/watch/ds002322.json")
    with pytest.raises(DatasetError, match="_state/watch/ds002322.json.*delete it"):
        plan_entry(entry_for(source, results_bucket))
