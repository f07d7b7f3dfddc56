"""The gallery index at the output root: complete, escaped, never half-written, never loses an entry."""
from __future__ import annotations

import hashlib
import json
import threading

import pytest

from pipelines.gallery import INDEX_HTML, INDEX_JSON, build_index, output_of, render_html, update_index
from pipelines.resultstore import ResultStore

pytestmark = pytest.mark.integration


def manifest(dataset="ds002322", version="1.0.4", name="alice", n=0, simulated=False, mean_r=0.1) -> dict:
    """A minimal valid manifest (schema 1.0) of one analysis."""
    config_hash = hashlib.sha256(f"{dataset}{version}{name}{n}".encode()).hexdigest()[:12]
    report = b"<html>report</html>"
    return {
        "schema_version": "1.0", "status": "complete",
        "dataset": {"id": dataset, "version": version, "source": f"s3://openneuro.org/{dataset}"},
        "analysis_id": f"{name}-{config_hash}", "config_hash": config_hash, "subjects": ["18"],
        "subject_info": {"18": {"status": "ok", "simulated": simulated}},
        "feature_spaces": [{"name": "wordrate", "kind": "word_rate"}],
        "metrics": {"18": {"wordrate": {"mean_r": mean_r, "median_r": mean_r, "max_r": 0.3, "n_targets": 6,
                                        "n_valid": 6}}},
        "artifacts": [{"path": "report.html", "kind": "report_html", "bytes": len(report),
                       "sha256": hashlib.sha256(report).hexdigest()}],
        "inputs": [], "provenance": {"neuroflow_version": "0.1.0", "libraries": {}, "backend": "numpy",
                                     "config_hash": config_hash, "started": "2026-01-01T00:00:00+00:00",
                                     "finished": "2026-01-01T00:01:00+00:00"},
    }


def publish_fake(output: str, m: dict) -> str:
    store = ResultStore(output)
    prefix = f"{m['dataset']['id']}/{m['dataset']['version']}/{m['analysis_id']}"
    store.put_bytes(b"<html>report</html>", f"{prefix}/report.html", content_type="text/html")
    store.put_bytes(json.dumps(m).encode(), f"{prefix}/manifest.json", content_type="application/json")
    return f"{prefix}/manifest.json"


def test_output_root_of_a_manifest_uri():
    assert output_of("s3://b/ds1/1.0.0/a-0123456789ab/manifest.json") == "s3://b"
    assert output_of("s3://b/lab/neuro/ds1/1.0.0/a-0123456789ab/manifest.json") == "s3://b/lab/neuro"
    with pytest.raises(Exception, match="not a published manifest"):
        output_of("s3://b/ds1/report.html")


def test_index_lists_every_published_analysis_and_links_its_report(results_bucket):
    rels = [publish_fake(results_bucket, manifest(version=v, n=i, simulated=(i == 1)))
            for i, v in enumerate(["1.0.4", "1.0.5"])]
    rels.append(publish_fake(results_bucket, manifest(dataset="ds003020", version="1.1.1", name="lm")))
    store = ResultStore(results_bucket)
    # things that are not published analyses are never listed
    store.put_bytes(b"{}", "_work/x/y/z/manifest.json")
    store.put_bytes(b"{}", "_state/watch/ds002322.json")

    result = update_index(results_bucket)
    assert result["changed"] and result["n_analyses"] == 3 and result["n_problems"] == 0
    index = json.loads(store.get_bytes(INDEX_JSON))
    assert [a["manifest"] for a in index["analyses"]] == sorted(rels)
    assert index["analyses"][1]["simulated_subjects"] == ["18"]
    assert all(a["report"] == a["manifest"].replace("manifest.json", "report.html") for a in index["analyses"])
    page = store.get_bytes(INDEX_HTML).decode()
    for rel in rels:
        assert f'href="{rel.replace("manifest.json", "report.html")}"' in page
        assert f'href="{rel}"' in page
    assert "simulated" in page and "3 analyses" in page


