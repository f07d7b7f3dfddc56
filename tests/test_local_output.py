"""`output: /path` (or file://): the same layout, manifest and guarantees as S3, in a local folder."""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import parse_config
from pipelines.errors import ConfigError, IntegrityError
from pipelines.gallery import output_of, update_index
from pipelines.localstore import LocalStore, canonical_local_uri
from pipelines.resultstore import ResultStore, open_store

from .conftest import demo_config
from .test_dags import airflow_db, dagbag  # noqa: F401 - the DAG fixtures


def neuroflow(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def write(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_line_error(proc, *fragments) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not re.match(r"\d\d:\d\d:\d\d neuroflow: ", ln)]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- the output URI ------------------------------------------------------------------

def test_a_path_and_a_file_uri_of_one_folder_are_one_analysis(tiny_bert_dir, tmp_path):
    ids = {parse_config(demo_config(tiny_bert_dir, out)).analysis_id
           for out in (str(tmp_path / "r"), f"{tmp_path}/r/", f"file://{tmp_path}/r",
                       f"file://localhost{tmp_path}//r/.")}
    assert len(ids) == 1
    cfg = parse_config(demo_config(tiny_bert_dir, str(tmp_path / "r")))
    assert cfg.output == f"file://{tmp_path}/r"
    assert cfg.publish_prefix == f"file://{tmp_path}/r/ds002322/1.0.4/{cfg.analysis_id}"
    assert output_of(cfg.publish_prefix + "/manifest.json") == cfg.output
    # an S3 output is exactly as before
    assert parse_config(demo_config(tiny_bert_dir, "s3://b/p/")).output == "s3://b/p"
    assert isinstance(open_store("s3://b/p"), ResultStore) and isinstance(open_store(cfg.output), LocalStore)


@pytest.mark.parametrize("bad, fragment", [("results/here", "not an absolute path"),
                                           ("~/results", "not an absolute path"),
                                           ("file://server/share", "no host"),
                                           ("/", "root of the file system"),
                                           ("gs://bucket", "s3://bucket[/prefix], file:///abs/path or /abs/path")])
def test_a_bad_local_output_is_one_clear_error(bad, fragment, tiny_bert_dir, tmp_path):
    with pytest.raises(ConfigError, match="output") as err:
        parse_config(demo_config(tiny_bert_dir, bad))
    assert fragment in str(err.value)


# --- the store -----------------------------------------------------------------------

def test_writes_are_verified_listed_and_leave_no_temporary_files(tmp_path):
    store = LocalStore(str(tmp_path / "out"))
    assert store.list() == [] and not store.exists("a/b.txt")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024))
    rec = store.put_file(src, "a/b.bin")
    assert rec["bytes"] == 3 * 1024 * 1024 and store.get_bytes("a/b.bin") == src.read_bytes()
    assert store.put_bytes(b"one", "a/c.txt")["bytes"] == 3 and store.put_bytes(b"two", "a/c.txt")
    assert store.get_bytes("a/c.txt") == b"two"
    assert [o.key for o in store.list()] == ["a/b.bin", "a/c.txt"] and [o.key for o in store.list("a/c")] == ["a/c.txt"]
    assert sorted(os.listdir(tmp_path / "out" / "a")) == ["b.bin", "c.txt"]  # no .nf-tmp-* left behind
    with pytest.raises(IntegrityError, match="3 bytes, over the 2 expected"):
        store.get_bytes("a/c.txt", max_bytes=2)
    dest = store.download("a/b.bin", tmp_path / "dl" / "b.bin")
    assert dest.read_bytes() == src.read_bytes()


def test_the_conditional_replace_lets_only_an_up_to_date_writer_through(tmp_path):
    store = LocalStore(str(tmp_path / "out"))
    assert store.put_if("index.json", b"v1", "application/json", None)
    assert not store.put_if("index.json", b"v1 again", "application/json", None)  # one is there now
    body, etag = store.get_with_etag("index.json")
    assert body == b"v1"
    assert store.put_if("index.json", b"v2", "application/json", etag)
    assert not store.put_if("index.json", b"stale", "application/json", etag)  # its view is stale
    assert store.get_bytes("index.json") == b"v2"


def _race(root: str, i: int, start, results) -> None:
    start.wait()
    results.put((i, LocalStore(root).create_bytes(f"writer {i}".encode(), "ds/v/a/manifest.json") is not None))


def test_of_many_racing_conditional_creates_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "out"), i, start, results)) for i in range(8)]
    for p in procs:
        p.start()
    start.set()
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    winners = [i for i, ok in won if ok]
    assert len(winners) == 1
    assert LocalStore(str(tmp_path / "out")).get_bytes("ds/v/a/manifest.json") == f"writer {winners[0]}".encode()
    assert os.listdir(tmp_path / "out" / "ds" / "v" / "a") == ["manifest.json"]


