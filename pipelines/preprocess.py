"""Cleaning of one run's responses, fitted on that run alone: detrending, high-pass, confound regression.

Every function here is pure (arrays in, arrays out) and sees one run: nothing is estimated across
runs, so a held-out run is never cleaned with what other runs hold. The steps, in order
(``dataset.responses.preprocess``, :class:`pipelines.config.PreprocessConfig`):

1. a Savitzky-Golay trend (``scipy.signal.savgol_filter``, window in seconds) is subtracted;
2. with ``high_pass_method: butterworth``, a zero-phase 5th-order Butterworth high-pass
   (``scipy.signal.sosfiltfilt``);
3. one least-squares regression removes, together, a constant, Legendre polynomials up to
   ``polynomial``, the DCT-II cosines of period longer than ``1 / high_pass`` (``cosine``: SPM's
   and nilearn's drift model) and the selected confound columns.

Confounds pass through steps 1-2 as the data do, so the regression removes what is left of
them in the filtered data (the data stay orthogonal to every regressor).
"""
from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import PreprocessConfig
from .errors import DatasetError
from .limits import check_table

__all__ = ["cosine_drift", "polynomial_drift", "preprocess_run", "read_confounds", "select_confounds"]

_COLUMNS_AT_ONCE = 4096  # targets cleaned per float64 block (bounded temporaries)


def polynomial_drift(n_samples: int, order: int) -> np.ndarray:
    """Legendre polynomials of degree 0..order on the run, shape (n_samples, order + 1)."""
    return np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, n_samples), order)


def cosine_drift(n_samples: int, tr: float, cutoff_hz: float) -> np.ndarray:
    """DCT-II cosines of frequency below ``cutoff_hz`` (k / (2 n tr), k >= 1), shape (n_samples, n_cosines)."""
    n_cos = int(np.floor(2.0 * n_samples * tr * cutoff_hz))
    k = np.arange(1, min(n_cos, n_samples - 1) + 1)
    t = np.arange(n_samples)
    return np.cos(np.pi * (t[:, None] + 0.5) * k[None, :] / n_samples) if k.size else np.zeros((n_samples, 0))


def read_confounds(path: str | Path, key: str) -> pd.DataFrame:
    """fMRIPrep's ``*_desc-confounds_timeseries.tsv`` (``n/a`` read as NaN), checked before parsing."""
    check_table(path, key, "confounds TSV")
    try:
        return pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except Exception as err:  # noqa: BLE001 - pandas raises many types on a damaged table
        raise DatasetError(f"{key}: unreadable confounds TSV ({err}); fix or re-download it") from err


