"""The group level end to end: ``run_analysis`` on a cohort publishes ``sub-group/`` to S3."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.resultstore import ResultStore

from .datasets.cohort import build_cohort, cohort_config
from .test_dags import airflow_db, dagbag  # noqa: F401 - the fixtures of the DAG tests

pytestmark = pytest.mark.integration


def _tsv(store: ResultStore, rel: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(rel)), sep="\t", na_values=["n/a"])


def test_run_analysis_publishes_group_maps_roi_tables_and_ceilings(s3_url, results_bucket, tmp_path, monkeypatch):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds002322"
    labels = build_cohort(source, 8, n_targets=6)
    (source / "derivatives" / "group-atlas.tsv").write_text(
        "target\troi\nROI1\tplanted\nROI2\tplanted\nROI3\tplanted\nROI4\tnoise\nROI5\tnoise\nROI6\tnoise\n")
    raw = cohort_config(str(source), results_bucket, labels)
    raw["group"] = {"permutations": 5000, "atlas": "derivatives/group-atlas.tsv"}
    cfg = parse_config(raw)
    result = run_analysis(cfg)
    assert result["status"] == "complete" and result["group"]["status"] == "ok"

    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")  # validated against the schema
    group = manifest["group"]
    assert group["status"] == "ok" and group["kind"] == "targets" and group["subjects"] == labels
    kinds = {a["kind"] for a in manifest["artifacts"] if a.get("subject") == "group"}
    assert {"statmap_tsv", "figure_png", "roi_tsv", "roi_json", "group_json", "group_report_html"} <= kinds
    assert all(a["path"].startswith("sub-group/") for a in manifest["artifacts"] if a.get("subject") == "group")
    assert "derivatives/group-atlas.tsv" in {i["key"] for i in manifest["inputs"]}

    store = ResultStore(cfg.publish_prefix)
    # the subjects' own published r, read back, give the group map and the ROI table by plain numpy
    r = np.stack([_tsv(store, f"sub-{s}/sub-{s}_task-alice_desc-wordrate_stat-r_statmap.tsv")["r"].to_numpy()
                  for s in labels])
    gmap = _tsv(store, "sub-group/sub-group_task-alice_desc-wordrate_stat-r_statmap.tsv")
    assert np.allclose(gmap["mean_r"], np.tanh(np.arctanh(r).mean(0)), atol=1e-5)
    assert gmap["significant"][:3].all() and not gmap["significant"][3:].any()  # the planted half, and only it
    assert group["metrics"]["wordrate"]["n_significant"] == 3
    roi = _tsv(store, "sub-group/sub-group_task-alice_desc-roi_summary.tsv")
    for i, s in enumerate(labels):
        rows = roi[roi["subject"] == s].set_index("roi")
        assert rows.loc["planted", "mean_r"] == pytest.approx(r[i, :3].mean(), abs=1e-5)
        assert rows.loc["noise", "mean_r"] == pytest.approx(r[i, 3:].mean(), abs=1e-5)
    grow = roi[roi["subject"] == "group"].set_index("roi")
    assert grow.loc["planted", "mean_r"] == pytest.approx(np.tanh(np.arctanh(r[:, :3].mean(1)).mean()), abs=1e-5)
    assert grow.loc["planted", "p"] <= 1 / 2 ** 8 + 1e-9  # every subject's planted region above zero: exact minimum
    assert json.loads(store.get_bytes("sub-group/sub-group_task-alice_desc-roi_summary.json"))["atlas"] == \
        "derivatives/group-atlas.tsv"

    # no repeats here: the inter-subject ceiling normalises each subject's scores
    assert group["isc"]["status"] == "ok" and group["isc"]["n_with_ceiling"] >= 3 * 8 - 4
    for s in labels:
        assert manifest["metrics"][s]["wordrate"]["ceiling"] == "inter-subject"
        table = _tsv(store, f"sub-{s}/sub-{s}_task-alice_desc-wordrate_stat-r_statmap.tsv")
        assert np.isfinite(table["rnorm"][:3]).all()
    page = store.get_bytes("sub-group/report.html").decode()
    assert "Regions" in page and "planted" in page and "Inter-subject ceilings" in page
    assert 'href="sub-group/report.html"' in store.get_bytes("report.html").decode()

    again = run_analysis(cfg)  # a re-run recomputes nothing: the group result is reused by its content key
    assert again["reused"] and again["group"] == result["group"]


def test_too_few_subjects_publish_no_group_map_and_say_why(s3_url, results_bucket, tmp_path, monkeypatch):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = build_cohort(tmp_path / "ds002322", 2)
    raw = cohort_config(str(tmp_path / "ds002322"), results_bucket, labels)
    raw["group"] = {}
    cfg = parse_config(raw)
    run_analysis(cfg)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["group"]["status"] == "none"
    assert "2 subject(s) fitted; the group level needs at least 3" in manifest["group"]["reason"]
    store = ResultStore(cfg.publish_prefix)
    assert "No group map" in store.get_bytes("sub-group/report.html").decode()
    assert "no group map: 2 subject(s)" in store.get_bytes("report.html").decode()


def test_the_dag_runs_the_group_level_after_the_fits(airflow_db, dagbag, s3_url, results_bucket,  # noqa: F811
                                                     tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = build_cohort(tmp_path / "ds002322", 4)
    config = cohort_config(str(tmp_path / "ds002322"), results_bucket, labels)
    config["group"] = {"permutations": 100}
    dag = dagbag.dags["neuroflow_encoding"]
    assert dag.task_dict["group_level"].upstream_task_ids >= {"fit_subject", "prepare"}
    assert "group_level" in dag.task_dict["publish"].upstream_task_ids
    run = dag.test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    assert [ti.state for ti in run.get_task_instances() if ti.task_id == "group_level"] == ["success"]
    manifest = read_manifest(f"{parse_config(config).publish_prefix}/manifest.json")
    assert manifest["group"]["status"] == "ok" and manifest["group"]["n_subjects"] == 4
    assert manifest["group"]["metrics"]["wordrate"]["exact"]  # 2**4 = 16 patterns <= 100: all of them
    assert any(a["path"] == "sub-group/report.html" for a in manifest["artifacts"])


@pytest.mark.parametrize("atlas, table, message", [
    ("derivatives/no-such-atlas.tsv", None, "'group.atlas' derivatives/no-such-atlas.tsv: "),
    ("derivatives/bad-atlas.tsv", "name\tregion\nROI1\tx\n", "needs columns 'target' and 'roi'"),
    ("derivatives/bad-atlas.nii.gz", b"not a nifti", "'group.atlas' derivatives/bad-atlas.nii.gz: not a readable"),
])
def test_a_bad_atlas_is_one_error_naming_it_and_nothing_is_published(s3_url, results_bucket, tmp_path, monkeypatch,
                                                                    atlas, table, message):
    from pipelines.errors import NeuroflowError
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds002322"
    labels = build_cohort(source, 3)
    if table is not None:
        (source / atlas).write_bytes(table if isinstance(table, bytes) else table.encode())
    raw = cohort_config(str(source), results_bucket, labels)
    raw["group"] = {"atlas": atlas}
    cfg = parse_config(raw)
    with pytest.raises(NeuroflowError) as err:
        run_analysis(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not ResultStore(cfg.publish_prefix).exists("manifest.json")
