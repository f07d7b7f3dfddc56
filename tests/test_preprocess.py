"""Per-run preprocessing of responses: detrending, high-pass, confound regression from fMRIPrep tables."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from pipelines.config import PreprocessConfig, parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import load_subject, open_dataset
from pipelines.preprocess import cosine_drift, preprocess_run, select_confounds

from .conftest import demo_config

TR = 2.0
RUN = "derivatives/brennan2016roi/sub-18/func/sub-18_task-alice_desc-roi6mm_timeseries.tsv"
CONFOUNDS = "derivatives/brennan2016roi/sub-18/func/sub-18_task-alice_desc-confounds_timeseries.tsv"


def planted(rng, n=300, t=20):
    """A fast signal plus a slow drift (cubic, large) in every target."""
    signal = rng.standard_normal((n, t))
    x = np.linspace(-1, 1, n)[:, None]
    drift = 10.0 * (x ** 3 - 0.5 * x) * rng.standard_normal(t) + 6.0 * x ** 2 * rng.standard_normal(t)
    return signal, drift


def corr_cols(a, b):
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


@pytest.mark.parametrize("opts", [PreprocessConfig(polynomial=3), PreprocessConfig(savgol=120.0),
                                  PreprocessConfig(high_pass=0.01),
                                  PreprocessConfig(high_pass=0.01, high_pass_method="butterworth")],
                         ids=["polynomial", "savgol", "cosine", "butterworth"])
def test_detrending_removes_a_planted_drift_and_keeps_the_signal(rng, opts):
    signal, drift = planted(rng)
    raw = (signal + drift).astype(np.float32)
    assert np.median(corr_cols(raw, signal)) < 0.6  # the drift dominates before
    cleaned, record = preprocess_run(raw.copy(), TR, opts)
    assert record["steps"] and cleaned.dtype == np.float32
    assert np.median(corr_cols(cleaned, signal)) > 0.95
    assert np.abs(corr_cols(cleaned, drift)).max() < 0.2
    # the cleaned run is orthogonal to a cubic trend only where that is what was removed
    if opts.polynomial == 3:
        basis = np.polynomial.legendre.legvander(np.linspace(-1, 1, 300), 3)
        np.testing.assert_allclose(basis.T @ cleaned, 0, atol=1e-3)


def test_each_run_is_fitted_alone_and_nan_stays_in_its_column(rng):
    signal, drift = planted(rng, t=4)
    raw = (signal + drift).astype(np.float32)
    raw[5, 2] = np.nan
    cleaned, _ = preprocess_run(raw.copy(), TR, PreprocessConfig(polynomial=2, high_pass=0.02))
    assert np.isnan(cleaned[:, 2]).all() and np.isfinite(cleaned[:, [0, 1, 3]]).all()
    half, _ = preprocess_run(raw[:150, :2].copy(), TR, PreprocessConfig(polynomial=2))
    whole, _ = preprocess_run(raw[:, :2].copy(), TR, PreprocessConfig(polynomial=2))
    assert not np.allclose(half, whole[:150])  # a trend is the run's own, not the subject's
    assert cosine_drift(300, TR, 0.01).shape == (300, 12)  # floor(2 n TR f) cosines, SPM's rule


def fmriprep_confounds(rng, n: int) -> pd.DataFrame:
    cols = {}
    for axis in "xyz":
        cols[f"trans_{axis}"] = np.cumsum(rng.standard_normal(n)) * 0.05
        cols[f"trans_{axis}_derivative1"] = np.r_[np.nan, np.diff(cols[f"trans_{axis}"])]
        cols[f"rot_{axis}"] = np.cumsum(rng.standard_normal(n)) * 0.01
    for k in range(8):
        cols[f"a_comp_cor_{k:02d}"] = rng.standard_normal(n)
    cols["csf"] = rng.standard_normal(n)
    cols["framewise_displacement"] = np.r_[np.nan, np.abs(rng.standard_normal(n - 1))]
    return pd.DataFrame(cols)


def test_select_confounds_by_name_and_pattern():
    table = fmriprep_confounds(np.random.default_rng(1), 50)
    values, columns = select_confounds(table, ["trans_*", "a_comp_cor_0[0-5]", "framewise_displacement"], "c.tsv")
    assert columns == [c for c in table.columns if c.startswith("trans_")
                       or c in [f"a_comp_cor_0{k}" for k in range(6)] + ["framewise_displacement"]]
    assert len(columns) == 6 + 6 + 1 and np.isfinite(values).all()
    assert values[0, columns.index("trans_x_derivative1")] == 0.0  # fMRIPrep's n/a in row 0
    with pytest.raises(DatasetError, match=r"c\.tsv: no column matches .* 'global_signal'.*the file has: trans_x"):
        select_confounds(table, ["trans_*", "global_signal"], "c.tsv")
    table.loc[20, "csf"] = np.nan
    with pytest.raises(DatasetError, match=r"c\.tsv: confound column 'csf' has n/a at row 20"):
        select_confounds(table, ["csf"], "c.tsv")


@pytest.fixture
def bids_with_confounds(demo_tree, tmp_path):
    """The demo dataset (a local folder) with fMRIPrep-style confounds beside sub-18's run, planted in its data."""
    tree = tmp_path / "ds"
    shutil.copytree(demo_tree, tree)
    real = pd.read_csv(tree / RUN, sep="\t")
    rng = np.random.default_rng(5)
    table = fmriprep_confounds(rng, len(real))
    used = [c for c in table.columns if c.startswith(("trans_", "rot_")) or c in
            [f"a_comp_cor_0{k}" for k in range(6)]]
    C = table[used].fillna(0.0).to_numpy()
    dirty = real.to_numpy() + 20 * C @ rng.standard_normal((len(used), real.shape[1]))
    pd.DataFrame(dirty, columns=real.columns).to_csv(tree / RUN, sep="\t", index=False)
    table.to_csv(tree / CONFOUNDS, sep="\t", index=False, na_rep="n/a")
    return tree, real.to_numpy(), C, used


