"""Encoding-model fitting: the eigen solvers vs himalaya and scikit-learn, nested CV, chunking, dask."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from himalaya.backend import get_backend, set_backend
from himalaya.ridge import RidgeCV
from sklearn.linear_model import Ridge as SkRidge
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut

from pipelines.backend import (
    MAX_BUDGET_BYTES,
    MIN_BUDGET_BYTES,
    blas_threads,
    choose_backend,
    describe_device,
    memory_budget_bytes,
    use_backend,
)
from pipelines.errors import ConfigError, FitError
from pipelines.fit import (
    EncodingResult,
    _check_alphas,
    _columns,
    _fit_chunk,
    default_targets_chunk,
    fit_banded_encoding,
    fit_encoding,
    fit_ridge_fixed_alpha,
    nested_group_splits,
    pearson_r,
    r2_score,
    ridge_flops,
    zscore_by_group,
)

REPO = Path(__file__).resolve().parents[1]

ALPHAS = np.logspace(-2, 4, 13)


def make_data(rng: np.random.Generator, n_runs: int = 5, per_run: int = 60, n_features: int = 20,
              n_signal: int = 20, n_null: int = 20, weight_scale: tuple[float, float] = (0.05, 0.5),
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, responses (signal targets first, with varied SNR) and run labels, z-scored per run."""
    groups = np.repeat(np.arange(n_runs), per_run)
    X = rng.standard_normal((groups.size, n_features))
    W = rng.standard_normal((n_features, n_signal)) * np.linspace(*weight_scale, n_signal)
    Y = np.hstack([X @ W, np.zeros((groups.size, n_null))]) + rng.standard_normal((groups.size, n_signal + n_null))
    return zscore_by_group(X, groups), zscore_by_group(Y, groups), groups


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_data(np.random.default_rng(1))


@pytest.fixture(scope="module")
def reference(data) -> EncodingResult:
    X, Y, groups = data
    return fit_encoding(X, Y, groups, ALPHAS)


# ----------------------------------------------------------------------------- helpers


