"""Readers of response files: one module per format, each a plain function of local paths.

Every reader returns a :class:`Responses`: float32 data ``[n_samples, n_targets]``, the
sampling period and the time of the first sample, and names for the targets (voxels,
vertices, ROIs, channels). Readers know nothing of S3, configs or BIDS layouts; `ingest`
finds and fetches the files and hands them here, with the options as keyword arguments.

=========== ========================================= =========================================
kind        files                                     targets
=========== ========================================= =========================================
bold        4-D NIfTI (``.nii``/``.nii.gz``)          voxels in the dataset's mask, else those
                                                      that vary over time
gifti       ``.func.gii`` per hemisphere              vertices (``L:0`` ... ``R:40961``)
hdf5        ``.hf5``/``.h5`` derivative arrays        columns of the array (e.g. cortical voxels)
timeseries  derivative TSV, one column per ROI        ROIs / parcels
meg, ieeg   anything MNE reads (FIF, EDF, KIT, ...)   channels, bad ones dropped
=========== ========================================= =========================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DatasetError
from ..storage import check_not_pointer as _check_not_pointer


@dataclass
class Responses:
    """What a reader gives back for one run."""

    data: np.ndarray  # float32 [n_samples, n_targets]
    period: float  # seconds between samples (TR, or 1 / sfreq)
    target_names: list[str]
    start: float = 0.0  # time of the first sample on the run's clock (seconds)
    mask_img: object | None = None
    space: str | None = None
    target_info: pd.DataFrame | None = None  # one row per target (coordinates, hemisphere, type, ...)
    meta: dict = field(default_factory=dict)  # what the reader found out (sfreq, dropped channels, ...)

    @property
    def times(self) -> np.ndarray:
        return self.start + self.period * np.arange(self.data.shape[0])


def check_not_pointer(path: str | Path, key: str) -> None:
    """Raise DatasetError when `path` is a git-annex/LFS pointer left where data was expected."""
    _check_not_pointer(path, key)


def as_float32(data: np.ndarray, key: str) -> np.ndarray:
    """``data`` as a C-ordered float32 array; refuse non-numeric content."""
    if not np.issubdtype(np.asarray(data).dtype, np.number):
        raise DatasetError(f"{key}: expected numeric data; got dtype {np.asarray(data).dtype}")
    return np.ascontiguousarray(data, dtype=np.float32)


def reader_for(kind: str):
    """The reader function of a response kind (imported lazily: MNE is heavy)."""
    if kind == "bold":
        from .nifti import read_bold
        return read_bold
    if kind == "gifti":
        from .gifti import read_gifti
        return read_gifti
    if kind == "hdf5":
        from .hdf5 import read_hdf5
        return read_hdf5
    if kind == "timeseries":
        from .timeseries import read_timeseries
        return read_timeseries
    if kind in ("meg", "ieeg", "eeg"):
        from .mne_io import read_mne_raw
        return read_mne_raw
    raise ValueError(f"unknown response kind {kind!r}; valid: bold, gifti, hdf5, timeseries, meg, ieeg, eeg")


KINDS = ("bold", "gifti", "hdf5", "timeseries", "meg", "ieeg", "eeg")