def open_local(tree, tmp_path, preprocess):
    cfg = demo_config(tmp_path, "s3://unused", subjects=("18",))
    cfg["dataset"]["source"] = str(tree)
    cfg["dataset"]["responses"]["preprocess"] = preprocess
    return open_dataset(parse_config(cfg), tmp_path / "cache")


def residual(A, C):
    D = np.column_stack([np.ones(len(A)), C])
    return A - D @ np.linalg.lstsq(D, A, rcond=None)[0]


@pytest.mark.integration
def test_confounds_are_regressed_out_by_name_and_wildcard(bids_with_confounds, tmp_path):
    tree, real, C, used = bids_with_confounds
    ingest = open_local(tree, tmp_path, {"confounds": ["trans_*", "rot_*", "a_comp_cor_0[0-5]"]})
    run = load_subject(ingest, "18").runs[0]
    assert run.meta["preprocess"]["confounds_file"] == CONFOUNDS
    assert run.meta["preprocess"]["confounds"] == used
    assert CONFOUNDS in ingest.files_read  # part of the responses' content key
    # what is left is the real data less its projection on the confounds: the planted part is gone
    np.testing.assert_allclose(run.data, residual(real, C), atol=2e-3 * np.abs(real).max())
    assert np.abs(corr_cols(run.data, C[:, :1].repeat(6, 1))).max() < 1e-3


@pytest.mark.integration
def test_missing_confound_column_or_table_is_refused_by_name(bids_with_confounds, tmp_path):
    tree, *_ = bids_with_confounds
    ingest = open_local(tree, tmp_path, {"confounds": ["trans_*", "global_signal"]})
    with pytest.raises(DatasetError, match=r"desc-confounds_timeseries\.tsv: no column matches .*'global_signal'"):
        load_subject(ingest, "18")
    ingest = open_local(tree, tmp_path, {"confounds": ["trans_*"]})
    with pytest.raises(DatasetError, match=r"sub-22.*needs fMRIPrep's confounds table beside the run "
                                           r"\(sub-22_task-alice_desc-confounds_timeseries\.tsv"):
        load_subject(ingest, "22")


