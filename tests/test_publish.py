"""The manifest is the only commit point: conditional writes, concurrent runs, no half results."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.resultstore import ResultStore

from .conftest import demo_config

pytestmark = pytest.mark.integration


def test_conditional_create_lets_exactly_one_writer_win(results_bucket):
    store = ResultStore(results_bucket)
    assert store.create_bytes(b"first", "a/manifest.json") is not None
    assert store.create_bytes(b"second", "a/manifest.json") is None
    assert store.get_bytes("a/manifest.json") == b"first"


def test_the_server_itself_refuses_a_second_conditional_write(results_bucket, monkeypatch):
    """Skip our own existence check: the S3 server's If-None-Match is what stops the loser."""
    store = ResultStore(results_bucket)
    store.create_bytes(b"first", "b/manifest.json")
    monkeypatch.setattr(ResultStore, "exists", lambda self, rel: False)
    assert store.create_bytes(b"second", "b/manifest.json") is None
    assert store.get_bytes("b/manifest.json") == b"first"


def test_on_a_server_that_ignores_conditional_writes_the_last_racer_wins(results_bucket, monkeypatch):
    """What happens where If-None-Match is not honoured (the header is dropped on the wire):
    a writer that passed the existence check before the other's write overwrites it. The
    README states this window; on such servers run one publisher per analysis."""
    store = ResultStore(results_bucket)
    store.create_bytes(b"first", "c/manifest.json")

    def drop_header(request, **kwargs):
        request.headers.pop("If-None-Match", None)

    store.client.meta.events.register("before-send.s3.PutObject", drop_header)
    try:
        monkeypatch.setattr(ResultStore, "exists", lambda self, rel: False)  # the race: both checked first
        assert store.create_bytes(b"second", "c/manifest.json") is not None
        assert store.get_bytes("c/manifest.json") == b"second"
    finally:
        store.client.meta.events.unregister("before-send.s3.PutObject", drop_header)


@pytest.mark.slow
def test_two_identical_analyses_started_at_once_leave_one_manifest(openneuro_demo, tiny_bert_dir,
                                                                  results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(path), "--cache-dir",
                               str(tmp_path / f"cache{i}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy()) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    uris = {o[0].strip().splitlines()[-1] for o in outs}
    analysis = parse_config(cfg)
    assert uris == {f"{analysis.publish_prefix}/manifest.json"}
    store = ResultStore(results_bucket)
    manifests = [o.key for o in store.list() if o.key.endswith("manifest.json")]
    assert len(manifests) == 1
    manifest = read_manifest(uris.pop())
    prefix = ResultStore(analysis.publish_prefix)
    for art in manifest["artifacts"]:  # every listed artifact matches what is stored
        import hashlib

        assert hashlib.sha256(prefix.get_bytes(art["path"])).hexdigest() == art["sha256"]
    # the index at the output root lists the analysis once, whichever racer updated it last
    import json

    index = json.loads(store.get_bytes("index.json"))
    assert [a["manifest"] for a in index["analyses"]] == [manifests[0]]
    assert b"report.html" in store.get_bytes("index.html")


def test_two_different_configs_never_share_a_prefix(tiny_bert_dir):
    a = parse_config(demo_config(tiny_bert_dir, "s3://r"))
    changed = demo_config(tiny_bert_dir, "s3://r")
    changed["features"][1]["layer"] = 1
    b = parse_config(changed)
    assert a.publish_prefix != b.publish_prefix


def test_manifest_schema_rejects_a_manifest_missing_its_artifacts_digest(tmp_path):
    import jsonschema

    from pipelines.publish import validate_manifest

    bad = json.loads(json.dumps({
        "schema_version": "1.0", "status": "complete",
        "dataset": {"id": "ds1", "version": "1.0.0", "source": "s3://b/ds1"},
        "analysis_id": "x-0123456789ab", "config_hash": "0123456789ab", "subjects": ["01"],
        "feature_spaces": [{"name": "w", "kind": "word_rate"}], "metrics": {},
        "artifacts": [{"path": "report.html", "kind": "report_html", "bytes": 10}],
        "inputs": [], "provenance": {"neuroflow_version": "0", "libraries": {}, "backend": "numpy",
                                     "config_hash": "0123456789ab", "started": "t", "finished": "t"}}))
    with pytest.raises(jsonschema.ValidationError, match="sha256"):
        validate_manifest(bad)
    bad["artifacts"][0]["sha256"] = "0" * 64
    validate_manifest(bad)
    bad["artifacts"][0]["path"] = "../escape.html"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad)
