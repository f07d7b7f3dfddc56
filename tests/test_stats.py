"""Permutation p-values, FDR and noise ceilings of held-out scores."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import false_discovery_control, kstest

from pipelines.backend import use_backend
from pipelines.errors import ConfigError, FitError
from pipelines.features.align import make_delays
from pipelines.fit import fit_encoding, zscore_by_group
from pipelines.simulate import ar1_noise, slow_word_features
from pipelines.stats import (
    _block_null,
    _circular_null,
    auto_block_length,
    ceiling_p_values,
    choose_permutation_method,
    explainable_variance,
    fdr_bh,
    noise_ceiling,
    normalise_by_ceiling,
    permutation_test,
    permutations_needed,
    simes,
)

ALPHAS = [1.0, 10.0, 100.0, 1000.0, 1e4]


def ar1(rng: np.random.Generator, n: int, t: int, phi: float = 0.5) -> np.ndarray:
    """Autocorrelated noise, like fMRI residuals (correlation phi at lag 1)."""
    e = rng.standard_normal((n, t))
    out = np.empty_like(e)
    out[0] = e[0]
    for i in range(1, n):
        out[i] = phi * out[i - 1] + np.sqrt(1 - phi**2) * e[i]
    return out


@pytest.fixture(scope="module")
def noise_fit():
    """Pure noise responses (AR(1)) fit on random features: every target is null."""
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(5), 200)
    X = zscore_by_group(rng.standard_normal((1000, 20)), groups)
    Y = zscore_by_group(ar1(rng, 1000, 6000), groups)
    return X, Y, groups


def at_most_level(p: np.ndarray, level: float = 0.05) -> bool:
    """No more than ``level`` of null p-values at or below it, up to sampling error.

    An exact test gives ``level`` in expectation; over ``m`` targets the fraction
    fluctuates by ``sqrt(level (1 - level) / m)`` (0.28% for 6,000 targets; measured
    over 8 seeds: 4.2-5.9%, mean 4.9-5.2%), so three standard errors are allowed.
    """
    return (p <= level).mean() <= level + 3 * np.sqrt(level * (1 - level) / p.size)


# ----------------------------------------------------------------------------- FDR


def test_fdr_bh_matches_scipy_and_skips_nan(rng):
    p = rng.random(200) ** 3
    rejected, adjusted = fdr_bh(p, 0.05)
    np.testing.assert_allclose(adjusted, false_discovery_control(p), rtol=1e-12)
    assert rejected.sum() == (adjusted <= 0.05).sum() > 0
    p_nan = np.concatenate([p, [np.nan, np.nan]])
    rej2, adj2 = fdr_bh(p_nan)
    np.testing.assert_array_equal(rej2[:200], rejected)
    assert np.isnan(adj2[200:]).all() and not rej2[200:].any()
    with pytest.raises(ConfigError, match="'q' must lie in"):
        fdr_bh(p, 1.5)


def test_permutations_needed_and_simes():
    assert permutations_needed(20000, 0.05, 200) == 1999
    assert permutations_needed(100, 0.05, 1) == 1999
    np.testing.assert_allclose(simes(np.array([[0.01, 0.2], [0.04, 0.5], [0.03, 0.9]])), [0.03, 0.6])
    np.testing.assert_allclose(simes(np.array([0.3, 0.02])), [0.3, 0.02])


# ----------------------------------------------------------------------------- permutations


def test_batched_nulls_equal_brute_force(rng):
    n, t, L = 95, 6, 10
    Y, P = rng.standard_normal((n, t)), rng.standard_normal((n, t))
    perms = np.argsort(rng.random((7, n // L)), axis=1)
    shifts = np.array([10, 33, 80])
    for backend in ("numpy", "torch"):
        with use_backend(backend) as bk:
            obs, null = _block_null(bk, bk.asarray(Y), bk.asarray(P), perms, L)
            obs_c, null_c = _circular_null(bk, bk.asarray(Y), bk.asarray(P), shifts)
            obs, null, obs_c, null_c = (bk.to_numpy(a) for a in (obs, null, obs_c, null_c))
        np.testing.assert_allclose(obs, (Y * P).sum(0), rtol=1e-5)
        np.testing.assert_allclose(obs_c, (Y * P).sum(0), rtol=1e-4, atol=1e-4)
        for k, perm in enumerate(perms):
            order = np.concatenate([np.arange(c * L, (c + 1) * L) for c in perm] + [np.arange(90, 95)])
            np.testing.assert_allclose(null[:, k], (Y[order] * P).sum(0), rtol=1e-5, atol=1e-5)
        for k, s in enumerate(shifts):
            np.testing.assert_allclose(null_c[:, k], (np.roll(Y, -s, axis=0) * P).sum(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["block", "circular"])
def test_null_p_values_are_uniform_on_a_held_out_test_set(noise_fit, method):
    """One held-out fold: the permutation test is exact, p-values uniform."""
    X, Y, groups = noise_fit
    res = fit_encoding(X, Y, groups, ALPHAS, test_groups=[4])
    perm = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=999, method=method)
    p = perm.p_values
    assert perm.valid.all() and np.isfinite(p).all()
    assert at_most_level(p)  # before any correction
    assert kstest(p, "uniform").pvalue > 0.01
    assert perm.significant(0.05).sum() == 0


def test_null_p_values_of_nested_cv_are_not_anti_conservative(noise_fit):
    """Nested CV: folds' scores are correlated under the null; Simes keeps the level."""
    X, Y, groups = noise_fit
    res = fit_encoding(X, Y, groups, ALPHAS)
    perm = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=999)
    np.testing.assert_allclose(perm.r, res.r, atol=1e-5)  # the same statistic as the fit's r
    assert perm.p_folds.shape == (5, Y.shape[1])
    for fold in perm.p_folds:  # each fold's test is exact
        assert at_most_level(fold)
    assert at_most_level(perm.p_values)
    assert perm.significant(0.05).sum() == 0


