"""Event regressors from a BIDS ``events.tsv``: one column per ``trial_type``.

For block and event-related designs. :func:`events_design` puts the events of each type on
any sample grid (TR times, or a fine grid the registry later aligns):

* ``mode="boxcar"``: sample ``j`` gets the fraction of its bin
  ``[t_j - dt / 2, t_j + dt / 2)`` covered by events of the type (1 inside a block, fractions
  at the edges, where ``dt`` is the grid spacing); an event of zero duration counts as one
  onset in the bin it falls in (an impulse), so event-related designs work unchanged.
* ``mode="impulse"``: sample ``j`` counts the onsets of the type inside its bin, whatever
  their durations.

Rows whose type is ``n/a`` (BIDS' missing value) are skipped. Columns are ordered by
``trial_types`` when given (the same columns for every run, types absent from a run give
zeros), else by sorted type name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipelines.errors import DatasetError

__all__ = ["read_events", "events_design", "events_on_grid"]

_MODES = ("boxcar", "impulse")


def read_events(source: str | Path | pd.DataFrame, column: str = "trial_type") -> pd.DataFrame:
    """Read an events table (tab-separated, BIDS) into ``onset``, ``duration``, ``trial_type``.

    Parameters
    ----------
    source : str, Path or pandas.DataFrame
        An ``events.tsv`` file, or a table already read.
    column : str
        Column holding the event types (``trial_type`` in BIDS).

    Returns
    -------
    pandas.DataFrame
        Columns ``onset``, ``duration`` (seconds, floats) and ``trial_type`` (str), sorted by
        onset; rows without a type are dropped.

    Raises
    ------
    DatasetError
        Missing file or column, non-numeric or negative onsets/durations.
    """
    name = "events table"
    if isinstance(source, pd.DataFrame):
        table = source.copy()
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise DatasetError(f"{path}: events file not found")
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype={column: str})
    missing = [c for c in ("onset", "duration", column) if c not in table.columns]
    if missing:
        raise DatasetError(f"{name}: no column {missing[0]!r}; it has {list(table.columns)}")
    table = table[table[column].notna() & (table[column].astype(str).str.strip() != "")]
    try:
        onset = pd.to_numeric(table["onset"]).to_numpy(np.float64)
        duration = pd.to_numeric(table["duration"].fillna(0.0)).to_numpy(np.float64)
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{name}: 'onset' and 'duration' must be numbers (seconds)") from err
    if not (np.all(np.isfinite(onset)) and np.all(np.isfinite(duration))) or np.any(duration < 0):
        raise DatasetError(f"{name}: onsets must be finite and durations finite and >= 0")
    out = pd.DataFrame({"onset": onset, "duration": duration, "trial_type": table[column].astype(str).str.strip()})
    return out.sort_values("onset", kind="stable").reset_index(drop=True)


def events_design(
    events: pd.DataFrame,
    sample_times: np.ndarray,
    *,
    trial_types: Sequence[str] | None = None,
    mode: str = "boxcar",
) -> tuple[np.ndarray, list[str]]:
    """One-hot event regressors on a regular sample grid.

    Parameters
    ----------
    events : pandas.DataFrame
        Columns ``onset``, ``duration``, ``trial_type`` (:func:`read_events`), seconds on the
        same clock as ``sample_times``.
    sample_times : np.ndarray, shape (n_samples,)
        Regularly spaced, strictly increasing sample times (at least 2).
    trial_types : sequence of str, optional
        Columns to build, in this order; types not listed are ignored. Default: every type
        in ``events``, sorted.
    mode : {"boxcar", "impulse"}
        See the module docstring.

    Returns
    -------
    values : np.ndarray, shape (n_samples, n_types), float32
    columns : list of str
        The trial type of each column.
    """
    t = np.asarray(sample_times, dtype=np.float64)
    if t.ndim != 1 or t.size < 2 or np.any(np.diff(t) <= 0):
        raise ValueError("sample_times must be at least 2 strictly increasing times")
    if mode not in _MODES:
        raise ValueError(f"mode = {mode!r} is unknown: use one of {', '.join(_MODES)}")
    dt = float(np.median(np.diff(t)))
    types = sorted(set(events["trial_type"])) if trial_types is None else list(trial_types)
    if not types:
        raise DatasetError("the events table has no trial types: nothing to build")
    lo_edges = t - dt / 2.0
    hi_edges = t + dt / 2.0
    out = np.zeros((t.size, len(types)), dtype=np.float64)
    col = {name: k for k, name in enumerate(types)}
    for onset, duration, kind in events[["onset", "duration", "trial_type"]].itertuples(index=False):
        k = col.get(kind)
        if k is None:
            continue
        if mode == "impulse" or duration == 0:
            j = int(np.searchsorted(lo_edges, onset, side="right")) - 1
            if 0 <= j < t.size and onset < hi_edges[j]:
                out[j, k] += 1.0
            continue
        end = onset + duration
        j0 = max(int(np.searchsorted(hi_edges, onset, side="right")), 0)
        j1 = min(int(np.searchsorted(lo_edges, end, side="left")), t.size)
        if j1 > j0:
            overlap = np.minimum(hi_edges[j0:j1], end) - np.maximum(lo_edges[j0:j1], onset)
            out[j0:j1, k] += np.clip(overlap, 0.0, None) / dt
    return out.astype(np.float32), types


def events_on_grid(events: pd.DataFrame, sfreq: float, *, trial_types: Sequence[str] | None = None,
                   mode: str = "boxcar", start: float = 0.0, stop: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`events_design` on the grid ``start, start + 1/sfreq, ...`` up to the last event's end.

    Returns
    -------
    values : np.ndarray, shape (n_samples, n_types), float32
    times : np.ndarray, shape (n_samples,)
    columns : list of str
    """
    if not sfreq > 0:
        raise ValueError(f"sfreq = {sfreq!r} must be positive (samples per second)")
    if stop is None:
        stop = float((events["onset"] + events["duration"]).max()) if len(events) else start + 1.0
    n = max(2, int(np.ceil((stop - start) * sfreq)) + 1)
    times = start + np.arange(n) / sfreq
    values, columns = events_design(events, times, trial_types=trial_types, mode=mode)
    return values, times, columns