@pytest.mark.integration
def test_the_manifest_records_preprocessing_and_the_permutation_null(openneuro_demo, tiny_bert_dir,
                                                                     results_bucket, tmp_path):
    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis
    from pipelines.steps.fit_subject import responses_key

    raw = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
    raw["features"] = [f for f in raw["features"] if f["kind"] == "word_rate"]
    raw["model"]["permutations"] = 99
    raw["dataset"]["responses"]["preprocess"] = {"polynomial": 3}
    cfg = parse_config(raw)
    result = run_analysis(cfg, cache_dir=tmp_path / "cache")
    manifest = read_manifest(result["manifest_uri"])  # validated against the schema
    (name,) = manifest["metrics"]["22"]
    assert manifest["subject_info"]["22"]["preprocess"] == {"1": {"steps": ["polynomial order 3"], "n_regressors": 4}}
    block = manifest["metrics"]["22"][name]["permutation_block"]  # auto, one run in 5 blocks of 72: 6 blocks
    assert isinstance(block, int) and 10 <= block <= 72 // 6
    # the preprocessing is part of the responses' content key: changing it refits
    keys = {responses_key(open_dataset(cfg, tmp_path, responses={"preprocess": p})) for p in ({}, {"polynomial": 3})}
    assert len(keys) == 2


def test_unused_defaults_leave_analysis_ids_and_response_keys_as_they_were(tmp_path):
    """No preprocessing and no permutation test: the resolved config (hence the analysis id, the fit keys and
    the responses' key) is the one it always had; either option set changes it."""
    cfg = demo_config(tmp_path, "s3://out")
    plain = parse_config(cfg)
    out = plain.to_dict()
    assert "preprocess" not in out["dataset"]["responses"] and "permutation_block" not in out["model"]
    assert parse_config(out).config_hash == plain.config_hash
    cfg["dataset"]["responses"]["preprocess"] = {"savgol": 120}
    cleaned = parse_config(cfg)
    assert cleaned.to_dict()["dataset"]["responses"]["preprocess"]["savgol"] == 120
    assert cleaned.config_hash != plain.config_hash
    cfg["model"]["permutations"] = 1000
    tested = parse_config(cfg)
    assert tested.to_dict()["model"]["permutation_block"] == "auto"
    assert parse_config(tested.to_dict()).config_hash == tested.config_hash


def test_options_a_run_cannot_take_are_refused_by_name(rng):
    short = rng.standard_normal((6, 3)).astype(np.float32)
    for opts, message in ((PreprocessConfig(savgol=120, savgol_order=5), "too short for a Savitzky-Golay trend"),
                          (PreprocessConfig(high_pass=0.05, high_pass_method="butterworth"),
                           "too short for a Butterworth high-pass"),
                          (PreprocessConfig(polynomial=6), "asks for 7 regressors on a run of 6 samples")):
        with pytest.raises(DatasetError, match=f"r.tsv: .*{message}"):
            preprocess_run(short.copy(), TR, opts, key="r.tsv")
    with pytest.raises(DatasetError, match=r"high_pass' 0.3 Hz is not below the Nyquist frequency of the run "
                                           r"\(0.25 Hz"):
        preprocess_run(rng.standard_normal((100, 2)), TR, PreprocessConfig(high_pass=0.3, high_pass_method="butterworth"),
                       key="r.tsv")
    with pytest.raises(DatasetError, match="confounds table has 5 rows but the run has 6 samples"):
        preprocess_run(short.copy(), TR, PreprocessConfig(confounds=("a",)), np.zeros((5, 1)), key="r.tsv")
