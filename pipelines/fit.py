"""Voxelwise encoding models: ridge with one alpha per target, nested CV, banded ridge.

Features ``X`` are mapped to responses ``Y`` by ridge regression with an intercept, one
regularization ``alpha`` per target (voxel, channel), chosen by an inner
leave-one-group-out cross-validation inside the training groups and scored on held-out
groups of an outer loop (every group in turn, or one fixed held-out test set, e.g. a
story played several times). Folds are always whole groups (runs, stories or contiguous
blocks), never shuffled samples, and an optional ``gap`` drops training samples next to
held-out ones so that autocorrelated neighbours do not leak between them.

Solvers (``solver=``):

* ``"primal"``: one eigendecomposition of the centred ``X^T X`` (features x features,
  float64) per training set serves every alpha; the target-dependent work is
  ``X^T Y`` once per outer training set, a downdate ``- X_E^T Y_E`` per inner fold
  (``E`` the samples the inner fold leaves out) and one ``(n_val x n_features)`` by
  ``(n_features x n_targets)`` product per alpha, on the himalaya backend in float32.
* ``"kernel"``: the same in sample space (eigendecomposition of the centred kernel
  ``X X^T`` of the training samples), when there are fewer training samples than features.
* ``"auto"`` (default): ``"kernel"`` when the outer training sets have fewer samples than
  ``X`` has features, else ``"primal"``.
* ``"himalaya"``: himalaya's ``RidgeCV`` per outer fold, kept as the reference the others
  are tested against (same alphas chosen, same scores).

Per target, the primal solver does ``2 * n_features * (n_train + sum_folds n_left_out
+ n_alphas * sum_folds n_val + n_test)`` flops (:func:`ridge_flops`); himalaya's
``RidgeCV`` multiplies ``Y`` by one ``(n_val x n_train)`` matrix per alpha and fold
instead, twice that with 5 runs of 600 TRs and 1,024 features, and a minimal solver with
one SVD per fold (``U^T Y`` per fold) 1.2 times (``bench/results/fit.md``). With fewer
targets than ``n_alphas * n_val`` the per-alpha operators would cost more than the
targets' own work, so the right-hand side is rotated into the eigenbasis once instead
(``mode="rotation"``), decided once for all chunks.

Targets are independent given ``X``, so they are sharded into chunks: each chunk is one
call of a pure function (one dask task when a ``distributed.Client`` is given), and the
result does not depend on how targets are chunked or where chunks run, up to float32
rounding of BLAS (a chunk re-run on the same machine gives the same bits).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .backend import (
    GPU_BACKENDS,
    blas_threads,
    choose_backend,
    column_sq_norms,
    eigh_float64,
    float32_like,
    float64_of,
    gemm,
    memory_budget_bytes,
    take_columns,
    take_rows,
    use_backend,
)
from .errors import ConfigError, FitError

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "SOLVERS",
    "BandedEncodingResult",
    "EncodingResult",
    "OuterSplit",
    "default_targets_chunk",
    "fit_banded_encoding",
    "fit_encoding",
    "fit_ridge_fixed_alpha",
    "nested_group_splits",
    "pearson_r",
    "r2_score",
    "ridge_flops",
    "zscore_by_group",
]

#: Memory budget of one chunk when none is given and none can be measured.
MEMORY_BUDGET_BYTES: int = 256 * 2**20

#: Solver names accepted by :func:`fit_encoding` (see the module docstring).
SOLVERS: tuple[str, ...] = ("auto", "primal", "kernel", "himalaya")

#: Most bytes of per-target arrays one chunk holds on a GPU, whatever the free device memory:
#: the target matrix is never copied to the device whole, a chunk's copy-in and results stay
#: bounded, and ~14,000 LeBel-sized targets per chunk still run the products at the GPU's rate.
GPU_CHUNK_MAX_BYTES: int = 1 << 30

#: Times data is sent to dask workers again when a worker receiving or holding it died (a failed
#: scatter, or a chunk cancelled because its columns of Y were lost with their worker).
SEND_RETRIES: int = 3

_MIN_GROUPS = 3
SHARED_DECOMPOSITIONS_MAX = 1 << 30  # bytes of primal decompositions shipped to every chunk

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
        Label of the held-out group (a tuple of labels for a held-out test set).
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


def _check_not_shuffled(groups: np.ndarray, n_labels: int) -> None:
    """Refuse group labels that cut the time series into scraps (shuffled time points).

    A run or story may appear in a few stretches (runs of one story not played in a
    row), but when the typical stretch of consecutive samples sharing a label is one or
    two samples long, the samples were assigned to folds at random: each held-out sample
    then has training neighbours one TR away, whose autocorrelated noise leaks into the
    score.
    """
    if groups.size < 2:
        return
    cuts = np.flatnonzero(groups[1:] != groups[:-1])
    if cuts.size + 1 <= n_labels:
        return
    lengths = np.diff(np.concatenate([[0], cuts + 1, [groups.size]]))
    if np.median(lengths) <= 2:
        raise FitError(
            f"'groups' changes label {cuts.size} times over {groups.size} samples (median stretch "
            f"{np.median(lengths):g} sample(s)): the time points look shuffled. Folds must be whole runs, "
            "stories or contiguous blocks, or autocorrelated neighbours of held-out samples leak into "
            "training; pass run labels or use `model.cv: contiguous_blocks`."
        )


def _inner_splits(groups: np.ndarray, train: np.ndarray, held_out: np.ndarray, labels: np.ndarray,
                  gap: int, outer: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-group-out splits of ``train`` (positions within it), with the gap."""
    n = groups.size
    in_train = np.zeros(n, dtype=bool)
    in_train[train] = True
    inner = []
    for inner_label in labels:
        is_val = in_train & (groups == inner_label)
        if not is_val.any():
            continue
        inner_train = np.flatnonzero(in_train & ~_near(is_val, gap))
        if inner_train.size == 0:
            raise FitError(f"'gap' = {gap} leaves no training samples in an inner fold when holding "
                           f"out groups {outer!r} and {inner_label!r}; use a smaller gap.")
        val = np.flatnonzero(is_val)
        inner.append((np.searchsorted(train, inner_train), np.searchsorted(train, val)))
    if len(inner) < 2:
        raise FitError(f"'gap' = {gap} leaves {len(inner)} inner validation group(s) when holding out "
                       f"group {outer!r}; alphas need at least 2: use a smaller gap or more runs.")
    return inner