def test_zscore_by_group_is_float32_and_zeroes_constant_columns(rng):
    groups = np.repeat([0, 1, 2], 10)
    A = rng.standard_normal((30, 3)) * 5 + 2
    A[:, 1] = 0.1  # constant everywhere
    A[groups == 2, 2] = 7.0  # constant in one group only
    Z = zscore_by_group(A, groups)
    assert Z.dtype == np.float32 and np.isfinite(Z).all()
    assert np.all(Z[:, 1] == 0) and np.all(Z[groups == 2, 2] == 0)
    for g in (0, 1):
        np.testing.assert_allclose(Z[groups == g][:, [0, 2]].mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(Z[groups == g][:, [0, 2]].std(0), 1, rtol=1e-5)


def test_scores_match_definitions_and_are_nan_for_constant_truth(rng):
    y = rng.standard_normal((50, 4))
    p = y + rng.standard_normal((50, 4))
    y[:, 2] = 3.0
    p[:, 3] = 1.0
    with np.errstate(all="raise"):
        r, r2 = pearson_r(y, p), r2_score(y, p)
    for j in (0, 1):
        assert r[j] == pytest.approx(np.corrcoef(y[:, j], p[:, j])[0, 1], abs=1e-6)
        ss_res = ((y[:, j] - p[:, j]) ** 2).sum()
        ss_tot = ((y[:, j] - y[:, j].mean()) ** 2).sum()
        assert r2[j] == pytest.approx(1 - ss_res / ss_tot, abs=1e-5)
    assert np.isnan(r[2]) and np.isnan(r2[2])
    assert r[3] == 0.0 and np.isfinite(r2[3])


def test_fixed_alpha_weights_match_sklearn(rng):
    X = rng.standard_normal((80, 12))
    Y = X @ rng.standard_normal((12, 5)) + rng.standard_normal((80, 5))
    for alpha in (0.1, 3.0, 100.0):
        W = fit_ridge_fixed_alpha(X, Y, alpha)
        ref = SkRidge(alpha=alpha, fit_intercept=False).fit(X, Y).coef_.T
        assert W.shape == (12, 5) and W.dtype == np.float32
        np.testing.assert_allclose(W, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------- splits


def test_nested_splits_are_leave_one_group_out():
    groups = np.repeat(["run-b", "run-a", "run-c", "run-d"], [7, 5, 6, 4])
    splits = nested_group_splits(groups)
    assert [s.group for s in splits] == ["run-b", "run-a", "run-c", "run-d"]  # order of appearance
    logo = LeaveOneGroupOut()
    for s in splits:
        np.testing.assert_array_equal(s.test, np.flatnonzero(groups == s.group))
        np.testing.assert_array_equal(s.train, np.flatnonzero(groups != s.group))
        expected = sorted((tuple(tr), tuple(va)) for tr, va in logo.split(s.train, groups=groups[s.train]))
        assert sorted((tuple(tr), tuple(va)) for tr, va in s.inner) == expected


def test_gap_drops_training_samples_next_to_held_out_ones():
    groups = np.repeat([0, 1, 2, 3], 10)
    gap = 3
    for s in nested_group_splits(groups, gap=gap):
        dist = np.abs(s.train[:, None] - s.test[None, :]).min(1)
        assert dist.min() > gap
        assert s.train.size == 40 - 10 - gap * (2 if 0 < s.group < 3 else 1)
        for tr, va in s.inner:
            tr, va = s.train[tr], s.train[va]
            assert np.abs(tr[:, None] - va[None, :]).min() > gap
            assert np.unique(groups[va]).size == 1


def test_held_out_test_groups_split():
    groups = np.repeat(["s1", "s2", "test", "s3"], [8, 6, 5, 7])
    (split,) = nested_group_splits(groups, test_groups=["test"])
    np.testing.assert_array_equal(split.test, np.flatnonzero(groups == "test"))
    np.testing.assert_array_equal(split.train, np.flatnonzero(groups != "test"))
    assert sorted(np.unique(groups[split.train][va]).item() for _, va in split.inner) == ["s1", "s2", "s3"]
    with pytest.raises(FitError, match="'test_groups' must name groups"):
        nested_group_splits(groups, test_groups=["nope"])
    with pytest.raises(FitError, match="leaves 1 training group"):
        nested_group_splits(groups[:14], test_groups=["s1"])


def test_shuffled_time_points_are_refused_with_the_reason(rng):
    groups = rng.permutation(np.repeat(np.arange(5), 40))
    with pytest.raises(FitError, match="look shuffled.*autocorrelated neighbours") as info:
        nested_group_splits(groups)
    assert "\n" not in str(info.value)
    # a story split into a few runs that are not played in a row is fine
    nested_group_splits(np.repeat([0, 1, 0, 2, 1, 2], 30))


# ----------------------------------------------------------------------------- nested CV


def test_one_outer_fold_matches_himalaya_ridgecv_and_sklearn_search(data, reference):
    X, Y, groups = data
    k, label = 2, 2
    train, test = np.flatnonzero(groups != label), np.flatnonzero(groups == label)
    cv = list(LeaveOneGroupOut().split(X[train], groups=groups[train]))

    with use_backend(reference.backend) as bk:
        direct = RidgeCV(alphas=ALPHAS.astype(np.float32), cv=cv, fit_intercept=True).fit(X[train], Y[train])
        best = bk.to_numpy(direct.best_alphas_)
        pred = bk.to_numpy(direct.predict(X[test]))
    np.testing.assert_allclose(reference.fold_alphas[k], best, rtol=1e-6)  # himalaya: exp(-log(alpha))
    np.testing.assert_allclose(reference.predictions[test], pred, atol=1e-5)

    # Manual grid search with scikit-learn (float64): mean over inner splits of the MSE.
    mse = np.zeros((ALPHAS.size, Y.shape[1]))
    for i, alpha in enumerate(ALPHAS):
        for tr, va in cv:
            model = SkRidge(alpha=alpha).fit(X[train][tr], Y[train][tr])
            mse[i] += ((model.predict(X[train][va]) - Y[train][va]) ** 2).mean(0) / len(cv)
    sk_best = ALPHAS[mse.argmin(0)]
    ordered = np.sort(mse, axis=0)
    decisive = (ordered[1] - ordered[0]) / ordered[0] > 1e-4  # float32 cannot split closer ties
    assert decisive.mean() > 0.8
    np.testing.assert_allclose(best[decisive], sk_best[decisive], rtol=1e-6)
    assert np.unique(best[:20]).size > 2  # the planted SNRs really select different alphas

    # GridSearchCV agrees on a few single targets.
    for j in (0, 10, 19):
        search = GridSearchCV(SkRidge(), {"alpha": ALPHAS}, cv=cv, scoring="neg_mean_squared_error")
        search.fit(X[train], Y[train][:, j])
        if decisive[j]:
            assert best[j] == pytest.approx(search.best_params_["alpha"], rel=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("solver", ["primal", "kernel"])
@pytest.mark.parametrize("mode", ["operator", "rotation"])
def test_eigen_solvers_equal_himalaya_ridgecv(data, backend, solver, mode):
    """Same alphas and scores as himalaya's RidgeCV with the same folds, every solver path."""
    X, Y, groups = data
    splits = nested_group_splits(groups)
    alphas = _check_alphas(ALPHAS)
    ref = _fit_chunk(X, Y, splits, alphas, backend, solver="himalaya")
    got = _fit_chunk(X, Y, splits, alphas, backend, solver=solver, mode=mode)
    np.testing.assert_array_equal(got["fold_alphas"], ref["fold_alphas"])
    np.testing.assert_allclose(got["r"], ref["r"], atol=1e-4)
    np.testing.assert_allclose(got["r2"], ref["r2"], atol=1e-4)
    np.testing.assert_allclose(got["predictions"], ref["predictions"], atol=1e-4)


def test_auto_solver_follows_the_shape(data, rng):
    X, Y, groups = data
    assert fit_encoding(X, Y[:, :3], groups, ALPHAS).solver == "primal"  # 240 training samples > 21
    wide = rng.standard_normal((X.shape[0], 400)).astype(np.float32)
    assert fit_encoding(wide, Y[:, :3], groups, ALPHAS).solver == "kernel"
    with pytest.raises(ConfigError, match="'solver' must be one of auto, primal, kernel, himalaya"):
        fit_encoding(X, Y, groups, ALPHAS, solver="svd")


def test_held_out_test_story_is_never_seen(data):
    """A held-out test set: alphas by CV over the other runs only; its data change nothing."""
    X, Y, groups = data
    res = fit_encoding(X, Y, groups, ALPHAS, test_groups=[4])
    test, train = groups == 4, groups != 4
    assert res.n_folds == 1 and np.isnan(res.predictions[train]).all() and np.isfinite(res.predictions[test]).all()
    np.testing.assert_array_equal(res.sample_fold, np.where(test, 0, -1))
    cv = list(LeaveOneGroupOut().split(X[train], groups=groups[train]))
    with use_backend(res.backend) as bk:
        direct = RidgeCV(alphas=ALPHAS.astype(np.float32), cv=cv, fit_intercept=True).fit(X[train], Y[train])
        np.testing.assert_allclose(res.fold_alphas[0], bk.to_numpy(direct.best_alphas_), rtol=1e-6)
        np.testing.assert_allclose(res.predictions[test], bk.to_numpy(direct.predict(X[test])), atol=1e-5)
    np.testing.assert_allclose(res.r, pearson_r(Y[test], res.predictions[test]), atol=1e-6)
    # scrambling the held-out responses leaves the fit bit-for-bit unchanged
    Y2 = Y.copy()
    Y2[test] = np.random.default_rng(5).standard_normal((test.sum(), Y.shape[1]))
    res2 = fit_encoding(X, Y2, groups, ALPHAS, test_groups=[4])
    np.testing.assert_array_equal(res2.predictions, res.predictions)
    np.testing.assert_array_equal(res2.fold_alphas, res.fold_alphas)


def test_held_out_run_data_never_reach_its_own_predictions(data, reference):
    X, Y, groups = data
    Y2 = Y.copy()
    Y2[groups == 1] *= -3.0  # the held-out run of fold 1
    res = fit_encoding(X, Y2, groups, ALPHAS)
    np.testing.assert_array_equal(res.predictions[groups == 1], reference.predictions[groups == 1])
    np.testing.assert_array_equal(res.fold_alphas[1], reference.fold_alphas[1])


def test_a_killed_and_restarted_chunk_leaves_the_same_result(data):
    """Chunks are pure: re-running one (as dask does for a task lost with its worker) gives
    the same bits, and the assembled result is the one of an uninterrupted run."""
    X, Y, groups = data
    whole = fit_encoding(X, Y, groups, ALPHAS, n_targets_chunk=8)
    splits, alphas = nested_group_splits(groups), _check_alphas(ALPHAS)
    chunks = [np.arange(i, min(i + 8, Y.shape[1])) for i in range(0, Y.shape[1], 8)]
    args = (splits, alphas, whole.backend, True, whole.solver, "rotation")
    parts = [_fit_chunk(X, _columns(Y, c), *args) for c in chunks]
    parts[2] = _fit_chunk(X, _columns(Y, chunks[2]).copy(), *args)  # the restarted chunk
    for key in ("r", "r2", "fold_alphas", "predictions"):
        assembled = np.concatenate([p[key] for p in parts], axis=-1)
        np.testing.assert_array_equal(assembled, getattr(whole, key))


def test_planted_signal_is_recovered(rng):
    X, Y, groups = make_data(rng, per_run=150, n_signal=20, n_null=200, weight_scale=(0.2, 0.5))
    res = fit_encoding(X, Y, groups, ALPHAS)
    signal, null = res.r[:20], res.r[20:]
    assert res.valid.all() and res.n_folds == 5
    assert signal.min() > 0.5
    assert abs(null.mean()) < 0.05 and null.max() < signal.min()
    assert np.all(res.r2[:20] > 0)
    # r is scored within each held-out run, then averaged weighted by run size
    per_run = [pearson_r(Y[groups == g], res.predictions[groups == g]) * (groups == g).mean()
               for g in np.unique(groups)]
    np.testing.assert_allclose(res.r, np.sum(per_run, axis=0), atol=1e-5)
    np.testing.assert_allclose(res.alpha, np.exp(np.log(res.fold_alphas).mean(0)), rtol=1e-5)
    assert res.predictions.dtype == np.float32 and res.predictions.shape == Y.shape


def test_results_do_not_depend_on_chunking(data, reference):
    X, Y, groups = data
    for chunk in (1, 7):
        res = fit_encoding(X, Y, groups, ALPHAS, n_targets_chunk=chunk)
        np.testing.assert_array_equal(res.fold_alphas, reference.fold_alphas)
        np.testing.assert_array_equal(res.alpha, reference.alpha)
        np.testing.assert_allclose(res.r, reference.r, atol=1e-5)
        np.testing.assert_allclose(res.r2, reference.r2, atol=1e-5)


def test_chunk_plan_is_equal_chunks_and_caps_a_gpu_chunk(monkeypatch):
    import pipelines.fit.chunks as fit_module

    monkeypatch.setattr(fit_module, "memory_budget_bytes", lambda *args: 8 * 2**30)
    idx = np.arange(80_000)
    per_target = 4 * 10_000
    cpu, _ = fit_module._plan_chunks(idx, None, per_target, "torch", None)
    assert len(cpu) == 1  # 8 GiB holds every target
    gpu, _ = fit_module._plan_chunks(idx, None, per_target, "torch_cuda", None)
    assert len(gpu) > 1 and max(c.size for c in gpu) * per_target <= fit_module.GPU_CHUNK_MAX_BYTES
    assert max(c.size for c in gpu) - min(c.size for c in gpu) <= 1  # no small last chunk
    np.testing.assert_array_equal(np.concatenate(gpu), idx)
    assert fit_module._balanced(20_000, 9_700, 2) == 5_000  # 3 chunks of at most 9,700 -> 4 equal, for 2 threads


def test_default_chunk_respects_memory_budget():
    chunk = default_targets_chunk(3300, 1024, 600, 300)
    assert 5000 < chunk and 4 * chunk * (2 * 3300 + 2 * 1025 + 2 * 600 + 300) <= 256 * 2**20
    assert default_targets_chunk(10**9, 20, 10**8, 10) == 1
    budget = memory_budget_bytes("numpy", n_tasks=2)
    assert MIN_BUDGET_BYTES <= budget <= MAX_BUDGET_BYTES


def test_flop_count_of_the_primal_solver():
    groups = np.repeat(np.arange(6), [600] * 5 + [300])
    (split,) = nested_group_splits(groups, test_groups=[5])
    per_target = ridge_flops(1024, [split], 11, 1) / 2 / 1025
    assert per_target == 3000 + 5 * 600 + 11 * 3000 + 300  # X'Y, downdates, alphas, test


def test_gap_still_fits(data):
    X, Y, groups = data
    res = fit_encoding(X, Y, groups, ALPHAS, gap=4, return_predictions=False)
    assert res.predictions is None and np.all(res.r[:20] > 0)


def test_invalid_targets_are_flagged_and_others_unaffected(data, reference):
    X, Y, groups = data
    Y = Y.copy()
    Y[:, 0] = 0.5  # constant
    Y[10, 1] = np.nan
    Y[20, 2] = np.inf
    res = fit_encoding(X, Y, groups, ALPHAS, n_targets_chunk=5)
    bad = [0, 1, 2]
    assert not res.valid[bad].any() and res.valid[3:].all()
    for values in (res.r, res.r2, res.alpha):
        assert np.isnan(values[bad]).all() and np.isfinite(values[3:]).all()
    assert np.isnan(res.predictions[:, bad]).all()
    np.testing.assert_allclose(res.r[3:], reference.r[3:], atol=1e-5)
    np.testing.assert_array_equal(res.alpha[3:], reference.alpha[3:])

    with pytest.raises(FitError, match="All 2 targets"):
        fit_encoding(X, np.ones((X.shape[0], 2)), groups, ALPHAS)


def test_banded_ridge_recovers_planted_feature_spaces(rng):
    groups = np.repeat(np.arange(4), 150)
    A = zscore_by_group(rng.standard_normal((600, 10)), groups)
    B = zscore_by_group(rng.standard_normal((600, 30)), groups)
    signal = np.hstack([A @ rng.standard_normal((10, 10)),  # A only
                        B @ rng.standard_normal((30, 10)) * 0.4,  # B only
                        A @ rng.standard_normal((10, 10)) * 0.5 + B @ rng.standard_normal((30, 10)) * 0.3])
    Y = zscore_by_group(signal + 1.5 * rng.standard_normal(signal.shape), groups)
    res = fit_banded_encoding({"A": A, "B": B}, Y, groups, np.logspace(-2, 4, 7), n_iter=20)
    assert res.band_names == ["A", "B"] and res.r2_split.shape == (2, 30) and res.valid.all()
    a_only, b_only, both = slice(0, 10), slice(10, 20), slice(20, 30)
    assert res.r2_split[0, a_only].min() > 0.5 and np.abs(res.r2_split[1, a_only]).max() < 0.02
    assert res.r2_split[1, b_only].min() > 0.4 and np.abs(res.r2_split[0, b_only]).max() < 0.02
    assert (res.r2_split[:, both] > 0.1).all()
    assert res.band_weights[0, a_only].min() > 0.9 and res.band_weights[1, b_only].min() > 0.9
    # the split sums to the joint R² of fold-centred predictions (here, z-scored runs: r2)
    np.testing.assert_allclose(res.r2_split.sum(0), res.r2, atol=0.02)
    chunked = fit_banded_encoding({"A": A, "B": B}, Y, groups, np.logspace(-2, 4, 7), n_iter=20, n_targets_chunk=7)
    np.testing.assert_allclose(chunked.r2_split, res.r2_split, atol=1e-5)


@pytest.mark.slow
def test_bench_quick_writes_every_row(tmp_path):
    out = tmp_path / "fit.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_fit.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for row in ("neuroflow fit_encoding", "reference solver", "himalaya RidgeCV (torch)", "himalaya RidgeCV (numpy)",
                "himalaya KernelRidgeCV", "scikit-learn RidgeCV", "dask, 1 worker", "dask, 2 workers",
                "permutations", "load average"):
        assert row in table, row
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert not [r for r in rows if "failed:" in r or "stopped after" in r], table


@pytest.mark.slow
@pytest.mark.integration
def test_dask_result_equals_in_process(data, reference):
    distributed = pytest.importorskip("distributed")
    X, Y, groups = data
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        res = fit_encoding(X, Y, groups, ALPHAS, n_targets_chunk=9, client=client)
    np.testing.assert_array_equal(res.fold_alphas, reference.fold_alphas)
    np.testing.assert_array_equal(res.alpha, reference.alpha)
    np.testing.assert_allclose(res.r, reference.r, atol=1e-5)
    np.testing.assert_allclose(res.predictions, reference.predictions, atol=1e-5)
    assert res.backend == reference.backend


# ----------------------------------------------------------------------------- errors


def test_fewer_than_three_groups_is_a_fit_error(data):
    X, Y, _ = data
    with pytest.raises(FitError, match=r"Found 2 group.*n_folds >= 3"):
        fit_encoding(X, Y, np.repeat([0, 1], X.shape[0] // 2), ALPHAS)


@pytest.mark.parametrize(("alphas", "message"), [
    ([-1, 10], r"'model\.alphas' must be positive; got \[-1, 10\]\."),
    ([0.0, 1.0], r"'model\.alphas' must be positive"),
    ([], r"'model\.alphas' must list at least one value"),
    ([1.0, np.inf], r"'model\.alphas' must be finite"),
])
def test_bad_alphas_name_the_parameter(data, alphas, message):
    X, Y, groups = data
    with pytest.raises(ConfigError, match=message):
        fit_encoding(X, Y, groups, alphas)


def test_bad_inputs_raise_one_line_errors(data):
    X, Y, groups = data
    Xn = X.copy()
    Xn[3, 4] = np.nan
    cases = [
        (FitError, "NaN or Inf in 1 feature column", dict(X=Xn)),
        (FitError, "same number of samples", dict(Y=Y[:-1])),
        (FitError, "'groups' must have shape", dict(groups=groups[:-1])),
        (ConfigError, "'gap' must be an integer >= 0", dict(gap=-1)),
        (ConfigError, "'n_targets_chunk' must be an integer >= 1", dict(n_targets_chunk=0)),
        (ConfigError, "'model.backend' must be one of auto, numpy", dict(backend="tensorflow")),
        (ConfigError, "'solver' must be one of", dict(solver="lsqr")),
        (FitError, "'gap' = 1000 leaves no training samples", dict(gap=1000)),
    ]
    for error, message, override in cases:
        kwargs = dict(X=X, Y=Y, groups=groups, alphas=ALPHAS) | override
        with pytest.raises(error, match=message) as info:
            fit_encoding(kwargs.pop("X"), kwargs.pop("Y"), kwargs.pop("groups"), **kwargs)
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- backend


def test_choose_backend_and_device():
    import torch

    auto = choose_backend("auto")
    assert auto == ("torch_cuda" if torch.cuda.is_available() else "numpy")  # numpy is the faster CPU backend
    assert choose_backend("numpy") == "numpy"
    assert describe_device("numpy") == "cpu" and describe_device("torch") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'model.backend' is 'torch_cuda' but no CUDA device"):
            choose_backend("torch_cuda")


def test_blas_threads_are_restored():
    import torch

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with blas_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
    assert torch.get_num_threads() == before


def test_use_backend_restores_previous_backend_after_an_error():
    previous = get_backend().name
    try:
        set_backend("numpy")
        with pytest.raises(RuntimeError, match="boom"):
            with use_backend("torch") as bk:
                assert bk.name == "torch" and get_backend().name == "torch"
                raise RuntimeError("boom")
        assert get_backend().name == "numpy"
        with pytest.raises(ValueError):
            with use_backend("not-a-backend"):
                pass  # pragma: no cover
        assert get_backend().name == "numpy"
    finally:
        set_backend(previous)


def test_scores_do_not_depend_on_keeping_the_predictions(rng):
    """fit_subject keeps the held-out predictions (as large as Y) only for permutation tests."""
    X = rng.standard_normal((600, 20)).astype(np.float32)
    Y = (X @ rng.standard_normal((20, 300)) + 3 * rng.standard_normal((600, 300))).astype(np.float32)
    groups = np.repeat(np.arange(5), 120)
    kept = fit_encoding(X, Y, groups, [1.0, 10.0, 100.0], return_predictions=True)
    dropped = fit_encoding(X, Y, groups, [1.0, 10.0, 100.0], return_predictions=False)
    assert dropped.predictions is None and kept.predictions.shape == Y.shape
    for name in ("r", "r2", "alpha", "valid"):
        np.testing.assert_array_equal(getattr(dropped, name), getattr(kept, name))


@pytest.mark.parametrize("gap", [0, 7])
def test_banded_chunk_searches_as_himalaya_does(rng, gap):
    """Both strategies (one decomposition per draw and inner split; one per draw and outer training
    set, inner fits by deletion) pick what himalaya's BandedRidgeCV picks with one SVD per draw and
    inner split (same draws, alphas and inner splits, gaps included), with the same scores and R²
    split to float32 precision; the kernel form gives the same fit."""
    from pipelines.fit.banded import fit_banded_chunk, fit_banded_chunk_himalaya
    from pipelines.fit.splits import nested_group_splits

    groups = np.repeat(np.arange(5), 120)
    A = zscore_by_group(rng.standard_normal((600, 10)), groups).astype(np.float32)
    B = zscore_by_group(rng.standard_normal((600, 30)), groups).astype(np.float32)
    signal = np.hstack([A @ rng.standard_normal((10, 10)), B @ rng.standard_normal((30, 10)) * 0.4,
                        np.zeros((600, 10))])
    Y = (signal + 1.5 * rng.standard_normal(signal.shape)).astype(np.float32)
    splits = nested_group_splits(groups, gap=gap)
    alphas = np.logspace(-2, 4, 7).astype(np.float32)
    fast = fit_banded_chunk([A, B], Y, splits, alphas, "numpy", True, 12, 3)
    ref = fit_banded_chunk_himalaya([A, B], Y, splits, alphas, "numpy", True, 12, 3)
    kernel = fit_banded_chunk([A, B], Y, splits, alphas, "numpy", True, 12, 3, kernel=True)
    direct = fit_banded_chunk([A, B], Y, splits, alphas, "numpy", True, 12, 3, strategy="direct")
    deleted = fit_banded_chunk([A, B], Y, splits, alphas, "numpy", True, 12, 3, strategy="delete")
    for other in (ref, kernel, direct, deleted):
        same = np.abs(np.log(fast["fold_alphas"]) - np.log(other["fold_alphas"])) < 1e-3
        assert same.mean() >= 0.95, same.mean()  # near-ties between alphas may fall either way
        targets = same.all(0)
        np.testing.assert_allclose(fast["band_weights"][:, targets], other["band_weights"][:, targets], atol=1e-4)
        for key in ("r", "r2", "r2_split"):
            np.testing.assert_allclose(fast[key][..., targets], other[key][..., targets], atol=2e-4, err_msg=key)
            np.testing.assert_allclose(fast[key], other[key], atol=0.02, err_msg=key)
        scale = np.abs(other["predictions"][:, targets]).max()
        np.testing.assert_allclose(fast["predictions"][:, targets], other["predictions"][:, targets], atol=5e-3 * scale)
    # the planted band takes the larger share
    assert (fast["r2_split"][0, :10] > fast["r2_split"][1, :10]).all()
    assert (fast["r2_split"][1, 10:20] > fast["r2_split"][0, 10:20]).all()


def test_banded_ridge_with_more_features_than_samples_takes_the_kernel_form(rng):
    """120 features, 90 training samples: the kernel form fits, and the planted band takes the split."""
    groups = np.repeat(np.arange(4), 30)
    A = zscore_by_group(rng.standard_normal((120, 20)), groups)
    B = zscore_by_group(rng.standard_normal((120, 100)), groups)
    Y = zscore_by_group(np.hstack([A @ rng.standard_normal((20, 6)), B @ rng.standard_normal((100, 6)) * 0.3])
                        + 0.5 * rng.standard_normal((120, 12)), groups)
    res = fit_banded_encoding({"A": A, "B": B}, Y, groups, np.logspace(-1, 4, 6), n_iter=8)
    assert res.valid.all() and np.isfinite(res.r2_split).all()
    assert (res.r2_split[0, :6] > res.r2_split[1, :6]).all() and (res.r2_split[0, :6] > 0.3).all()
    assert (res.r2_split[1, 6:] > res.r2_split[0, 6:]).all()
