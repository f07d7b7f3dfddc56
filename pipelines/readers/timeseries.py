"""Derivative time-series tables: one column per ROI / parcel, one row per sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DatasetError
from ..limits import check_table
from . import Responses, check_not_pointer


def read_timeseries(path: str | Path, key: str, *, tr: float | None = None, start: float = 0.0) -> Responses:
    """Read a TSV of numeric columns (a header row of ROI names); ``tr`` from the JSON sidecar."""
    check_not_pointer(path, key)
    check_table(path, key, "time-series TSV")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable TSV ({err})") from err
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.empty:
        raise DatasetError(f"{key}: expected numeric columns only (one per ROI); got non-numeric {non_numeric}")
    if not (isinstance(tr, (int, float)) and not isinstance(tr, bool) and np.isfinite(tr) and tr > 0):
        raise DatasetError(f"{key}: its JSON sidecar needs RepetitionTime (seconds); add it")
    return Responses(data=table.to_numpy(np.float32), period=float(tr), start=float(start),
                     target_names=[str(c) for c in table.columns])