def test_a_link_planted_in_the_output_folder_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not yours")
    store = LocalStore(str(tmp_path / "out"))
    store.put_bytes(b"ok", "ds/real.txt")
    os.symlink(outside, tmp_path / "out" / "linked")  # a folder link
    os.symlink(outside / "secret.txt", tmp_path / "out" / "ds" / "index.json")  # a file link
    for action in (lambda: store.get_bytes("linked/secret.txt"), lambda: store.exists("linked/secret.txt"),
                   lambda: store.put_bytes(b"x", "linked/new.txt"), lambda: store.create_bytes(b"x", "linked/m.json"),
                   lambda: store.get_bytes("ds/index.json"), lambda: store.put_bytes(b"x", "ds/index.json"),
                   lambda: store.put_if("ds/index.json", b"x", "application/json", None)):
        with pytest.raises(IntegrityError, match="is a symbolic link; neuroflow never follows links"):
            action()
    assert [o.key for o in store.list()] == ["ds/real.txt"]  # links are skipped, never walked into
    assert sorted(os.listdir(outside)) == ["secret.txt"] and (outside / "secret.txt").read_bytes() == b"not yours"
    assert (tmp_path / "out" / "ds" / "index.json").is_symlink()  # refused, not replaced


def test_the_gallery_index_is_built_in_a_local_folder_and_refuses_a_planted_link(tmp_path):
    out = str(tmp_path / "out")
    result = update_index(out)
    assert result["index_uri"] == f"file://{tmp_path}/out/index.json" and result["n_analyses"] == 0
    assert json.loads(LocalStore(out).get_bytes("index.json"))["output"] == f"file://{tmp_path}/out"
    assert not update_index(out)["changed"]
    (tmp_path / "out" / "index.json").unlink()
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    os.symlink(target, tmp_path / "out" / "index.json")
    with pytest.raises(IntegrityError, match="symbolic link"):
        update_index(out)
    assert target.read_text() == "{}"


def test_the_watch_state_claims_once_in_a_local_folder(tmp_path):
    from pipelines.watch import WatchState

    state = WatchState(str(tmp_path / "out"), "ds002322")
    record, etag = state.read()
    assert record["seen"] == [] and etag is None
    assert state.write({**record, "seen": ["1.0.4"]}, etag)
    assert not state.write({**record, "seen": ["other"]}, etag)  # a racing watcher with the old view loses
    again, etag2 = state.read()
    assert again["seen"] == ["1.0.4"] and etag2 is not None
    assert state.uri == f"file://{tmp_path}/out/_state/watch/ds002322.json"


# --- whole runs ----------------------------------------------------------------------

def _manifest_of(output_uri: str) -> tuple[dict, str]:
    listed = neuroflow("maps", "list", output_uri)
    assert listed.returncode == 0, listed.stderr
    uri = next(tok for tok in listed.stdout.split() if tok.endswith("/manifest.json"))
    store, key = (LocalStore(uri.rsplit("/", 1)[0]), "manifest.json") if uri.startswith("file://") else \
        (ResultStore(uri.rsplit("/", 1)[0]), "manifest.json")
    return json.loads(store.get_bytes(key)), uri


