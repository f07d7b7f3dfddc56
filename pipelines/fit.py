"""Voxelwise encoding models: ridge regression with one alpha per target, nested CV.

Features ``X`` of a story are mapped to fMRI responses ``Y`` by ridge regression
(himalaya's ``RidgeCV``), one regularization ``alpha`` per target (voxel), chosen by
an inner leave-one-run-out cross-validation and scored on held-out runs of an outer
leave-one-run-out loop. Folds are always whole groups (runs or contiguous blocks),
never shuffled samples, and an optional ``gap`` drops training samples next to held-out
ones so that autocorrelated neighbours do not leak between them.

Targets are independent given ``X``, so they are sharded into chunks: each chunk is one
call of a pure function (one dask task when a ``distributed.Client`` is given), and the
result does not depend on how targets are chunked or where chunks run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from himalaya.ridge import Ridge, RidgeCV

from .backend import choose_backend, use_backend
from .errors import ConfigError, FitError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "EncodingResult",
    "OuterSplit",
    "default_targets_chunk",
    "fit_encoding",
    "fit_ridge_fixed_alpha",
    "nested_group_splits",
    "pearson_r",
    "r2_score",
    "zscore_by_group",
]

#: Memory budget for the target-dependent arrays of one chunk (see default_targets_chunk).
MEMORY_BUDGET_BYTES: int = 256 * 2**20

_MIN_GROUPS = 3


# --------------------------------------------------------------------------- helpers


def zscore_by_group(A: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Z-score the columns of ``A`` within each group (run).

    Parameters
    ----------
    A : array of shape (n_samples, n_columns) or (n_samples,)
        Data to standardize (features or responses).
    groups : array of shape (n_samples,)
        Group label of each sample (e.g. the run).

    Returns
    -------
    Z : array of shape like ``A``, float32
        Each column has zero mean and unit variance (``ddof=0``) within each group.
        Columns constant within a group are set to 0 there (not NaN).
    """
    A = np.asarray(A)
    groups = np.asarray(groups)
    if groups.shape != (A.shape[0],):
        raise FitError(f"'groups' must have shape ({A.shape[0]},) to match the data; got {groups.shape}.")
    A2 = A.astype(np.float64, copy=False).reshape(A.shape[0], -1)
    Z = np.empty(A2.shape, dtype=np.float32)
    for label in np.unique(groups):
        rows = groups == label
        block = A2[rows]
        varies = np.ptp(block, axis=0) > 0  # exact test: a rounding-error std is not variance
        scale = np.where(varies, block.std(axis=0), np.inf)  # constant columns -> 0, not NaN
        Z[rows] = (block - block.mean(axis=0)) / scale
    Z = Z.reshape(A.shape)
    return Z


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


# --------------------------------------------------------------------------- splits


class OuterSplit(NamedTuple):
    """One outer fold of the nested cross-validation.

    Attributes
    ----------
    group : object
        Label of the held-out group.
    train : array of int, shape (n_train,)
        Sample indices used for fitting (sorted).
    test : array of int, shape (n_test,)
        Sample indices of the held-out group (sorted).
    inner : list of (array of int, array of int)
        Inner leave-one-group-out ``(train, validation)`` splits, as positions
        *within* ``train`` (what ``RidgeCV(cv=...)`` receives when fit on ``X[train]``).
    """

    group: Any
    train: np.ndarray
    test: np.ndarray
    inner: list[tuple[np.ndarray, np.ndarray]]


def _near(mask: np.ndarray, gap: int) -> np.ndarray:
    """Samples within ``gap`` positions of any sample of ``mask`` (mask included)."""
    if gap == 0:
        return mask
    n = mask.shape[0]
    csum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    idx = np.arange(n)
    hi = np.minimum(idx + gap + 1, n)
    lo = np.maximum(idx - gap, 0)
    return (csum[hi] - csum[lo]) > 0


def _ordered_labels(groups: np.ndarray) -> np.ndarray:
    labels, first = np.unique(groups, return_index=True)
    return labels[np.argsort(first, kind="stable")]


