"""Checks of a fit's inputs (shapes, finite features, alphas, integers) and of its targets.

One message shape for every refusal: the parameter, what it must be, what it got.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError, FitError

__all__ = ["check_alphas", "check_inputs", "check_int", "is_stored", "valid_targets"]


def _format_values(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def check_alphas(alphas: Any) -> np.ndarray:
    """Candidate alphas as a sorted float32 array without duplicates.

    Parameters
    ----------
    alphas : float or sequence of float
        Positive, finite values (at least one).

    Returns
    -------
    alphas : array of shape (n_alphas,), float32, sorted, unique

    Raises
    ------
    ConfigError
        No value, or a value not positive or not finite.
    """
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()
    if a.size == 0:
        raise ConfigError("'model.alphas' must list at least one value; got [].")
    if not np.all(a > 0):
        raise ConfigError(f"'model.alphas' must be positive; got {_format_values(a)}.")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"'model.alphas' must be finite; got {_format_values(a)}.")
    return np.unique(a).astype(np.float32)


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int, refused (ConfigError naming ``name``) unless an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"'{name}' must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def is_stored(Y: Any) -> bool:
    """Whether ``Y`` is a 2-D array on storage (``h5py.Dataset``, zarr, dask, ``np.memmap`` is not:
    it is an ndarray), read a block of columns at a time by the fits instead of held in memory."""
    return (not isinstance(Y, np.ndarray) and hasattr(Y, "shape") and hasattr(Y, "dtype")
            and hasattr(Y, "__getitem__") and len(Y.shape) == 2)


def check_inputs(Xs: list[np.ndarray], Y: np.ndarray, groups: np.ndarray,
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Feature arrays, responses and groups as float32 / numpy arrays of matching shapes.

    Parameters
    ----------
    Xs : list of arrays of shape (n_samples, n_features_b)
    Y : array of shape (n_samples, n_targets) or (n_samples,), or a float32 2-D array on
        storage (:func:`is_stored`), returned as it is
    groups : array of shape (n_samples,)

    Returns
    -------
    Xs : list of float32 arrays of shape (n_samples, n_features_b)
    Y : float32 array of shape (n_samples, n_targets), or the stored array
    groups : array of shape (n_samples,)

    Raises
    ------
    FitError
        Arrays not 2-D, sample counts or ``groups`` shape that differ, NaN or Inf in ``X``.
    """
    Xs = [np.asarray(X, dtype=np.float32) for X in Xs]
    if is_stored(Y):  # read a block of columns at a time by the fit, never whole
        if np.dtype(Y.dtype) != np.float32:
            raise FitError(f"A stored Y must be float32 (it is read as it is stored); got {Y.dtype}.")
    else:
        Y = np.asarray(Y, dtype=np.float32)
    groups = np.asarray(groups)
    if Y.ndim == 1:
        Y = Y[:, None]
    if any(X.ndim != 2 for X in Xs) or Y.ndim != 2:
        shapes = ", ".join(str(X.shape) for X in Xs)
        raise FitError(f"X and Y must be 2-D (n_samples, n_features/n_targets); got {shapes} and {Y.shape}.")
    n_samples = Y.shape[0]
    for X in Xs:
        if X.shape[0] != n_samples:
            raise FitError(f"X and Y must have the same number of samples; got {X.shape[0]} and {n_samples}.")
    if groups.shape != (n_samples,):
        raise FitError(f"'groups' must have shape ({n_samples},) to match X; got {groups.shape}.")
    for X in Xs:
        bad_cols = np.flatnonzero(~np.isfinite(X).all(axis=0))
        if bad_cols.size:
            raise FitError(f"X contains NaN or Inf in {bad_cols.size} feature column(s) (first: {bad_cols[0]}); "
                           "impute or drop them before fitting.")
    return Xs, Y, groups


def valid_targets(Y: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Targets (columns of ``Y``) that are finite and not constant.

    Computed in column batches (no full-size temporaries).

    Parameters
    ----------
    Y : array of shape (n_samples, n_targets), in memory or on storage (:func:`is_stored`)
    batch : int
        Columns checked at a time.

    Returns
    -------
    valid : array of shape (n_targets,), bool
    """
    valid = np.empty(Y.shape[1], dtype=bool)
    stored_chunks = getattr(Y, "chunks", None) if is_stored(Y) else None
    if isinstance(stored_chunks, tuple) and len(stored_chunks) == 2 and isinstance(stored_chunks[1], int):
        batch = max(batch, stored_chunks[1])  # an HDF5 / zarr array: whole storage chunks of columns at a time
    with np.errstate(invalid="ignore"):
        for start in range(0, Y.shape[1], batch):
            block = np.asarray(Y[:, start:start + batch])
            valid[start:start + batch] = np.isfinite(block).all(axis=0) & (np.ptp(block, axis=0) > 0)
    return valid