def test_an_unchanged_set_of_analyses_writes_nothing(results_bucket):
    publish_fake(results_bucket, manifest())
    update_index(results_bucket)
    store = ResultStore(results_bucket)
    etag = store.client.head_object(Bucket=store.bucket, Key=INDEX_JSON)["ETag"]
    again = update_index(results_bucket)
    assert again["changed"] is False
    assert store.client.head_object(Bucket=store.bucket, Key=INDEX_JSON)["ETag"] == etag


def test_a_stale_page_left_by_a_racing_writer_is_repaired(results_bucket):
    publish_fake(results_bucket, manifest())
    update_index(results_bucket)
    store = ResultStore(results_bucket)
    store.put_bytes(b"<html>stale</html>", INDEX_HTML)  # a writer with an old listing lost the race
    update_index(results_bucket)
    assert store.get_bytes(INDEX_HTML) == render_html(build_index(results_bucket)).encode()


def test_an_invalid_manifest_is_reported_and_left_out(results_bucket):
    good = publish_fake(results_bucket, manifest())
    store = ResultStore(results_bucket)
    store.put_bytes(b'{"status": "complete"}', "ds9/1.0.0/x-0123456789ab/manifest.json")
    result = update_index(results_bucket)
    index = json.loads(store.get_bytes(INDEX_JSON))
    assert [a["manifest"] for a in index["analyses"]] == [good]
    assert result["n_problems"] == 1 and index["problems"][0]["manifest"].startswith("ds9/")
    assert "Left out" in store.get_bytes(INDEX_HTML).decode()


def test_the_page_escapes_what_it_shows():
    m = manifest()
    m["dataset"]["id"] = "<script>alert(1)</script>"
    index = {"output": "s3://b", "problems": [], "analyses": []}
    from pipelines.gallery import _entry

    index["analyses"].append(_entry("x/1/a/manifest.json", "e", m))
    page = render_html(index)
    assert "<script>alert" not in page and "&lt;script&gt;" in page


def test_a_writer_with_a_stale_view_loses_and_retries(results_bucket, monkeypatch):
    """Between this writer's read and its write another analysis is published and indexed:
    the conditional put refuses the stale index, the writer lists again, nothing is lost."""
    import pipelines.gallery as gallery

    first = publish_fake(results_bucket, manifest(n=1))
    update_index(results_bucket)
    publish_fake(results_bucket, manifest(n=2))  # this writer will index it...
    real_build = gallery.build_index
    calls = {"n": 0}

    def build_then_someone_else_publishes(output, previous=None):
        index = real_build(output, previous)
        calls["n"] += 1
        if calls["n"] == 1:  # the other writer: publishes and indexes between our read and our write
            publish_fake(results_bucket, manifest(n=3))
            monkeypatch.setattr(gallery, "build_index", real_build)
            update_index(results_bucket)
            monkeypatch.setattr(gallery, "build_index", build_then_someone_else_publishes)
        return index

    monkeypatch.setattr(gallery, "build_index", build_then_someone_else_publishes)
    update_index(results_bucket)
    index = json.loads(ResultStore(results_bucket).get_bytes(INDEX_JSON))
    assert calls["n"] == 2  # lost once, retried
    assert len(index["analyses"]) == 3 and first in [a["manifest"] for a in index["analyses"]]


def test_concurrent_updates_leave_a_whole_index_with_every_analysis(results_bucket):
    for i in range(6):
        publish_fake(results_bucket, manifest(n=i))
    errors = []

    def worker():
        try:
            update_index(results_bucket)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    store = ResultStore(results_bucket)
    index = json.loads(store.get_bytes(INDEX_JSON))  # parses: never half-written
    assert len(index["analyses"]) == 6
    assert store.get_bytes(INDEX_HTML).decode() == render_html(build_index(results_bucket))


def test_reads_are_reused_for_unchanged_manifests(results_bucket, monkeypatch):
    publish_fake(results_bucket, manifest(n=1))
    update_index(results_bucket)
    import pipelines.gallery as gallery

    reads = []
    real = gallery.read_manifest
    monkeypatch.setattr(gallery, "read_manifest", lambda uri: reads.append(uri) or real(uri))
    publish_fake(results_bucket, manifest(n=2))
    update_index(results_bucket)
    assert len(reads) == 1  # only the new manifest was read