def nested_group_splits(groups: np.ndarray, gap: int = 0) -> list[OuterSplit]:
    """Nested leave-one-group-out splits, with an optional gap around held-out samples.

    Parameters
    ----------
    groups : array of shape (n_samples,)
        Group label (run or contiguous block) of each sample.
    gap : int
        Training samples within ``gap`` positions (in sample index order) of any
        held-out sample are dropped, in the outer split and in every inner split.

    Returns
    -------
    splits : list of OuterSplit, one per group, in order of first appearance
        Inner splits hold out each remaining group in turn; an inner split whose
        validation group lies entirely inside the outer gap is skipped.

    Raises
    ------
    FitError
        If fewer than 3 groups, or if ``gap`` leaves a fold without training samples.
    """
    groups = np.asarray(groups)
    labels = _ordered_labels(groups)
    if labels.size < _MIN_GROUPS:
        raise FitError(
            f"Found {labels.size} group(s) (runs) in 'groups' but nested cross-validation needs at "
            f"least {_MIN_GROUPS}: use more runs or `model.cv: contiguous_blocks` with `n_folds >= 3`."
        )
    splits = []
    for label in labels:
        is_test = groups == label
        test = np.flatnonzero(is_test)
        train = np.flatnonzero(~_near(is_test, gap))
        if train.size == 0:
            raise FitError(f"'gap' = {gap} leaves no training samples when holding out group {label!r}; "
                           "use a smaller gap.")
        inner = []
        for inner_label in labels:
            if inner_label == label:
                continue
            is_val = np.zeros_like(is_test)
            is_val[train] = groups[train] == inner_label
            if not is_val.any():
                continue
            in_train = np.zeros_like(is_test)
            in_train[train] = True
            inner_train = np.flatnonzero(in_train & ~_near(is_val, gap))
            if inner_train.size == 0:
                raise FitError(f"'gap' = {gap} leaves no training samples in an inner fold when holding "
                               f"out groups {label!r} and {inner_label!r}; use a smaller gap.")
            val = np.flatnonzero(is_val)
            inner.append((np.searchsorted(train, inner_train), np.searchsorted(train, val)))
        if not inner:
            raise FitError(f"'gap' = {gap} leaves no inner validation group when holding out group "
                           f"{label!r}; use a smaller gap.")
        splits.append(OuterSplit(label, train, test, inner))
    return splits


# --------------------------------------------------------------------------- results


@dataclass
class EncodingResult:
    """Held-out scores of a voxelwise encoding model.

    Attributes
    ----------
    r : array of shape (n_targets,), float32
        Pearson r between held-out predictions and ``Y`` within each outer fold,
        averaged over folds weighted by fold size.
    r2 : array of shape (n_targets,), float32
        R² of held-out predictions within each outer fold, averaged likewise.
    alpha : array of shape (n_targets,), float32
        Geometric mean over outer folds of the alpha chosen by the inner CV.
    valid : array of shape (n_targets,), bool
        False for targets that are constant or contain NaN/Inf; their ``r``,
        ``r2``, ``alpha`` (and predictions) are NaN.
    n_folds : int
        Number of outer folds (= number of groups).
    backend : str
        himalaya backend the fit ran on.
    predictions : array of shape (n_samples, n_targets), float32, or None
        Held-out prediction of every sample (from the fold that held it out).
    fold_alphas : array of shape (n_folds, n_targets), float32, or None
        Alpha chosen in each outer fold (folds in order of first appearance of groups).
    """

    r: np.ndarray
    r2: np.ndarray
    alpha: np.ndarray
    valid: np.ndarray
    n_folds: int
    backend: str
    predictions: np.ndarray | None = None
    fold_alphas: np.ndarray | None = None


# --------------------------------------------------------------------------- fitting


def fit_ridge_fixed_alpha(X: np.ndarray, Y: np.ndarray, alpha: float, *, backend: str = "auto") -> np.ndarray:
    """Ridge weights for one fixed alpha, without intercept (himalaya ``Ridge``).

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
    Y : array of shape (n_samples, n_targets)
    alpha : float
        Regularization strength (> 0).
    backend : str
        ``"auto"`` or a himalaya backend name (see :func:`pipelines.backend.choose_backend`).

    Returns
    -------
    weights : array of shape (n_features, n_targets), float32
        Minimizer of ``||X W - Y||² + alpha ||W||²``.
    """
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"'alpha' must be positive and finite; got {alpha!r}.")
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float32)
    with use_backend(choose_backend(backend)) as bk:
        model = Ridge(alpha=float(alpha), fit_intercept=False).fit(X, Y)
        return bk.to_numpy(model.coef_).astype(np.float32, copy=False)