def test_planted_signal_is_significant_after_fdr(rng):
    groups = np.repeat(np.arange(5), 200)
    X = zscore_by_group(rng.standard_normal((1000, 10)), groups)
    Y = ar1(rng, 1000, 1000)
    Y[:, :50] += X @ rng.standard_normal((10, 50)) * 0.15
    Y = zscore_by_group(Y, groups)
    res = fit_encoding(X, Y, groups, ALPHAS)
    perm = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=1999)
    sig = perm.significant(0.05)
    assert sig[:50].mean() > 0.9 and sig[50:].sum() <= 0.1 * sig.sum()  # FDR 5%, with margin
    # a circular shift of a 200-sample fold has only 181 distinct nulls: its p-values cannot go lower
    circ = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=1999, method="circular",
                            block_length=10)
    assert circ.p_folds.min() == pytest.approx(1 / 182)


def slow_null_fit(seed: int, n_runs: int, n_trs: int, n_targets: int):
    """AR(1) 0.9 noise responses fitted on slow word-rate-like features (Lanczos, delays 1-4), nested
    leave-one-run-out: every target is null, and data and predictions are both autocorrelated."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_runs), n_trs)
    X = np.concatenate([slow_word_features(rng, n_trs) for _ in range(n_runs)])
    X = make_delays(zscore_by_group(X, groups), [n_trs] * n_runs, [1, 2, 3, 4])
    Y = zscore_by_group(ar1_noise(rng, n_runs * n_trs, n_targets, 0.9).astype(np.float32), groups)
    return Y, fit_encoding(X, Y, groups, [1, 10, 100, 1e3, 1e4, 1e5], backend="numpy")


@pytest.mark.slow
def test_auto_blocks_hold_the_level_on_slow_autocorrelated_data():
    """AR(1) 0.9 noise and slow features: fixed blocks of 10 samples give about 11% of p < 0.05 on
    null targets; blocks sized from the data's autocorrelation hold 5% (at most 6% asked)."""
    Y, res = slow_null_fit(0, n_runs=5, n_trs=300, n_targets=2000)
    fixed = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=999, block_length=10)
    auto = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=999)
    assert (fixed.p_values < 0.05).mean() > 0.08  # the problem this solves is there
    assert auto.block_length > 20 and auto.block_length == auto_block_length(Y, res.predictions, res.sample_fold)
    assert (auto.p_values < 0.05).mean() <= 0.06
    assert auto_block_length(*ar1_data_pair(0.0)) == 10  # white data: the shortest blocks it uses
    assert 10 < auto_block_length(*ar1_data_pair(0.8)) < auto_block_length(*ar1_data_pair(0.95)) <= 250 // 6


