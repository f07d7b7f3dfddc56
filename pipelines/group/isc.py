"""Inter-subject ceilings: what a model of the stimulus could reach where a dataset has no repeats.

Subjects who heard the same story stand in for repeats (Nastase et al. 2019, 2021): the part of a
subject's response that the mean of the other subjects predicts is driven by the stimulus.

For each held-out subject ``i`` and target, ``r_loso`` is the correlation of its responses with
the mean of the others' (leave one subject out). The mean of ``k`` others is itself noisy: if
each subject is ``signal + noise`` with reliability ``rho**2 = var(signal) / var(response)``,
``r_loso = rho_i * rho_mean`` with ``rho_mean**2`` the Spearman-Brown reliability of the mean of
``k`` subjects, ``k rbar / (1 + (k - 1) rbar)``, where ``rbar`` is the mean pairwise correlation
among the others. So the ceiling of a model of subject ``i`` (its correlation with the shared
signal) is ``r_max = r_loso / rho_mean``, clipped at 1. It is kept only where ``r_loso`` is
reliably above zero against circular time shifts of the held-out subject (which keep each
series' autocorrelation): ``p <= reliability``; elsewhere NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = ["IntersubjectCeiling", "intersubject_ceiling", "shift_null_p"]


@dataclass
class IntersubjectCeiling:
    """Leave-one-subject-out ceilings.

    Attributes
    ----------
    r_loso : array of shape (n_subjects, n_targets)
        Correlation of each subject with the mean of the others.
    r_max : array of shape (n_subjects, n_targets)
        Ceiling of a model of each subject (``r_loso`` corrected for the noise left in the mean of
        the others); NaN where not reliably above zero.
    p_value : array of shape (n_subjects, n_targets)
        Circular-shift p-value of ``r_loso``.
    n_subjects : int
    n_samples : int
    reliability : float
    """

    r_loso: np.ndarray
    r_max: np.ndarray
    p_value: np.ndarray
    n_subjects: int
    n_samples: int
    reliability: float


def _zscore(a: np.ndarray, axis: int) -> np.ndarray:
    a = a - a.mean(axis=axis, keepdims=True)
    sd = a.std(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, a / np.where(sd > 0, sd, 1.0), np.nan)


def shift_null_p(x: np.ndarray, y: np.ndarray, *, min_shift: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of x and y per column and its p-value against circular shifts of y.

    x, y : arrays of shape (n_samples, n_targets). Every circular shift at least ``min_shift``
    samples away from zero (default a tenth of the series) is one null draw, all computed at once
    by FFT. One-sided: p = (1 + #(null >= r)) / (1 + n_shifts).
    """
    n = x.shape[0]
    min_shift = max(1, n // 10) if min_shift is None else min_shift
    if n - 2 * min_shift + 1 < 19:
        raise ConfigError(f"an inter-subject ceiling needs a longer stimulus: {n} samples leave too few "
                          "circular shifts for its null")
    xz, yz = _zscore(x, 0), _zscore(y, 0)
    spectrum = np.fft.rfft(np.nan_to_num(xz), axis=0) * np.conj(np.fft.rfft(np.nan_to_num(yz), axis=0))
    xcorr = np.fft.irfft(spectrum, n=n, axis=0) / n  # xcorr[s] = corr(x, roll(y, s))
    r = xcorr[0]
    null = xcorr[min_shift:n - min_shift + 1]
    p = (1.0 + (null >= r[None] - 1e-12).sum(axis=0)) / (1.0 + null.shape[0])
    bad = ~(np.isfinite(xz).all(axis=0) & np.isfinite(yz).all(axis=0))
    return np.where(bad, np.nan, r), np.where(bad, np.nan, p)


def intersubject_ceiling(responses: np.ndarray, *, reliability: float = 0.05) -> IntersubjectCeiling:
    """Leave-one-subject-out ceilings of responses to the same stimulus.

    Parameters
    ----------
    responses : array of shape (n_subjects, n_samples, n_targets)
        Each subject's responses to the same stimulus, on the same targets (a common space) and the
        same clock.
    reliability : float
        Level of the circular-shift test under which a ceiling is kept.
    """
    Y = np.asarray(responses, dtype=np.float64)
    if Y.ndim != 3 or Y.shape[0] < 3:
        raise ConfigError("an inter-subject ceiling needs responses of shape (n_subjects >= 3, n_samples, "
                          f"n_targets); got shape {Y.shape}")
    n_subjects, n_samples, n_targets = Y.shape
    Z = _zscore(Y, 1)
    # pairwise correlations of every target: C[i, j] = mean_t z_i z_j
    C = np.einsum("itv,jtv->ijv", np.nan_to_num(Z), np.nan_to_num(Z)) / n_samples
    r_loso = np.empty((n_subjects, n_targets))
    r_max = np.empty((n_subjects, n_targets))
    p = np.empty((n_subjects, n_targets))
    k = n_subjects - 1
    for i in range(n_subjects):
        others = [j for j in range(n_subjects) if j != i]
        r_loso[i], p[i] = shift_null_p(Z[others].mean(axis=0), Z[i])
        sub = C[np.ix_(others, others)]
        rbar = (sub.sum(axis=(0, 1)) - np.trace(sub)) / (k * (k - 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel_mean = k * rbar / (1 + (k - 1) * rbar)
            r_max[i] = np.where(rel_mean > 0, r_loso[i] / np.sqrt(np.where(rel_mean > 0, rel_mean, 1.0)), np.nan)
    keep = np.isfinite(r_max) & (r_loso > 0) & (p <= reliability)
    r_max = np.where(keep, np.minimum(r_max, 1.0), np.nan)
    return IntersubjectCeiling(r_loso=r_loso, r_max=r_max, p_value=p, n_subjects=n_subjects, n_samples=n_samples,
                               reliability=reliability)
