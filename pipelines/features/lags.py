"""Features for MEG / ECoG: time series at the response sampling rate, and TRF time lags.

* :func:`to_sample_times` puts a feature (word/phone events, or a regularly sampled series such
  as a spectrogram or speech-model features) on the response's sample times:

  - events (``sampling="events"``) become a stick function: each event's value is added to
    the sample nearest its time (events outside the samples' span are dropped), the usual
    word-onset regressor of temporal response function (TRF) models;
  - regular series (``sampling="regular"``) are resampled with an anti-aliasing polyphase
    filter (``scipy.signal.resample_poly``) to the response rate, then linearly
    interpolated at the exact sample times; zero outside the feature's span.

* :func:`lag_samples` / :func:`make_lags` / :func:`trf_design` build the lagged design of a
  TRF: for lags ``tmin .. tmax`` seconds (``round(t * sfreq)`` samples, tmin may be negative),
  block ``k`` holds the features shifted by ``lag_k`` samples *within each run*:
  ``out[t, block k] = X[t - lag_k]`` when ``t - lag_k`` is in the same run as ``t``, else 0.
  A positive lag means the response follows the stimulus. Nothing crosses a run boundary.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipelines.errors import ConfigError

__all__ = ["to_sample_times", "lag_samples", "make_lags", "trf_design"]


def to_sample_times(
    values: np.ndarray,
    times: np.ndarray,
    sample_times: np.ndarray,
    *,
    sampling: str,
) -> np.ndarray:
    """A feature at the response's sample times (MEG / ECoG rate).

    Parameters
    ----------
    values : np.ndarray, shape (n_rows, n_features)
        Feature values, one row per event or per regular sample.
    times : np.ndarray, shape (n_rows,)
        Time of each row (seconds, same clock as ``sample_times``): non-decreasing for
        events, regularly spaced for ``"regular"``.
    sample_times : np.ndarray, shape (n_samples,)
        Regularly spaced, strictly increasing response sample times.
    sampling : {"events", "regular"}
        How the rows were sampled (see the module docstring).

    Returns
    -------
    np.ndarray, shape (n_samples, n_features), float32
    """
    from scipy.signal import resample_poly

    v = np.asarray(values, dtype=np.float64)
    src = np.asarray(times, dtype=np.float64)
    dst = np.asarray(sample_times, dtype=np.float64)
    if v.ndim != 2 or src.shape != (v.shape[0],):
        raise ValueError(f"values must be (n_rows, n_features) with one time per row; got {v.shape} and {src.shape}")
    if dst.ndim != 1 or dst.size < 2 or np.any(np.diff(dst) <= 0):
        raise ValueError("sample_times must be at least 2 strictly increasing times")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(v))):
        raise ValueError("values and times must be finite")
    dt = float(np.median(np.diff(dst)))
    out = np.zeros((dst.size, v.shape[1]), dtype=np.float64)
    if sampling == "events":
        # a stick function is a sum, so event order does not matter (real transcripts have
        # overlapping words whose midpoints are out of order)
        j = np.round((src - dst[0]) / dt).astype(np.int64)
        keep = (j >= 0) & (j < dst.size)
        np.add.at(out, j[keep], v[keep])
        return out.astype(np.float32)
    if sampling != "regular":
        raise ValueError(f"sampling = {sampling!r} is unknown: use 'events' or 'regular'")
    if src.size < 2:
        raise ValueError("a regular feature needs at least 2 rows")
    d_src = np.diff(src)
    dt_src = float(np.median(d_src))
    if dt_src <= 0 or np.max(np.abs(d_src - dt_src)) > 1e-3 * dt_src:
        raise ValueError("times of a regular feature must be evenly spaced")
    from fractions import Fraction

    ratio = Fraction(dt_src / dt).limit_denominator(1000)  # = sfreq_out / sfreq_in
    up, down = ratio.numerator, ratio.denominator
    if up == down:
        res, dt_res = v, dt_src
    else:
        res = resample_poly(v, up, down, axis=0)
        dt_res = dt_src * down / up
    grid = src[0] + np.arange(res.shape[0]) * dt_res
    inside = (dst >= grid[0]) & (dst <= grid[-1])
    for c in range(v.shape[1]):
        out[inside, c] = np.interp(dst[inside], grid, res[:, c])
    return out.astype(np.float32)


def lag_samples(tmin: float, tmax: float, sfreq: float) -> np.ndarray:
    """Integer lags (samples) from ``round(tmin * sfreq)`` to ``round(tmax * sfreq)``, inclusive.

    Raises
    ------
    ConfigError
        ``tmin > tmax``, non-finite values, or ``sfreq <= 0``.
    """
    if not (np.isfinite(tmin) and np.isfinite(tmax)) or tmin > tmax:
        raise ConfigError(f"TRF lags need finite tmin <= tmax (seconds); got tmin={tmin!r}, tmax={tmax!r}")
    if not (np.isfinite(sfreq) and sfreq > 0):
        raise ConfigError(f"sfreq = {sfreq!r} must be a positive sampling rate (Hz)")
    return np.arange(int(round(tmin * sfreq)), int(round(tmax * sfreq)) + 1, dtype=np.int64)


def make_lags(X: np.ndarray, run_lengths: Sequence[int], lags: Sequence[int]) -> np.ndarray:
    """Stack copies of ``X`` shifted by each lag (samples), never crossing a run boundary.

    Parameters
    ----------
    X : np.ndarray, shape (n_samples, n_features)
        Runs concatenated in time.
    run_lengths : sequence of int
        Samples per run, summing to ``n_samples``.
    lags : sequence of int
        Lags in samples (may be negative), e.g. :func:`lag_samples`.

    Returns
    -------
    np.ndarray, shape (n_samples, n_features * len(lags)), dtype of ``X``
        Block ``k`` is ``X`` delayed by ``lags[k]`` within each run, zero where that would
        reach into another run.

    Raises
    ------
    ValueError
        ``X`` not 2-D or ``run_lengths`` not summing to ``n_samples``.
    ConfigError
        No lags, non-integer lags, or a run not longer than the largest ``|lag|``.
    """
    from pipelines.features.align import stack_shifted

    lags = list(lags)
    if not lags:
        raise ConfigError("no TRF lags: give tmin <= tmax spanning at least one sample")
    for lag in lags:
        if isinstance(lag, bool) or not isinstance(lag, (int, np.integer)):
            raise ConfigError(f"TRF lag {lag!r} is not an integer number of samples")
    return stack_shifted(X, run_lengths, lags, too_long="TRF lags reach {longest} samples but run {run} has only "
                                                        "{n}: narrow tmin..tmax or drop the short run")


def trf_design(X: np.ndarray, run_lengths: Sequence[int], sfreq: float, tmin: float, tmax: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Lagged design of a temporal response function from ``tmin`` to ``tmax`` seconds.

    Parameters
    ----------
    X : np.ndarray, shape (n_samples, n_features)
        Features at the response rate (e.g. :func:`to_sample_times`), runs concatenated.
    run_lengths : sequence of int
        Samples per run.
    sfreq : float
        Response sampling rate (Hz).
    tmin, tmax : float
        First and last lag in seconds (tmin may be negative: the response before the stimulus).

    Returns
    -------
    design : np.ndarray, shape (n_samples, n_features * n_lags)
        Lag-major blocks: columns ``k * n_features .. (k + 1) * n_features - 1`` hold lag ``k``.
    lag_times : np.ndarray, shape (n_lags,)
        Each lag in seconds.
    """
    lags = lag_samples(tmin, tmax, sfreq)
    return make_lags(X, run_lengths, lags), lags / float(sfreq)
