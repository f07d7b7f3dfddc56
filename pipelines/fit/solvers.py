"""The ridge solvers: one chunk of targets, nested CV, every outer fold.

Each solver is a pure function of the same signature (see :func:`fit_chunk`), collected
in :data:`RIDGE_SOLVERS`; :func:`fit_chunk` runs the one named. The banded ridge chunk
(:func:`fit_banded_chunk`) lives in :mod:`pipelines.fit.banded` (re-exported here); the
cost model that picks a solver and a mode once for all chunks lives here.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from himalaya.ridge import RidgeCV

from ..backend import blas_threads, column_sq_norms, gemm, take_columns, take_rows, use_backend
from ..errors import ConfigError
from .banded import fit_banded_chunk
from .designs import KernelDesign, PrimalDesign, shrinkage
from .scores import combine_folds, fold_scores
from .splits import OuterSplit

__all__ = [
    "RIDGE_SOLVERS",
    "SOLVERS",
    "ChunkInputs",
    "choose_mode",
    "choose_solver",
    "fit_banded_chunk",
    "fit_chunk",
    "get_solver",
    "ridge_flops",
]


class ChunkInputs(NamedTuple):
    """What every chunk of targets shares: the features, and the primal decompositions.

    A NamedTuple so that dask resolves the futures it may hold (``X`` broadcast to the
    workers, decompositions computed there) in the task that receives it.

    Attributes
    ----------
    X : array of shape (n_samples, n_features), float32
    decompositions : dict of str -> (lam, V, mu, n), or None
        Every training set's primal eigendecomposition under its rows key
        (:func:`pipelines.fit.designs.decompose_folds`); None: each chunk computes its own.
    """

    X: np.ndarray
    decompositions: dict[str, tuple] | None = None


#: A chunk solver: ``(inputs, Y, splits, alphas, backend_name, return_predictions, mode) -> part``
#: (see :func:`fit_chunk`).
RidgeSolver = Callable[..., dict[str, np.ndarray | None]]


def fit_chunk(inputs: ChunkInputs, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
              backend_name: str, return_predictions: bool = True, solver: str = "primal",
              mode: str = "operator", n_threads: int | None = None) -> dict[str, np.ndarray | None]:
    """Nested-CV fit of one chunk of (valid) targets. Pure: same inputs, same outputs.

    Parameters
    ----------
    inputs : ChunkInputs
        ``X`` (n_samples, n_features) float32, and the primal decompositions if shared.
    Y : array of shape (n_samples, n_chunk), float32 (a view is fine: it is never written)
    splits : list of OuterSplit
    alphas : array of shape (n_alphas,), float32, sorted
    backend_name : str
    return_predictions : bool
    solver : {"primal", "kernel", "himalaya"}
        A key of :data:`RIDGE_SOLVERS`.
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
    solve = get_solver(solver)
    with blas_threads(n_threads):
        return solve(inputs, Y, splits, alphas, backend_name, return_predictions, mode)


def _solve_eigen(design_class: type[PrimalDesign] | type[KernelDesign], inputs: ChunkInputs, Y: np.ndarray,
                 splits: list[OuterSplit], alphas: np.ndarray, backend_name: str, return_predictions: bool,
                 mode: str) -> dict[str, np.ndarray | None]:
    """Nested CV of one chunk with one eigendecomposition per training set (see :func:`fit_chunk`)."""
    n_samples, n_targets = Y.shape
    n_alphas = alphas.size
    log_alphas = np.log(alphas.astype(np.float64))
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), n_targets), dtype=np.float32)
    fold_r = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_r2 = np.empty((len(splits), n_targets), dtype=np.float64)
    with use_backend(backend_name) as bk:
        design = design_class(bk, np.asarray(inputs.X, dtype=np.float32), inputs.decompositions)
        Yb = bk.asarray(Y)
        for k, split in enumerate(splits):
            base = design.outer(Yb, split.train)
            losses = np.zeros((n_alphas, n_targets), dtype=np.float64)
            for tr, va in split.inner:
                dec, H = design.fold(Yb, base, split.train[tr])
                val = split.train[va]
                B = design.left(dec, val)
                d = shrinkage(bk, dec.lam, alphas, B)
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
            d = shrinkage(bk, dec.lam, alphas[used], B)
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
            fold_r[k], fold_r2[k] = fold_scores(y_test, pred)
            if predictions is not None:
                predictions[split.test] = pred
    return combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)


