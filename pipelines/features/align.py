"""Bring word-level features onto the fMRI sampling grid and add FIR delays.

* :func:`lanczos_resample`: Lanczos (windowed-sinc) interpolation of event values at the
  TR times, as the Huth lab's ``lanczosinterp2D``. The kernel is not normalised: the
  output at a TR is a weighted *sum* of nearby events, so resampling ones gives a word rate
  (about events-per-TR) and resampling features gives rate-weighted features.
* :func:`average_within_tr`: the simple alternative, mean (or sum) of events in each TR bin.
* :func:`make_delays`: finite-impulse-response delays, kept within each run.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipelines.errors import ConfigError

__all__ = ["lanczos_kernel", "lanczos_resample", "average_within_tr", "make_delays"]


def _as_times(name: str, times: np.ndarray, strict: bool) -> np.ndarray:
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one time per row), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{name} contains NaN or inf: remove or fill those times")
    d = np.diff(t)
    if strict and np.any(d <= 0):
        raise ValueError(f"{name} must be strictly increasing: sort the times and drop duplicates")
    if not strict and np.any(d < 0):
        raise ValueError(f"{name} must be non-decreasing: sort the events by time")
    return t


def _as_values(values: np.ndarray, n_events: int) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D (n_events, n_features), got shape {v.shape}: use values.reshape(-1, 1)")
    if v.shape[0] != n_events:
        raise ValueError(f"values has {v.shape[0]} rows but event_times has {n_events}: give one time per event")
    return v.astype(np.float64, copy=False)


def lanczos_kernel(t: np.ndarray, cutoff: float, window: int = 3) -> np.ndarray:
    """Lanczos kernel ``sinc(2 f t) * sinc(2 f t / window)`` for ``|2 f t| < window``, else 0.

    Parameters
    ----------
    t : np.ndarray
        Time offsets (any shape), seconds.
    cutoff : float
        Cutoff frequency ``f`` in Hz (first zero of the kernel at ``1 / (2 f)`` seconds).
    window : int
        Number of lobes on each side.

    Returns
    -------
    np.ndarray
        Kernel values, same shape as ``t``; 1 at ``t = 0``.
    """
    u = 2.0 * cutoff * np.asarray(t, dtype=np.float64)
    val = np.sinc(u) * np.sinc(u / window)  # np.sinc(x) = sin(pi x) / (pi x)
    val[np.abs(u) >= window] = 0.0
    return val


def lanczos_resample(
    values: np.ndarray,
    event_times: np.ndarray,
    target_times: np.ndarray,
    window: int = 3,
    cutoff_mult: float = 1.0,
) -> np.ndarray:
    """Lanczos-interpolate event values (e.g. one row per word) at the TR times.

    ``out[j] = sum_i K(target_times[j] - event_times[i]) * values[i]`` with the Lanczos kernel
    :func:`lanczos_kernel` and cutoff frequency ``f = cutoff_mult / (2 * TR)``, ``TR`` being the
    median spacing of ``target_times`` (the Nyquist frequency of the TR grid when
    ``cutoff_mult = 1``). As in ``lanczosinterp2D`` the kernel is not normalised (its integral
    is ``TR / cutoff_mult``), so a slowly varying signal ``g`` sampled by events at rate
    ``r`` per second comes out as about ``r * TR / cutoff_mult * g``.

    Parameters
    ----------
    values : np.ndarray, shape (n_events, n_features)
        Value of each event.
    event_times : np.ndarray, shape (n_events,)
        Event times in seconds, non-decreasing.
    target_times : np.ndarray, shape (n_targets,)
        Times to interpolate at (TR times), strictly increasing, at least 2.
    window : int
        Lanczos lobes on each side (3 in the Huth lab code).
    cutoff_mult : float
        Multiplier of the cutoff frequency (> 0).

    Returns
    -------
    np.ndarray, shape (n_targets, n_features), float32

    Raises
    ------
    ValueError
        Wrong shapes, unsorted or non-finite times, bad ``window``/``cutoff_mult``.
    """
    ev = _as_times("event_times", event_times, strict=False)
    tt = _as_times("target_times", target_times, strict=True)
    v = _as_values(values, ev.size)
    if tt.size < 2:
        raise ValueError("target_times needs at least 2 times to define the TR")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window = {window!r} must be an integer >= 1 (3 is usual)")
    if not np.isfinite(cutoff_mult) or cutoff_mult <= 0:
        raise ValueError(f"cutoff_mult = {cutoff_mult!r} must be a positive number (1.0 is usual)")
    tr = float(np.median(np.diff(tt)))
    cutoff = cutoff_mult / (2.0 * tr)
    out = np.empty((tt.size, v.shape[1]), dtype=np.float64)
    step = max(1, int(2**24 // max(ev.size, 1)))  # bound the kernel matrix to ~128 MB
    for lo in range(0, tt.size, step):
        k = lanczos_kernel(tt[lo : lo + step, None] - ev[None, :], cutoff, window)
        out[lo : lo + step] = k @ v
    return out.astype(np.float32)


def average_within_tr(
    values: np.ndarray,
    event_times: np.ndarray,
    target_times: np.ndarray,
    tr: float,
    reduce: str = "mean",
) -> np.ndarray:
    """Mean (or sum) of the events falling in each TR bin.

    Bin ``j`` is ``[target_times[j] - tr / 2, target_times[j] + tr / 2)``, centred on the
    target time like the Lanczos kernel. Bins without events give 0; events outside every
    bin are ignored.

    Parameters
    ----------
    values : np.ndarray, shape (n_events, n_features)
    event_times : np.ndarray, shape (n_events,)
        Non-decreasing, seconds.
    target_times : np.ndarray, shape (n_targets,)
        Strictly increasing, seconds.
    tr : float
        Bin width in seconds (> 0).
    reduce : {"mean", "sum"}

    Returns
    -------
    np.ndarray, shape (n_targets, n_features), float32
    """
    ev = _as_times("event_times", event_times, strict=False)
    tt = _as_times("target_times", target_times, strict=True)
    v = _as_values(values, ev.size)
    if not np.isfinite(tr) or tr <= 0:
        raise ValueError(f"tr = {tr!r} must be a positive number of seconds")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce = {reduce!r} is unknown: use 'mean' or 'sum'")
    out = np.zeros((tt.size, v.shape[1]), dtype=np.float64)
    counts = np.zeros(tt.size, dtype=np.int64)
    lo = np.searchsorted(ev, tt - tr / 2.0, side="left")
    hi = np.searchsorted(ev, tt + tr / 2.0, side="left")
    for j in range(tt.size):
        if hi[j] > lo[j]:
            out[j] = v[lo[j] : hi[j]].sum(axis=0)
            counts[j] = hi[j] - lo[j]
    if reduce == "mean":
        nz = counts > 0
        out[nz] /= counts[nz, None]
    return out.astype(np.float32)


def make_delays(X: np.ndarray, run_lengths: Sequence[int], delays: Sequence[int]) -> np.ndarray:
    """Stack delayed copies of the features (FIR model), never crossing a run boundary.

    Block ``k`` of the output is ``X`` shifted forward by ``delays[k]`` samples within each
    run: ``out[t, block k] = X[t - delays[k]]`` when ``t - delays[k]`` is in the same run as
    ``t``, else 0 (so the response at ``t`` depends on the stimulus ``d`` samples earlier).
    Negative delays shift backward (zeros at the run end).

    Parameters
    ----------
    X : np.ndarray, shape (n_samples, n_features)
        Runs concatenated in time.
    run_lengths : sequence of int
        Samples per run, summing to ``n_samples``.
    delays : sequence of int
        Delays in samples (TRs), non-empty, e.g. ``[1, 2, 3, 4]``.

    Returns
    -------
    np.ndarray, shape (n_samples, n_features * len(delays)), dtype of ``X``

    Raises
    ------
    ValueError
        ``X`` not 2-D or ``run_lengths`` not summing to ``n_samples``.
    ConfigError
        ``model.delays`` empty or not integers, or a run not longer than the largest ``|delay|``.
    """
    delays = list(delays)
    if not delays:
        raise ConfigError("model.delays is empty: give at least one delay in TRs, e.g. [1, 2, 3, 4]")
    for d in delays:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise ConfigError(f"model.delays contains {d!r}: delays must be integers (TRs), e.g. [1, 2, 3, 4]")
    return stack_shifted(X, run_lengths, delays,
                         too_long="model.delays reach {longest} TRs but run {run} has only {n} samples: "
                                  "use smaller delays or drop the short run")


def stack_shifted(X: np.ndarray, run_lengths: Sequence[int], shifts: Sequence[int], *, too_long: str) -> np.ndarray:
    """Copies of ``X`` shifted forward by each of ``shifts`` samples within each run (zeros at run starts).

    ``too_long`` is the error message (with ``{longest}``, ``{run}``, ``{n}``) for a run not
    longer than the largest shift.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    runs = [int(r) for r in run_lengths]
    if any(r < 1 for r in runs) or sum(runs) != X.shape[0]:
        raise ValueError(f"run_lengths {runs} must be positive and sum to the {X.shape[0]} rows of X")
    delays = [int(d) for d in shifts]
    max_d = max(abs(d) for d in delays)
    for i, r in enumerate(runs):
        if r <= max_d:
            raise ConfigError(too_long.format(longest=max_d, run=i, n=r))
    n, f = X.shape
    out = np.zeros((n, f * len(delays)), dtype=X.dtype)
    start = 0
    for r in runs:
        block = X[start : start + r]
        for k, d in enumerate(int(d) for d in delays):
            cols = slice(k * f, (k + 1) * f)
            if d > 0:
                out[start + d : start + r, cols] = block[: r - d]
            elif d < 0:
                out[start : start + r + d, cols] = block[-d:]
            else:
                out[start : start + r, cols] = block
        start += r
    return out
