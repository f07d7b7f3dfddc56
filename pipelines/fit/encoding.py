"""The public fits: :func:`fit_encoding`, :func:`fit_banded_encoding`, :func:`fit_ridge_fixed_alpha`.

Each checks its inputs, makes the folds, plans the chunks of targets, runs a chunk
solver on every chunk (in process or on dask) and assembles the chunks' scores into a
result dataclass. See :mod:`pipelines.fit` for the method.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from himalaya.ridge import Ridge

from ..backend import choose_backend, use_backend
from ..errors import ConfigError, FitError
from .checks import check_alphas, check_inputs, check_int, valid_targets
from .chunks import broadcast, bytes_per_target, plan_chunks, run_chunks, set_columns
from .banded import banded_bytes_per_target
from .designs import SHARED_DECOMPOSITIONS_MAX, decompose_folds
from .solvers import ChunkInputs, choose_mode, choose_solver, fit_banded_chunk, fit_chunk
from .splits import nested_group_splits, sample_fold

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "BandedEncodingResult",
    "EncodingResult",
    "fit_banded_encoding",
    "fit_encoding",
    "fit_ridge_fixed_alpha",
]


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


# --------------------------------------------------------------------------- helpers


def _held_bytes(Y: Any) -> int | None:
    """Bytes of ``Y`` when it is held in memory (caps a chunk's memory), None when it is on storage."""
    return int(Y.nbytes) if isinstance(Y, np.ndarray) else None


def _checked_valid(valid: Any, n_targets: int) -> np.ndarray:
    """The caller's mask of targets to fit, as a bool array of one value per target."""
    mask = np.asarray(valid)
    if mask.dtype != bool or mask.shape != (n_targets,):
        raise FitError(f"'valid' must be a bool array of shape ({n_targets},); got {mask.dtype} {mask.shape}.")
    return mask.copy()


def _predictions_array(Y: Any, return_predictions: bool, out: Any) -> Any:
    """Where held-out predictions go: ``out``, a new NaN array, or None when none are kept."""
    if not return_predictions:
        return None
    if out is None:
        return np.full(Y.shape, np.nan, dtype=np.float32)
    if tuple(out.shape) != tuple(Y.shape):
        raise FitError(f"'predictions_out' must have Y's shape {tuple(Y.shape)}; got {tuple(out.shape)}.")
    return out


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
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"'alpha' must be positive and finite; got {alpha!r}.")
    X = np.asarray(X, dtype=np.float32)
    Y = np.asarray(Y, dtype=np.float32)
    with use_backend(choose_backend(backend)) as bk:
        model = Ridge(alpha=float(alpha), fit_intercept=False).fit(X, Y)
        return bk.to_numpy(model.coef_).astype(np.float32, copy=False)


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
    predictions_out: Any = None,
    valid: np.ndarray | None = None,
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
        run, as :func:`pipelines.steps.fit_subject` gives) keep float32 accurate.
    Y : array of shape (n_samples, n_targets)
        Responses (cast to float32). Constant or non-finite targets are skipped. May be a
        float32 array on storage (an ``h5py.Dataset``, zarr or dask array): each chunk's
        columns are then read when the chunk runs, and ``Y`` is never held whole (out of core).
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
        worker, and on the GPU), see :func:`pipelines.fit.default_targets_chunk`; with dask at least
        one chunk per worker thread. Results do not depend on it.
    client : distributed.Client or None
        If given, ``X`` is scattered once (broadcast), each chunk is one task whose
        columns of ``Y`` are scattered to its worker; otherwise chunks run sequentially
        in this process.
    return_predictions : bool
        Keep the held-out predictions (n_samples x n_targets float32) in the result.
    test_groups : sequence of labels or None
        Hold these groups out as the one test set instead of every group in turn
        (see :func:`pipelines.fit.nested_group_splits`).
    solver : str
        One of :data:`pipelines.fit.SOLVERS` (see :mod:`pipelines.fit`); ``"auto"`` by default.
    predictions_out : writable float32 array of ``Y``'s shape filled with NaN, or None
        Where the held-out predictions are written (e.g. an ``h5py.Dataset`` beside a stored
        ``Y``) instead of a new array in memory; only with ``return_predictions``.

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
    (X,), Y, groups = check_inputs([X], Y, groups)
    alphas_arr = check_alphas(alphas)
    gap = check_int(gap, "gap", 0)
    if n_targets_chunk is not None:
        n_targets_chunk = check_int(n_targets_chunk, "n_targets_chunk", 1)
    splits = nested_group_splits(groups, gap=gap, test_groups=test_groups)
    backend_name = choose_backend(backend)
    solver_name = choose_solver(solver, X.shape[1], splits)

    n_samples, n_targets = Y.shape
    valid = valid_targets(Y) if valid is None else _checked_valid(valid, n_targets)
    if not valid.any():
        raise FitError(f"All {n_targets} targets in Y are constant or contain NaN/Inf; nothing to fit.")
    valid_idx = np.flatnonzero(valid)

    per_target = bytes_per_target(  # planned for the mode that holds more per target
        n_samples, X.shape[1], max(s.train.size for s in splits),
        max(va.size for s in splits for _, va in s.inner), max(s.test.size for s in splits),
        solver_name, "rotation", return_predictions)
    chunks, n_threads = plan_chunks(valid_idx, n_targets_chunk, per_target, backend_name, client, _held_bytes(Y))
    mode = choose_mode(solver_name, X.shape[1], splits, alphas_arr.size, max(c.size for c in chunks))
    X_shared = broadcast(client, X)  # X itself, or on dask a future of it held by every worker
    decompositions = None
    n_sets = sum(len(s.inner) + 1 for s in splits)
    if solver_name == "primal" and len(chunks) > 1 and n_sets * (X.shape[1] + 2) ** 2 * 4 <= SHARED_DECOMPOSITIONS_MAX:
        # the decompositions depend on X alone: compute them once (in parallel on dask), not per chunk
        # (on dask: tasks, left on the workers, that run while the chunks' columns of Y are sent)
        decompositions = decompose_folds(X_shared, splits, backend_name, client, n_threads)
    parts = run_chunks(fit_chunk, ChunkInputs(X_shared, decompositions), Y, chunks, client, n_threads, splits,
                       alphas_arr, backend_name, return_predictions, solver_name, mode)

    r = np.full(n_targets, np.nan, dtype=np.float32)
    r2 = np.full(n_targets, np.nan, dtype=np.float32)
    fold_alphas = np.full((len(splits), n_targets), np.nan, dtype=np.float32)
    predictions = _predictions_array(Y, return_predictions, predictions_out)
    for c, part in zip(chunks, parts):
        r[c] = part["r"]
        r2[c] = part["r2"]
        fold_alphas[:, c] = part["fold_alphas"]
        if predictions is not None:
            set_columns(predictions, c, part["predictions"])
    with np.errstate(invalid="ignore"):
        alpha = np.exp(np.log(fold_alphas.astype(np.float64)).mean(axis=0)).astype(np.float32)

    return EncodingResult(r=r, r2=r2, alpha=alpha, valid=valid, n_folds=len(splits), backend=backend_name,
                          predictions=predictions, fold_alphas=fold_alphas,
                          sample_fold=sample_fold(splits, n_samples), solver=solver_name)


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
    predictions_out: Any = None,
    valid: np.ndarray | None = None,
) -> BandedEncodingResult:
    """Banded ridge over several feature spaces, with the held-out R² split per space.

    Same folds, validity rules, chunking and scores as :func:`fit_encoding`; each
    feature space (band) gets its own regularization, chosen inside the training groups
    by himalaya's random search (its draws of band weights and its selection rules), with
    one eigendecomposition per draw and outer training set (see
    :func:`pipelines.fit.banded.fit_banded_chunk`).

    Parameters
    ----------
    Xs : mapping of name -> array of shape (n_samples, n_features_b), or a sequence
        The feature spaces (a sequence is named ``band0``, ``band1``, ...).
    Y, groups, alphas, backend, gap, n_targets_chunk, client, return_predictions, test_groups, predictions_out, valid
        As in :func:`fit_encoding` (``Y`` may be on storage).
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
    arrays, Y, groups = check_inputs(arrays, Y, groups)
    alphas_arr = check_alphas(alphas)
    gap = check_int(gap, "gap", 0)
    n_iter = check_int(n_iter, "n_iter", 1)
    if n_targets_chunk is not None:
        n_targets_chunk = check_int(n_targets_chunk, "n_targets_chunk", 1)
    splits = nested_group_splits(groups, gap=gap, test_groups=test_groups)
    backend_name = choose_backend(backend)

    n_samples, n_targets = Y.shape
    valid = valid_targets(Y) if valid is None else _checked_valid(valid, n_targets)
    if not valid.any():
        raise FitError(f"All {n_targets} targets in Y are constant or contain NaN/Inf; nothing to fit.")
    valid_idx = np.flatnonzero(valid)
    n_features = sum(A.shape[1] for A in arrays)
    per_target = banded_bytes_per_target(n_samples, n_features, len(arrays), splits, return_predictions)
    chunks, n_threads = plan_chunks(valid_idx, n_targets_chunk, per_target, backend_name, client, _held_bytes(Y))
    parts = run_chunks(fit_banded_chunk, broadcast(client, arrays), Y, chunks, client, n_threads, splits,
                       alphas_arr, backend_name, return_predictions, n_iter, random_state)

    n_bands = len(arrays)
    r = np.full(n_targets, np.nan, dtype=np.float32)
    r2 = np.full(n_targets, np.nan, dtype=np.float32)
    r2_split = np.full((n_bands, n_targets), np.nan, dtype=np.float32)
    band_weights = np.full((n_bands, n_targets), np.nan, dtype=np.float32)
    fold_alphas = np.full((len(splits), n_targets), np.nan, dtype=np.float32)
    predictions = _predictions_array(Y, return_predictions, predictions_out)
    for c, part in zip(chunks, parts):
        r[c], r2[c] = part["r"], part["r2"]
        r2_split[:, c], band_weights[:, c] = part["r2_split"], part["band_weights"]
        fold_alphas[:, c] = part["fold_alphas"]
        if predictions is not None:
            set_columns(predictions, c, part["predictions"])
    with np.errstate(invalid="ignore"):
        alpha = np.exp(np.log(fold_alphas.astype(np.float64)).mean(axis=0)).astype(np.float32)
    return BandedEncodingResult(
        r=r, r2=r2, alpha=alpha, valid=valid, n_folds=len(splits), backend=backend_name,
        predictions=predictions, fold_alphas=fold_alphas, sample_fold=sample_fold(splits, n_samples),
        solver="banded", band_names=names, r2_split=r2_split, band_weights=band_weights)