def solve_primal(inputs: ChunkInputs, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                 backend_name: str, return_predictions: bool = True, mode: str = "operator",
                 ) -> dict[str, np.ndarray | None]:
    """Ridge in feature space: one eigendecomposition of the centred ``X^T X`` per training set.

    Uses ``inputs.decompositions`` when given (computed once for every chunk), else
    computes them. Arguments and result as in :func:`fit_chunk`.
    """
    return _solve_eigen(PrimalDesign, inputs, Y, splits, alphas, backend_name, return_predictions, mode)


def solve_kernel(inputs: ChunkInputs, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                 backend_name: str, return_predictions: bool = True, mode: str = "operator",
                 ) -> dict[str, np.ndarray | None]:
    """Ridge in sample space: one eigendecomposition of the centred kernel ``X X^T`` per training set.

    For fewer training samples than features. Arguments and result as in :func:`fit_chunk`
    (``inputs.decompositions`` is not used: kernel decompositions are not shared).
    """
    return _solve_eigen(KernelDesign, inputs, Y, splits, alphas, backend_name, return_predictions, mode)


def solve_himalaya(inputs: ChunkInputs, Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                   backend_name: str, return_predictions: bool = True, mode: str = "operator",
                   ) -> dict[str, np.ndarray | None]:
    """The reference: himalaya ``RidgeCV`` (intercept, inner CV splits) per outer fold.

    Arguments and result as in :func:`fit_chunk` (``mode`` and ``inputs.decompositions``
    are not used).
    """
    X = inputs.X
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
            fold_r[k], fold_r2[k] = fold_scores(np.asarray(Y[split.test]), pred)
            if predictions is not None:
                predictions[split.test] = pred
    return combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)


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


def choose_solver(solver: str, n_features: int, splits: list[OuterSplit]) -> str:
    """The solver to run: ``solver`` itself, or for ``"auto"`` the kernel solver when the
    outer training sets have fewer samples than ``X`` has features (plus the intercept).

    Raises
    ------
    ConfigError
        ``solver`` not in :data:`SOLVERS`.
    """
    if solver not in SOLVERS:
        raise ConfigError(f"'solver' must be one of {', '.join(SOLVERS)}; got {solver!r}.")
    if solver != "auto":
        return solver
    max_train = max(split.train.size for split in splits)
    return "kernel" if max_train < n_features + 1 else "primal"


def choose_mode(solver: str, n_features: int, splits: list[OuterSplit], n_alphas: int, n_targets: int) -> str:
    """Operators when they cost less than rotating ``Y``, for a chunk of ``n_targets``.

    Per fold, operators cost ``n_alphas * n_val * m²`` flops for each chunk (they depend on
    ``X`` only, but every chunk builds its own), rotation ``m² * n_targets``: operators win
    when a chunk holds at least ``n_alphas * n_val`` targets.
    """
    max_val = max(va.size for split in splits for _, va in split.inner)
    return "operator" if n_targets >= n_alphas * max_val else "rotation"


def get_solver(name: str) -> RidgeSolver:
    """The chunk solver registered as ``name`` in :data:`RIDGE_SOLVERS`.

    Raises
    ------
    ValueError
        ``name`` is not a registered solver (the message lists them).
    """
    if name not in RIDGE_SOLVERS:
        raise ValueError(f"'solver' must be one of {', '.join(RIDGE_SOLVERS)}; got {name!r}.")
    return RIDGE_SOLVERS[name]


#: Chunk solvers by name (see :mod:`pipelines.fit`): same signature, same result.
RIDGE_SOLVERS: dict[str, RidgeSolver] = {
    "primal": solve_primal,
    "kernel": solve_kernel,
    "himalaya": solve_himalaya,
}

#: Solver names accepted by :func:`pipelines.fit.fit_encoding`.
SOLVERS: tuple[str, ...] = ("auto", *RIDGE_SOLVERS)
