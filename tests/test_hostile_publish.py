"""Publishing never destroys anything (issue 14 items 1, 6, 8 and 10a).

- ``--local-dir`` is never emptied: a folder holding anyone else's files is refused before any
  work, and an earlier local copy of the same analysis has only neuroflow's own files replaced;
- a re-run never downgrades a published result (complete -> partial, or a partial one losing
  subjects), from the command line or from Airflow, and never leaves a manifest whose listed
  artifacts were overwritten;
- two runs of one config at once both succeed; a kill before the gallery update is repaired;
- an ``output`` inside the dataset or inside another analysis' folder is refused at prepare.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import parse_config
from pipelines.errors import ConfigError, PublishConflictError
from pipelines.localdir import MARKER, check_local_dir, install
from pipelines.resultstore import ResultStore, copy_tree_to_s3

from .conftest import demo_config, make_bucket
from .hostile import Sandbox, assert_one_clear_error, run_cli
from .test_dags import airflow_db, dagbag  # noqa: F401 - the DAG fixtures

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

TRUNCATED_TSV = "derivatives/brennan2016roi/sub-23/func/sub-23_task-alice_desc-roi6mm_timeseries.tsv"


def objects(uri: str) -> dict[str, str]:
    """{key: ETag} of every object under `uri`."""
    return {o.key: o.etag for o in ResultStore(uri).list()}


def manifest_rel(cfg) -> str:
    return cfg.publish_prefix[len(cfg.output) + 1:] + "/manifest.json"


def artifacts_intact(cfg, manifest: dict) -> int:
    """How many artifacts the manifest lists whose stored bytes do not match its sha256 (lost)."""
    prefix = ResultStore(cfg.publish_prefix)
    bad = 0
    for art in manifest["artifacts"]:
        try:
            bad += hashlib.sha256(prefix.get_bytes(art["path"])).hexdigest() != art["sha256"]
        except Exception:  # noqa: BLE001 - a missing artifact is lost too
            bad += 1
    return bad


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# --- item 1: --local-dir is never emptied ---------------------------------------------

def _another_analysis(sandbox: Sandbox) -> Path:
    folder = sandbox.cwd / "old-output"
    folder.mkdir()
    (folder / "report.html").write_text("<p>another analysis</p>")
    (folder / MARKER).write_text(json.dumps({"marker_version": 1, "analysis_id": "other-0123456789ab",
                                             "files": {"report.html": "0" * 64}}))
    return folder


def _read_only(sandbox: Sandbox) -> Path:
    folder = sandbox.cwd / "readonly"
    folder.mkdir()
    (folder / "mine.txt").write_text("mine")
    folder.chmod(0o555)
    return folder


def _symlink_to_user_files(sandbox: Sandbox) -> Path:
    link = sandbox.cwd / "link"
    link.symlink_to(sandbox.home / "analysis", target_is_directory=True)
    return link


def _loop(sandbox: Sandbox) -> Path:
    link = sandbox.cwd / "loop"
    link.symlink_to(link)
    return link


def _one_file(sandbox: Sandbox) -> Path:
    folder = sandbox.cwd / "one"
    folder.mkdir()
    (folder / "results.csv").write_text("a,b\n1,2\n")
    return folder


LOCAL_DIRS = {
    # name: (how to make it in the sandbox -> the --local-dir argument, fragment of the error)
    "the working directory (.)": (lambda sb: ".", "is not empty"),
    "the user's home": (lambda sb: str(sb.home), "is not empty"),
    "~ (unexpanded)": (lambda sb: "~", "is not empty"),
    "a folder holding one file": (lambda sb: str(_one_file(sb)), "is not empty"),
    "a file instead of a folder": (lambda sb: "notes.txt", "is a file"),
    "a symlink to a folder of user files": (lambda sb: str(_symlink_to_user_files(sb)), "is not empty"),
    "a symlink loop": (lambda sb: str(_loop(sb)), "--local-dir"),
    "a parent of the cache": (lambda sb: str(sb.root), "holds it"),
    "the cache folder itself": (lambda sb: str(sb.cache), "is the cache folder"),
    "the filesystem root": (lambda sb: "/", "holds it"),
    "a previous run of another analysis": (lambda sb: str(_another_analysis(sb)), "another analysis (other-"),
    "a read-only folder of user files": (lambda sb: str(_read_only(sb)), "is not empty"),
}


@pytest.mark.parametrize("name", sorted(LOCAL_DIRS))
def test_a_local_dir_holding_other_files_is_refused_before_any_work(name, tiny_bert_dir, results_bucket, tmp_path,
                                                                    ledger):
    make_dir, fragment = LOCAL_DIRS[name]
    with ledger.bad_input(f"--local-dir: {name}") as scope:
        sandbox = Sandbox(tmp_path).seed()
        local = make_dir(sandbox)
        config = write_config(tmp_path / "c.yaml", demo_config(tiny_bert_dir, results_bucket, subjects=["22"]))
        try:
            proc = run_cli(scope, sandbox, "run", str(config), "--local-dir", local, timeout=120)
        finally:
            for path in tmp_path.rglob("*"):  # let pytest clean up the read-only folder
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
        line = assert_one_clear_error(proc, "--local-dir", fragment, "pass a new or empty folder")
        assert str(local) in line
        assert proc.touched == [], proc.touched
        assert objects(results_bucket) == {}  # refused before any work: nothing read, nothing written
        assert list(sandbox.cache.rglob("*")) == []


def test_a_local_dir_inside_or_holding_a_local_dataset_is_refused(demo_tree, tiny_bert_dir, results_bucket,
                                                                  tmp_path, ledger):
    with ledger.bad_input("--local-dir inside / holding the local dataset") as scope:
        sandbox = Sandbox(tmp_path).seed()
        dataset = tmp_path / "work" / "ds002322"
        shutil.copytree(demo_tree, dataset)
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        cfg["dataset"]["source"] = str(dataset)
        config = write_config(tmp_path / "c.yaml", cfg)
        before = sorted(str(p) for p in dataset.rglob("*"))
        for local in (str(dataset / "derivatives" / "out"), str(dataset), str(dataset.parent)):
            proc = run_cli(scope, sandbox, "run", str(config), "--local-dir", local, timeout=120)
            assert_one_clear_error(proc, "--local-dir", local, "dataset")
        assert sorted(str(p) for p in dataset.rglob("*")) == before
        assert proc.touched == [] and objects(results_bucket) == {}


def test_a_local_dir_is_accepted_new_empty_or_ours(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "empty").mkdir()
    assert check_local_dir(tmp_path / "new" / "deeper", "a-0123456789ab", cache_dir=cache) == \
        (tmp_path / "new" / "deeper").resolve()
    assert check_local_dir(tmp_path / "empty", "a-0123456789ab", cache_dir=cache)
    assert check_local_dir(cache / "published" / "a-0123456789ab", "a-0123456789ab", cache_dir=cache)
    with pytest.raises(ConfigError, match="cannot be created"):  # under a file
        (tmp_path / "file").write_text("x")
        check_local_dir(tmp_path / "file" / "sub", "a-0123456789ab", cache_dir=cache)


def _stage(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_reinstalling_our_own_copy_replaces_only_files_we_wrote(tmp_path, ledger):
    with ledger.bad_input("--local-dir: our earlier copy with the user's files added") as scope:
        cache, dest, aid = tmp_path / "cache", tmp_path / "out", "a-0123456789ab"
        cache.mkdir()
        first = _stage(tmp_path / "s1", {"report.html": "r1", "sub-1/map.tsv": "m1", "sub-2/map.tsv": "m2",
                                         "sub-3/map.tsv": "m3", "manifest.json": "{}"})
        install(first, ["report.html", "sub-1/map.tsv", "sub-2/map.tsv", "sub-3/map.tsv", "manifest.json"], dest,
                aid, cache_dir=cache)
        (dest / "my-notes.txt").write_text("the user's")  # the user adds a file to our folder
        (dest / "sub-2" / "map.tsv").write_text("edited by the user")  # and edits one of ours
        secret = tmp_path / "secret.txt"
        secret.write_text("never overwritten")
        (dest / "sub-3" / "map.tsv").unlink()
        (dest / "sub-3" / "map.tsv").symlink_to(secret)  # one of ours replaced by a link to a user file
        second = _stage(tmp_path / "s2", {"report.html": "r2", "sub-1/map.tsv": "m1b", "sub-3/map.tsv": "m3b",
                                          "manifest.json": "{}"})
        check_local_dir(dest, aid, cache_dir=cache)  # ours: accepted
        install(second, ["report.html", "sub-1/map.tsv", "sub-3/map.tsv", "manifest.json"], dest, aid,
                cache_dir=cache)
        assert (dest / "report.html").read_text() == "r2" and (dest / "sub-1/map.tsv").read_text() == "m1b"
        assert (dest / "my-notes.txt").read_text() == "the user's"
        assert (dest / "sub-2/map.tsv").read_text() == "edited by the user"  # dropped by us, changed: kept
        assert not (dest / "sub-3/map.tsv").is_symlink() and (dest / "sub-3/map.tsv").read_text() == "m3b"
        assert secret.read_text() == "never overwritten"
        marker = json.loads((dest / MARKER).read_text())
        assert marker["analysis_id"] == aid and sorted(marker["files"]) == [
            "manifest.json", "report.html", "sub-1/map.tsv", "sub-3/map.tsv"]
        # a third result without sub-1: our unchanged file goes, so the copy matches its manifest
        third = _stage(tmp_path / "s3", {"report.html": "r3", "manifest.json": "{}"})
        install(third, ["report.html", "manifest.json"], dest, aid, cache_dir=cache)
        assert not (dest / "sub-1/map.tsv").exists() and (dest / "my-notes.txt").exists()
        # a folder of ours swapped for a link to the user's folder is refused, the target untouched
        shutil.rmtree(dest / "sub-3")
        (dest / "sub-3").symlink_to(tmp_path / "s1" / "sub-1", target_is_directory=True)
        with pytest.raises(ConfigError, match="link or a file"):
            install(second, ["sub-3/map.tsv"], dest, aid, cache_dir=cache)
        assert sorted(p.name for p in (tmp_path / "s1" / "sub-1").iterdir()) == ["map.tsv"]
        with pytest.raises(ConfigError, match="another analysis"):
            check_local_dir(dest, "b-0123456789ab", cache_dir=cache)
        scope.touched = 0


# --- item 6: a published result is never downgraded -----------------------------------

@pytest.fixture
def two_subject_source(demo_tree, s3_url, request):
    """sub-22 and sub-23 of the demo in a source of their own; `break_sub23()` truncates one run."""
    import re

    bucket = "src-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    make_bucket(bucket)
    uri = f"s3://{bucket}/ds002322"
    copy_tree_to_s3(demo_tree, uri)

    class Source:
        source = uri

        @staticmethod
        def break_sub23() -> None:
            text = (demo_tree / TRUNCATED_TSV).read_text()
            store = ResultStore(uri)
            store.client.put_object(Bucket=store.bucket, Key=store.key(TRUNCATED_TSV),
                                    Body=("\n".join(text.splitlines()[:150]) + "\n").encode())

        @staticmethod
        def fix_sub23() -> None:
            store = ResultStore(uri)
            store.client.put_object(Bucket=store.bucket, Key=store.key(TRUNCATED_TSV),
                                    Body=(demo_tree / TRUNCATED_TSV).read_bytes())

    return Source


@pytest.fixture(scope="module")
def complete_then_broken(s3_url, demo_tree, tiny_bert_dir, tmp_path_factory):
    """A complete result of sub-22 and sub-23 published, then sub-23's run truncated in the source.

    Yields (config dict, parsed config, {key: ETag} of the published objects)."""
    from pipelines.run import run_analysis

    make_bucket("src-complete-then-broken")
    make_bucket("res-complete-then-broken")
    source = "s3://src-complete-then-broken/ds002322"
    copy_tree_to_s3(demo_tree, source)
    cfg = demo_config(tiny_bert_dir, "s3://res-complete-then-broken", subjects=["22", "23"])
    cfg["dataset"]["source"] = source
    analysis = parse_config(cfg)
    first = run_analysis(analysis, cache_dir=tmp_path_factory.mktemp("complete-cache"))
    assert first["status"] == "complete"
    prefix = manifest_rel(analysis).rsplit("/", 1)[0]
    published = {k: v for k, v in objects(cfg["output"]).items() if k.startswith(prefix)}
    assert len(published) > 5
    store = ResultStore(source)
    text = (demo_tree / TRUNCATED_TSV).read_text()
    store.client.put_object(Bucket=store.bucket, Key=store.key(TRUNCATED_TSV),
                            Body=("\n".join(text.splitlines()[:150]) + "\n").encode())
    return cfg, analysis, published


@pytest.mark.slow
def test_a_failed_rerun_leaves_a_complete_result_exactly_as_it_is(complete_then_broken, tmp_path, ledger):
    with ledger.fault("re-run with a bad subject after a complete result (CLI)") as scope:
        cfg, analysis, published = complete_then_broken
        config = write_config(tmp_path / "c.yaml", cfg)
        sandbox = Sandbox(tmp_path / "sb").seed()  # a fresh download cache: it sees the bad file
        again = run_cli(scope, sandbox, "run", str(config))
        line = assert_one_clear_error(again, "a complete result of this analysis is already published",
                                      "stands as it is", "sub-23", "nothing was uploaded")
        assert manifest_rel(analysis).rsplit("/", 1)[0] in line
        after = objects(cfg["output"])
        assert {k: after.get(k) for k in published} == published  # manifest and every artifact untouched
        manifest = json.loads(ResultStore(cfg["output"]).get_bytes(manifest_rel(analysis)))
        assert manifest["status"] == "complete"
        scope.lost = artifacts_intact(analysis, manifest)
        assert scope.lost == 0 and again.touched == []


@pytest.mark.slow
def test_a_partial_result_rerun_never_shows_a_manifest_with_overwritten_artifacts(
        two_subject_source, tiny_bert_dir, results_bucket, tmp_path, ledger):
    """Partial (sub-23 bad) -> the input is fixed -> a re-run is killed just before its manifest:
    the partial manifest still at the URI lists only artifacts whose bytes match it; the next
    re-run commits the complete result."""
    with ledger.fault("SIGKILL before the manifest of a re-run replacing a partial result") as scope:
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22", "23"])
        cfg["dataset"]["source"] = two_subject_source.source
        analysis = parse_config(cfg)
        config = write_config(tmp_path / "c.yaml", cfg)
        sandbox = Sandbox(tmp_path / "sb").seed()
        two_subject_source.break_sub23()
        partial = run_cli(scope, sandbox, "run", str(config))
        assert partial.returncode == 3, partial.stderr[-3000:]
        store = ResultStore(results_bucket)
        old = json.loads(store.get_bytes(manifest_rel(analysis)))
        assert old["status"] == "partial" and any(a["path"] == "report.html" for a in old["artifacts"])

        two_subject_source.fix_sub23()
        shutil.rmtree(sandbox.cache)
        sandbox.cache.mkdir()
        killed = run_cli(scope, sandbox, "run", str(config), env={"NEUROFLOW_FAILPOINTS": "publish.commit=1:kill"})
        assert killed.returncode == -signal.SIGKILL
        seen = json.loads(store.get_bytes(manifest_rel(analysis)))
        assert seen["status"] == "partial"
        assert artifacts_intact(analysis, seen) == 0  # what a reader sees between upload and commit
        assert "report.html" not in {a["path"] for a in seen["artifacts"]}  # it changed: withdrawn

        done = run_cli(scope, sandbox, "run", str(config))
        assert done.returncode == 0, done.stderr[-3000:]
        final = json.loads(store.get_bytes(manifest_rel(analysis)))
        assert final["status"] == "complete"
        scope.lost = artifacts_intact(analysis, final)
        assert scope.lost == 0


def _fake_manifest(cfg, status: str, subject_info: dict) -> dict:
    return {"schema_version": "1.0", "status": status,
            "dataset": {"id": cfg.dataset.dataset_id, "version": cfg.dataset.version, "source": cfg.dataset.source},
            "analysis_id": cfg.analysis_id, "config_hash": cfg.config_hash, "subjects": sorted(subject_info),
            "subject_info": subject_info, "feature_spaces": [{"name": "w", "kind": "word_rate"}], "metrics": {},
            "artifacts": [{"path": "report.html", "kind": "report_html", "sha256": "0" * 64, "bytes": 1}],
            "inputs": [], "provenance": {"neuroflow_version": "0", "libraries": {}, "backend": "numpy",
                                         "config_hash": cfg.config_hash, "started": "t", "finished": "t"}}


def test_a_partial_result_is_not_replaced_by_one_with_fewer_subjects(tiny_bert_dir, results_bucket, tmp_path,
                                                                     ledger):
    from pipelines.publish import _guard, publish

    with ledger.bad_input("re-run whose partial result lost a published subject"):
        cfg = parse_config(demo_config(tiny_bert_dir, results_bucket, subjects=["22", "23"]))
        store = ResultStore(results_bucket)
        body = json.dumps(_fake_manifest(cfg, "partial", {"22": {"status": "ok"},
                                                          "23": {"status": "failed", "error": "x"}})).encode()
        store.put_bytes(body, manifest_rel(cfg))
        worse = [{"subject": "22", "status": "failed", "error": "bad\nfile", "metrics": {}},
                 {"subject": "23", "status": "ok", "metrics": {}}]
        with pytest.raises(PublishConflictError, match=r"has subjects \['22'\] that this re-run failed"):
            publish(cfg, {}, [], worse, local_dir=tmp_path / "local", cache_dir=tmp_path / "cache")
        assert store.get_bytes(manifest_rel(cfg)) == body and not (tmp_path / "local").exists()
        same = [{"subject": "22", "status": "ok", "metrics": {}},
                {"subject": "23", "status": "failed", "error": "x", "metrics": {}}]
        assert _guard(store, manifest_rel(cfg), cfg, same)["status"] == "partial"  # may be replaced
        complete = _fake_manifest(cfg, "complete", {"22": {"status": "ok"}, "23": {"status": "ok"}})
        store.put_bytes(json.dumps(complete).encode(), manifest_rel(cfg))
        with pytest.raises(PublishConflictError, match="complete result .* stands as it is") as err:
            publish(cfg, {}, [], worse, local_dir=tmp_path / "local", cache_dir=tmp_path / "cache")
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_the_dag_leaves_a_complete_result_as_it_is(airflow_db, dagbag, complete_then_broken, tmp_path, monkeypatch,
                                                  ledger):
    from airflow.utils.state import DagRunState

    with ledger.fault("re-run with a bad subject after a complete result (Airflow)") as scope:
        cfg, analysis, published = complete_then_broken
        monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
        run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": cfg})
        assert run.state == DagRunState.FAILED
        states = {(ti.task_id, ti.map_index): ti for ti in run.get_task_instances()}
        assert states[("fit_subject", 1)].state == "failed"
        assert states[("publish", -1)].state == "failed" and states[("publish", -1)].try_number == 1  # no retries
        after = objects(cfg["output"])
        assert {k: after.get(k) for k in published} == published
        manifest = json.loads(ResultStore(cfg["output"]).get_bytes(manifest_rel(analysis)))
        assert manifest["status"] == "complete" and manifest["provenance"]["airflow_run_id"] is None
        scope.lost = artifacts_intact(analysis, manifest)
        assert scope.lost == 0


# --- item 8: concurrency and the gallery ----------------------------------------------

@pytest.mark.slow
def test_two_runs_of_one_config_sharing_a_cache_both_succeed(openneuro_demo, tiny_bert_dir, results_bucket,
                                                             tmp_path, ledger):
    with ledger.fault("two runs of one config at once, one cache and local folder"):
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        analysis = parse_config(cfg)
        config = write_config(tmp_path / "c.yaml", cfg)
        env = {**os.environ, "NEUROFLOW_CACHE": str(tmp_path / "cache")}
        procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(config)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
        assert all("Traceback" not in o[1] for o in outs)
        uris = {o[0].strip().splitlines()[-1] for o in outs}
        assert uris == {f"{analysis.publish_prefix}/manifest.json"}
        manifests = [k for k in objects(results_bucket) if k.endswith("manifest.json")]
        assert manifests == [manifest_rel(analysis)]
        local = tmp_path / "cache" / "published" / analysis.analysis_id
        stored = ResultStore(results_bucket).get_bytes(manifest_rel(analysis))
        assert json.loads((local / "manifest.json").read_text()) == json.loads(stored)
        assert json.loads((local / MARKER).read_text())["analysis_id"] == analysis.analysis_id
        assert list((tmp_path / "cache" / "staging").iterdir()) == []  # both staging folders removed
        assert artifacts_intact(analysis, json.loads(stored)) == 0


@pytest.mark.slow
def test_a_kill_before_the_gallery_update_is_repaired_by_the_rerun(openneuro_demo, tiny_bert_dir, results_bucket,
                                                                   tmp_path, ledger):
    with ledger.fault("SIGKILL between the manifest and the gallery index, then re-run") as scope:
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        analysis = parse_config(cfg)
        config = write_config(tmp_path / "c.yaml", cfg)
        sandbox = Sandbox(tmp_path / "sb").seed()
        killed = run_cli(scope, sandbox, "run", str(config), env={"NEUROFLOW_FAILPOINTS": "publish.gallery=1:kill"})
        assert killed.returncode == -signal.SIGKILL
        store = ResultStore(results_bucket)
        assert store.exists(manifest_rel(analysis)) and not store.exists("index.json")
        again = run_cli(scope, sandbox, "run", str(config))
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.strip().splitlines()[-1] == f"{analysis.publish_prefix}/manifest.json"
        index = json.loads(store.get_bytes("index.json"))
        assert [a["manifest"] for a in index["analyses"]] == [manifest_rel(analysis)]
        assert b"report.html" in store.get_bytes("index.html")
        assert killed.touched == [] and again.touched == []


# --- item 10a: an output inside the dataset or inside another analysis ----------------

def _published_analysis(results_bucket: str) -> str:
    """A published analysis folder under `results_bucket` (its manifest.json and config.yaml)."""
    store = ResultStore(results_bucket)
    folder = "lab/ds002322/1.0.4/alice-demo-0123456789ab"
    store.put_bytes(b"{}", f"{folder}/manifest.json")
    store.put_bytes(b"name: x\n", f"{folder}/config.yaml")
    store.put_bytes(b"name: y\n", "lab/ds002322/1.0.4/crashed-abcdefabcdef/config.yaml")  # no manifest yet
    return folder


OUTPUTS = {
    # name: (output from (results bucket, source uri), fragment)
    "output equal to the dataset source": (lambda res, src: src, "inside the dataset source"),
    "output inside the dataset source": (lambda res, src: f"{src}/derivatives/neuroflow", "inside the dataset source"),
    "output at the source's parent (results land in the dataset)": (
        lambda res, src: src.rsplit("/", 1)[0], "inside the dataset source"),
    "output is a published analysis folder": (
        lambda res, src: f"{res}/lab/ds002322/1.0.4/alice-demo-0123456789ab", "inside the published analysis"),
    "output inside a published analysis folder": (
        lambda res, src: f"{res}/lab/ds002322/1.0.4/alice-demo-0123456789ab/sub-18/x", "inside the published analysis"),
    "output inside an analysis folder without a manifest yet": (
        lambda res, src: f"{res}/lab/ds002322/1.0.4/crashed-abcdefabcdef/out", "holds config.yaml"),
}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_an_output_inside_the_dataset_or_another_analysis_is_refused(name, two_subject_source, tiny_bert_dir,
                                                                     results_bucket, tmp_path, ledger):
    from pipelines.steps import prepare

    make_output, fragment = OUTPUTS[name]
    with ledger.bad_input(name):
        _published_analysis(results_bucket)
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        cfg["dataset"]["source"] = two_subject_source.source
        cfg["output"] = make_output(results_bucket, two_subject_source.source)
        before = {**objects(results_bucket), **objects(two_subject_source.source.rsplit("/", 1)[0])}
        with pytest.raises(ConfigError, match=fragment) as err:
            prepare(parse_config(cfg), cache_dir=tmp_path / "cache")
        assert "'output'" in str(err.value) and "\n" not in str(err.value)
        after = {**objects(results_bucket), **objects(two_subject_source.source.rsplit("/", 1)[0])}
        assert after == before and not (tmp_path / "cache").exists()  # refused before reading the dataset


def test_an_output_beside_published_analyses_is_accepted(two_subject_source, tiny_bert_dir, results_bucket,
                                                         tmp_path):
    from pipelines.publish import check_output_place

    _published_analysis(results_bucket)
    for output in (results_bucket, f"{results_bucket}/lab", f"{results_bucket}/other",
                   f"{results_bucket}/lab/ds002322/1.0.4/not-an-analysis"):
        cfg = demo_config(tiny_bert_dir, output, subjects=["22"])
        cfg["dataset"]["source"] = two_subject_source.source
        check_output_place(parse_config(cfg))


def test_the_dag_refuses_an_output_inside_the_dataset_at_prepare(airflow_db, dagbag, two_subject_source,
                                                                 tiny_bert_dir, tmp_path, monkeypatch, ledger):
    from airflow.utils.state import DagRunState

    with ledger.bad_input("output inside the dataset source (Airflow)"):
        monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
        cfg = demo_config(tiny_bert_dir, f"{two_subject_source.source}/derivatives/out", subjects=["22"])
        cfg["dataset"]["source"] = two_subject_source.source
        before = objects(two_subject_source.source)
        run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": cfg})
        assert run.state == DagRunState.FAILED
        states = {ti.task_id: ti for ti in run.get_task_instances()}
        assert states["prepare"].state == "failed" and states["prepare"].try_number == 1  # refused, not retried
        assert objects(two_subject_source.source) == before


def test_the_default_local_copy_under_the_cache_is_always_ours(tmp_path):
    """A default copy left half-written by an older neuroflow (no manifest, no marker) is reused."""
    cache = tmp_path / "cache"
    default = cache / "published" / "a-0123456789ab"
    _stage(default, {"sub-1/map.tsv": "left by a crashed run"})
    assert check_local_dir(default, "a-0123456789ab", cache_dir=cache) == default.resolve()
    with pytest.raises(ConfigError, match="is not empty"):  # the same files anywhere else are not ours
        check_local_dir(default, "a-0123456789ab", cache_dir=tmp_path / "another-cache")


def test_the_demo_dataset_is_never_built_over_a_users_folder(tmp_path, ledger, tiny_bert_dir, monkeypatch):
    """`neuroflow demo-data DEST`: a folder of the user's is refused untouched; an earlier build is replaced."""
    import numpy as np

    import pipelines.demo as demo
    from pipelines.demo import build_demo_dataset
    from pipelines.errors import ConfigError

    # word rate alone drives the simulated subject here (the packaged model's layer 4 is not in the tiny one)
    monkeypatch.setattr(demo, "simulation_drivers", lambda words, model, times: np.ones((len(times), 2), np.float32))

    with ledger.bad_input("demo-data into a folder holding the user's files"):
        mine = tmp_path / "mine"
        (mine / "sub").mkdir(parents=True)
        (mine / "sub" / "notes.txt").write_text("keep")
        with pytest.raises(ConfigError, match="not an earlier demo build"):
            build_demo_dataset(mine, model_dir=tiny_bert_dir, resolution_mm=16.0)
        assert [p.name for p in mine.rglob("*")] == ["sub", "notes.txt"]

        built = build_demo_dataset(tmp_path / "demo", model_dir=tiny_bert_dir, resolution_mm=16.0)
        files = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
        again = build_demo_dataset(built, model_dir=tiny_bert_dir, resolution_mm=16.0)  # an earlier build: replaced
        assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
        (again / "added-by-user.txt").write_text("mine")  # now it holds a file no build wrote
        with pytest.raises(ConfigError, match="not an earlier demo build"):
            build_demo_dataset(again, model_dir=tiny_bert_dir, resolution_mm=16.0)
        assert (again / "added-by-user.txt").read_text() == "mine"
