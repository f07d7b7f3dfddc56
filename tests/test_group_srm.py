"""Cross-subject encoding through a shared response model (``group.srm``), on planted data and end to end."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.cross_decomposition import CCA

from pipelines.config import parse_config
from pipelines.errors import ConfigError, DatasetError, NeuroflowError
from pipelines.fit.splits import nested_group_splits
from pipelines.group.srm import fit_shared, srm_encoding, srm_fold

from .datasets.cohort import DERIVATIVE, TASK, build_cohort, cohort_config
from .test_dags import airflow_db, dagbag  # noqa: F401 - the fixtures of the DAG tests
from .test_group_alice import alice_cohort  # noqa: F401 - the real Alice listeners, staged on the S3 fixture

N_RUNS, PER_RUN, K, N_FEATURES = 4, 90, 4, 6
ALPHAS = [0.1, 1, 10, 100]


def _planted(rng: np.random.Generator, n_subjects: int = 4, noise: float = 0.7, signal: bool = True):
    """Subjects = random orthonormal W_s (targets x K) times a shared S (features-driven) + noise."""
    n = N_RUNS * PER_RUN
    X = rng.standard_normal((n, N_FEATURES))
    S = X @ rng.standard_normal((N_FEATURES, K)) + 0.5 * rng.standard_normal((n, K))
    Ys = []
    for s in range(n_subjects):
        n_targets = 40 + 7 * s
        W = np.linalg.qr(rng.standard_normal((n_targets, K)))[0]
        Y = noise * rng.standard_normal((n, n_targets))
        if signal:
            Y += S @ W.T
        Ys.append(Y)
    return Ys, X, S, np.repeat(np.arange(N_RUNS), PER_RUN)


def _cca(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    u, v = CCA(n_components=K, max_iter=2000).fit(a, b).transform(a, b)
    return np.array([np.corrcoef(u[:, i], v[:, i])[0, 1] for i in range(K)])


def test_srm_recovers_the_planted_shared_signal_up_to_rotation():
    rng = np.random.default_rng(1)
    Ys, _, S, groups = _planted(rng)
    model = fit_shared(Ys, K, 10)
    assert model.s_.shape == (K, S.shape[0])
    assert _cca(model.s_.T, S).min() > 0.9  # every planted dimension, up to a rotation (here 0.94-0.995)
    noise_model = fit_shared([rng.standard_normal(Y.shape) for Y in Ys], K, 10)
    assert _cca(noise_model.s_.T, S).max() < 0.35  # no shared signal planted: none recovered

    # a held-out subject's held-out run, reconstructed from the others through the SRM fitted on training runs
    split = nested_group_splits(groups)[0]
    fold = srm_fold(Ys, split.train, 0, K, 10)
    assert np.allclose(fold.w_held.T @ fold.w_held, np.eye(K), atol=1e-8)  # an orthonormal map
    shared_test = np.mean([Y[split.test] @ w for Y, w in zip(Ys[1:], fold.w_others)], axis=0)
    recon = shared_test @ fold.w_held.T
    truth = Ys[0][split.test]
    r = np.array([np.corrcoef(recon[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])])
    signal = (S[split.test] @ np.linalg.lstsq(S, Ys[0] - 0, rcond=None)[0])  # the planted part of each target
    ceiling = np.array([np.corrcoef(signal[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])])
    assert r.mean() > 0.8 * ceiling.mean() and r.mean() > 0.6


def test_cross_subject_encoding_predicts_a_held_out_subject_above_chance_and_not_on_null_data():
    rng = np.random.default_rng(2)
    Ys, X, _, groups = _planted(rng)
    result = srm_encoding(Ys, {"planted": X}, groups, ALPHAS, features=K, iterations=10)
    assert result.n_folds == N_RUNS
    means = [float(np.nanmean(r)) for r in result.r["planted"]]
    assert min(means) > 0.5, means
    assert all(r.shape == (Y.shape[1],) for r, Y in zip(result.r["planted"], Ys))
    assert min(float(v.mean()) for v in result.r_shared["planted"]) > 0.7

    null, X0, _, _ = _planted(np.random.default_rng(3), signal=False)
    res0 = srm_encoding(null, {"null": X0}, groups, ALPHAS, features=K, iterations=10)
    r0 = np.concatenate(res0.r["null"])
    assert abs(float(r0.mean())) < 0.03 and np.percentile(np.abs(r0), 95) < 0.2


def test_held_out_runs_never_enter_the_srm_fit_nor_the_prediction():
    rng = np.random.default_rng(4)
    Ys, X, _, groups = _planted(rng, n_subjects=3)
    split = nested_group_splits(groups)[1]
    changed = [Y.copy() for Y in Ys]
    for Y in changed:
        Y[split.test] = rng.standard_normal((split.test.size, Y.shape[1])) * 5
    a, b = srm_fold(Ys, split.train, 2, K, 10), srm_fold(changed, split.train, 2, K, 10)
    assert np.array_equal(a.w_held, b.w_held) and np.array_equal(a.shared, b.shared)
    assert all(np.array_equal(u, v) for u, v in zip(a.w_others, b.w_others))

    # the whole cross-subject prediction of the held-out run: unchanged; only its score moves
    test_groups = [1]
    one = srm_encoding(Ys, {"f": X}, groups, ALPHAS, features=K, iterations=5, test_groups=test_groups,
                       return_predictions=True)
    two = srm_encoding(changed, {"f": X}, groups, ALPHAS, features=K, iterations=5, test_groups=test_groups,
                       return_predictions=True)
    for p, q in zip(one.predictions["f"], two.predictions["f"]):
        assert np.isfinite(p[split.test]).all() and np.allclose(p, q, equal_nan=True, atol=1e-6)
    assert not np.allclose(one.r["f"][0], two.r["f"][0])


@pytest.mark.parametrize("case, error, message", [
    ("one subject", ConfigError, "'group.srm' needs at least 2 subjects"),
    ("too many features", ConfigError, "'group.srm.features' = 45 exceeds the 40 targets of sub-0"),
    ("mismatched runs", DatasetError, "'group.srm' needs every subject's runs on the same samples"),
])
def test_bad_inputs_are_one_error_naming_the_key(case, error, message):
    rng = np.random.default_rng(5)
    Ys, X, _, groups = _planted(rng, n_subjects=3)
    features = K
    if case == "one subject":
        Ys = Ys[:1]
    elif case == "too many features":
        features = 45
    else:
        Ys[1] = Ys[1][:-5]
    with pytest.raises(error) as err:
        srm_encoding(Ys, {"f": X}, groups, ALPHAS, features=features, iterations=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_config_section_is_optional_strict_and_bounded(tmp_path):
    raw = cohort_config(str(tmp_path), "s3://bucket/out", ["c001", "c002"])
    assert parse_config(raw).group is None
    raw["group"] = {"srm": {}}
    srm = parse_config(raw).group.srm
    assert (srm.features, srm.iterations, srm.seed) == (50, 10, 0)
    for bad in ({"features": 0}, {"iterations": 0}, {"shared": 3}):
        raw["group"] = {"srm": bad}
        with pytest.raises(ConfigError) as err:
            parse_config(raw)
        assert "srm" in str(err.value)


def _tsv(store, rel: str) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(store.get_bytes(rel)), sep="\t", na_values=["n/a"])


@pytest.mark.integration
def test_run_analysis_publishes_cross_subject_scores_to_s3(s3_url, results_bucket, tmp_path, monkeypatch):
    from pipelines.consume import read_manifest
    from pipelines.resultstore import ResultStore
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds002322"
    labels = build_cohort(source, 4, n_targets=6)
    raw = cohort_config(str(source), results_bucket, labels)
    raw["group"] = {"permutations": 100, "srm": {"features": 2, "iterations": 10}}
    cfg = parse_config(raw)
    result = run_analysis(cfg)
    assert result["status"] == "complete" and result["group"]["srm"]["status"] == "ok"

    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")  # validated against the schema
    srm = manifest["group"]["srm"]
    assert srm["status"] == "ok" and srm["subjects"] == labels and srm["features"] == 2
    assert "result_rel" not in srm and "fits" not in srm
    store = ResultStore(cfg.publish_prefix)
    planted, noise = [], []
    for s in labels:
        table = _tsv(store, f"sub-{s}/sub-{s}_task-{TASK}_desc-wordrateSRM_stat-r_statmap.tsv")
        own = _tsv(store, f"sub-{s}/sub-{s}_task-{TASK}_desc-wordrate_stat-r_statmap.tsv")
        assert np.allclose(table["ownr"], own["r"], atol=1e-5)  # the subject's own published model
        assert np.allclose(table["diff"], table["r"] - table["ownr"], atol=1e-5)
        assert srm["metrics"]["wordrate"][s]["mean_r_srm"] == pytest.approx(table["r"].mean(), abs=1e-5)
        planted += list(table["r"][:3])
        noise += list(table["r"][3:])
    assert np.mean(planted) > 0.3 and np.mean(planted) > np.mean(noise) + 0.2
    kinds = {a["kind"] for a in manifest["artifacts"]}
    assert {"srm_tsv", "srm_json"} <= kinds
    summary = _tsv(store, f"sub-group/sub-group_task-{TASK}_desc-srm_summary.tsv")
    assert sorted(summary["subject"]) == labels and set(summary["feature_space"]) == {"wordrate"}
    assert json.loads(store.get_bytes(f"sub-group/sub-group_task-{TASK}_desc-srm_summary.json"))["features"] == 2
    assert "Cross-subject encoding" in store.get_bytes("sub-group/report.html").decode()

    again = run_analysis(cfg)  # the SRM result is reused by the group's content key
    assert again["group"]["srm"] == result["group"]["srm"]


@pytest.mark.integration
def test_runs_of_different_lengths_are_one_error_and_nothing_is_published(s3_url, results_bucket, tmp_path,
                                                                          monkeypatch):
    from pipelines.resultstore import ResultStore
    from pipelines.steps import run_analysis

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ds002322"
    labels = build_cohort(source, 3)
    path = source / DERIVATIVE / f"sub-{labels[1]}" / "func" / f"sub-{labels[1]}_task-{TASK}_desc-roi_timeseries.tsv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-6]) + "\n")  # 6 TRs short
    raw = cohort_config(str(source), results_bucket, labels)
    raw["group"] = {"srm": {"features": 2}}
    cfg = parse_config(raw)
    with pytest.raises(NeuroflowError) as err:
        run_analysis(cfg)
    assert "'group.srm'" in str(err.value) and "different lengths" in str(err.value)
    assert "\n" not in str(err.value)
    assert not ResultStore(cfg.publish_prefix).exists("manifest.json")


@pytest.mark.integration
@pytest.mark.slow
def test_srm_on_the_real_alice_listeners(alice_cohort, results_bucket, tmp_path, monkeypatch):  # noqa: F811
    """The real Alice ROI time courses (26 listeners, 6 ROIs): each listener predicted from the others."""
    from pipelines.consume import read_manifest
    from pipelines.steps import run_analysis

    from .datasets.alice import word_rate_config
    from .test_group_alice import SOURCE

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    cfg = parse_config(word_rate_config("alice-srm", SOURCE, alice_cohort, results_bucket,
                                        {"permutations": 1000, "srm": {"features": 3, "iterations": 10}}))
    run_analysis(cfg)
    srm = read_manifest(f"{cfg.publish_prefix}/manifest.json")["group"]["srm"]
    per = srm["metrics"]["wordrate"]
    assert srm["status"] == "ok" and sorted(per) == sorted(alice_cohort) and srm["n_folds"] == 5
    mean_srm = np.mean([m["mean_r_srm"] for m in per.values()])
    mean_own = np.mean([m["mean_r_own"] for m in per.values()])
    print(f"alice SRM: mean r {mean_srm:.3f} (own {mean_own:.3f}), "
          f"{sum(m['n_srm_better'] for m in per.values())} of {6 * len(per)} subject-ROIs better")
    assert mean_srm > 0.05  # the word rate predicts the listeners' language ROIs from the other listeners


@pytest.mark.integration
def test_subject_space_volumes_get_srm_maps_in_their_own_space_without_a_group_map(s3_url, results_bucket, tmp_path,
                                                                                   monkeypatch):
    """No common space (subject-space volumes, no transform): no group map, but each subject's SRM maps are
    published as NIfTI in its own space, the planted voxel predicted from the other subjects."""
    import gzip

    import nibabel as nib

    from pipelines.consume import read_manifest
    from pipelines.resultstore import ResultStore
    from pipelines.steps import run_analysis

    from .test_group_space import _bold_cohort, _bold_config

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = _bold_cohort(tmp_path / "ds", 3, np.random.default_rng(7))
    cfg = parse_config(_bold_config(tmp_path / "ds", results_bucket, labels,
                                    {"permutations": 100, "srm": {"features": 2, "iterations": 10}}))
    run_analysis(cfg)
    manifest = read_manifest(f"{cfg.publish_prefix}/manifest.json")
    assert manifest["group"]["status"] == "none" and manifest["group"]["srm"]["status"] == "ok"
    store = ResultStore(cfg.publish_prefix)
    paths = {a["path"] for a in manifest["artifacts"]}
    for s in labels:
        maps = {}
        for stat in ("r", "ownr", "diff"):
            name = f"sub-{s}/sub-{s}_task-{TASK}_desc-wordrateSRM_stat-{stat}_statmap.nii.gz"
            assert name in paths
            maps[stat] = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(store.get_bytes(name))).dataobj)
        own = f"sub-{s}/sub-{s}_task-{TASK}_desc-wordrate_stat-r_statmap.nii.gz"
        own_r = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(store.get_bytes(own))).dataobj)
        inside = np.isfinite(maps["r"]) & (maps["r"] != 0)
        assert np.allclose(maps["ownr"][inside], own_r[inside], atol=1e-5)
        assert maps["r"][1, 1, 1] > 0.3  # the planted voxel, predicted from the others
        noise = np.ones(maps["r"].shape, bool)
        noise[1, 1, 1] = noise[2, 2, 1] = False
        assert abs(float(np.nanmean(maps["r"][noise & inside]))) < 0.1
    assert "Cross-subject encoding" in store.get_bytes("sub-group/report.html").decode()


@pytest.mark.integration
def test_the_dag_passes_the_features_to_the_group_srm(airflow_db, dagbag, s3_url, results_bucket,  # noqa: F811
                                                     tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState

    from pipelines.consume import read_manifest

    monkeypatch.setenv("NEUROFLOW_CACHE", str(tmp_path / "cache"))
    labels = build_cohort(tmp_path / "ds002322", 3)
    config = cohort_config(str(tmp_path / "ds002322"), results_bucket, labels)
    config["group"] = {"permutations": 100, "srm": {"features": 2}}
    dag = dagbag.dags["neuroflow_encoding"]
    assert "extract_features" in dag.task_dict["group_level"].upstream_task_ids
    run = dag.test(run_conf={"config": config})
    assert run.state == DagRunState.SUCCESS
    srm = read_manifest(f"{parse_config(config).publish_prefix}/manifest.json")["group"]["srm"]
    assert srm["status"] == "ok" and sorted(srm["metrics"]["wordrate"]) == labels