def select_confounds(table: pd.DataFrame, patterns: tuple[str, ...] | list[str], key: str
                     ) -> tuple[np.ndarray, list[str]]:
    """The columns of ``table`` named by ``patterns`` (names or fnmatch patterns), in the table's order.

    NaN at the start of a column (fMRIPrep's ``n/a`` in row 0 of ``*_derivative1``,
    ``framewise_displacement``, ``dvars``) becomes 0: no change before the first sample.

    Returns
    -------
    confounds : float64 array of shape (n_samples, n_columns)
    columns : list of str

    Raises
    ------
    DatasetError
        A pattern matching no column (naming the file, the pattern and the columns it has), a
        column that is not numeric, or NaN after the first rows.
    """
    have = [str(c) for c in table.columns]
    chosen: list[str] = []
    for pattern in patterns:
        hits = [c for c in have if fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            shown = ", ".join(have[:60]) + (f", ... ({len(have)} in all)" if len(have) > 60 else "")
            raise DatasetError(f"{key}: no column matches 'dataset.responses.preprocess.confounds' entry "
                               f"{pattern!r}; the file has: {shown}. Fix the name or pattern")
        chosen += [c for c in hits if c not in chosen]
    chosen = [c for c in have if c in chosen]
    values = np.empty((len(table), len(chosen)), dtype=np.float64)
    for j, col in enumerate(chosen):
        series = pd.to_numeric(table[col], errors="coerce")
        bad = series.isna() & table[col].notna()
        if bad.any():
            raise DatasetError(f"{key}: confound column {col!r} is not numeric (row {int(np.flatnonzero(bad)[0])}); "
                               "fix the file or drop the column from 'dataset.responses.preprocess.confounds'")
        v = series.to_numpy(np.float64, copy=True)
        missing = ~np.isfinite(v)
        lead = int(np.argmax(~missing)) if (~missing).any() else len(v)
        if missing[lead:].any() or lead == len(v):
            raise DatasetError(f"{key}: confound column {col!r} has n/a at row {int(np.flatnonzero(missing)[-1])} "
                               "(only the first rows may be n/a, as fMRIPrep's derivatives); fix the file or drop "
                               "the column")
        v[:lead] = 0.0
        values[:, j] = v
    return values, chosen


def _savgol_window(n_samples: int, tr: float, seconds: float, order: int) -> int:
    """An odd window of about ``seconds`` (at most the run, more than ``order``)."""
    w = int(round(seconds / tr))
    w = min(w if w % 2 else w + 1, n_samples if n_samples % 2 else n_samples - 1)
    return max(w, order + 2 if order % 2 else order + 1)


def _filtered(A: np.ndarray, tr: float, opts: PreprocessConfig, window: int | None, sos: Any) -> np.ndarray:
    """Steps 1-2 (Savitzky-Golay trend removed, Butterworth high-pass) on float64 columns."""
    from scipy.signal import savgol_filter, sosfiltfilt  # scipy.signal is slow to import: only when used

    if window is not None:
        A = A - savgol_filter(A, window, opts.savgol_order, axis=0, mode="interp")
    if sos is not None:
        A = sosfiltfilt(sos, A, axis=0)
    return A


def preprocess_run(data: np.ndarray, tr: float, opts: PreprocessConfig, confounds: np.ndarray | None = None, *,
                   key: str = "run") -> tuple[np.ndarray, dict[str, Any]]:
    """One run's responses cleaned by ``opts`` (see the module's docstring), fitted on this run alone.

    Parameters
    ----------
    data : array of shape (n_samples, n_targets)
        The run's responses; float32 arrays are cleaned in place (in blocks of columns).
    tr : float
        Sampling period in seconds.
    opts : PreprocessConfig
    confounds : array of shape (n_samples, n_confounds) or None
        The run's selected confound columns (:func:`select_confounds`).
    key : str
        The run's file, for error messages.

    Returns
    -------
    data : float32 array of shape (n_samples, n_targets)
        NaN in a column stays within that column.
    record : dict
        What was done (``steps``, ``n_regressors``), for the manifest.

    Raises
    ------
    DatasetError
        Confounds of another length than the run, or more regressors than samples.
    """
    n = data.shape[0]
    steps: list[str] = []
    window = sos = None
    if opts.savgol:
        window = _savgol_window(n, tr, opts.savgol, opts.savgol_order)
        if window > n:
            raise DatasetError(f"{key}: a run of {n} samples is too short for a Savitzky-Golay trend of order "
                               f"{opts.savgol_order}; lower 'dataset.responses.preprocess.savgol_order' or drop 'savgol'")
        steps.append(f"savgol {opts.savgol:g} s ({window} samples), order {opts.savgol_order}")
    if opts.high_pass and opts.high_pass_method == "butterworth":
        from scipy.signal import butter  # scipy.signal is slow to import: only when used

        nyquist = 0.5 / tr
        if not opts.high_pass < nyquist:
            raise DatasetError(f"{key}: 'dataset.responses.preprocess.high_pass' {opts.high_pass:g} Hz is not below "
                               f"the Nyquist frequency of the run ({nyquist:g} Hz, TR {tr:g} s); lower it")
        sos = butter(5, opts.high_pass / nyquist, btype="highpass", output="sos")
        if n <= 3 * (2 * len(sos) + 1):  # sosfiltfilt's padding
            raise DatasetError(f"{key}: a run of {n} samples is too short for a Butterworth high-pass; use "
                               "'high_pass_method: cosine'")
        steps.append(f"butterworth high-pass {opts.high_pass:g} Hz")
    parts = [np.ones((n, 1))]
    if opts.polynomial is not None:
        parts.append(polynomial_drift(n, opts.polynomial)[:, 1:])
        steps.append(f"polynomial order {opts.polynomial}")
    if opts.high_pass and opts.high_pass_method == "cosine":
        parts.append(cosine_drift(n, tr, opts.high_pass))
        steps.append(f"cosine high-pass {opts.high_pass:g} Hz ({parts[-1].shape[1]} cosines)")
    if confounds is not None and confounds.size:
        if confounds.shape[0] != n:
            raise DatasetError(f"{key}: its confounds table has {confounds.shape[0]} rows but the run has {n} "
                               "samples; they must match (the confounds of another run?)")
        parts.append(_filtered(np.asarray(confounds, dtype=np.float64), tr, opts, window, sos))
        steps.append(f"{confounds.shape[1]} confounds")
    D = np.concatenate(parts, axis=1)
    if D.shape[1] >= n:
        raise DatasetError(f"{key}: preprocessing asks for {D.shape[1]} regressors on a run of {n} samples; use "
                           "fewer confounds, a lower polynomial order or a lower high-pass cutoff")
    pinv = np.linalg.pinv(D)
    out = data if data.dtype == np.float32 and data.flags.writeable else np.array(data, dtype=np.float32)
    for j in range(0, out.shape[1], _COLUMNS_AT_ONCE):
        A = _filtered(out[:, j:j + _COLUMNS_AT_ONCE].astype(np.float64), tr, opts, window, sos)
        out[:, j:j + _COLUMNS_AT_ONCE] = A - D @ (pinv @ A)
    return out, {"steps": steps, "n_regressors": int(D.shape[1])}
