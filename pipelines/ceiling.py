"""Noise ceilings of repeated data: what a perfect model could reach, and where that is known at all.

* :func:`explainable_variance`: the share of the response variance that repeats
  (bias-corrected);
* :func:`ceiling_p_values`: whether the repeats share any signal (split halves against
  phase-randomised halves, which keep the autocorrelation);
* :func:`noise_ceiling`: the highest correlation a perfect model could reach, kept only where
  the repeats reliably share a signal;
* :func:`normalise_by_ceiling`: ceiling-normalised scores.

Re-exported by :mod:`pipelines.stats`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, FitError

__all__ = ["NoiseCeiling", "ceiling_p_values", "explainable_variance", "noise_ceiling", "normalise_by_ceiling"]


@dataclass
class NoiseCeiling:
    """What a perfect model could reach on repeated data.

    Attributes
    ----------
    explainable_variance : array of shape (n_targets,), float64
        Share of single-repeat variance that repeats (bias-corrected; can be <= 0 for
        targets with no repeatable signal, NaN for constant or NaN targets).
    r_max : array of shape (n_targets,), float64
        Highest expected correlation of a perfect model with the data it is scored
        on: the average of ``n_average`` repeats, ``sqrt(N ev / (1 + (N - 1) ev))``
        (Spearman-Brown); NaN where ``explainable_variance <= 0``, or where the repeats'
        reliability is not significant (``p_value > reliability``).
    n_repeats : int
    n_average : int
    p_value : array of shape (n_targets,), float64, or None
        :func:`ceiling_p_values`: the p-value of "the repeats share nothing"; None when
        not tested.
    reliability : float or None
        Level at which ``r_max`` was kept (None: not tested).
    """

    explainable_variance: np.ndarray
    r_max: np.ndarray
    n_repeats: int
    n_average: int
    p_value: np.ndarray | None = None
    reliability: float | None = None


def explainable_variance(repeats: np.ndarray, *, bias_correction: bool = True, zscore: bool = True) -> np.ndarray:
    """Explainable variance of each target from repeated presentations of one stimulus.

    Parameters
    ----------
    repeats : array of shape (n_repeats, n_samples, n_targets)
        Responses to the same stimulus, repeat by repeat (at least 2).
    bias_correction : bool
        Correct the upward bias of the raw ratio with few repeats (Sahani & Linden
        2003): ``ev - (1 - ev) / (n_repeats - 1)``, an unbiased estimate of
        signal / (signal + noise) for one repeat.
    zscore : bool
        Z-score each repeat first (repeats on different scales weigh alike).

    Returns
    -------
    ev : array of shape (n_targets,), float64
        ``var(mean over repeats) / mean(var of each repeat)``, bias-corrected. NaN for
        targets constant or not finite in some repeat.
    """
    data = np.asarray(repeats, dtype=np.float64)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or data.shape[0] < 2:
        raise FitError(f"'repeats' must have shape (n_repeats >= 2, n_samples, n_targets); got {data.shape}.")
    with np.errstate(invalid="ignore", divide="ignore"):
        ok = np.isfinite(data).all(axis=(0, 1)) & (np.ptp(data, axis=1) > 0).all(axis=0)
        if zscore:
            data = (data - data.mean(1, keepdims=True)) / data.std(1, keepdims=True)
        mean_var = data.var(axis=1).mean(axis=0)
        var_mean = data.mean(axis=0).var(axis=0)
        ev = var_mean / mean_var
    if bias_correction:
        ev = ev - (1.0 - ev) / (data.shape[0] - 1)
    return np.where(ok, ev, np.nan)


def noise_ceiling(repeats: np.ndarray, *, n_average: int | None = None, bias_correction: bool = True,
                  reliability: float | None = 0.05, n_draws: int = 999, random_state: int = 0) -> NoiseCeiling:
    """Explainable variance and the correlation ceiling of each target.

    Parameters
    ----------
    repeats : array of shape (n_repeats, n_samples, n_targets)
    n_average : int or None
        Number of repeats averaged in the data the model is scored on (None: all of
        them, the usual held-out test story; 1: single repeats).
    bias_correction : bool
        See :func:`explainable_variance`.
    reliability : float or None
        Keep a ceiling only where the repeats' shared signal is significant at this level
        (:func:`ceiling_p_values`): on autocorrelated noise the estimate of a target with
        nothing repeatable is above 0 half the time, and a score divided by it is noise.
        None: no test (any ``ev > 0`` gives a ceiling).
    n_draws, random_state : int
        Of :func:`ceiling_p_values`.
    """
    ev = explainable_variance(repeats, bias_correction=bias_correction)
    n_repeats = int(np.asarray(repeats).shape[0])
    n = n_repeats if n_average is None else int(n_average)
    if n < 1:
        raise ConfigError(f"'n_average' must be >= 1; got {n_average!r}.")
    if reliability is not None and not (0 < reliability < 1):
        raise ConfigError(f"'reliability' must lie in (0, 1) or be None; got {reliability!r}.")
    with np.errstate(invalid="ignore", divide="ignore"):
        r_max = np.where(ev > 0, np.sqrt(n * ev / (1.0 + (n - 1) * ev)), np.nan)
    p = None
    if reliability is not None:
        p = ceiling_p_values(repeats, n_draws=n_draws, random_state=random_state)
        r_max = np.where(p <= reliability, r_max, np.nan)
    return NoiseCeiling(explainable_variance=ev, r_max=np.minimum(r_max, 1.0), n_repeats=n_repeats, n_average=n,
                        p_value=p, reliability=reliability)


def ceiling_p_values(repeats: np.ndarray, *, n_draws: int = 999, random_state: int = 0,
                     n_targets_batch: int = 4096) -> np.ndarray:
    """p-value, per target, of the null "the repeats share no signal": split halves and phase randomisation.

    The repeats are averaged in two halves (even and odd repeats); the statistic is the
    correlation of the two halves. Its null keeps each half's power spectrum and draws its
    phases at random (Theiler's surrogates: independent series with the same
    autocorrelation), computed exactly in the frequency domain: ``sum_f |A_f| |B_f|
    cos(theta_f)``, one matrix product for every draw and target. Circular shifts that skip
    the lags near 0 are not valid on autocorrelated data (10% of null targets below 0.05 at
    AR(1) 0.9, measured), phase randomisation is (5%).

    Parameters
    ----------
    repeats : array of shape (n_repeats >= 2, n_samples, n_targets)
    n_draws : int
    random_state : int
    n_targets_batch : int

    Returns
    -------
    p : array of shape (n_targets,), float64
        ``(1 + #{null >= observed}) / (1 + n_draws)``; NaN for targets constant or not finite
        in some repeat.
    """
    data = np.asarray(repeats)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3 or data.shape[0] < 2 or data.shape[1] < 4:
        raise FitError(f"'repeats' must have shape (n_repeats >= 2, n_samples >= 4, n_targets); got {data.shape}.")
    R, n, t = data.shape
    n_freq = n // 2 + 1
    rng = np.random.default_rng(random_state)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=(n_draws, n_freq))
    if n % 2 == 0:
        theta[:, -1] = np.pi * rng.integers(0, 2, size=n_draws)  # the Nyquist term is real: a random sign
    weight = np.full(n_freq, 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    cos = np.cos(theta) * weight[None, :] / n ** 2
    p = np.full(t, np.nan)
    for start in range(0, t, n_targets_batch):
        block = data[:, :, start:start + n_targets_batch].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = np.isfinite(block).all(axis=(0, 1)) & (np.ptp(block, axis=1) > 0).all(axis=0)
            halves = np.stack([block[0::2].mean(0), block[1::2].mean(0)])
            z = (halves - halves.mean(1, keepdims=True)) / halves.std(1, keepdims=True)
        z[:, :, ~(ok & np.isfinite(z).all(axis=(0, 1)))] = 0.0
        A, B = np.fft.rfft(z, axis=1)
        observed = (z[0] * z[1]).mean(0)
        null = cos @ (np.abs(A) * np.abs(B))  # (n_draws, targets)
        exceed = (null >= observed[None, :] - 1e-9).sum(0)
        p[start:start + z.shape[2]] = np.where(ok, (1.0 + exceed) / (1.0 + n_draws), np.nan)
    return p


def normalise_by_ceiling(score: np.ndarray, r_max: np.ndarray, *, kind: str = "r",
                         min_ceiling: float = 0.1) -> np.ndarray:
    """Ceiling-normalised scores: ``r / r_max`` or ``r2 / r_max**2``.

    Targets whose ceiling is below ``min_ceiling`` (or NaN) get NaN: dividing by a
    near-zero ceiling only amplifies noise.
    """
    if kind not in ("r", "r2"):
        raise ConfigError(f"'kind' must be 'r' or 'r2'; got {kind!r}.")
    score = np.asarray(score, dtype=np.float64)
    ceiling = np.asarray(r_max, dtype=np.float64)
    ok = np.isfinite(ceiling) & (ceiling >= min_ceiling)
    denom = ceiling if kind == "r" else ceiling ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, score / np.where(ok, denom, 1.0), np.nan)