def nested_group_splits(groups: np.ndarray, gap: int = 0, test_groups: Sequence[Any] | None = None,
                        ) -> list[OuterSplit]:
    """Nested leave-one-group-out splits, with an optional gap around held-out samples.

    Parameters
    ----------
    groups : array of shape (n_samples,)
        Group label (run, story or contiguous block) of each sample.
    gap : int
        Training samples within ``gap`` positions (in sample index order) of any
        held-out sample are dropped, in the outer split and in every inner split.
    test_groups : sequence of labels or None
        None: every group is held out in turn (nested leave-one-group-out). Else the
        samples of these groups form the one held-out test set (e.g. a story played
        several times), never seen by the fit nor by the choice of alphas, which is made
        by leave-one-group-out over the other groups.

    Returns
    -------
    splits : list of OuterSplit, one per group in order of first appearance (or one)
        Inner splits hold out each remaining group in turn; an inner split whose
        validation group lies entirely inside the outer gap is skipped.

    Raises
    ------
    FitError
        Fewer than 3 groups (2 training groups with ``test_groups``), groups that look
        like shuffled time points, unknown test groups, or a ``gap`` that empties a fold.
    """
    groups = np.asarray(groups)
    labels = _ordered_labels(groups)
    _check_not_shuffled(groups, labels.size)
    if test_groups is not None:
        wanted = list(np.atleast_1d(np.asarray(test_groups, dtype=groups.dtype)))
        unknown = [g for g in wanted if g not in set(labels.tolist())]
        if not wanted or unknown:
            raise FitError(f"'test_groups' must name groups present in 'groups'; got {wanted!r} "
                           f"(unknown: {unknown!r}; groups: {labels.tolist()!r}).")
        is_test = np.isin(groups, wanted)
        train_labels = labels[~np.isin(labels, wanted)]
        if train_labels.size < 2:
            raise FitError(f"Holding out {wanted!r} leaves {train_labels.size} training group(s); choosing "
                           "alphas by cross-validation needs at least 2.")
        train = np.flatnonzero(~_near(is_test, gap))
        if train.size == 0:
            raise FitError(f"'gap' = {gap} leaves no training samples around the test groups; use a smaller gap.")
        label = tuple(wanted)
        return [OuterSplit(label, train, np.flatnonzero(is_test),
                           _inner_splits(groups, train, is_test, train_labels, gap, label))]
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
        others = labels[labels != label]
        splits.append(OuterSplit(label, train, test, _inner_splits(groups, train, is_test, others, gap, label)))
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
        Number of outer folds (= number of groups; 1 with a held-out test set).
    backend : str
        himalaya backend the fit ran on.
    predictions : array of shape (n_samples, n_targets), float32, or None
        Held-out prediction of every sample (from the fold that held it out); NaN for
        samples no fold held out (the training groups, with a held-out test set).
    fold_alphas : array of shape (n_folds, n_targets), float32, or None
        Alpha chosen in each outer fold (folds in order of first appearance of groups).
    sample_fold : array of shape (n_samples,), int, or None
        Index of the outer fold that held out each sample, -1 for none: what
        :func:`pipelines.stats.permutation_test` needs to rebuild ``r`` under the null.
    solver : str
        Solver that ran (``"primal"``, ``"kernel"`` or ``"himalaya"``).
    """

    r: np.ndarray
    r2: np.ndarray
    alpha: np.ndarray
    valid: np.ndarray
    n_folds: int
    backend: str
    predictions: np.ndarray | None = None
    fold_alphas: np.ndarray | None = None
    sample_fold: np.ndarray | None = None
    solver: str = ""


@dataclass
class BandedEncodingResult(EncodingResult):
    """Held-out scores of a banded ridge model over several feature spaces (bands).

    Attributes (besides :class:`EncodingResult`'s)
    ----------------------------------------------
    band_names : list of str
        Name of each feature space, in the order of the arrays below.
    r2_split : array of shape (n_bands, n_targets), float32
        Held-out R² split between bands by the product measure (himalaya's
        ``r2_score_split``), within each outer fold on fold-centred data and
        predictions, averaged like ``r2``. Sums over bands to the joint R² of the
        fold-centred predictions (which is ``r2`` up to the fold's offset error).
    band_weights : array of shape (n_bands, n_targets), float32
        Relative weight ``gamma`` of each band chosen by the inner CV (summing to 1
        per target), averaged over outer folds.
    """

    band_names: list[str] = field(default_factory=list)
    r2_split: np.ndarray | None = None
    band_weights: np.ndarray | None = None


# --------------------------------------------------------------------------- fixed alpha


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
    from himalaya.ridge import Ridge

    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"'alpha' must be positive and finite; got {alpha!r}.")
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float32)
    with use_backend(choose_backend(backend)) as bk:
        model = Ridge(alpha=float(alpha), fit_intercept=False).fit(X, Y)
        return bk.to_numpy(model.coef_).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- solvers


class _Base(NamedTuple):
    """What an outer training set shares with its inner folds."""

    rows: np.ndarray  # sample indices of the outer training set
    G: Any  # primal: float64 Gram [X, 1]^T [X, 1] of the rows; kernel: None
    H: Any  # primal: [X, 1][rows]^T Y[rows] (n_features + 1, n_targets); kernel: None


class _Decomposition(NamedTuple):
    """Eigendecomposition of one centred training set, valid for every alpha."""

    lam: Any  # (m,) float64, eigenvalues clipped at 0
    Q: Any  # (m, m) float32, eigenvectors (columns)
    extra: dict[str, Any]


class _PrimalDesign:
    """Ridge with an intercept in feature space (``m = n_features``).

    For a training set ``T`` with feature means ``mu``, centred Gram ``C = V diag(lam) V^T``
    and right-hand side ``S = [X, 1][T]^T Y[T]`` (whose last row is the sum of ``Y[T]``),
    the prediction for rows ``X_r`` with alpha is ``O @ S`` where ``O = [M, (1 - n M mu) / n]``
    and ``M = (X_r - mu) V diag(1 / (lam + alpha)) V^T``: the intercept needs no centred
    copy of ``Y``. ``S`` of an inner fold is the outer one minus ``[X, 1][E]^T Y[E]``.
    """

    name = "primal"

    def __init__(self, bk: Any, X: np.ndarray, decompositions: dict[str, tuple] | None = None):
        n, p = X.shape
        Xa = np.empty((n, p + 1), dtype=np.float32)
        Xa[:, :p] = X
        Xa[:, p] = 1.0
        self.bk, self.p = bk, p
        self.Xa = bk.asarray(Xa)
        self.decompositions = decompositions or {}  # rows key -> (lam, V, mu, n), as numpy

    def _gram(self, rows: np.ndarray) -> Any:
        A = float64_of(self.bk, take_rows(self.bk, self.Xa, rows))
        return A.T @ A

    def outer(self, Y: Any, rows: np.ndarray) -> _Base:
        bk = self.bk
        G = None if self.decompositions else self._gram(rows)  # shared decompositions need no Gram here
        return _Base(rows, G, gemm(bk, take_rows(bk, self.Xa, rows).T, take_rows(bk, Y, rows)))

    def fold(self, Y: Any, base: _Base, rows: np.ndarray) -> tuple[_Decomposition, Any]:
        bk = self.bk
        left_out = np.setdiff1d(base.rows, rows, assume_unique=True)
        if left_out.size:
            H = gemm(bk, take_rows(bk, self.Xa, left_out).T, take_rows(bk, Y, left_out), C=base.H, alpha=-1.0)
        else:
            H = base.H
        return self.decompose(base.rows, rows, base.G), H

    def decompose(self, outer_rows: np.ndarray, rows: np.ndarray, outer_G: Any = None) -> _Decomposition:
        """The eigendecomposition of the centred Gram of ``rows`` (within ``outer_rows``).

        Taken from the shared ``decompositions`` when they hold it (computed once for every
        chunk by :func:`_decompose_folds`, with these same operations), else computed here.
        """
        bk, p = self.bk, self.p
        cached = self.decompositions.get(_rows_key(rows))
        if cached is not None:
            lam, V, mu, n = cached
            return _Decomposition(bk.asarray_like(lam, self._gram_ref()), float32_like(bk, bk.asarray(V), self.Xa),
                                  {"mu": float32_like(bk, bk.asarray(mu), self.Xa), "n": float(n)})
        G = self._gram(outer_rows) if outer_G is None else outer_G
        left_out = np.setdiff1d(outer_rows, rows, assume_unique=True)
        if left_out.size:
            G = G - self._gram(left_out)
        n = float(G[p, p])
        mu = G[:p, p] / n
        lam, V = eigh_float64(bk, G[:p, :p] - n * (mu[:, None] * mu[None, :]))
        lam = lam * (lam > 0)
        extra = {"mu": float32_like(bk, mu, self.Xa), "n": n}
        return _Decomposition(lam, float32_like(bk, V, self.Xa), extra)

    def _gram_ref(self) -> Any:
        """A float64 array on the device the eigenvalues live on."""
        return float64_of(self.bk, self.Xa[:1, :1])

    def left(self, dec: _Decomposition, rows: np.ndarray) -> Any:
        """``(X_r - mu) V``, float32 (n_rows, m)."""
        Xr = take_rows(self.bk, self.Xa, rows)[:, :self.p]
        return (Xr - dec.extra["mu"][None, :]) @ dec.Q

    def operators(self, dec: _Decomposition, B: Any, d: Any) -> Any:
        """Prediction operators ``O`` for every row of ``d``: (n_alphas, n_rows, m + 1)."""
        bk, p = self.bk, self.p
        n_alphas, n_rows = d.shape[0], B.shape[0]
        M = (B[None, :, :] * d[:, None, :]).reshape(n_alphas * n_rows, p) @ dec.Q.T
        n = dec.extra["n"]
        a = (1.0 - n * (M @ dec.extra["mu"])) / n
        return bk.concatenate([M, a[:, None]], 1).reshape(n_alphas, n_rows, p + 1)

    def rotate(self, dec: _Decomposition, H: Any) -> tuple[Any, Any]:
        """``Z = V^T X_c^T Y_c`` (m, n_targets) and the training mean of ``Y``."""
        p, n = self.p, dec.extra["n"]
        total = H[p]
        Z = dec.Q.T @ H[:p] - (dec.Q.T @ dec.extra["mu"])[:, None] * total[None, :]
        return Z, total / n


class _KernelDesign:
    """Ridge with an intercept in sample space (``m = n_train``), for ``n_train < n_features``.

    With the training kernel centred, ``K_c = U diag(lam) U^T``, and ``K_rc`` the centred
    kernel between rows and training samples, the prediction with alpha is
    ``(K_rc U diag(1 / (lam + alpha)) U^T + 1/n) Y[T]`` (centred kernels annihilate the
    constant, so ``Y`` needs no centring either).
    """

    name = "kernel"

    def __init__(self, bk: Any, X: np.ndarray, decompositions: dict[str, tuple] | None = None):
        self.bk = bk  # kernel decompositions (n_train² each) are not shared: too large to ship
        Xb = bk.asarray(np.ascontiguousarray(X, dtype=np.float32))
        self.K = Xb @ Xb.T
        self._ref = self.K

    def outer(self, Y: Any, rows: np.ndarray) -> _Base:
        return _Base(rows, None, None)

    def _block(self, rows: np.ndarray, cols: np.ndarray) -> Any:
        bk = self.bk
        return float64_of(bk, take_rows(bk, take_rows(bk, self.K, rows).T, cols).T)

    def fold(self, Y: Any, base: _Base, rows: np.ndarray) -> tuple[_Decomposition, Any]:
        bk = self.bk
        K = self._block(rows, rows)
        kbar = K.mean(0)
        g = kbar.mean()
        lam, U = eigh_float64(bk, K - kbar[:, None] - kbar[None, :] + g)
        lam = lam * (lam > 0)
        extra = {"rows": rows, "kbar": kbar, "g": g, "n": float(rows.size)}
        return _Decomposition(lam, float32_like(bk, U, self._ref), extra), take_rows(bk, Y, rows)

    def left(self, dec: _Decomposition, rows: np.ndarray) -> Any:
        """``K_rc U``, float32 (n_rows, m)."""
        Kr = self._block(rows, dec.extra["rows"])
        Krc = Kr - Kr.mean(1)[:, None] - dec.extra["kbar"][None, :] + dec.extra["g"]
        return float32_like(self.bk, Krc, self._ref) @ dec.Q

    def operators(self, dec: _Decomposition, B: Any, d: Any) -> Any:
        n_alphas, n_rows, m = d.shape[0], B.shape[0], B.shape[1]
        M = (B[None, :, :] * d[:, None, :]).reshape(n_alphas * n_rows, m) @ dec.Q.T
        M += 1.0 / dec.extra["n"]
        return M.reshape(n_alphas, n_rows, m)

    def rotate(self, dec: _Decomposition, H: Any) -> tuple[Any, Any]:
        return dec.Q.T @ H, H.mean(0)


_DESIGNS: dict[str, Callable[..., Any]] = {"primal": _PrimalDesign, "kernel": _KernelDesign}


def _rows_key(rows: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _fold_row_sets(split: OuterSplit) -> list[np.ndarray]:
    """Every training set whose decomposition a split needs: its inner folds' and its own."""
    return [split.train[tr] for tr, _ in split.inner] + [split.train]


def _outer_gram(X: np.ndarray, rows: np.ndarray, backend_name: str, n_threads: int | None = None) -> np.ndarray:
    """The float64 Gram ``[X, 1]^T [X, 1]`` of an outer training set, as numpy (a dask task)."""
    with blas_threads(n_threads), use_backend(backend_name) as bk:
        return bk.to_numpy(_PrimalDesign(bk, np.asarray(X, dtype=np.float32))._gram(rows))


def _decompose_rows(X: np.ndarray, outer_rows: np.ndarray, rows: np.ndarray, G: np.ndarray, backend_name: str,
                    n_threads: int | None = None) -> tuple:
    """One training set's decomposition, as numpy ``(lam, V, mu, n)``, from its outer
    set's Gram ``G`` (a dask task)."""
    with blas_threads(n_threads), use_backend(backend_name) as bk:
        design = _PrimalDesign(bk, np.asarray(X, dtype=np.float32))
        dec = design.decompose(outer_rows, rows, bk.asarray(G))
        return bk.to_numpy(dec.lam), bk.to_numpy(dec.Q), bk.to_numpy(dec.extra["mu"]), dec.extra["n"]


def _decompose_folds(X: Any, splits: list[OuterSplit], backend_name: str, client: Client | None,
                     n_threads: int | None) -> dict[str, Any]:
    """Every split's decompositions under their rows keys, computed once for all chunks to share.

    The Gram of each outer split, then each training set's (every inner fold's and the
    refit's) eigendecomposition: in process, or on dask (``X`` then a future of it) as one
    task each, spread over the workers, and left there as futures for the chunks' tasks to
    take (the same functions, so the results are identical).
    """
    if client is None:
        grams = [_outer_gram(X, split.train, backend_name) for split in splits]
        return {_rows_key(rows): _decompose_rows(X, split.train, rows, G, backend_name)
                for split, G in zip(splits, grams) for rows in _fold_row_sets(split)}
    futures = {}
    for split in splits:
        gram = client.submit(_outer_gram, X, split.train, backend_name, n_threads, pure=True)
        futures.update({_rows_key(rows): client.submit(_decompose_rows, X, split.train, rows, gram, backend_name,
                                                       n_threads, pure=True)
                        for rows in _fold_row_sets(split)})
    return futures


def _scatter(client: Client, data: Any, **kwargs: Any) -> Any:
    """``client.scatter(data, hash=False, **kwargs)``, tried again when a worker it was
    sending to died (the next try asks the scheduler for the workers alive then).

    ``hash=False``: a key of its own; with a content hash, an earlier identical fit releasing
    its copy can delete this one's before its tasks run ("lost dependencies").
    """
    for attempt in range(SEND_RETRIES + 1):
        try:
            return client.scatter(data, hash=False, **kwargs)
        # a worker dead mid-send: connection refused or reset (OSError, as distributed's
        # CommClosedError), or the scheduler no longer knowing the worker (its KeyError)
        except (OSError, KeyError):
            if attempt == SEND_RETRIES:
                raise
            time.sleep(0.5 * (attempt + 1))


def _broadcast(client: Client | None, data: Any) -> Any:
    """``data`` itself in process; on dask, a future of it held by every worker."""
    return data if client is None else _scatter(client, data, broadcast=True)


def _shrinkage(bk: Any, lam: Any, alphas: np.ndarray, ref: Any) -> Any:
    """``1 / (lam + alpha)`` for every alpha: float32 (n_alphas, m) on the device of ``ref``."""
    a = bk.asarray_like(np.asarray(alphas, dtype=np.float64)[:, None], lam)
    return float32_like(bk, 1.0 / (lam[None, :] + a), ref)


def _fold_scores(y: np.ndarray, p: np.ndarray, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and R² per column, computed in column batches (bounded float64 copies)."""
    r = np.empty(y.shape[1], dtype=np.float64)
    r2 = np.empty(y.shape[1], dtype=np.float64)
    for start in range(0, y.shape[1], batch):
        cols = slice(start, start + batch)
        r[cols] = pearson_r(y[:, cols], p[:, cols])
        r2[cols] = r2_score(y[:, cols], p[:, cols])
    return r, r2


def _fit_chunk(X: np.ndarray, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
               backend_name: str, return_predictions: bool = True, solver: str = "primal",
               mode: str = "operator", n_threads: int | None = None) -> dict[str, np.ndarray | None]:
    """Nested-CV fit of one chunk of (valid) targets. Pure: same inputs, same outputs.

    Parameters
    ----------
    X : array of shape (n_samples, n_features), float32
    Y : array of shape (n_samples, n_chunk), float32 (a view is fine: it is never written)
    splits : list of OuterSplit
    alphas : array of shape (n_alphas,), float32, sorted
    backend_name : str
    return_predictions : bool
    solver : {"primal", "kernel", "himalaya"}
    mode : {"operator", "rotation"}
        ``"operator"`` builds one ``(n_val, m)`` prediction operator per alpha and fold
        (``n_alphas * n_val * m²`` flops, independent of the targets) and applies it to the
        fold's right-hand side; ``"rotation"`` rotates the right-hand side once
        (``m² * n_chunk`` flops) and scales it per alpha. The caller picks one for all
        chunks: whichever costs less for the whole target matrix.
    n_threads : int or None
        BLAS threads for this call (None: unchanged).

    Returns
    -------
    part : dict
        ``r``, ``r2`` (n_chunk,), ``fold_alphas`` (n_folds, n_chunk) and ``predictions``
        (n_samples, n_chunk; NaN on rows no fold held out) or None.
    """
    decompositions = None
    if isinstance(X, (tuple, list)):  # (X, decompositions shared by every chunk; a list once scattered)
        X, decompositions = X
    with blas_threads(n_threads):
        if solver == "himalaya":
            return _fit_chunk_himalaya(X, Y, splits, alphas, backend_name, return_predictions)
        return _fit_chunk_eigen(X, Y, splits, alphas, backend_name, return_predictions, solver, mode,
                                decompositions)


def _fit_chunk_eigen(X: np.ndarray, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                     backend_name: str, return_predictions: bool, solver: str,
                     mode: str, decompositions: dict[str, tuple] | None = None) -> dict[str, np.ndarray | None]:
    n_samples, n_targets = Y.shape
    n_alphas = alphas.size
    log_alphas = np.log(alphas.astype(np.float64))
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), n_targets), dtype=np.float32)
    fold_r = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_r2 = np.empty((len(splits), n_targets), dtype=np.float64)
    with use_backend(backend_name) as bk:
        design = _DESIGNS[solver](bk, np.asarray(X, dtype=np.float32), decompositions)
        Yb = bk.asarray(Y)
        for k, split in enumerate(splits):
            base = design.outer(Yb, split.train)
            losses = np.zeros((n_alphas, n_targets), dtype=np.float64)
            for tr, va in split.inner:
                dec, H = design.fold(Yb, base, split.train[tr])
                val = split.train[va]
                B = design.left(dec, val)
                d = _shrinkage(bk, dec.lam, alphas, B)
                Yv = take_rows(bk, Yb, val)
                R = bk.zeros_like(Yv)
                if mode == "operator":  # one alpha's (n_val, m) operator at a time, made as it is used
                    terms = ((design.operators(dec, B, d[a:a + 1])[0], H, Yv) for a in range(n_alphas))
                else:
                    Z, nu = design.rotate(dec, H)
                    Yc = Yv - nu[None, :]
                    terms = ((B * d[a][None, :], Z, Yc) for a in range(n_alphas))
                for a, (left, right, target) in enumerate(terms):
                    gemm(bk, left, right, C=target, alpha=-1.0, out=R)
                    # himalaya's l2_neg_loss: mean squared error per split in float32,
                    # averaged over splits in float64
                    losses[a] += bk.to_numpy(column_sq_norms(bk, R) / val.size).astype(np.float64)
                del dec, H, B, d, Yv, R, terms
            scores = -losses / len(split.inner) + 1e-10 * log_alphas[:, None]  # ties -> larger alpha
            best = np.argmax(scores, axis=0)
            fold_alphas[k] = alphas[best]

            # refit on the whole outer training set, predict the held-out group
            dec, H = design.fold(Yb, base, split.train)
            B = design.left(dec, split.test)
            used = np.unique(best)
            pred = np.empty((split.test.size, n_targets), dtype=np.float32)
            d = _shrinkage(bk, dec.lam, alphas[used], B)
            if mode == "rotation":
                Z, nu = design.rotate(dec, H)
            for i, a in enumerate(used):
                cols = np.flatnonzero(best == a)
                if mode == "operator":
                    block = design.operators(dec, B, d[i:i + 1])[0] @ take_columns(bk, H, cols)
                else:
                    block = (B * d[i][None, :]) @ take_columns(bk, Z, cols) + take_rows(bk, nu, cols)[None, :]
                pred[:, cols] = bk.to_numpy(block)
            del dec, H, B, d, base
            y_test = np.asarray(Y[split.test])
            fold_r[k], fold_r2[k] = _fold_scores(y_test, pred)
            if predictions is not None:
                predictions[split.test] = pred
    return _combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)


def _combine_folds(splits: list[OuterSplit], fold_r: np.ndarray, fold_r2: np.ndarray,
                   fold_alphas: np.ndarray, predictions: np.ndarray | None) -> dict[str, np.ndarray | None]:
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


def _fit_chunk_himalaya(X: np.ndarray, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                        backend_name: str, return_predictions: bool = True) -> dict[str, np.ndarray | None]:
    """The reference: himalaya ``RidgeCV`` (intercept, inner CV splits) per outer fold."""
    from himalaya.ridge import RidgeCV

    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), Y.shape[1]), dtype=np.float32)
    fold_r = np.empty((len(splits), Y.shape[1]), dtype=np.float64)
    fold_r2 = np.empty((len(splits), Y.shape[1]), dtype=np.float64)
    with use_backend(backend_name) as bk:
        for k, split in enumerate(splits):
            model = RidgeCV(alphas=alphas, cv=split.inner, fit_intercept=True)
            model.fit(X[split.train], Y[split.train])
            pred = bk.to_numpy(model.predict(X[split.test])).astype(np.float32, copy=False)
            # himalaya returns exp(-log(alpha)): snap to the candidate it stands for
            chosen = bk.to_numpy(model.best_alphas_).astype(np.float64)
            fold_alphas[k] = alphas[np.abs(np.log(chosen)[:, None] - np.log(alphas)[None, :]).argmin(1)]
            fold_r[k], fold_r2[k] = _fold_scores(np.asarray(Y[split.test]), pred)
            if predictions is not None:
                predictions[split.test] = pred
    return _combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)


# --------------------------------------------------------------------------- planning


def ridge_flops(n_features: int, splits: list[OuterSplit], n_alphas: int, n_targets: int,
                solver: str = "primal") -> float:
    """Floating-point operations of the target-dependent work of :func:`fit_encoding`.

    Counts the products with ``Y`` only (2 flops per multiply-add): for the primal
    solver, ``X^T Y`` of each outer training set, the downdate of each inner fold, one
    prediction per alpha and validation sample, and the held-out predictions; for the
    kernel solver, one prediction per alpha and validation sample against every
    training sample. The target-independent decompositions are left out.
    """
    m = n_features + 1
    total = 0.0
    for split in splits:
        n_train = split.train.size
        width = m if solver != "kernel" else n_train
        total += n_train * m if solver != "kernel" else 0.0
        for tr, va in split.inner:
            if solver != "kernel":
                total += (n_train - tr.size) * m
                total += n_alphas * va.size * m
            else:
                total += n_alphas * va.size * tr.size
        total += split.test.size * width
    return 2.0 * total * n_targets


def _bytes_per_target(n_samples: int, n_features: int, max_train: int, max_val: int, max_test: int,
                      solver: str, mode: str, return_predictions: bool) -> int:
    """float32 values a chunk holds per target, times 4 (see default_targets_chunk)."""
    values = n_samples  # the chunk of Y (a copy on a dask worker or a GPU)
    values += n_samples if return_predictions else 0
    if solver == "kernel":
        values += max_train  # Y of the training rows
        m = max_train
    else:
        values += 2 * (n_features + 1)  # outer and inner right-hand sides
        m = n_features + 1
    values += 2 * max_val + max_test  # validation rows, residuals, held-out predictions
    if mode == "rotation":
        values += m + max_val
    if solver == "himalaya":
        values += 20 * max_val  # himalaya's predictions for every alpha (about)
    return 4 * values


def default_targets_chunk(n_samples: int, n_features: int, max_val: int, max_test: int,
                          budget_bytes: int = MEMORY_BUDGET_BYTES, *, max_train: int | None = None,
                          solver: str = "primal", mode: str = "operator",
                          return_predictions: bool = True) -> int:
    """Number of targets per chunk that keeps one chunk's arrays under a memory budget.

    Per target, a chunk holds its float32 responses (``n_samples``), its held-out
    predictions (``n_samples``, when returned), the outer and inner right-hand sides
    (``2 * (n_features + 1)``; the kernel solver holds the training rows of ``Y``
    instead), the validation rows and their residuals (``2 * max_val``) and the
    held-out predictions of one fold (``max_test``)::

        chunk = budget_bytes // (4 * (2 * n_samples + 2 * (n_features + 1) + 2 * max_val + max_test))

    (at least 1). The target-independent arrays (one alpha's operator at a time,
    ``max_val * (n_features + 1)`` floats) come on top. With 256 MiB, 3300
    samples, 1024 features, 600-sample validation folds and a 300-sample test set this
    is about 7,200 targets per chunk.
    """
    per_target = _bytes_per_target(n_samples, n_features, max_train or n_samples, max_val, max_test,
                                   solver, mode, return_predictions)
    return max(1, int(budget_bytes) // per_target)


def _choose_solver(solver: str, n_features: int, splits: list[OuterSplit]) -> str:
    if solver not in SOLVERS:
        raise ConfigError(f"'solver' must be one of {', '.join(SOLVERS)}; got {solver!r}.")
    if solver != "auto":
        return solver
    max_train = max(split.train.size for split in splits)
    return "kernel" if max_train < n_features + 1 else "primal"


def _choose_mode(solver: str, n_features: int, splits: list[OuterSplit], n_alphas: int, n_targets: int) -> str:
    """Operators when they cost less than rotating ``Y``, for a chunk of ``n_targets``.

    Per fold, operators cost ``n_alphas * n_val * m²`` flops for each chunk (they depend on
    ``X`` only, but every chunk builds its own), rotation ``m² * n_targets``: operators win
    when a chunk holds at least ``n_alphas * n_val`` targets.
    """
    max_val = max(va.size for split in splits for _, va in split.inner)
    return "operator" if n_targets >= n_alphas * max_val else "rotation"


def _columns(Y: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``Y[:, cols]``: a view when ``cols`` is a contiguous range."""
    if cols.size and cols[-1] - cols[0] + 1 == cols.size:
        return Y[:, int(cols[0]):int(cols[-1]) + 1]
    return Y[:, cols]


def _worker_threads(client: Client) -> dict[str, int]:
    threads = dict(client.nthreads())
    if not threads:
        raise FitError("The dask cluster has no workers; start some or use `compute.dask: none`.")
    return threads


def _chunk_budget(backend_name: str, budget: int) -> int:
    """A chunk's memory budget: on a GPU, never more than :data:`GPU_CHUNK_MAX_BYTES`."""
    return min(budget, GPU_CHUNK_MAX_BYTES) if backend_name in GPU_BACKENDS else budget


def _plan_chunks(valid_idx: np.ndarray, n_targets_chunk: int | None, per_target: int, backend_name: str,
                 client: Client | None) -> tuple[list[np.ndarray], int | None]:
    """Chunks of target indices, and the BLAS threads each dask task may use.

    With ``n_targets_chunk`` None, the chunk size comes from the memory free on this machine
    (or on the most loaded dask worker) and on the GPU; then the chunks are made equal in
    size (no small last chunk) and, on dask, their number a multiple of the worker threads,
    so every thread gets the same share of the work.
    """
    n_valid = valid_idx.size
    n_threads = None
    if client is None:
        if n_targets_chunk is None:
            budget = _chunk_budget(backend_name, memory_budget_bytes(backend_name))
            n_targets_chunk = _balanced(n_valid, max(1, budget // per_target), 1)
    else:
        threads = _worker_threads(client)
        total = sum(threads.values())
        if n_targets_chunk is None:
            budgets = client.run(memory_budget_bytes, backend_name, max(threads.values()))
            budget = _chunk_budget(backend_name, min(budgets.values()) if budgets else MEMORY_BUDGET_BYTES)
            n_targets_chunk = _balanced(n_valid, max(1, budget // per_target), total)
        n_chunks = math.ceil(n_valid / n_targets_chunk)
        n_threads = max(1, min(min(threads.values()), total // max(1, min(n_chunks, total))))
    chunks = [valid_idx[i:i + n_targets_chunk] for i in range(0, n_valid, n_targets_chunk)]
    return chunks, n_threads


def _balanced(n_valid: int, largest: int, multiple: int) -> int:
    """Chunk size at most ``largest`` giving equal chunks, their number a multiple of ``multiple``."""
    n_chunks = math.ceil(n_valid / largest)
    n_chunks = min(max(1, n_valid), multiple * math.ceil(n_chunks / multiple))
    return max(1, math.ceil(n_valid / n_chunks))


def _run_chunks(func: Callable[..., dict], shared: Any, Y: np.ndarray, chunks: list[np.ndarray],
                client: Client | None, n_threads: int | None, *args: Any) -> list[dict]:
    """``func(shared, Y[:, chunk], *args)`` for every chunk, in process or on dask.

    On dask, ``shared`` holds futures placed by the caller (:func:`_broadcast`); each
    chunk's columns of ``Y`` are scattered straight to a worker (not embedded in the task
    graph, which would route them through the scheduler) and at most two chunks per worker
    thread are in flight, so the cluster never holds a second copy of ``Y``. Tasks are pure:
    a task lost with its worker is recomputed elsewhere, and a chunk whose columns were lost
    with their worker is scattered again (:data:`SEND_RETRIES` times at most); either
    gives the same result.
    """
    from .progress import Progress

    progress = Progress(len(chunks), f"fit: {Y.shape[1]} targets in chunks", unit="chunks")
    if client is None:
        out = []
        for c in chunks:
            out.append(func(shared, _columns(Y, c), *args))
            progress.update()
        progress.close()
        return out
    from distributed import as_completed

    parts: list[dict | None] = [None] * len(chunks)
    order = iter(range(len(chunks)))
    index: dict[str, int] = {}
    resubmits = [0] * len(chunks)
    running = as_completed()

    def submit(batch: list[int]) -> None:
        if not batch:
            return
        # one scatter call for the batch: the blocks travel to their workers concurrently
        blocks = _scatter(client, [np.ascontiguousarray(_columns(Y, chunks[i])) for i in batch], direct=True)
        for i, block in zip(batch, blocks):
            future = client.submit(func, shared, block, *args, n_threads=n_threads, pure=True)
            index[future.key] = i
            running.add(future)

    submit(list(itertools.islice(order, 2 * sum(_worker_threads(client).values()))))
    for future in running:
        i = index.pop(future.key)
        if future.cancelled() and resubmits[i] < SEND_RETRIES:
            # its columns of Y were lost with their worker: send them again
            resubmits[i] += 1
            submit([i])
            continue
        parts[i] = future.result()
        future.release()
        progress.update()
        submit(list(itertools.islice(order, 1)))
    progress.close()
    return parts  # type: ignore[return-value]


# --------------------------------------------------------------------------- checks


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


def _check_inputs(Xs: list[np.ndarray], Y: np.ndarray, groups: np.ndarray) -> tuple[list[np.ndarray], np.ndarray,
                                                                                     np.ndarray]:
    Xs = [np.asarray(X, dtype=np.float32) for X in Xs]
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


def _valid_targets(Y: np.ndarray, batch: int = 2048) -> np.ndarray:
    """Finite and not constant, computed in column batches (no full-size temporaries)."""
    valid = np.empty(Y.shape[1], dtype=bool)
    with np.errstate(invalid="ignore"):
        for start in range(0, Y.shape[1], batch):
            block = Y[:, start:start + batch]
            valid[start:start + batch] = np.isfinite(block).all(axis=0) & (np.ptp(block, axis=0) > 0)
    return valid


def _sample_fold(splits: list[OuterSplit], n_samples: int) -> np.ndarray:
    fold = np.full(n_samples, -1, dtype=np.int64)
    for k, split in enumerate(splits):
        fold[split.test] = k
    return fold


# --------------------------------------------------------------------------- fitting


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
    test_groups: Sequence[Any] | None = None,
    solver: str = "auto",
) -> EncodingResult:
    """Fit a ridge encoding model per target with nested leave-one-group-out CV.

    For each outer fold (each group in turn, or the ``test_groups``), a ridge model
    with an intercept is fit on the other groups, choosing one alpha per target by an
    inner leave-one-group-out CV over those training groups (mean squared error, as
    himalaya's ``RidgeCV``), then predicts the held-out samples. Scores are computed
    within each held-out fold and averaged (weighted by size).

    Parameters
    ----------
    X : array of shape (n_samples, n_features)
        Features (cast to float32). Must be finite. Roughly centred data (z-scored per
        run, as :func:`pipelines.stages.fit_subject` gives) keep float32 accurate.
    Y : array of shape (n_samples, n_targets)
        Responses (cast to float32). Constant or non-finite targets are skipped.
    groups : array of shape (n_samples,)
        Run / story / block label of each sample; at least 3 distinct labels. Folds are
        whole groups, in order of first appearance. Labels that look like shuffled time
        points are refused.
    alphas : sequence of float
        Candidate ridge alphas (positive, finite; duplicates removed).
    backend : str
        ``"auto"`` or a himalaya backend name (resolved once, here, with
        :func:`pipelines.backend.choose_backend`; dask workers use the same name).
    gap : int
        Drop training samples within ``gap`` positions of held-out samples (outer
        and inner splits), against autocorrelation leakage between adjacent runs.
    n_targets_chunk : int or None
        Targets per chunk. None: from the memory free on this machine (or on each dask
        worker, and on the GPU), see :func:`default_targets_chunk`; with dask at least
        one chunk per worker thread. Results do not depend on it.
    client : distributed.Client or None
        If given, ``X`` is scattered once (broadcast), each chunk is one task whose
        columns of ``Y`` are scattered to its worker; otherwise chunks run sequentially
        in this process.
    return_predictions : bool
        Keep the held-out predictions (n_samples x n_targets float32) in the result.
    test_groups : sequence of labels or None
        Hold these groups out as the one test set instead of every group in turn
        (see :func:`nested_group_splits`).
    solver : str
        One of :data:`SOLVERS` (see the module docstring); ``"auto"`` by default.

    Returns
    -------
    result : EncodingResult

    Raises
    ------
    FitError
        Shape mismatches, non-finite ``X``, fewer than 3 groups, shuffled groups, a
        ``gap`` that empties a fold, or no valid target.
    ConfigError
        Invalid ``alphas``, ``gap``, ``n_targets_chunk``, ``backend`` or ``solver``.
    """
    (X,), Y, groups = _check_inputs([X], Y, groups)
    alphas_arr = _check_alphas(alphas)
    gap = _check_int(gap, "gap", 0)
    if n_targets_chunk is not None:
        n_targets_chunk = _check_int(n_targets_chunk, "n_targets_chunk", 1)
    splits = nested_group_splits(groups, gap=gap, test_groups=test_groups)
    backend_name = choose_backend(backend)
    solver_name = _choose_solver(solver, X.shape[1], splits)

    n_samples, n_targets = Y.shape
    valid = _valid_targets(Y)
    if not valid.any():
        raise FitError(f"All {n_targets} targets in Y are constant or contain NaN/Inf; nothing to fit.")
    valid_idx = np.flatnonzero(valid)

    per_target = _bytes_per_target(  # planned for the mode that holds more per target
        n_samples, X.shape[1], max(s.train.size for s in splits),
        max(va.size for s in splits for _, va in s.inner), max(s.test.size for s in splits),
        solver_name, "rotation", return_predictions)
    chunks, n_threads = _plan_chunks(valid_idx, n_targets_chunk, per_target, backend_name, client)
    mode = _choose_mode(solver_name, X.shape[1], splits, alphas_arr.size, max(c.size for c in chunks))
    shared: Any = _broadcast(client, X)
    n_sets = sum(len(s.inner) + 1 for s in splits)
    if solver_name == "primal" and len(chunks) > 1 and n_sets * (X.shape[1] + 2) ** 2 * 4 <= SHARED_DECOMPOSITIONS_MAX:
        # the decompositions depend on X alone: compute them once (in parallel on dask), not per chunk
        # (on dask: tasks, left on the workers, that run while the chunks' columns of Y are sent)
        shared = (shared, _decompose_folds(shared, splits, backend_name, client, n_threads))
    parts = _run_chunks(_fit_chunk, shared, Y, chunks, client, n_threads, splits, alphas_arr, backend_name,
                        return_predictions, solver_name, mode)

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
                          predictions=predictions, fold_alphas=fold_alphas,
                          sample_fold=_sample_fold(splits, n_samples), solver=solver_name)


# --------------------------------------------------------------------------- banded ridge


def _fit_banded_chunk(Xs: list[np.ndarray], Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                      backend_name: str, return_predictions: bool, n_iter: int, random_state: int,
                      n_threads: int | None = None) -> dict[str, np.ndarray | None]:
    """Banded ridge (himalaya) per outer fold for one chunk of targets. Pure.

    Each outer training set is centred (features and targets, by its own means); the
    bands' relative weights and the alpha are searched by himalaya (random search over
    the simplex, ``n_iter`` draws, fixed seed) with the inner splits: ``BandedRidgeCV``
    (primal, intercept refit in every inner fold) when the training set has at least as
    many samples as features, else ``MultipleKernelRidgeCV`` on precomputed linear
    kernels of the centred bands. The held-out prediction is split per band.
    """
    from himalaya.kernel_ridge import MultipleKernelRidgeCV
    from himalaya.ridge import BandedRidgeCV

    n_bands, n_targets = len(Xs), Y.shape[1]
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), n_targets), dtype=np.float32)
    fold_r = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_r2 = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_split = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    fold_gamma = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    params = dict(alphas=np.asarray(alphas, dtype=np.float32), n_iter=n_iter, progress_bar=False)
    with blas_threads(n_threads), use_backend(backend_name) as bk:
        for k, split in enumerate(splits):
            tr, te = split.train, split.test
            means = [X[tr].mean(axis=0, dtype=np.float64).astype(np.float32) for X in Xs]
            Xtr = [X[tr] - mu for X, mu in zip(Xs, means)]
            Xte = [X[te] - mu for X, mu in zip(Xs, means)]
            nu = Y[tr].mean(axis=0, dtype=np.float64).astype(np.float32)
            Ytr = Y[tr] - nu
            if sum(X.shape[1] for X in Xs) <= tr.size:
                model = BandedRidgeCV(groups="input", solver_params=params, cv=split.inner,
                                      fit_intercept=True, random_state=random_state)
                model.fit(Xtr, Ytr)
                coef = bk.to_numpy(model.coef_)
                edges = np.cumsum([0] + [X.shape[1] for X in Xs])
                parts = np.stack([Xte[b] @ coef[edges[b]:edges[b + 1]] for b in range(n_bands)])
                offset = bk.to_numpy(model.intercept_)
            else:
                model = MultipleKernelRidgeCV(kernels="precomputed", solver_params=params, cv=split.inner,
                                              fit_intercept=False, random_state=random_state)
                model.fit(np.stack([A @ A.T for A in Xtr]), Ytr)
                dual = bk.to_numpy(model.dual_coef_)
                weights = np.exp(bk.to_numpy(model.deltas_))
                parts = np.stack([(Xte[b] @ Xtr[b].T @ dual) * weights[b] for b in range(n_bands)])
                offset = np.zeros(n_targets, dtype=np.float32)
            deltas = bk.to_numpy(model.deltas_).astype(np.float64)
            gamma = np.exp(deltas - deltas.max(0))
            fold_gamma[k] = gamma / gamma.sum(0)
            fold_alphas[k] = 1.0 / np.exp(deltas).sum(0)
            pred = (parts.sum(0) + offset + nu).astype(np.float32)
            y_te = Y[te]
            fold_r[k], fold_r2[k] = _fold_scores(y_te, pred)
            yc = y_te - y_te.mean(0)
            pc = parts - parts.mean(1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                sst = (yc.astype(np.float64) ** 2).sum(0)
                total = pc.sum(0)
                for b in range(n_bands):  # product measure (himalaya's r2_score_split)
                    fold_split[k, b] = ((2 * yc * pc[b] - pc[b] * total).sum(0, dtype=np.float64)) / sst
            if predictions is not None:
                predictions[te] = pred
    out = _combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)
    weights = np.array([len(split.test) for split in splits], dtype=np.float64)
    weights /= weights.sum()
    out["r2_split"] = np.tensordot(weights, fold_split, axes=1).astype(np.float32)
    out["band_weights"] = np.tensordot(weights, fold_gamma, axes=1).astype(np.float32)
    return out


def fit_banded_encoding(
    Xs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    Y: np.ndarray,
    groups: np.ndarray,
    alphas: Any,
    *,
    n_iter: int = 20,
    random_state: int = 0,
    backend: str = "auto",
    gap: int = 0,
    n_targets_chunk: int | None = None,
    client: Client | None = None,
    return_predictions: bool = True,
    test_groups: Sequence[Any] | None = None,
) -> BandedEncodingResult:
    """Banded ridge over several feature spaces, with the held-out R² split per space.

    Same folds, validity rules, chunking and scores as :func:`fit_encoding`; each
    feature space (band) gets its own regularization, searched by himalaya inside the
    training groups (see :func:`_fit_banded_chunk`).

    Parameters
    ----------
    Xs : mapping of name -> array of shape (n_samples, n_features_b), or a sequence
        The feature spaces (a sequence is named ``band0``, ``band1``, ...).
    Y, groups, alphas, backend, gap, n_targets_chunk, client, return_predictions, test_groups
        As in :func:`fit_encoding`.
    n_iter : int
        Draws of band weights in himalaya's random search (the first is uniform).
    random_state : int
        Seed of that search (fixed: re-runs and chunkings give the same result).

    Returns
    -------
    result : BandedEncodingResult
        ``alpha`` is himalaya's ``1 / sum(exp(deltas))`` per fold, averaged
        geometrically; ``r2_split`` and ``band_weights`` per band.
    """
    if isinstance(Xs, Mapping):
        names, arrays = [str(k) for k in Xs], list(Xs.values())
    else:
        arrays = list(Xs)
        names = [f"band{i}" for i in range(len(arrays))]
    if len(arrays) < 1:
        raise ConfigError("'Xs' must hold at least one feature space; got none.")
    arrays, Y, groups = _check_inputs(arrays, Y, groups)
    alphas_arr = _check_alphas(alphas)
    gap = _check_int(gap, "gap", 0)
    n_iter = _check_int(n_iter, "n_iter", 1)
    if n_targets_chunk is not None:
        n_targets_chunk = _check_int(n_targets_chunk, "n_targets_chunk", 1)
    splits = nested_group_splits(groups, gap=gap, test_groups=test_groups)
    backend_name = choose_backend(backend)

    n_samples, n_targets = Y.shape
    valid = _valid_targets(Y)
    if not valid.any():
        raise FitError(f"All {n_targets} targets in Y are constant or contain NaN/Inf; nothing to fit.")
    valid_idx = np.flatnonzero(valid)
    n_features = sum(A.shape[1] for A in arrays)
    max_train = max(s.train.size for s in splits)
    per_target = _bytes_per_target(n_samples, n_features, max_train,
                                   max(va.size for s in splits for _, va in s.inner),
                                   max(s.test.size for s in splits), "himalaya", "operator",
                                   return_predictions) + 4 * len(arrays) * max(s.test.size for s in splits)
    chunks, n_threads = _plan_chunks(valid_idx, n_targets_chunk, per_target, backend_name, client)
    parts = _run_chunks(_fit_banded_chunk, _broadcast(client, arrays), Y, chunks, client, n_threads, splits,
                        alphas_arr, backend_name, return_predictions, n_iter, random_state)

    n_bands = len(arrays)
    r = np.full(n_targets, np.nan, dtype=np.float32)
    r2 = np.full(n_targets, np.nan, dtype=np.float32)
    r2_split = np.full((n_bands, n_targets), np.nan, dtype=np.float32)
    band_weights = np.full((n_bands, n_targets), np.nan, dtype=np.float32)
    fold_alphas = np.full((len(splits), n_targets), np.nan, dtype=np.float32)
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    for c, part in zip(chunks, parts):
        r[c], r2[c] = part["r"], part["r2"]
        r2_split[:, c], band_weights[:, c] = part["r2_split"], part["band_weights"]
        fold_alphas[:, c] = part["fold_alphas"]
        if predictions is not None:
            predictions[:, c] = part["predictions"]
    with np.errstate(invalid="ignore"):
        alpha = np.exp(np.log(fold_alphas.astype(np.float64)).mean(axis=0)).astype(np.float32)
    return BandedEncodingResult(
        r=r, r2=r2, alpha=alpha, valid=valid, n_folds=len(splits), backend=backend_name,
        predictions=predictions, fold_alphas=fold_alphas, sample_fold=_sample_fold(splits, n_samples),
        solver="banded", band_names=names, r2_split=r2_split, band_weights=band_weights)
