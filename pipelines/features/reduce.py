"""Dimensionality reduction of a feature space, fitted on the training stories only.

``features[].pca`` (a number of components, or a fraction of the variance to keep in
``(0, 1)``) replaces each space of a feature (each layer of a sweep) by its principal
components. The PCA of a space is fitted on the rows (words, frames) of the *training*
stimuli alone: the stories named in ``model.test_stories`` never enter it, so a held-out
story's features change nothing in the fit (they are only projected). Rows are centred by
the training mean, not scaled (the fit z-scores the design per run anyway).

The fit is scikit-learn's :class:`~sklearn.decomposition.PCA` with the ``covariance_eigh``
solver when there are more rows than dimensions (one ``d x d`` covariance, exact and
deterministic), ``full`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipelines.errors import ConfigError

__all__ = ["PcaFit", "fit_pca", "apply_pca"]


@dataclass(frozen=True)
class PcaFit:
    """A fitted PCA of one space.

    Attributes
    ----------
    mean : np.ndarray, shape (n_dims,)
        Mean of the training rows (float64).
    components : np.ndarray, shape (n_components, n_dims)
        Principal axes (rows, unit norm), by decreasing variance (float64).
    explained : float
        Fraction of the training variance the components keep.
    n_rows : int
        Training rows the PCA was fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    explained: float
    n_rows: int


def fit_pca(train: Sequence[np.ndarray], n_components: int | float, *, what: str = "features[].pca") -> PcaFit:
    """Fit a PCA on the rows of the training stimuli of one space.

    Parameters
    ----------
    train : sequence of arrays of shape (n_rows_i, n_dims)
        The space's rows of each training stimulus.
    n_components : int or float
        Components to keep (int >= 1), or the fraction of variance to keep (float in (0, 1)).
    what : str
        Names the config key in messages.

    Returns
    -------
    PcaFit

    Raises
    ------
    ConfigError
        No training rows, or more components than training rows or dimensions.
    """
    from sklearn.decomposition import PCA  # imported only when a PCA is fitted

    if not train:
        raise ConfigError(f"{what}: no training stimulus to fit the PCA on: every story is a test story")
    X = np.concatenate([np.asarray(a, dtype=np.float64) for a in train], axis=0)
    n_rows, n_dims = X.shape
    if isinstance(n_components, (int, np.integer)) and not isinstance(n_components, bool):
        if n_components > min(n_rows, n_dims):
            raise ConfigError(f"{what}: {n_components} components asked for, but the training stories give "
                              f"{n_rows} rows of {n_dims} dimensions: ask for at most {min(n_rows, n_dims)} "
                              "or a fraction of the variance such as 0.9")
    solver = "covariance_eigh" if n_rows >= n_dims else "full"
    pca = PCA(n_components=n_components, svd_solver=solver).fit(X)
    return PcaFit(mean=pca.mean_.astype(np.float64), components=pca.components_.astype(np.float64),
                  explained=float(pca.explained_variance_ratio_.sum()), n_rows=int(n_rows))


def apply_pca(values: np.ndarray, fit: PcaFit) -> np.ndarray:
    """Project rows on a fitted PCA.

    Parameters
    ----------
    values : array of shape (n_rows, n_dims)
    fit : PcaFit

    Returns
    -------
    np.ndarray of shape (n_rows, n_components), float32
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != fit.mean.size:
        raise ValueError(f"values must have shape (n_rows, {fit.mean.size}), got {values.shape}")
    return ((values - fit.mean) @ fit.components.T).astype(np.float32)
