"""Banded ridge for one chunk of targets: himalaya's random search, one eigendecomposition
per band-weight draw and training set, shared by every alpha and every target.

:func:`fit_banded_chunk` searches the same candidates as himalaya's ``BandedRidgeCV``
(``n_iter`` Dirichlet draws of the band weights ``gamma``, the first uniform, the same
seed; every alpha; the inner splits; the mean squared error of each split averaged over
splits; the same tie rules). For each draw it decomposes the scaled centred Gram
``S C S`` (``S = diag(sqrt(gamma))`` per feature) once, and every alpha and target is a
matrix product: either of each inner split's own Gram (the direct strategy), or of the
outer training set's alone, the inner fits then following by deletion of their left-out
rows (:func:`_inner_losses`); :func:`choose_strategy` takes the cheaper. himalaya instead
takes an SVD of the scaled design and builds one ``(n_features, n_train)`` matrix per alpha,
for every draw and inner split. :func:`fit_banded_chunk_himalaya` (himalaya itself) is the
reference the tests compare to.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from himalaya.backend import get_backend
from himalaya.kernel_ridge import MultipleKernelRidgeCV, generate_dirichlet_samples
from himalaya.ridge import BandedRidgeCV
from himalaya.scoring import r2_score_split
from scipy.linalg import cho_factor, cho_solve
from scipy.linalg.blas import dsyrk

from ..backend import blas_threads, use_backend
from .scores import combine_folds, fold_scores
from .splits import OuterSplit

__all__ = ["EIGH_COST", "band_weight_draws", "banded_bytes_per_target", "choose_strategy", "fit_banded_chunk",
           "fit_banded_chunk_himalaya"]


def band_weight_draws(n_bands: int, n_iter: int, random_state: int) -> np.ndarray:
    """himalaya's candidates of band weights: (n_iter, n_bands) float32, rows on the simplex.

    Dirichlet draws cycling through concentrations 0.1 and 1, the first row uniform
    (as ``solve_group_ridge_random_search`` draws them).
    """
    gammas = generate_dirichlet_samples(n_samples=n_iter, n_kernels=n_bands, concentration=[0.1, 1.0],
                                        random_state=random_state)
    gammas[0] = 1.0 / n_bands
    return np.asarray(gammas, dtype=np.float32)


class _Decomposition(NamedTuple):
    """One draw's eigendecomposition of an outer training set.

    The centred hat matrix of the training rows is ``P diag(1 / (lam + alpha)) P^T`` (plus
    ``1 / n`` for the intercept) and their centred fitted values ``P diag(1 / (lam + alpha)) Z``.
    """

    lam: np.ndarray  # (m,) float64, clipped at 0
    P: np.ndarray | None  # (n_train, m) float32
    Z: np.ndarray  # (m, n_targets) float32: P^T Y_c
    Q: np.ndarray  # (m, m) primal: V (eigenvectors); (n_train, m) kernel: U
    W: np.ndarray  # (m, n_targets) float32: primal Z; kernel U^T Y_c


class _Training:
    """An outer training set, centred by its own means: what every draw of it shares.

    Primal (``m = n_features``): the float64 Gram ``C`` of the centred features; a draw
    decomposes ``S C S`` (``S = diag(sqrt(gamma))`` per feature) as ``V diag(lam) V^T`` and
    ``P = X_c S V``. Kernel (``m = n_train``, for fewer samples than features): the centred
    linear kernel of each band; a draw decomposes ``sum_b gamma_b K_b = U diag(lam) U^T``
    and ``P = U diag(sqrt(lam))``.
    """

    def __init__(self, Xs: list[np.ndarray], Y: np.ndarray, rows: np.ndarray, kernel: bool):
        self.kernel, self.n = kernel, rows.size
        self.mus = [X[rows].mean(0, dtype=np.float64).astype(np.float32) for X in Xs]
        self.Xc = [X[rows] - mu for X, mu in zip(Xs, self.mus)]
        nu = Y[rows].mean(0, dtype=np.float64)
        self.nu = nu.astype(np.float32)
        self.Yc = (Y[rows] - nu).astype(np.float32)
        self.band_of = np.repeat(np.arange(len(Xs)), [X.shape[1] for X in Xs])
        if kernel:
            self.grams = [A.astype(np.float64) @ A.T.astype(np.float64) for A in self.Xc]
        else:
            self.X = np.concatenate(self.Xc, 1)
            X64 = self.X.astype(np.float64)
            self.C = X64.T @ X64
            self.H = self.X.T @ self.Yc

    def decompose(self, gamma: np.ndarray, hat: bool = True) -> _Decomposition:
        """The decomposition for band weights ``gamma`` (n_bands,); ``P`` None unless ``hat``
        (primal form: the refit does not need it)."""
        g = gamma.astype(np.float64)
        if self.kernel:
            lam, U = np.linalg.eigh(sum(w * K for w, K in zip(g, self.grams)))
            lam = np.maximum(lam, 0.0)
            U32 = U.astype(np.float32)
            W = U32.T @ self.Yc
            root = np.sqrt(lam).astype(np.float32)
            return _Decomposition(lam, U32 * root[None, :], W * root[:, None], U32, W)
        s = np.sqrt(g)[self.band_of]
        lam, V = np.linalg.eigh(self.C * s[:, None] * s[None, :])
        V = V.astype(np.float32)
        s32 = s.astype(np.float32)
        Z = V.T @ (self.H * s32[:, None])
        P = (self.X * s32[None, :]) @ V if hat else None
        return _Decomposition(np.maximum(lam, 0.0), P, Z, V, Z)

    def parts(self, dec: _Decomposition, gamma: np.ndarray, Xte: list[np.ndarray], shrink: np.ndarray,
              cols: np.ndarray) -> np.ndarray:
        """Held-out predictions of targets ``cols`` per band, (n_bands, n_test, n_cols), centred
        by the training means; ``shrink`` (m, n_cols) is ``1 / (lam + alpha)`` of each target's alpha."""
        w = dec.W[:, cols] * shrink
        if self.kernel:
            dual = dec.Q @ w
            return np.stack([np.float32(g) * ((X - mu) @ (A.T @ dual))
                             for g, X, mu, A in zip(gamma, Xte, self.mus, self.Xc)])
        s = np.sqrt(gamma.astype(np.float64))[self.band_of].astype(np.float32)
        coef = (dec.Q @ w) * s[:, None]  # weights of the unscaled features
        return np.stack([(X - mu) @ coef[self.band_of == b] for b, (X, mu) in enumerate(zip(Xte, self.mus))])


