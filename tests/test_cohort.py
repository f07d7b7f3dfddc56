"""Cohorts: an index page and one bounded page per subject; 300 subjects through the real Airflow DAG."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import NeuroflowError
from pipelines.report import INDEX_ABOVE_SUBJECTS, render_report_pages

from .datasets.cohort import build_cohort, cohort_config
from .test_dags import airflow_db, dagbag  # noqa: F401 - the fixtures of the DAG tests

N_COHORT = 300
PAGE_BOUND = 256 * 1024  # a subject page of this cohort (2 small pictures) stays far below


def _png(path: Path, rng) -> Path:
    from pipelines.maps import render_targets_png

    return render_targets_png(["a", "b", "c"], rng.normal(size=3), path, path.stem)


def _report(n: int, img: Path, failed=()) -> dict:
    return {
        "title": "Cohort", "dataset": {"id": "ds002345", "version": "1.1.4", "source": "s3://openneuro.org/ds002345"},
        "analysis_id": "cohort-0123456789ab", "config_yaml": "model: {}\n", "provenance": {"backend": "numpy"},
        "subjects": [{"label": f"{i:03d}", "simulated": i == 1, "page": f"sub-{i:03d}/report.html",
                      "feature_spaces": [{"name": "wordrate", "metrics": {
                          "mean_r": 0.1 + i / 1000, "median_r": 0.1, "max_r": 0.5, "n_targets": 4, "n_valid": 4},
                          "images": [{"path": str(img), "caption": f"sub-{i:03d} <r>"}]}]}
                     for i in range(1, n + 1)],
        "failed": [{"label": label, "error": error} for label, error in failed],
    }


def test_pages_index_every_subject_and_each_page_holds_only_its_subject(tmp_path, rng):
    img = _png(tmp_path / "bars.png", rng)
    evil = "<script>alert(1)</script> run too short"
    pages = render_report_pages(_report(5, img, failed=[("004b", evil)]), tmp_path / "out" / "report.html")
    assert [sub for _, sub in pages] == [None, "001", "002", "003", "004", "005"]
    index = (tmp_path / "out" / "report.html").read_text()
    assert re.findall(r'<a href="(sub-[^"]+)"', index) == [f"sub-{i:03d}/report.html" for i in range(1, 6)]
    assert "data:image" not in index  # the index carries no pictures: it grows by one row per subject
    assert "004b" in index and "failed" in index and "&lt;script&gt;" in index and "<script>" not in index
    assert "5 fitted" in index and "1 failed" in index
    assert "0.103" in index  # the cohort's mean of the subjects' mean r (0.101 .. 0.105)
    for path, sub in pages[1:]:
        html = path.read_text()
        assert path == tmp_path / "out" / f"sub-{sub}" / "report.html"
        assert len(re.findall(r'src="data:image/png;base64,', html)) == 1  # its own picture, embedded
        other = "002" if sub == "001" else "001"
        assert f"sub-{sub} &lt;r&gt;" in html and f"sub-{other} &lt;r&gt;" not in html
        assert f'href="../report.html#sub-{sub}"' in html and 'href="../config.yaml"' in html
        assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", html, re.I)  # nothing fetched


def test_a_subject_page_does_not_grow_with_the_cohort(tmp_path, rng):
    img = _png(tmp_path / "bars.png", rng)
    sizes = {}
    for n in (3, 60):
        pages = render_report_pages(_report(n, img), tmp_path / f"n{n}" / "report.html")
        sizes[n] = {sub: path.stat().st_size for path, sub in pages if sub}
    assert sizes[3]["002"] == sizes[60]["002"]
    assert max(sizes[60].values()) - min(sizes[60].values()) < 100  # the same pictures: the same size, labels aside


def test_a_page_path_outside_the_analysis_is_refused(tmp_path, rng):
    img = _png(tmp_path / "bars.png", rng)
    report = _report(2, img)
    report["subjects"][1]["page"] = "../elsewhere.html"
    with pytest.raises(NeuroflowError, match=r"subjects\[1\] page '../elsewhere.html'"):
        render_report_pages(report, tmp_path / "out" / "report.html")
    assert not (tmp_path / "elsewhere.html").exists()


def test_a_task_peak_counts_only_what_happened_since_its_reset():
    from pipelines.taskmem import peak_rss_bytes, reset_peak

    block = np.ones(200 * 2**20, np.uint8)  # 200 MiB, touched
    high = peak_rss_bytes()
    del block
    assert reset_peak()
    after = peak_rss_bytes()
    assert high - after > 150 * 2**20  # the earlier 200 MiB no longer count
    block = np.ones(100 * 2**20, np.uint8)
    assert peak_rss_bytes() - after > 90 * 2**20  # what this "task" held does
    del block


def _check_published(cfg, labels: list[str], failed: tuple[str, ...] = ()) -> dict:
    """The manifest lists every subject; the index links every fitted subject's page (and names the
    failed ones); each page is in S3, matches its manifest entry and is bounded."""
    from pipelines.consume import read_manifest
    from pipelines.resultstore import ResultStore

    fitted = sorted(set(labels) - set(failed))
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["status"] == ("partial" if failed else "complete") and manifest["subjects"] == sorted(labels)
    assert sorted(manifest["metrics"]) == fitted
    pages = {a["subject"]: a for a in manifest["artifacts"] if a["kind"] == "subject_report_html"}
    assert sorted(pages) == fitted
    assert all(a["path"] == f"sub-{s}/report.html" for s, a in pages.items())
    store = ResultStore(cfg.publish_prefix)
    index = store.get_bytes("report.html").decode()
    assert sorted(re.findall(r'<a href="sub-([a-z0-9]+)/report.html"', index)) == fitted
    for sub in failed:
        row = re.search(rf'<tr id="sub-{sub}">(.*?)</tr>', index, re.S).group(1)
        assert "failed" in row and f"sub-{sub}" in row  # its error, naming it
    for sub, art in pages.items():
        body = store.get_bytes(art["path"])
        assert len(body) == art["bytes"] <= PAGE_BOUND, sub
        assert hashlib.sha256(body).hexdigest() == art["sha256"]
        assert f"sub-{sub}" in body.decode() and b'href="../report.html#sub-' in body
    return manifest


@pytest.mark.integration
def test_neuroflow_run_publishes_an_index_and_a_page_per_subject_past_the_threshold(
        s3_url, results_bucket, tmp_path, monkeypatch):
    from pipelines.config import parse_config
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = build_cohort(tmp_path / "ds002322", INDEX_ABOVE_SUBJECTS + 2)
    bad = tmp_path / "ds002322" / "derivatives/cohortroi/sub-c022/func/sub-c022_task-alice_desc-roi_timeseries.tsv"
    bad.write_text("\n".join(bad.read_text().splitlines()[:40]) + "\n")  # a truncated run: this subject fails
    cfg = parse_config(cohort_config(str(tmp_path / "ds002322"), results_bucket, labels))
    result = run_analysis(cfg)
    assert result["status"] == "partial" and result["failed_subjects"] == ["c022"]
    manifest = _check_published(cfg, labels, failed=("c022",))
    assert [a["path"] for a in manifest["artifacts"] if a["kind"] == "report_html"] == ["report.html"]
    assert (Path(result["local_dir"]) / "sub-c001" / "report.html").is_file()
    planted = np.mean([manifest["metrics"][s]["wordrate"]["max_r"] for s in labels[:-1]])
    assert planted > 0.3  # the word-rate targets are found


@pytest.mark.slow
@pytest.mark.integration
def test_a_cohort_of_300_subjects_runs_through_the_dag(airflow_db, dagbag, s3_url, results_bucket,  # noqa: F811
                                                       tmp_path, monkeypatch):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    from pipelines.config import parse_config

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = build_cohort(tmp_path / "ds002322", N_COHORT)
    config = cohort_config(str(tmp_path / "ds002322"), results_bucket, labels)
    run = dagbag.dags["neuroflow_encoding"].test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    tis = run.get_task_instances()
    fits = sorted(ti.map_index for ti in tis if ti.task_id == "fit_subject" and ti.state == "success")
    assert fits == list(range(N_COHORT))  # one mapped fit_subject per subject
    assert [ti.state for ti in tis if ti.task_id == "publish"] == ["success"]  # one publish for all of them
    manifest = _check_published(parse_config(config), labels)
    assert manifest["provenance"]["airflow_run_id"] == run.run_id
    with create_session() as session:  # every task recorded its own peak RSS
        peaks = {(x.task_id, x.map_index): XComModel.deserialize_value(x) for x in session.scalars(
            select(XComModel).where(XComModel.run_id == run.run_id, XComModel.key == "peak_rss_bytes"))}
    # every task that ran (fit_layer has no sweep to map here: it is skipped, and records nothing)
    assert {(ti.task_id, ti.map_index) for ti in tis if ti.state == "success"} == set(peaks)
    assert {ti.task_id for ti in tis if ti.state != "success"} <= {"fit_layer"}
    assert all(isinstance(v, int) and v > 10 * 2**20 for v in peaks.values()), json.dumps(peaks)[:500]


@pytest.mark.slow
@pytest.mark.integration
def test_bench_cohort_writes_its_table(tmp_path):
    import os
    import subprocess
    import sys

    from .conftest import REPO

    out = tmp_path / "cohort.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}  # the bench makes its own home
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_cohort.py"), "--subjects", "3",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "| `neuroflow run` (in process) |" in text and "Airflow overhead per subject:" in text
    fit = next(ln for ln in text.splitlines() if ln.startswith("| `fit_subject` (mapped) | 3 |"))
    assert "success" in fit and "n/a" not in fit  # every fit task recorded its peak RSS