@pytest.mark.slow
@pytest.mark.integration
def test_a_local_folder_run_equals_an_s3_run(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    out = tmp_path / "results"
    s3_cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
    local_cfg = demo_config(tiny_bert_dir, str(out), subjects=["22"])
    runs = {}
    for name, cfg in (("s3", s3_cfg), ("local", local_cfg)):
        proc = neuroflow("run", write(tmp_path / f"{name}.yaml", cfg), "--cache-dir", str(tmp_path / f"cache-{name}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = proc.stdout.strip().splitlines()
    s3_analysis, local_analysis = parse_config(s3_cfg), parse_config(local_cfg)
    assert runs["local"][-1] == f"file://{out}/ds002322/1.0.4/{local_analysis.analysis_id}/manifest.json"
    folder = out / "ds002322" / "1.0.4" / local_analysis.analysis_id
    # no second copy by default: the report is the published one, in the output folder
    assert runs["local"][-2] == f"report: {folder / 'report.html'}"
    assert not (tmp_path / "cache-local" / "published").exists()

    s3_manifest, s3_uri = _manifest_of(results_bucket)
    local_manifest, local_uri = _manifest_of(str(out))
    assert local_uri == runs["local"][-1] and s3_uri == runs["s3"][-1]
    s3_arts = {a["path"]: a for a in s3_manifest["artifacts"]}
    local_arts = {a["path"]: a for a in local_manifest["artifacts"]}
    assert sorted(s3_arts) == sorted(local_arts) and len(local_arts) > 5
    s3_store = ResultStore(s3_analysis.publish_prefix)
    differ = []
    for path, art in local_arts.items():
        data = (folder / path).read_bytes()  # every artifact is where the manifest says, intact
        assert len(data) == art["bytes"] and __import__("hashlib").sha256(data).hexdigest() == art["sha256"]
        if art["sha256"] != s3_arts[path]["sha256"]:
            # only files that name the output (and so the analysis id) differ, and by exactly that
            swapped = (data.replace(local_analysis.output.encode(), s3_analysis.output.encode())
                       .replace(local_analysis.config_hash.encode(), s3_analysis.config_hash.encode()))
            assert swapped == s3_store.get_bytes(path), path
            differ.append(path)
    assert set(differ) <= {"config.yaml", "dataset_description.json", "report.html"}, differ
    assert {k: v for k, v in local_manifest.items() if k not in ("artifacts", "analysis_id", "config_hash",
                                                                 "provenance", "inputs")} == \
        {k: v for k, v in s3_manifest.items() if k not in ("artifacts", "analysis_id", "config_hash",
                                                          "provenance", "inputs")}
    # the published layout at the output root: the gallery index, the caches, nothing else
    index = json.loads((out / "index.json").read_text())
    assert [a["manifest"] for a in index["analyses"]] == [
        f"ds002322/1.0.4/{local_analysis.analysis_id}/manifest.json"]
    assert sorted(p.name for p in out.iterdir()) == ["_cache", "_work", "ds002322", "index.html", "index.json"]
    assert not [p for p in out.rglob(".nf-tmp-*")]

    # maps list / show / get on the local output, by file:// URI and by plain path
    shown = neuroflow("maps", "show", local_uri)
    assert shown.returncode == 0 and "sub-22 wordrate: mean r" in shown.stdout and "report.html" in shown.stdout
    plain = neuroflow("maps", "show", str(folder / "manifest.json"))
    assert plain.returncode == 0 and plain.stdout == shown.stdout
    got = neuroflow("maps", "get", local_uri, "report.html", str(tmp_path / "r.html"))
    assert got.returncode == 0 and (tmp_path / "r.html").read_bytes() == (folder / "report.html").read_bytes()
    # an altered artifact is refused by `maps get`, as on S3
    tsv = next(p for p in local_arts if p.endswith(".tsv"))
    data = (folder / tsv).read_bytes()
    (folder / tsv).write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])  # one bit flipped, same size
    one_line_error(neuroflow("maps", "get", local_uri, tsv, str(tmp_path / "t.tsv")), "sha256")
    (folder / tsv).write_bytes(data + b"more\n")  # longer: refused before it is read
    one_line_error(neuroflow("maps", "get", local_uri, tsv, str(tmp_path / "t.tsv")), "not read")
    (folder / tsv).write_bytes(data)

    # a re-run finds it published (no copy made, nothing rewritten)
    again = neuroflow("run", str(tmp_path / "local.yaml"), "--cache-dir", str(tmp_path / "cache-local"))
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == local_uri, again.stderr[-2000:]
    # --local-dir still makes a copy, but never inside the output folder
    inside = neuroflow("run", str(tmp_path / "local.yaml"), "--cache-dir", str(tmp_path / "cache-local"),
                       "--local-dir", str(out / "copy"))
    one_line_error(inside, "--local-dir", "inside the output folder")
    copy = neuroflow("run", str(tmp_path / "local.yaml"), "--cache-dir", str(tmp_path / "cache-local"),
                     "--local-dir", str(tmp_path / "copy"))
    assert copy.returncode == 0, copy.stderr[-2000:]
    assert json.loads((tmp_path / "copy" / "manifest.json").read_text()) == local_manifest


@pytest.mark.slow
@pytest.mark.integration
def test_a_kill_before_the_manifest_leaves_no_manifest_in_the_folder(openneuro_demo, tiny_bert_dir, tmp_path):
    out = tmp_path / "results"
    config = write(tmp_path / "c.yaml", demo_config(tiny_bert_dir, str(out), subjects=["22"]))
    analysis = parse_config(yaml.safe_load(Path(config).read_text()))
    killed = neuroflow("run", config, "--cache-dir", str(tmp_path / "cache"),
                       env={"NEUROFLOW_FAILPOINTS": "publish.commit=1:kill"})
    assert killed.returncode == -signal.SIGKILL
    folder = out / "ds002322" / "1.0.4" / analysis.analysis_id
    assert (folder / "report.html").is_file() and not (folder / "manifest.json").exists()
    # the feature and fit caches live in the folder too ({output}/_cache/), for the re-run to reuse
    assert list((out / "_cache" / "features").rglob("*.npz")) and list((out / "_cache" / "fits").rglob("*.npz"))
    listed = neuroflow("maps", "list", str(out))
    assert listed.returncode == 0 and "manifest.json" not in listed.stdout  # readers see nothing published
    again = neuroflow("run", config, "--cache-dir", str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == f"{analysis.publish_prefix}/manifest.json"
    assert json.loads((folder / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
@pytest.mark.integration
def test_two_publishers_racing_into_one_folder_leave_one_manifest(openneuro_demo, tiny_bert_dir, tmp_path):
    out = tmp_path / "results"
    config = write(tmp_path / "c.yaml", demo_config(tiny_bert_dir, str(out), subjects=["22"]))
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", config, "--cache-dir",
                               str(tmp_path / f"cache{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    analysis = parse_config(yaml.safe_load(Path(config).read_text()))
    assert {o[0].strip().splitlines()[-1] for o in outs} == {f"{analysis.publish_prefix}/manifest.json"}
    store = LocalStore(str(out))
    assert [o.key for o in store.list() if o.key.endswith("manifest.json")] == [
        f"ds002322/1.0.4/{analysis.analysis_id}/manifest.json"]
    manifest = json.loads(store.get_bytes(f"ds002322/1.0.4/{analysis.analysis_id}/manifest.json"))
    for art in manifest["artifacts"]:  # every listed artifact matches what is stored
        assert len(store.get_bytes(f"ds002322/1.0.4/{analysis.analysis_id}/{art['path']}")) == art["bytes"]
    assert [a["manifest"] for a in json.loads(store.get_bytes("index.json"))["analyses"]] == [
        f"ds002322/1.0.4/{analysis.analysis_id}/manifest.json"]
    assert not list(out.rglob(".nf-tmp-*"))


@pytest.mark.integration
def test_a_link_planted_in_the_output_stops_the_run_with_one_error(openneuro_demo, tiny_bert_dir, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "_cache")
    config = write(tmp_path / "c.yaml", demo_config(tiny_bert_dir, str(out), subjects=["22"]))
    proc = neuroflow("run", config, "--cache-dir", str(tmp_path / "cache"))
    one_line_error(proc, f"file://{out}/_cache is a symbolic link")
    assert list(elsewhere.iterdir()) == []


def test_a_local_output_inside_the_dataset_or_an_analysis_is_refused(demo_tree, tiny_bert_dir, tmp_path):
    from pipelines.publish import check_output_place

    cfg = demo_config(tiny_bert_dir, str(demo_tree / "derivatives" / "results"))
    cfg["dataset"]["source"] = str(demo_tree)
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        check_output_place(parse_config(cfg))
    cfg["output"] = str(demo_tree.parent)  # the publish folder would be <output>/ds002322/...: the dataset
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        check_output_place(parse_config(cfg))
    published = tmp_path / "r" / "ds002322" / "1.0.4" / "alice-demo-0123456789ab"
    published.mkdir(parents=True)
    (published / "config.yaml").write_text("name: x\n")
    cfg["output"] = str(published / "nested")
    with pytest.raises(ConfigError, match="inside the published analysis"):
        check_output_place(parse_config(cfg))
    cfg["output"] = str(tmp_path / "r")  # beside published analyses: fine
    check_output_place(parse_config(cfg))
    assert canonical_local_uri(cfg["output"]) == parse_config(cfg).output


@pytest.mark.slow
@pytest.mark.integration
def test_the_dags_publish_to_and_index_a_local_folder(airflow_db, dagbag, openneuro_demo, tiny_bert_dir, tmp_path,
                                                      monkeypatch):
    from airflow.utils.state import DagRunState

    from pipelines.consume import read_manifest

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    config = demo_config(tiny_bert_dir, f"file://{out}", subjects=["22"])
    run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    cfg = parse_config(config)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["status"] == "complete" and manifest["provenance"]["airflow_run_id"] == run.run_id
    (out / "index.json").unlink()  # the consumer rebuilds it, given the folder
    consumer = dagbag.dags["neuroflow_maps_consumer"].test(run_conf={"output": str(out)})
    assert consumer.state == DagRunState.SUCCESS
    index = json.loads((out / "index.json").read_text())
    assert [a["manifest"] for a in index["analyses"]] == [f"ds002322/1.0.4/{cfg.analysis_id}/manifest.json"]
