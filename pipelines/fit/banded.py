"""Banded ridge for one chunk of targets: himalaya's random search, one eigendecomposition
per band-weight draw and training set, shared by every alpha and every target.

:func:`fit_banded_chunk` searches the same candidates as himalaya's ``BandedRidgeCV``
(``n_iter`` Dirichlet draws of the band weights ``gamma``, the first uniform, the same
seed; every alpha; the inner splits; the mean squared error of each split averaged over
splits; the same tie rules) but, for each training set, centres its Gram ``C`` once and
for each draw decomposes ``S C S`` (``S = diag(sqrt(gamma))`` per feature): every alpha
and every target is then a matrix product. himalaya instead takes an SVD of the scaled
design and builds one ``(n_features, n_train)`` matrix per alpha, for every draw and split.
:func:`fit_banded_chunk_himalaya` (himalaya itself) is the reference the tests compare to.
"""
from __future__ import annotations

import numpy as np
from himalaya.backend import get_backend
from himalaya.kernel_ridge import MultipleKernelRidgeCV, generate_dirichlet_samples
from himalaya.ridge import BandedRidgeCV
from himalaya.scoring import r2_score_split

from ..backend import blas_threads, use_backend
from .scores import combine_folds, fold_scores
from .splits import OuterSplit

__all__ = ["band_weight_draws", "fit_banded_chunk", "fit_banded_chunk_himalaya"]


def band_weight_draws(n_bands: int, n_iter: int, random_state: int) -> np.ndarray:
    """himalaya's candidates of band weights: (n_iter, n_bands) float32, rows on the simplex.

    Dirichlet draws cycling through concentrations 0.1 and 1, the first row uniform
    (as ``solve_group_ridge_random_search`` draws them).
    """
    gammas = generate_dirichlet_samples(n_samples=n_iter, n_kernels=n_bands, concentration=[0.1, 1.0],
                                        random_state=random_state)
    gammas[0] = 1.0 / n_bands
    return np.asarray(gammas, dtype=np.float32)


def _centred(X: np.ndarray, Y: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray]:
    """Centred float64 Gram, centred ``X^T Y`` (float32) and the means of ``rows``."""
    Xr, Yr = X[rows], Y[rows]
    mu = Xr.mean(0, dtype=np.float64)
    nu = Yr.mean(0, dtype=np.float64)
    n = rows.size
    Xr64 = Xr.astype(np.float64)
    C = Xr64.T @ Xr64 - n * np.outer(mu, mu)
    H = (Xr.T @ Yr).astype(np.float64) - n * np.outer(mu, nu)
    return C, H.astype(np.float32), mu, nu


