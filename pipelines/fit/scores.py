"""Scores of held-out predictions: Pearson r and R² per target, averaged over folds."""
from __future__ import annotations

import numpy as np

from ..errors import FitError
from .splits import OuterSplit

__all__ = ["combine_folds", "fold_scores", "pearson_r", "r2_score"]


def pearson_r(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Column-wise Pearson correlation.

    Parameters
    ----------
    y_true, y_pred : arrays of shape (n_samples, n_targets) or (n_samples,)
        Observed and predicted values.

    Returns
    -------
    r : array of shape (n_targets,), float32
        NaN where ``y_true`` is constant or not finite (undefined), 0 where only
        ``y_pred`` is constant (the model predicts no variation). Never warns.
    """
    yt, yp = _as_2d_pair(y_true, y_pred)
    with np.errstate(invalid="ignore"):
        varies_t = np.isfinite(yt).all(axis=0) & (np.ptp(yt, axis=0) > 0)
        flat_p = np.ptp(yp, axis=0) == 0  # NaN predictions stay NaN below
    yt = yt - yt.mean(axis=0)
    yp = yp - yp.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = (yt * yp).sum(axis=0) / np.sqrt((yt * yt).sum(axis=0) * (yp * yp).sum(axis=0))
    r = np.where(flat_p, 0.0, r)
    r = np.where(varies_t, r, np.nan)
    return np.clip(r, -1.0, 1.0).astype(np.float32)


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Column-wise coefficient of determination ``1 - SS_res / SS_tot``.

    Parameters
    ----------
    y_true, y_pred : arrays of shape (n_samples, n_targets) or (n_samples,)
        Observed and predicted values.

    Returns
    -------
    r2 : array of shape (n_targets,), float32
        Can be negative (worse than predicting the mean). NaN where ``y_true`` is
        constant or not finite. Never warns.
    """
    yt, yp = _as_2d_pair(y_true, y_pred)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        varies_t = np.isfinite(yt).all(axis=0) & (np.ptp(yt, axis=0) > 0)
        ss_res = ((yt - yp) ** 2).sum(axis=0)
        ss_tot = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
        r2 = 1.0 - ss_res / ss_tot
    r2 = np.where(varies_t, r2, np.nan)
    return r2.astype(np.float32)


def _as_2d_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yt = np.asarray(y_true, dtype=np.float64)
    yp = np.asarray(y_pred, dtype=np.float64)
    if yt.shape != yp.shape:
        raise FitError(f"y_true and y_pred must have the same shape; got {yt.shape} and {yp.shape}.")
    if yt.ndim == 1:
        yt, yp = yt[:, None], yp[:, None]
    return yt, yp


def fold_scores(y: np.ndarray, p: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and R² per column, computed in column batches (bounded float64 copies).

    Parameters
    ----------
    y, p : arrays of shape (n_test, n_targets)
        Observed and predicted values of one held-out fold.
    batch : int
        Columns scored at a time.

    Returns
    -------
    r, r2 : arrays of shape (n_targets,), float64
    """
    r = np.empty(y.shape[1], dtype=np.float64)
    r2 = np.empty(y.shape[1], dtype=np.float64)
    for start in range(0, y.shape[1], batch):
        cols = slice(start, start + batch)
        r[cols] = pearson_r(y[:, cols], p[:, cols])
        r2[cols] = r2_score(y[:, cols], p[:, cols])
    return r, r2


def combine_folds(splits: list[OuterSplit], fold_r: np.ndarray, fold_r2: np.ndarray,
                  fold_alphas: np.ndarray, predictions: np.ndarray | None) -> dict[str, np.ndarray | None]:
    """One chunk's scores: the folds' scores averaged, weighted by held-out fold size.

    Parameters
    ----------
    splits : list of OuterSplit
    fold_r, fold_r2 : arrays of shape (n_folds, n_targets)
    fold_alphas : array of shape (n_folds, n_targets)
    predictions : array of shape (n_samples, n_targets) or None

    Returns
    -------
    part : dict
        ``r``, ``r2`` (n_targets,) float32, ``fold_alphas`` and ``predictions`` as given.
    """
    # Scores are computed within each held-out fold, then averaged weighted by fold size:
    # pooling predictions across folds would add between-fold offsets (each fold's training
    # mean is anti-correlated with its held-out mean), biasing null targets' r below 0.
    weights = np.array([len(split.test) for split in splits], dtype=np.float64)
    weights /= weights.sum()
    return {
        "r": (weights @ fold_r).astype(np.float32),
        "r2": (weights @ fold_r2).astype(np.float32),
        "fold_alphas": fold_alphas,
        "predictions": predictions,
    }