def ar1_data_pair(phi: float):
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(4), 250)
    return ar1_noise(rng, 1000, 300, phi), ar1_noise(rng, 1000, 300, phi), groups


@pytest.mark.slow
def test_whole_run_null_holds_the_level_with_many_runs():
    Y, res = slow_null_fit(1, n_runs=12, n_trs=150, n_targets=1000)
    run = permutation_test(Y, res.predictions, res.sample_fold, method="run")
    assert run.method == "run" and run.block_length == 0 and run.p_folds.shape == (12, 1000)
    np.testing.assert_allclose(run.r, res.r, atol=1e-5)
    assert run.p_folds.min() >= 1 / (12 * 11 + 1)
    assert (run.p_values < 0.05).mean() <= 0.06
    assert choose_permutation_method(30, 870) == "run" and choose_permutation_method(30, 1000) == "block"


def test_whole_run_null_finds_a_planted_signal_and_needs_three_runs(rng):
    groups = np.repeat(np.arange(12), 100)
    X = zscore_by_group(rng.standard_normal((1200, 10)), groups)
    Y = ar1(rng, 1200, 200, 0.7)
    Y[:, :20] += X @ rng.standard_normal((10, 20)) * 0.3
    Y = zscore_by_group(Y, groups)
    res = fit_encoding(X, Y, groups, ALPHAS)
    run = permutation_test(Y, res.predictions, res.sample_fold, method="run")
    assert (run.p_values[:20] < 0.05).all() and (run.p_values[20:] < 0.05).mean() <= 0.1
    with pytest.raises(FitError, match="method 'run' .* needs at least 3 held-out folds"):
        permutation_test(Y[:200], res.predictions[:200], groups[:200], method="run")


def test_constant_and_nan_targets_are_skipped_not_fatal(rng):
    groups = np.repeat(np.arange(3), 60)
    Y = rng.standard_normal((180, 5)).astype(np.float32)
    P = rng.standard_normal((180, 5)).astype(np.float32)
    Y[:, 1] = 2.0
    Y[7, 2] = np.nan
    P[:, 3] = 0.0  # a model that predicts nothing
    perm = permutation_test(Y, P, groups, n_permutations=99)
    np.testing.assert_array_equal(perm.valid, [True, False, False, False, True])
    assert np.isnan(perm.p_values[1:4]).all() and np.isfinite(perm.p_values[[0, 4]]).all()
    assert np.isnan(perm.r[1:4]).all()


def test_backends_agree_and_bad_arguments_are_refused(rng):
    groups = np.repeat(np.arange(3), 100)
    Y = rng.standard_normal((300, 40))
    P = Y * 0.1 + rng.standard_normal((300, 40))
    a = permutation_test(Y, P, groups, n_permutations=199, backend="numpy")
    b = permutation_test(Y, P, groups, n_permutations=199, backend="torch")
    np.testing.assert_array_equal(a.p_values, b.p_values)
    with pytest.raises(ConfigError, match="'method' must be one of block, circular"):
        permutation_test(Y, P, groups, method="phase")
    with pytest.raises(ConfigError, match="'n_permutations' must be an integer >= 1"):
        permutation_test(Y, P, groups, n_permutations=0)
    with pytest.raises(ConfigError, match="'block_length' must be an integer >= 1 or 'auto'"):
        permutation_test(Y, P, groups, block_length="long")
    with pytest.raises(FitError, match="too short to permute blocks of 80"):
        permutation_test(Y, P, groups, block_length=80)
    with pytest.raises(FitError, match="marks no held-out sample"):
        permutation_test(Y, P, np.full(300, -1))