def _eig(C: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (clipped at 0, float64) and float32 eigenvectors of ``diag(s) C diag(s)``."""
    lam, V = np.linalg.eigh(C * s[:, None] * s[None, :])
    return np.maximum(lam, 0.0), V.astype(np.float32)


def _split_r2(y_test: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """himalaya's R² split (product measure) of fold-centred predictions, per band."""
    yc = y_test.astype(np.float64) - y_test.mean(0, dtype=np.float64)
    pc = parts.astype(np.float64) - parts.mean(1, keepdims=True, dtype=np.float64)
    bk = get_backend()  # whichever is set: switching the process-global backend could upset other threads
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(bk.to_numpy(r2_score_split(bk.asarray(yc), bk.asarray(pc), include_correlation=True)),
                          dtype=np.float64)


def _search(X: np.ndarray, Y: np.ndarray, split: OuterSplit, scales: np.ndarray, alphas: np.ndarray,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Best draw and alpha per target over the inner splits: two (n_targets,) int arrays."""
    n_draws, n_alphas, n_targets = scales.shape[0], alphas.size, Y.shape[1]
    alphas64 = alphas.astype(np.float64)
    scores = np.zeros((n_draws, n_alphas, n_targets), dtype=np.float64)
    for tr, va in split.inner:
        train, val = split.train[tr], split.train[va]
        C, H, mu, nu = _centred(X, Y, train)
        Xv = X[val] - mu.astype(np.float32)
        Yv = Y[val] - nu.astype(np.float32)
        rotate = n_targets < n_alphas * val.size  # rotating H costs less than one operator per alpha
        for i, s in enumerate(scales):
            lam, V = _eig(C, s)
            d = (1.0 / (lam[None, :] + alphas64[:, None])).astype(np.float32)
            s32 = s.astype(np.float32)
            B = (Xv * s32[None, :]) @ V
            if rotate:
                Z = V.T @ (H * s32[:, None])
            for a in range(n_alphas):
                if rotate:
                    R = Yv - (B * d[a][None, :]) @ Z
                else:
                    R = Yv - (((B * d[a][None, :]) @ V.T) * s32[None, :]) @ H
                # himalaya's l2_neg_loss: float32 mean squared error per split, float64 mean over splits
                scores[i, a] -= np.einsum("ij,ij->j", R, R) / np.float32(val.size)
    scores /= len(split.inner)
    scores += 1e-10 * np.log(alphas64)[None, :, None]  # ties -> the larger alpha
    best_alpha = scores.argmax(1)  # (n_draws, n_targets)
    best = np.take_along_axis(scores, best_alpha[:, None, :], 1)[:, 0, :]
    # a later draw replaces the current one only when it beats it by float32's epsilon
    eps = np.finfo(np.float32).eps
    chosen = np.zeros(n_targets, dtype=np.int64)
    current = np.full(n_targets, -np.inf)
    for i in range(n_draws):
        score = best[i].astype(np.float32)  # himalaya keeps the scores per draw in float32
        better = score > current + eps
        current[better] = score[better]
        chosen[better] = i
    return chosen, best_alpha[chosen, np.arange(n_targets)]


def fit_banded_chunk(Xs: list[np.ndarray], Y: np.ndarray, splits: list[OuterSplit], alphas: np.ndarray,
                     backend_name: str, return_predictions: bool, n_iter: int, random_state: int,
                     n_threads: int | None = None) -> dict[str, np.ndarray | None]:
    """Banded ridge per outer fold for one chunk of targets: himalaya's search, shared decompositions. Pure.

    Each outer training set is centred by its own means; for each of the ``n_iter`` band
    weight draws (:func:`band_weight_draws`), each inner split's training Gram is
    scaled and decomposed once and every alpha scores every target (mean squared error
    on the validation run, averaged over splits). Each target keeps the first draw whose
    best alpha beats the earlier ones by float32's epsilon (himalaya's rule), is refitted
    on the whole training set with it and predicts the held-out group; the prediction
    is split per band (himalaya's ``r2_score_split``). When the training sets have fewer
    samples than features, himalaya's kernel search (:func:`fit_banded_chunk_himalaya`)
    runs instead. Arguments and result as in :func:`fit_banded_chunk_himalaya`.
    """
    Xs = [np.asarray(X, dtype=np.float32) for X in Xs]
    n_bands, n_targets = len(Xs), Y.shape[1]
    widths = [X.shape[1] for X in Xs]
    if sum(widths) > min(split.train.size for split in splits):
        return fit_banded_chunk_himalaya(Xs, Y, splits, alphas, backend_name, return_predictions, n_iter,
                                         random_state, n_threads)
    X = np.concatenate(Xs, 1)
    band_of = np.repeat(np.arange(n_bands), widths)
    gammas = band_weight_draws(n_bands, n_iter, random_state)
    scales = np.sqrt(gammas.astype(np.float64))[:, band_of]  # (n_iter, n_features)
    alphas = np.asarray(alphas, dtype=np.float32)
    alphas64 = alphas.astype(np.float64)
    predictions = np.full(Y.shape, np.nan, dtype=np.float32) if return_predictions else None
    fold_alphas = np.empty((len(splits), n_targets), dtype=np.float32)
    fold_r = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_r2 = np.empty((len(splits), n_targets), dtype=np.float64)
    fold_split = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    fold_gamma = np.empty((len(splits), n_bands, n_targets), dtype=np.float64)
    with blas_threads(n_threads):
        Y = np.asarray(Y, dtype=np.float32)
        for k, split in enumerate(splits):
            chosen, alpha_idx = _search(X, Y, split, scales, alphas)
            # refit on the whole outer training set, once per draw some target chose
            C, H, mu, nu = _centred(X, Y, split.train)
            Xte = X[split.test] - mu.astype(np.float32)
            parts = np.empty((n_bands, split.test.size, n_targets), dtype=np.float32)
            for i in np.unique(chosen):
                cols = np.flatnonzero(chosen == i)
                lam, V = _eig(C, scales[i])
                s32 = scales[i].astype(np.float32)
                d = (1.0 / (lam[None, :] + alphas64[:, None])).astype(np.float32)
                Z = V.T @ (H[:, cols] * s32[:, None])
                coef = (V @ (Z * d[alpha_idx[cols]].T)) * s32[:, None]  # weights of the unscaled features
                for b in range(n_bands):
                    parts[b][:, cols] = Xte[:, band_of == b] @ coef[band_of == b]
            gamma = gammas[chosen].T.astype(np.float64)
            fold_gamma[k] = gamma / gamma.sum(0)
            fold_alphas[k] = alphas[alpha_idx]
            pred = (parts.sum(0) + nu.astype(np.float32)).astype(np.float32)
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