def _split_r2(y_test: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """himalaya's R² split (product measure) of fold-centred predictions, per band: (n_bands, n_targets)."""
    yc = y_test.astype(np.float64) - y_test.mean(0, dtype=np.float64)
    pc = parts.astype(np.float64) - parts.mean(1, keepdims=True, dtype=np.float64)
    bk = get_backend()  # whichever is set: switching the process-global backend could upset other threads
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(bk.to_numpy(r2_score_split(bk.asarray(yc), bk.asarray(pc), include_correlation=True)),
                          dtype=np.float64)


def _deleted_blocks(split: OuterSplit) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per inner split, the rows its training set leaves out (validation and gap, positions in
    the outer training set) and the validation rows' positions among them."""
    blocks = []
    for tr, va in split.inner:
        left_out = np.setdiff1d(np.arange(split.train.size), tr, assume_unique=True)
        blocks.append((left_out, np.searchsorted(left_out, va)))
    return blocks


def _identity_minus_hat(L: np.ndarray, offset: float) -> np.ndarray:
    """``I - offset - L L^T`` (float64; upper triangle only, by BLAS ``dsyrk``)."""
    A = dsyrk(-1.0, L, beta=1.0, c=np.full((L.shape[0], L.shape[0]), -offset), lower=0, trans=0)
    A[np.diag_indices_from(A)] += 1.0
    return A


def _inverse_spd(A: np.ndarray) -> np.ndarray:
    """The inverse of ``A``, symmetric positive definite as its upper triangle holds it (Cholesky),
    by least squares on the symmetrised matrix where rounding made it indefinite."""
    eye = np.eye(A.shape[0])
    try:
        return cho_solve(cho_factor(A, lower=False, check_finite=False), eye, check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(np.triu(A) + np.triu(A, 1).T, eye, rcond=None)[0]


def _inner_losses(train: _Training, dec: _Decomposition, blocks: list[tuple[np.ndarray, np.ndarray]],
                  alphas: np.ndarray) -> np.ndarray:
    """Mean squared error of every alpha and target on every inner validation set, averaged
    over splits: (n_alphas, n_targets) float64.

    Each inner split's fit (intercept included) is the outer training fit with its left-out
    rows ``E`` deleted, so its residuals on ``E`` are ``(I - H_EE)^-1 (y_E - yhat_E)`` with
    ``H`` the outer fit's hat matrix: no decomposition per inner split.
    """
    losses = np.zeros((alphas.size, train.Yc.shape[1]), dtype=np.float64)
    shrink = 1.0 / (dec.lam[None, :] + alphas.astype(np.float64)[:, None])
    for E, val in blocks:
        PE, YE = dec.P[E], train.Yc[E]
        PE64 = PE.astype(np.float64)
        for a in range(alphas.size):
            resid = YE - (PE * shrink[a].astype(np.float32)[None, :]) @ dec.Z
            # I - H_EE = I - 1/n - (PE sqrt(d)) (PE sqrt(d))^T, inverted in float64, applied in float32
            M = _inverse_spd(_identity_minus_hat(PE64 * np.sqrt(shrink[a])[None, :], 1.0 / train.n))
            R = M[val].astype(np.float32) @ resid
            # himalaya's l2_neg_loss: float32 mean squared error per split, float64 mean over splits
            losses[a] += np.einsum("ij,ij->j", R, R) / np.float32(val.size)
    return losses / len(blocks)


class _InnerSplit:
    """One inner split of an outer training set, centred by its own training rows' means, for the
    direct strategy: a decomposition of its own scaled Gram per draw (positions ``tr``, ``va`` within
    the outer training set, whose centred ``X`` and ``Y_c`` ``train`` holds)."""

    def __init__(self, train: _Training, tr: np.ndarray, va: np.ndarray):
        X, Yc = train.X[tr], train.Yc[tr]
        mu = X.mean(0, dtype=np.float64)
        nu = Yc.mean(0, dtype=np.float64)
        X64 = X.astype(np.float64)
        self.C = X64.T @ X64 - tr.size * np.outer(mu, mu)
        self.H = (X.T @ Yc - (tr.size * np.outer(mu, nu))).astype(np.float32)
        self.Xv = train.X[va] - mu.astype(np.float32)
        self.Yv = train.Yc[va] - nu.astype(np.float32)

    def losses(self, s: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Mean squared error of every alpha and target on the validation rows: (n_alphas, n_targets)."""
        lam, V = np.linalg.eigh(self.C * s[:, None] * s[None, :])
        V = V.astype(np.float32)
        s32 = s.astype(np.float32)
        shrink = (1.0 / (np.maximum(lam, 0.0)[None, :] + alphas.astype(np.float64)[:, None])).astype(np.float32)
        B = (self.Xv * s32[None, :]) @ V
        Z = V.T @ (self.H * s32[:, None])
        out = np.empty((alphas.size, self.Yv.shape[1]), dtype=np.float64)
        for a in range(alphas.size):
            R = self.Yv - (B * shrink[a][None, :]) @ Z
            out[a] = np.einsum("ij,ij->j", R, R) / np.float32(self.Yv.shape[0])
        return out


#: Cost of a symmetric eigendecomposition of order m, in float32 multiply-adds per m³
#: (measured against a matrix product on this project's machine: numpy's eigh in float64).
EIGH_COST = 23.0


def choose_strategy(n_features: int, split: OuterSplit, n_alphas: int, n_targets: int) -> str:
    """``"delete"`` (one decomposition per draw, inner fits by deletion) or ``"direct"`` (one
    per draw and inner split), whichever costs fewer float32 multiply-adds for this outer fold.

    Per draw, the direct strategy pays an eigendecomposition, a rotation of ``X^T Y`` and one
    ``(n_val, m)`` product per alpha for each inner split; deletion one eigendecomposition,
    ``X S V``, then per inner split and alpha the inverse of ``I - H_EE`` (float64) and two
    products of ``(n_E, m)`` and ``(n_E, n_E)`` with the targets.
    """
    m, n_train = n_features, split.train.size
    direct = delete = EIGH_COST * m ** 3 + n_train * m ** 2 + m ** 2 * n_targets
    direct -= n_train * m ** 2  # the direct strategy decomposes the outer set only to refit
    for tr, va in split.inner:
        n_e = n_train - tr.size
        direct += EIGH_COST * m ** 3 + m ** 2 * (va.size + n_targets) + n_alphas * va.size * m * n_targets
        # float64 counted twice; 1.3: conversions and indexing of the deleted rows (measured)
        delete += 1.3 * n_alphas * (2 * n_e ** 2 * m + 5 * n_e ** 3 + n_e * (m + va.size) * n_targets)
    return "direct" if direct < delete else "delete"


def banded_bytes_per_target(n_samples: int, n_features: int, n_bands: int, splits: list[OuterSplit],
                            return_predictions: bool) -> int:
    """Bytes a chunk of :func:`fit_banded_chunk` holds per target (float32 values, times 4).

    The chunk of ``Y`` and its predictions, the centred training rows, ``X^T Y`` and its
    rotation (the kernel form: the training rows twice), the held-out prediction per band, the
    residuals of one deleted block, and for the direct strategy each inner split's ``X^T Y``
    and validation rows.
    """
    max_train = max(split.train.size for split in splits)
    max_test = max(split.test.size for split in splits)
    max_left = max(split.train.size - tr.size for split in splits for tr, _ in split.inner)
    n_inner = max(len(split.inner) for split in splits)
    values = n_samples * (2 if return_predictions else 1) + max_train + (n_bands + 1) * max_test + 3 * max_left
    if n_features > max_train:  # the kernel form
        values += 2 * max_train
    else:
        values += 2 * n_features + n_inner * (n_features + max_left)
    return 4 * values


def fit_banded_chunk(Xs: list[np.ndarray], Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                     backend_name: str, return_predictions: bool, n_iter: int, random_state: int,
                     n_threads: int | None = None, kernel: bool | None = None, strategy: str | None = None,
                     ) -> dict[str, np.ndarray | None]:
    """Banded ridge per outer fold for one chunk of targets: himalaya's search, shared
    eigendecompositions. Pure.

    Each outer training set is centred by its own means. For each of the ``n_iter`` band
    weight draws (:func:`band_weight_draws`) either its scaled Gram (or, with fewer samples
    than features, its weighted kernel) is decomposed once and every alpha and target is
    scored on every inner split from it (the inner fits, intercept included, by deletion of
    the split's left-out rows: see :func:`_inner_losses`), or, where :func:`choose_strategy`
    finds it cheaper, each inner split's own Gram is; the score is the mean squared error on
    the validation run averaged over splits. Each target keeps the first draw whose best alpha
    beats the earlier draws' by float32's epsilon (himalaya's rule) and is refitted on the
    whole training set with it; the held-out prediction is split per band (himalaya's
    ``r2_score_split``). Computed in numpy whatever ``backend_name``. Arguments and result
    as in :func:`fit_banded_chunk_himalaya`; ``kernel`` forces the kernel (True) or primal
    (False) form, None takes the kernel one where a training set has fewer samples than features;
    ``strategy`` forces ``"direct"`` or ``"delete"`` in the primal form (None: :func:`choose_strategy`).
    """
    Xs = [np.asarray(X, dtype=np.float32) for X in Xs]
    Y = np.asarray(Y, dtype=np.float32)
    n_bands, n_targets = len(Xs), Y.shape[1]
    gammas = band_weight_draws(n_bands, n_iter, random_state)
    alphas = np.asarray(alphas, dtype=np.float32)
    log_alphas = np.log(alphas.astype(np.float64))
    eps = np.finfo(np.float32).eps
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), n_targets), dtype=np.float32)
    fold_r = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_r2 = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_split = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    fold_gamma = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    with blas_threads(n_threads):
        for k, split in enumerate(splits):
            wide = sum(X.shape[1] for X in Xs) > split.train.size if kernel is None else kernel
            train = _Training(Xs, Y, split.train, kernel=wide)
            blocks = _deleted_blocks(split)
            Xte = [X[split.test] for X in Xs]
            parts = np.zeros((n_bands, split.test.size, n_targets), dtype=np.float32)
            current = np.full(n_targets, -np.inf, dtype=np.float32)
            chosen = np.zeros(n_targets, dtype=np.int64)
            alpha_idx = np.zeros(n_targets, dtype=np.int64)
            plan = strategy or ("delete" if wide else choose_strategy(train.X.shape[1], split, alphas.size, n_targets))
            direct = plan == "direct" and not wide
            inner = [_InnerSplit(train, tr, va) for tr, va in split.inner] if direct else []
            for i, gamma in enumerate(gammas):
                if direct:
                    s = np.sqrt(gamma.astype(np.float64))[train.band_of]
                    losses = sum(part.losses(s, alphas) for part in inner) / len(inner)
                else:
                    dec = train.decompose(gamma)
                    losses = _inner_losses(train, dec, blocks, alphas)
                scores = -losses + 1e-10 * log_alphas[:, None]  # ties: the larger alpha
                best = scores.argmax(0)
                score = scores[best, np.arange(n_targets)].astype(np.float32)
                better = score > current + eps  # a later draw must beat the current one by float32's epsilon
                if not better.any():
                    continue
                cols = np.flatnonzero(better)
                if direct:
                    dec = train.decompose(gamma, hat=False)
                current[cols], chosen[cols], alpha_idx[cols] = score[cols], i, best[cols]
                shrink = (1.0 / (dec.lam[:, None] + alphas.astype(np.float64)[best[cols]][None, :])).astype(np.float32)
                parts[:, :, cols] = train.parts(dec, gamma, Xte, shrink, cols)
            gamma = gammas[chosen].T.astype(np.float64)
            fold_gamma[k] = gamma / gamma.sum(0)
            fold_alphas[k] = alphas[alpha_idx]
            pred = parts.sum(0) + train.nu
            y_te = Y[split.test]
            fold_r[k], fold_r2[k] = fold_scores(y_te, pred)
            fold_split[k] = _split_r2(y_te, parts)
            if predictions is not None:
                predictions[split.test] = pred
    return _banded_result(splits, fold_r, fold_r2, fold_alphas, predictions, fold_split, fold_gamma)


def _banded_result(splits: list[OuterSplit], fold_r: np.ndarray, fold_r2: np.ndarray, fold_alphas: np.ndarray,
                   predictions: np.ndarray | None, fold_split: np.ndarray, fold_gamma: np.ndarray,
                   ) -> dict[str, np.ndarray | None]:
    """The chunk's result: the folds' scores combined, split and band weights averaged by test size."""
    out = combine_folds(splits, fold_r, fold_r2, fold_alphas, predictions)
    weights = np.array([len(split.test) for split in splits], dtype=np.float64)
    weights /= weights.sum()
    out["r2_split"] = np.tensordot(weights, fold_split, axes=1).astype(np.float32)
    out["band_weights"] = np.tensordot(weights, fold_gamma, axes=1).astype(np.float32)
    return out


def fit_banded_chunk_himalaya(Xs: list[np.ndarray], Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                              backend_name: str, return_predictions: bool, n_iter: int, random_state: int,
                              n_threads: int | None = None) -> dict[str, np.ndarray | None]:
    """Banded ridge (himalaya) per outer fold for one chunk of targets. Pure.

    Each outer training set is centred (features and targets, by its own means); the
    bands' relative weights and the alpha are searched by himalaya (random search over
    the simplex, ``n_iter`` draws, fixed seed) with the inner splits: ``BandedRidgeCV``
    (primal, intercept refit in every inner fold) when the training set has at least as
    many samples as features, else ``MultipleKernelRidgeCV`` on precomputed linear
    kernels of the centred bands. The held-out prediction is split per band.

    Returns
    -------
    part : dict
        ``r``, ``r2`` (n_chunk,), ``fold_alphas`` (n_folds, n_chunk), ``predictions`` or
        None, ``r2_split`` and ``band_weights`` (n_bands, n_chunk).
    """
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
            fold_r[k], fold_r2[k] = fold_scores(y_te, pred)
            fold_split[k] = _split_r2(y_te, parts)
            if predictions is not None:
                predictions[te] = pred
    return _banded_result(splits, fold_r, fold_r2, fold_alphas, predictions, fold_split, fold_gamma)
