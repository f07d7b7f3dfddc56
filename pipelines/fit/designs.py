"""The eigendecompositions behind the ``"primal"`` and ``"kernel"`` ridge solvers.

A design holds ``X`` on the backend and answers, for any training set, the
eigendecomposition of its centred Gram (primal, ``m = n_features``) or kernel (kernel,
``m = n_train``), which serves every alpha, and the products that turn it into
predictions. The primal decompositions depend on ``X`` alone, so
:func:`decompose_folds` can compute them once for every chunk of targets.
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..backend import blas_threads, eigh_float64, float32_like, float64_of, gemm, take_rows, use_backend
from .splits import OuterSplit

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = ["SHARED_DECOMPOSITIONS_MAX", "KernelDesign", "PrimalDesign", "decompose_folds", "shrinkage"]

SHARED_DECOMPOSITIONS_MAX = 1 << 30  # bytes of primal decompositions shipped to every chunk


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


class PrimalDesign:
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
        chunk by :func:`decompose_folds`, with these same operations), else computed here.
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


class KernelDesign:
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



def _rows_key(rows: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def _fold_row_sets(split: OuterSplit) -> list[np.ndarray]:
    """Every training set whose decomposition a split needs: its inner folds' and its own."""
    return [split.train[tr] for tr, _ in split.inner] + [split.train]


def _outer_gram(X: np.ndarray, rows: np.ndarray, backend_name: str, n_threads: int | None = None) -> np.ndarray:
    """The float64 Gram ``[X, 1]^T [X, 1]`` of an outer training set, as numpy (a dask task)."""
    with blas_threads(n_threads), use_backend(backend_name) as bk:
        return bk.to_numpy(PrimalDesign(bk, np.asarray(X, dtype=np.float32))._gram(rows))


def _decompose_rows(X: np.ndarray, outer_rows: np.ndarray, rows: np.ndarray, G: np.ndarray, backend_name: str,
                    n_threads: int | None = None) -> tuple:
    """One training set's decomposition, as numpy ``(lam, V, mu, n)``, from its outer
    set's Gram ``G`` (a dask task)."""
    with blas_threads(n_threads), use_backend(backend_name) as bk:
        design = PrimalDesign(bk, np.asarray(X, dtype=np.float32))
        dec = design.decompose(outer_rows, rows, bk.asarray(G))
        return bk.to_numpy(dec.lam), bk.to_numpy(dec.Q), bk.to_numpy(dec.extra["mu"]), dec.extra["n"]


def decompose_folds(X: Any, splits: list[OuterSplit], backend_name: str, client: Client | None,
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


def shrinkage(bk: Any, lam: Any, alphas: np.ndarray, ref: Any) -> Any:
    """``1 / (lam + alpha)`` for every alpha: float32 (n_alphas, m) on the device of ``ref``."""
    a = bk.asarray_like(np.asarray(alphas, dtype=np.float64)[:, None], lam)
    return float32_like(bk, 1.0 / (lam[None, :] + a), ref)