# ----------------------------------------------------------------------------- noise ceiling


def test_explainable_variance_is_unbiased_and_gives_the_ceiling(rng):
    n_rep, n, t = 4, 300, 2000
    snr = np.linspace(0, 2, t)  # signal variance / noise variance
    signal = rng.standard_normal((n, t)) * np.sqrt(snr)
    repeats = signal[None] + rng.standard_normal((n_rep, n, t))
    ev = explainable_variance(repeats)
    truth = snr / (1 + snr)
    # bias-corrected: unbiased over targets (the raw ratio is biased upward by noise / n_repeats)
    assert abs(np.mean(ev - truth)) < 0.01
    raw = explainable_variance(repeats, bias_correction=False)
    assert np.mean(raw - truth) > 0.1
    ceiling = noise_ceiling(repeats)
    strong = truth > 0.4
    expected = np.sqrt(n_rep * truth / (1 + (n_rep - 1) * truth))  # r of the signal with the mean of repeats
    np.testing.assert_allclose(ceiling.r_max[strong], expected[strong], atol=0.05)
    # the signal itself, scored against the mean of the repeats, reaches its ceiling
    mean = repeats.mean(0)
    r_signal = np.array([np.corrcoef(signal[:, j], mean[:, j])[0, 1] for j in np.flatnonzero(strong)[:50]])
    normalised = normalise_by_ceiling(r_signal, ceiling.r_max[np.flatnonzero(strong)[:50]])
    assert abs(np.mean(normalised) - 1) < 0.03
    assert np.isnan(normalise_by_ceiling([0.2], [0.05])).all()


def test_noise_ceiling_skips_constant_targets(rng):
    repeats = rng.standard_normal((3, 50, 4))
    repeats[:, :, 1] = 1.0
    repeats[1, 3, 2] = np.nan
    ev = explainable_variance(repeats)
    assert np.isnan(ev[[1, 2]]).all() and np.isfinite(ev[[0, 3]]).all()
    assert np.isnan(noise_ceiling(repeats).r_max[[1, 2]]).all()
    with pytest.raises(FitError, match="n_repeats >= 2"):
        explainable_variance(repeats[:1])


def test_targets_without_repeatable_signal_get_no_ceiling_normalised_score():
    """AR(1) 0.9 noise in 3 repeats: without a reliability test about half of the pure-noise targets get a
    ceiling (ev > 0 by chance) and a normalised score; with it (split halves, phase-randomised, p <= 0.05)
    about 5%, while targets with a planted repeatable signal keep theirs."""
    rng = np.random.default_rng(4)
    n, n_null, n_signal = 290, 3000, 200
    repeats = np.stack([ar1_noise(rng, n, n_null + n_signal, 0.9) for _ in range(3)])
    repeats[:, :, n_null:] += ar1_noise(rng, n, n_signal, 0.5)[None]  # ev = 0.5
    untested = noise_ceiling(repeats, reliability=None)
    tested = noise_ceiling(repeats)
    r = np.full(n_null + n_signal, 0.3)  # any model's held-out r
    before = np.isfinite(normalise_by_ceiling(r, untested.r_max))
    after = np.isfinite(normalise_by_ceiling(r, tested.r_max))
    assert before[:n_null].mean() > 0.3
    assert after[:n_null].mean() <= 0.07
    assert after[n_null:].mean() > 0.95
    assert tested.reliability == 0.05 and tested.p_value.shape == (n_null + n_signal,)
    # the p-values of pure noise are (close to) uniform, whatever the autocorrelation
    for phi in (0.0, 0.9):
        noise = np.stack([ar1_noise(rng, 300, 2000, phi) for _ in range(2)])
        assert at_most_level(ceiling_p_values(noise), 0.05 + 0.01)  # phase randomisation: at most ~6%
    with pytest.raises(ConfigError, match="'reliability' must lie in"):
        noise_ceiling(repeats, reliability=1.5)
