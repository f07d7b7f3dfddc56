"""Statistics of held-out scores: permutation p-values, FDR, noise ceilings.

* :func:`permutation_test`: the p-value of each target's held-out correlation under the
  null that predictions and data are unrelated, by shuffling contiguous blocks of the
  held-out data (or circularly shifting it) within each held-out fold, which keeps the
  data's autocorrelation within blocks, or by pairing each held-out run's data with other
  runs' predictions (``method="run"``), which keeps all of it; exact per fold, combined
  over the folds of a nested cross-validation by a rule valid under their dependence
  (see its Notes). :func:`auto_block_length` chooses the block length from the
  autocorrelation of the held-out data and predictions.
  Every permutation of every target is computed in batch on the himalaya backend: a
  fold's data and predictions are reduced once to block cross-products (block method:
  ``n_blocks x n_blocks`` per target, or all circular lags by FFT), after which one
  permutation costs ``n_blocks`` additions per target.
* :func:`fdr_bh`: Benjamini-Hochberg adjusted p-values; :func:`permutations_needed`: how
  many permutations the smallest attainable p-value needs for BH to reach a given number
  of discoveries.
* :func:`explainable_variance` / :func:`noise_ceiling` / :func:`normalise_by_ceiling` /
  :func:`ceiling_p_values` (from :mod:`pipelines.ceiling`, re-exported here): where a stimulus
  was repeated, the share of the response variance that is repeatable (bias-corrected), the
  highest correlation a perfect model could reach (kept only where the repeats' shared signal
  is significant), and the ceiling-normalised scores.

Constant or NaN targets are reported (``valid`` False, NaN p-values) and skipped, never
raised on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import addcmul_, choose_backend, index_array, irfft, memory_budget_bytes, rfft, use_backend
from .ceiling import NoiseCeiling, ceiling_p_values, explainable_variance, noise_ceiling, normalise_by_ceiling
from .errors import ConfigError, FitError

log = logging.getLogger("neuroflow")

__all__ = [
    "PERMUTATION_METHODS",
    "NoiseCeiling",
    "PermutationResult",
    "auto_block_length",
    "ceiling_p_values",
    "choose_permutation_method",
    "explainable_variance",
    "fdr_bh",
    "noise_ceiling",
    "normalise_by_ceiling",
    "permutation_test",
    "permutations_needed",
    "simes",
]

#: Null models of :func:`permutation_test`.
PERMUTATION_METHODS: tuple[str, ...] = ("block", "circular", "run")

#: :func:`auto_block_length`: share of the null variance of the held-out correlation that
#: blocks must keep (measured: 0.95 holds the 5% level on AR(1) 0.9 data, see bench/results/permutation-level.md)
AUTO_BLOCK_CAPTURE = 0.95
#: :func:`auto_block_length`: fewest blocks per held-out fold (6 blocks: 720 orders)
MIN_BLOCKS = 6
#: :func:`auto_block_length`: shortest block it chooses (shorter blocks cost (n / L)**2 per target and fold)
AUTO_MIN_BLOCK = 10

_GATHER_VALUES = 2**24  # floats gathered at once when summing permuted blocks (64 MiB)


@dataclass
class PermutationResult:
    """Permutation p-values of held-out correlations.

    Attributes
    ----------
    r : array of shape (n_targets,), float32
        Observed statistic: within-fold Pearson r averaged over folds weighted by size
        (equal to ``EncodingResult.r`` up to float32 rounding). NaN where invalid.
    p_values : array of shape (n_targets,), float64
        One-sided (r > 0) p-value of each target: the fold's permutation p-value when
        there is one held-out fold, else the Simes combination of the folds' p-values
        (see :func:`permutation_test`). NaN where invalid.
    p_folds : array of shape (n_folds, n_targets), float64
        ``(1 + #{null >= observed}) / (1 + n_null)`` in each held-out fold (``n_null``:
        ``n_permutations``, or the number of distinct circular shifts if smaller).
    valid : array of shape (n_targets,), bool
        False for targets whose data or predictions are constant within a fold or not
        finite on held-out samples: skipped.
    n_permutations : int
    method : str
    block_length : int
        Block length (block method) or smallest shift (circular method), in samples, as
        given or as :func:`auto_block_length` chose it; 0 for the run method.
    """

    r: np.ndarray
    p_values: np.ndarray
    p_folds: np.ndarray
    valid: np.ndarray
    n_permutations: int
    method: str
    block_length: int

    def significant(self, q: float = 0.05) -> np.ndarray:
        """Targets significant at FDR ``q`` (Benjamini-Hochberg over valid targets)."""
        return fdr_bh(self.p_values, q)[0]


# --------------------------------------------------------------------------- FDR


def fdr_bh(p_values: np.ndarray, q: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg false discovery rate control.

    Parameters
    ----------
    p_values : array of shape (n_tests,)
        p-values; NaN entries are ignored (not tests) and never rejected.
    q : float
        Target false discovery rate, in (0, 1).

    Returns
    -------
    rejected : array of shape (n_tests,), bool
        True where the null is rejected at FDR ``q``.
    p_adjusted : array of shape (n_tests,), float64
        BH-adjusted p-values (``min_{k >= i} m p_(k) / k``, at most 1); NaN where the
        input is NaN.
    """
    if not (0 < q < 1):
        raise ConfigError(f"'q' must lie in (0, 1); got {q!r}.")
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        ranked = p[order] * m / np.arange(1, m + 1)
        adjusted[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    rejected = np.zeros(p.shape, dtype=bool)
    rejected[ok] = adjusted[ok] <= q
    return rejected, adjusted


def permutations_needed(n_tests: int, q: float = 0.05, min_discoveries: int = 1) -> int:
    """Permutations for BH at ``q`` to be able to declare ``min_discoveries`` targets.

    With ``n`` permutations the smallest p-value is ``1 / (n + 1)``; BH rejects ``k``
    of ``m`` tests only if their p-values are at most ``q k / m``. So
    ``n >= m / (q k) - 1``. E.g. 20,000 voxels, q = 0.05, 200 discoveries: 1,999.
    (Simes' combination over the folds of a nested cross-validation reaches that
    smallest p-value when every fold does.)
    """
    if n_tests < 1 or min_discoveries < 1:
        raise ConfigError(f"'n_tests' and 'min_discoveries' must be >= 1; got {n_tests}, {min_discoveries}.")
    return max(1, math.ceil(n_tests / (q * min_discoveries) - 1))


def simes(p_folds: np.ndarray) -> np.ndarray:
    """Simes' combination of the p-values of several tests of one hypothesis.

    Parameters
    ----------
    p_folds : array of shape (n_tests, n_targets)

    Returns
    -------
    p : array of shape (n_targets,)
        ``min_i n_tests p_(i) / i`` over the sorted p-values of each column (the
        p-value itself when there is one test); NaN where a column has a NaN.
    """
    p = np.asarray(p_folds, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    k = p.shape[0]
    ranked = np.sort(p, axis=0) * k / np.arange(1, k + 1)[:, None]
    return np.minimum(ranked.min(axis=0), 1.0)


# --------------------------------------------------------------------------- permutations


def _fold_rows(sample_fold: np.ndarray) -> list[np.ndarray]:
    folds = [f for f in np.unique(sample_fold) if f >= 0]
    if not folds:
        raise FitError("'sample_fold' marks no held-out sample (all -1); nothing to test.")
    return [np.flatnonzero(sample_fold == f) for f in folds]


def _zscore_columns(bk: Any, A: Any) -> Any:
    A = A - A.mean(0)[None, :]
    norm = (A * A).mean(0) ** 0.5
    return A / (norm + (norm == 0))[None, :]


def _block_null(bk: Any, Yz: Any, Pz: Any, perms: np.ndarray, L: int) -> tuple[Any, Any]:
    """Observed and permuted sums ``sum_i y_pi(i) p_i`` for block permutations.

    ``perms`` has shape (n_perm, n_blocks); row ``k`` sends block ``perms[k, b]`` of the
    data to the place of block ``b`` of the predictions. Samples after the last whole
    block stay in place.
    """
    n, t = Yz.shape
    n_blocks = n // L
    cut = n_blocks * L
    Pb = Pz[:cut].reshape(n_blocks, L, t)
    Yb = Yz[:cut].reshape(n_blocks, L, t)
    # C[b, c, j] = sum_k P[b L + k, j] Y[c L + k, j], by broadcast products (a batched
    # GEMM over targets with strided operands is erratic on CPU torch)
    C = bk.zeros_like(Yz, shape=(n_blocks, n_blocks, t))
    for k in range(L):
        addcmul_(bk, C, Pb[:, k, None, :], Yb[None, :, k, :])
    rest = (Yz[cut:] * Pz[cut:]).sum(0) if cut < n else bk.zeros_like(Yz[0])
    flat = C.reshape(n_blocks * n_blocks, t)
    observed = flat[::n_blocks + 1].sum(0) + rest
    index = np.arange(n_blocks)[None, :] * n_blocks + perms  # (n_perm, n_blocks)
    n_perm = perms.shape[0]
    step = max(1, _GATHER_VALUES // max(1, t * n_blocks))  # bounded gather temporaries
    parts = []
    for start in range(0, n_perm, step):
        idx = index_array(bk, index[start:start + step].ravel(), flat)
        parts.append(flat[idx].reshape(-1, n_blocks, t).sum(1))
    null = bk.concatenate(parts, 0) + rest[None, :]
    return observed, null.T  # (t,), (t, n_perm)


def _circular_null(bk: Any, Yz: Any, Pz: Any, shifts: np.ndarray) -> tuple[Any, Any]:
    """Observed and circularly shifted sums ``sum_i y_(i+s mod n) p_i`` (all lags by FFT)."""
    n = Yz.shape[0]
    size = 1 << (2 * n - 1).bit_length()  # zero-padded: plain cross-correlation, then wrap
    Fy = rfft(bk, Yz, size)
    Fp = rfft(bk, Pz, size)
    lags = irfft(bk, Fy * Fp.conj(), size)  # lags[s] = sum_i y[i + s] p[i], s in (-n, n)
    circular = lags[:n] + bk.concatenate([lags[:1] * 0, lags[size - n + 1:]], 0)
    return circular[0], circular[index_array(bk, shifts, circular)].T  # (t,), (t, n_perm)


def _lag_products(Y: np.ndarray, P: np.ndarray, folds: list[np.ndarray], max_lag: int,
                  n_probe: int = 1000) -> np.ndarray:
    """``c[k]``, k = 0..max_lag: median over targets of ``acf_Y(k) acf_P(k)``, averaged over folds by size.

    Bartlett: under the null the variance of a held-out correlation of ``n`` samples is
    ``(1 + 2 sum_k c[k]) / n``. At most ``n_probe`` targets (evenly spaced) are read.
    """
    cols = np.unique(np.linspace(0, Y.shape[1] - 1, min(n_probe, Y.shape[1])).round().astype(int))
    total = np.zeros(max_lag + 1)
    weight = 0.0
    for rows in folds:
        n = rows.size
        size = 1 << (2 * n - 1).bit_length()
        step = max(1, 2**22 // size)  # columns per FFT: bounded temporaries on long (MEG) folds
        products = np.ones((max_lag + 1, cols.size))
        for first in range(0, cols.size, step):
            part = cols[first:first + step]
            for A in (Y[np.ix_(rows, part)], P[np.ix_(rows, part)]):
                A = np.asarray(A, dtype=np.float64)
                A = A - A.mean(0)
                F = np.fft.rfft(A, size, axis=0)
                acov = np.fft.irfft(F * F.conj(), size, axis=0)[:max_lag + 1]
                products[:, first:first + part.size] *= acov / np.where(acov[:1] > 0, acov[:1], 1.0)
        total += n * np.median(products, axis=1)
        weight += n
    return total / weight


def auto_block_length(Y: np.ndarray, predictions: np.ndarray, sample_fold: np.ndarray, *,
                      capture: float = AUTO_BLOCK_CAPTURE, min_blocks: int = MIN_BLOCKS) -> int:
    """The block length a block permutation of these held-out data needs to hold its level.

    Under the null the variance of a held-out correlation is ``(1 + 2 sum_k c_k) / n``
    (Bartlett), ``c_k`` being the product of the data's and the predictions'
    autocorrelations at lag ``k`` (median over targets, see :func:`_lag_products`; summed
    up to its first lag <= 0). Shuffling blocks of ``L`` samples keeps the pairs within a
    block, ``1 + 2 sum_{k<L} (1 - k/L) c_k`` of it; the shortest ``L`` keeping ``capture``
    of the variance is returned, at least :data:`AUTO_MIN_BLOCK` (the cost of the test grows
    as ``1 / L``) and at most the shortest fold's length over ``min_blocks``.

    Parameters
    ----------
    Y, predictions : arrays of shape (n_samples, n_targets)
    sample_fold : array of shape (n_samples,), int
        Held-out fold of each sample, -1 for none.
    capture : float
        Share of the null variance to keep, in (0, 1).
    min_blocks : int
        Fewest blocks per fold (caps ``L``).

    Returns
    -------
    block_length : int
        At least 1. A warning is logged when the cap is shorter than the autocorrelation needs
        (the p-values are then optimistic: fewer folds, or whole runs, help).
    """
    Y, P, sample_fold = paired_held_out(Y, predictions, sample_fold, np.float32, ("Y", "predictions"))
    folds = _fold_rows(sample_fold)
    held = np.concatenate(folds)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(Y[held]).all(0) & np.isfinite(P[held]).all(0)
        for rows in folds:
            ok &= (np.ptp(Y[rows], axis=0) > 0) & (np.ptp(P[rows], axis=0) > 0)
    shortest = min(rows.size for rows in folds)
    cap = max(1, shortest // min_blocks)
    if not ok.any() or shortest < 4:
        return cap if shortest // cap >= 2 else 1
    c = _lag_products(Y[:, ok], P[:, ok], folds, max(1, shortest // 2))[1:]
    stop = np.flatnonzero(c <= 0)
    if stop.size:
        c = c[:stop[0]]
    total = 1.0 + 2.0 * c.sum()
    k = np.arange(1, c.size + 1)
    for L in range(1, shortest + 1):
        kept = 1.0 + 2.0 * (np.clip(1.0 - k / L, 0.0, None) * c).sum()
        if kept >= capture * total:
            break
    L = max(L, min(AUTO_MIN_BLOCK, cap))
    if L > cap:
        log.warning("permutation test: the held-out data's autocorrelation needs blocks of %d samples, but "
                    "folds of %d samples allow %d blocks of at most %d; p-values may be optimistic (fewer, "
                    "longer folds help)", L, shortest, min_blocks, cap)
        return cap
    return int(L)


def choose_permutation_method(n_folds: int, n_permutations: int) -> str:
    """``"run"`` where held-out whole runs give at least as many null pairs as the permutations asked
    for (``n_folds (n_folds - 1) >= n_permutations``), else ``"block"``."""
    return "run" if n_folds >= 3 and n_folds * (n_folds - 1) >= n_permutations else "block"


def _run_null(bk: Any, Y: np.ndarray, P: np.ndarray, folds: list[np.ndarray], cols: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Observed and swapped statistics ``r sqrt(m)`` of every (data fold, prediction fold) pair.

    Returns ``S`` of shape (n_folds, n_folds, n_targets): data of fold ``f`` against the
    predictions of fold ``g`` over their first ``m = min(n_f, n_g)`` samples, and each fold's
    own ``r`` (on all its samples).
    """
    n = len(folds)
    S = np.empty((n, n, cols.size))
    own = np.empty((n, cols.size))
    for f, rf in enumerate(folds):
        for g, rg in enumerate(folds):
            m = min(rf.size, rg.size)
            Yz = _zscore_columns(bk, bk.asarray(Y[np.ix_(rf[:m], cols)]))
            Pz = _zscore_columns(bk, bk.asarray(P[np.ix_(rg[:m], cols)]))
            r = bk.to_numpy((Yz * Pz).mean(0)).astype(np.float64)
            S[f, g] = r * math.sqrt(m)
            if f == g:
                own[f] = r
    return S, own


def paired_held_out(observed: np.ndarray, predicted: np.ndarray, sample_fold: np.ndarray, dtype: Any,
                    names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Observed and predicted as 2-D arrays of one shape, with one fold label per row, else FitError."""
    A = np.asarray(observed, dtype=dtype)
    B = np.asarray(predicted, dtype=dtype)
    if A.ndim == 1:
        A, B = A[:, None], B.reshape(-1, 1)
    sample_fold = np.asarray(sample_fold)
    if A.shape != B.shape or sample_fold.shape != (A.shape[0],):
        raise FitError(f"{names[0]}, {names[1]} and sample_fold must have shapes (n, k), (n, k), (n,); got "
                       f"{A.shape}, {B.shape}, {sample_fold.shape}.")
    return A, B, sample_fold


def permutation_test(
    Y: np.ndarray,
    predictions: np.ndarray,
    sample_fold: np.ndarray,
    *,
    n_permutations: int = 1000,
    method: str = "block",
    block_length: int | str = "auto",
    random_state: int = 0,
    backend: str = "auto",
    n_targets_batch: int | None = None,
) -> PermutationResult:
    """Permutation p-values of the held-out correlation of every target.

    Parameters
    ----------
    Y : array of shape (n_samples, n_targets)
        Observed responses.
    predictions : array of shape (n_samples, n_targets)
        Held-out predictions (``EncodingResult.predictions``).
    sample_fold : array of shape (n_samples,), int
        Outer fold that held out each sample, -1 for none (``EncodingResult.sample_fold``).
    n_permutations : int
        Permutations (the same ones for every target). See :func:`permutations_needed`
        for how many BH needs.
    method : {"block", "circular", "run"}
        ``"block"``: the held-out data of each fold are cut into blocks of
        ``block_length`` samples whose order is shuffled (a remainder shorter than a
        block stays in place); ``"circular"``: they are shifted circularly by a lag of
        at least ``block_length`` samples from either end, every such lag once when
        there are at most ``n_permutations`` of them (a fold of ``n`` samples has only
        ``n - 2 * block_length + 1``, which bounds its smallest p-value), else a random
        subset. Folds are permuted independently; predictions stay in place.
        ``"run"`` (folds that are whole runs, at least 3): each fold's ``r sqrt(n)`` is
        ranked among those of every pair of one fold's data with another fold's
        predictions (their first ``min(n_f, n_g)`` samples): ``n_folds (n_folds - 1)``
        null values that keep all of the data's and the predictions' autocorrelation
        (``n_permutations`` and ``block_length`` are not used).
    block_length : int or "auto"
        Samples per block (or smallest circular shift); longer than the data's
        autocorrelation. ``"auto"``: :func:`auto_block_length` of these data.
    random_state : int
        Seed of the permutations.
    backend : str
        ``"auto"`` or a himalaya backend name (GPU backends compute on the device; the
        CPU torch backend is run as numpy, faster for these memory-bound kernels).
    n_targets_batch : int or None
        Targets per batch; None: from the free memory.

    Returns
    -------
    result : PermutationResult

    Notes
    -----
    Within one held-out fold the test is exact: the fold's predictions come from a
    model that never saw the fold's data, so under the null they are independent of it
    and permuting blocks of the data draws from the null. Across the folds of a nested
    cross-validation it is not: each fold's predictions were trained on the *other*
    folds' data, which correlates the folds' scores under the null (by about
    ``1 / (n_folds - 1)`` for ridge: the term ``y_f' X_f M X_g' y_g`` enters the scores of
    folds ``f`` and ``g`` alike), so the null of the pooled ``r`` built from independent
    per-fold permutations is too narrow (about twice too many false positives, measured).
    The folds' exact p-values are therefore combined by Simes' test,
    ``min_i n_folds p_(i) / i``, valid under positive dependence of the folds' statistics
    (Sarkar 1998), which is the case here. Measured on pure noise (3 to 8 folds, 4,000
    targets): 4-5% of Simes p-values below 0.05, against 11% for the pooled null (and
    5-6% for a Cauchy combination; 0% for twice the mean p-value). With a held-out
    test set (``fit_encoding(..., test_groups=...)``) there is one fold and the p-value
    is the fold's own.

    Blocks must be as long as the joint autocorrelation of data and predictions: with
    AR(1) 0.9 responses and slow Lanczos-resampled word features, blocks of 10 samples
    give 10-12% of null p-values below 0.05, ``block_length="auto"`` 3.8-5.0% and
    ``method="run"`` 0-0.4% (conservative: its p-values are coarse with few runs;
    bench/results/permutation-level.md).

    Raises
    ------
    FitError
        Shapes that do not match, no held-out sample, or a fold too short for two blocks.
    ConfigError
        Bad ``n_permutations``, ``method`` or ``block_length``.
    """
    if method not in PERMUTATION_METHODS:
        raise ConfigError(f"'method' must be one of {', '.join(PERMUTATION_METHODS)}; got {method!r}.")
    checks = [("n_permutations", n_permutations)] + ([] if block_length == "auto" else [("block_length", block_length)])
    for name, value in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            also = " or 'auto'" if name == "block_length" else ""
            raise ConfigError(f"'{name}' must be an integer >= 1{also}; got {value!r}.")
    Y, P, sample_fold = paired_held_out(Y, predictions, sample_fold, np.float32, ("Y", "predictions"))
    folds = _fold_rows(sample_fold)
    if method == "run" and len(folds) < 3:
        raise FitError(f"method 'run' pairs held-out runs with each other's predictions and needs at least 3 "
                       f"held-out folds; got {len(folds)}. Use method 'block'.")
    if method == "run":
        block_length = 0
    elif block_length == "auto":
        block_length = auto_block_length(Y, P, sample_fold)
    for rows in folds:
        if method != "run" and (rows.size // block_length < 2
                                or (method == "circular" and rows.size <= 2 * block_length)):
            raise FitError(f"A held-out fold of {rows.size} samples is too short to permute blocks of "
                           f"{block_length}; lower 'block_length'.")
    weights = np.array([rows.size for rows in folds], dtype=np.float64)
    weights /= weights.sum()

    held = np.concatenate(folds)
    n_targets = Y.shape[1]
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(Y[held]).all(0) & np.isfinite(P[held]).all(0)
        for rows in folds:
            valid &= (np.ptp(Y[rows], axis=0) > 0) & (np.ptp(P[rows], axis=0) > 0)

    rng = np.random.default_rng(random_state)
    draws = []
    for rows in folds:
        if method == "run":
            draws.append(np.empty(len(folds) * (len(folds) - 1)))
        elif method == "block":
            n_blocks = rows.size // block_length
            draws.append(np.argsort(rng.random((n_permutations, n_blocks)), axis=1))
        else:  # every allowed shift once when there are no more of them than permutations
            shifts = np.arange(block_length, rows.size - block_length + 1)
            draws.append(shifts if shifts.size <= n_permutations
                         else np.sort(rng.choice(shifts, size=n_permutations, replace=False)))

    r = np.full(n_targets, np.nan, dtype=np.float32)
    p_folds = np.full((len(folds), n_targets), np.nan, dtype=np.float64)
    idx = np.flatnonzero(valid)
    backend_name = choose_backend(backend)
    if backend_name == "torch":
        # on CPU these memory-bound gathers and products run several times faster in
        # numpy than in torch (whose thread pool costs more than the work here)
        backend_name = "numpy"
    if n_targets_batch is None:
        longest = max(rows.size for rows in folds)
        per_target = 4 * (8 * longest + 3 * n_permutations + (longest // max(block_length, 1)) ** 2
                          + 4 * len(folds) ** 2)
        n_targets_batch = max(1, memory_budget_bytes(backend_name) // per_target)
    with use_backend(backend_name) as bk:
        for start in range(0, idx.size, n_targets_batch):
            cols = idx[start:start + n_targets_batch]
            if method == "run":
                S, own = _run_null(bk, Y, P, folds, cols)
                null = S[~np.eye(len(folds), dtype=bool)]  # (n_folds (n_folds - 1), targets)
                for k, rows in enumerate(folds):
                    exceed = (null >= S[k, k][None, :] - 1e-6 * math.sqrt(rows.size)).sum(0)
                    p_folds[k, cols] = (1.0 + exceed) / (1.0 + null.shape[0])
                r[cols] = weights @ own
                continue
            observed = np.zeros(cols.size, dtype=np.float64)
            for k, (rows, draw, w) in enumerate(zip(folds, draws, weights)):
                Yz = _zscore_columns(bk, bk.asarray(Y[np.ix_(rows, cols)]))
                Pz = _zscore_columns(bk, bk.asarray(P[np.ix_(rows, cols)]))
                if method == "block":
                    obs, null = _block_null(bk, Yz, Pz, draw, block_length)
                else:
                    obs, null = _circular_null(bk, Yz, Pz, draw)
                obs = bk.to_numpy(obs).astype(np.float64)
                # the identity permutation went through the same arithmetic: a tolerance
                # of float32 rounding counts ties as exceedances (conservative)
                exceed = bk.to_numpy((null >= bk.asarray_like(obs[:, None] - 1e-6 * rows.size, null)).sum(1))
                p_folds[k, cols] = (1.0 + exceed) / (1.0 + len(draw))
                observed += w * obs / rows.size
                del Yz, Pz, null
            r[cols] = observed
    p_values = simes(p_folds)
    return PermutationResult(r=r, p_values=p_values, p_folds=p_folds, valid=valid,
                             n_permutations=int(n_permutations), method=method, block_length=int(block_length))
