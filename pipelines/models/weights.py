"""The weights of a fitted ridge encoding model: one alpha per target, with an intercept.

The cross-validated fit (:func:`pipelines.fit.fit_encoding`) predicts held-out samples without
keeping the weights it used. :func:`ridge_weights` solves the same problem on the same training
rows with each target's chosen alpha, so ``predict_rows(X[test], W, b)`` is the fit's held-out
prediction (to float32 rounding).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import FitError
from ..fit.chunks import columns

__all__ = ["ridge_weights", "predict_rows"]

#: Targets solved at once (their columns of ``Y`` read together; bounds the float64 temporaries).
TARGETS_PER_BLOCK = 4096


def ridge_weights(X: np.ndarray, Y: Any, train: np.ndarray, alpha: np.ndarray, valid: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights and intercepts of every valid target on the training rows.

    Minimises ``||(X[T] - mu) W - (Y[T] - m)||² + alpha_j ||W_j||²`` per target ``j`` (the fit's
    problem: an unpenalised intercept, features centred on the training rows).

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32
        The design (delayed / lagged features, z-scored per run), as the fit saw it.
    Y : array of shape (n_samples, n_targets), float32, or an array on storage (``h5py.Dataset``)
        The responses, z-scored per run; read a block of columns at a time.
    train : int array
        Rows the model is trained on.
    alpha : array of shape (n_targets,)
        Each target's alpha; NaN where the target was not fitted.
    valid : bool array of shape (n_targets,)
        Targets to solve; the others get zero weights and a zero intercept.

    Returns
    -------
    weights : array of shape (n_features, n_targets), float32
    intercept : array of shape (n_targets,), float32
    """
    X = np.asarray(X, dtype=np.float32)
    train = np.asarray(train, dtype=np.int64)
    n_targets = Y.shape[1]
    if alpha.shape != (n_targets,) or valid.shape != (n_targets,):
        raise FitError(f"'alpha' and 'valid' must have one value per target ({n_targets}); "
                       f"got {alpha.shape} and {valid.shape}")
    ok = valid & np.isfinite(alpha) & (alpha > 0)
    Xt = X[train].astype(np.float64)
    mu = Xt.mean(axis=0)
    Xt -= mu
    lam, V = np.linalg.eigh(Xt.T @ Xt)
    lam = np.clip(lam, 0.0, None)
    weights = np.zeros((X.shape[1], n_targets), dtype=np.float32)
    intercept = np.zeros(n_targets, dtype=np.float32)
    idx = np.flatnonzero(ok)
    for first in range(0, idx.size, TARGETS_PER_BLOCK):
        cols = idx[first:first + TARGETS_PER_BLOCK]
        Yt = np.asarray(columns(Y, cols), dtype=np.float64)[train]
        R = V.T @ (Xt.T @ Yt)  # rotated right-hand side; Xt is centred, so Y needs no centring here
        a = alpha[cols].astype(np.float64)
        W = V @ (R / (lam[:, None] + a[None, :]))
        weights[:, cols] = W
        intercept[cols] = Yt.mean(axis=0) - mu @ W
    return weights, intercept


def predict_rows(X: np.ndarray, weights: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``X @ W + b`` in float32: the predicted response of every row.

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    weights : array of shape (n_features, n_targets)
    intercept : array of shape (n_targets,)

    Returns
    -------
    array of shape (n_samples, n_targets), float32
    """
    return (np.asarray(X, dtype=np.float32) @ np.asarray(weights, dtype=np.float32)
            + np.asarray(intercept, dtype=np.float32)[None, :])