def default_targets_chunk(n_samples: int, n_alphas: int, max_test: int,
                          budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """Number of targets per chunk that keeps one chunk's arrays under a memory budget.

    Per target, a chunk holds its float32 responses (``n_samples``), its held-out
    predictions (``n_samples``) and himalaya's validation predictions for every alpha
    (``n_alphas * max_test``), so::

        chunk = budget_bytes // (4 * (2 * n_samples + n_alphas * max_test))

    (at least 1). With the default 256 MiB, 3000 samples, 20 alphas and 300-sample
    runs this is about 7,400 targets per chunk.
    """
    per_target = 4 * (2 * n_samples + n_alphas * max_test)
    return max(1, budget_bytes // per_target)


def _fit_chunk(X: np.ndarray, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
               backend_name: str, return_predictions: bool = True) -> dict[str, np.ndarray | None]:
    """Nested-CV fit of one chunk of (valid) targets. Pure: same inputs, same outputs.

    Returns a dict with ``r``, ``r2`` (n_chunk,), ``fold_alphas`` (n_folds, n_chunk) and
    ``predictions`` (n_samples, n_chunk) or None.
    """
    predictions = np.empty(Y.shape, dtype=np.float32)
    fold_alphas = np.empty((len(splits), Y.shape[1]), dtype=np.float32)
    fold_r = np.empty((len(splits), Y.shape[1]), dtype=np.float64)
    fold_r2 = np.empty((len(splits), Y.shape[1]), dtype=np.float64)
    with use_backend(backend_name) as bk:
        for k, split in enumerate(splits):
            model = RidgeCV(alphas=alphas, cv=split.inner, fit_intercept=True)
            model.fit(X[split.train], Y[split.train])
            predictions[split.test] = bk.to_numpy(model.predict(X[split.test]))
            fold_alphas[k] = bk.to_numpy(model.best_alphas_)
            fold_r[k] = pearson_r(Y[split.test], predictions[split.test])
            fold_r2[k] = r2_score(Y[split.test], predictions[split.test])
    # Scores are computed within each held-out fold, then averaged weighted by fold size:
    # pooling predictions across folds would add between-fold offsets (each fold's training
    # mean is anti-correlated with its held-out mean), biasing null targets' r below 0.
    weights = np.array([len(split.test) for split in splits], dtype=np.float64)
    weights /= weights.sum()
    return {
        "r": (weights @ fold_r).astype(np.float32),
        "r2": (weights @ fold_r2).astype(np.float32),
        "fold_alphas": fold_alphas,
        "predictions": predictions if return_predictions else None,
    }


def _format_values(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _check_alphas(alphas: Any) -> np.ndarray:
    a = np.atleast_1d(np.asarray(alphas, dtype=np.float64)).ravel()
    if a.size == 0:
        raise ConfigError("'model.alphas' must list at least one value; got [].")
    if not np.all(a > 0):
        raise ConfigError(f"'model.alphas' must be positive; got {_format_values(a)}.")
    if not np.all(np.isfinite(a)):
        raise ConfigError(f"'model.alphas' must be finite; got {_format_values(a)}.")
    return np.unique(a).astype(np.float32)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"'{name}' must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def fit_encoding(
    X: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray,
    alphas: Any,
    *,
    backend: str = "auto",
    gap: int = 0,
    n_targets_chunk: int | None = None,
    client: Client | None = None,
    return_predictions: bool = True,
) -> EncodingResult:
    """Fit a ridge encoding model per target with nested leave-one-group-out CV.

    For each group (outer fold), himalaya ``RidgeCV`` with an intercept is fit on the
    other groups, choosing one alpha per target by an inner leave-one-group-out CV
    over those training groups (mean squared error), then predicts the held-out
    group. Scores are computed within each held-out fold and averaged (weighted by size).

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
        Features (cast to float32). Must be finite.
    Y : array of shape (n_samples, n_targets)
        Responses (cast to float32). Constant or non-finite targets are skipped.
    groups : array of shape (n_samples,)
        Run / block label of each sample; at least 3 distinct labels. Folds are
        whole groups, in order of first appearance.
    alphas : sequence of float
        Candidate ridge alphas (positive, finite; duplicates removed).
    backend : str
        ``"auto"`` or a himalaya backend name (resolved once, here, with
        :func:`pipelines.backend.choose_backend`; dask workers use the same name).
    gap : int
        Drop training samples within ``gap`` positions of held-out samples (outer
        and inner splits), against autocorrelation leakage between adjacent runs.
    n_targets_chunk : int or None
        Targets per chunk. None: :func:`default_targets_chunk` (256 MiB budget).
        Results do not depend on it.
    client : distributed.Client or None
        If given, ``X`` is scattered once (broadcast) and each chunk is one task;
        otherwise chunks run sequentially in this process.
    return_predictions : bool
        Keep the held-out predictions (n_samples x n_targets float32) in the result.

    Returns
    -------
    result : EncodingResult

    Raises
    ------
    FitError
        Shape mismatches, non-finite ``X``, fewer than 3 groups, a ``gap`` that
        empties a fold, or no valid target.
    ConfigError
        Invalid ``alphas``, ``gap``, ``n_targets_chunk`` or ``backend``.
    """
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float32)
    groups = np.asarray(groups)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2:
        raise FitError(f"X and Y must be 2-D (n_samples, n_features/n_targets); got {X.shape} and {Y.shape}.")
    n_samples = X.shape[0]
    if Y.shape[0] != n_samples:
        raise FitError(f"X and Y must have the same number of samples; got {n_samples} and {Y.shape[0]}.")
    if groups.shape != (n_samples,):
        raise FitError(f"'groups' must have shape ({n_samples},) to match X; got {groups.shape}.")
    alphas_arr = _check_alphas(alphas)
    gap = _check_int(gap, "gap", 0)
    if n_targets_chunk is not None:
        n_targets_chunk = _check_int(n_targets_chunk, "n_targets_chunk", 1)
    bad_cols = np.flatnonzero(~np.isfinite(X).all(axis=0))
    if bad_cols.size:
        raise FitError(f"X contains NaN or Inf in {bad_cols.size} feature column(s) (first: {bad_cols[0]}); "
                       "impute or drop them before fitting.")
    splits = nested_group_splits(groups, gap=gap)
    backend_name = choose_backend(backend)

    n_targets = Y.shape[1]
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(Y).all(axis=0) & (np.ptp(Y, axis=0) > 0)
    if not valid.any():
        raise FitError(f"All {n_targets} targets in Y are constant or contain NaN/Inf; nothing to fit.")
    valid_idx = np.flatnonzero(valid)

    if n_targets_chunk is None:
        max_test = max(s.test.size for s in splits)
        n_targets_chunk = default_targets_chunk(n_samples, alphas_arr.size, max_test)
    chunks = [valid_idx[i:i + n_targets_chunk] for i in range(0, valid_idx.size, n_targets_chunk)]

    if client is None:
        parts = [_fit_chunk(X, np.ascontiguousarray(Y[:, c]), splits, alphas_arr, backend_name,
                            return_predictions) for c in chunks]
    else:
        X_remote = client.scatter(X, broadcast=True)
        futures = [client.submit(_fit_chunk, X_remote, np.ascontiguousarray(Y[:, c]), splits, alphas_arr,
                                 backend_name, return_predictions, pure=True) for c in chunks]
        parts = client.gather(futures)

    r = np.full(n_targets, np.nan, dtype=np.float32)
    r2 = np.full(n_targets, np.nan, dtype=np.float32)
    fold_alphas = np.full((len(splits), n_targets), np.nan, dtype=np.float32)
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    for c, part in zip(chunks, parts):
        r[c] = part["r"]
        r2[c] = part["r2"]
        fold_alphas[:, c] = part["fold_alphas"]
        if predictions is not None:
            predictions[:, c] = part["predictions"]
    with np.errstate(invalid="ignore"):
        alpha = np.exp(np.log(fold_alphas.astype(np.float64)).mean(axis=0)).astype(np.float32)

    return EncodingResult(r=r, r2=r2, alpha=alpha, valid=valid, n_folds=len(splits), backend=backend_name,
                          predictions=predictions, fold_alphas=fold_alphas)
