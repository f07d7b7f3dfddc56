"""Decoding: ridge from brain responses to a feature space, scored by identification.

The decoder is the encoding model turned around: the responses (voxels, channels,
optionally stacked at several delays, see :func:`decoding_design`) are the regressors
and each feature of a feature space is a target, fit by :func:`pipelines.fit.fit_encoding`
with the same leak-free nested cross-validation (or held-out test set). Held-out
predictions of the features are scored

* per feature: Pearson r and R² within each held-out fold (as encoding scores);
* by identification (:func:`identification`): the held-out time series is cut into
  segments; the predicted features of each segment are correlated with the true features
  of every held-out segment, and the rank of the true one gives top-1 / top-5 accuracy
  (chance ``k / n_segments``) and a retrieval ROC-AUC (the probability that the true
  segment beats a random other one; chance 0.5). With one segment per word (MEG / ECoG
  epochs at word onsets) this is word-level decoding;
* for binary features (a word class, a phoneme present...): :func:`roc_auc` per feature.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, FitError
from .features.align import make_delays
from .fit import fit_encoding
from .stats import paired_held_out

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "DecodingResult",
    "IdentificationResult",
    "decoding_design",
    "fit_decoding",
    "identification",
    "roc_auc",
]


@dataclass
class IdentificationResult:
    """Identification of held-out segments from decoded features.

    Attributes
    ----------
    ranks : array of shape (n_segments,), int
        Number of held-out segments whose true features correlate better with the
        segment's predicted features than its own true features do (0: identified).
    top1, top5 : float
        Fraction of segments with rank < 1 and < 5.
    chance_top1, chance_top5 : float
        ``1 / n_segments`` and ``min(5, n_segments) / n_segments``.
    auc : float
        Mean over segments of the retrieval ROC-AUC ``1 - (rank + ties / 2) / (n - 1)``
        (chance 0.5).
    n_segments : int
    segment_length : int
        Samples per segment.
    """

    ranks: np.ndarray
    top1: float
    top5: float
    chance_top1: float
    chance_top5: float
    auc: float
    n_segments: int
    segment_length: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``decoding.json`` holds), ranks left out."""
        return {"top1": round(self.top1, 6), "top5": round(self.top5, 6),
                "chance_top1": round(self.chance_top1, 6), "chance_top5": round(self.chance_top5, 6),
                "auc": round(self.auc, 6), "n_segments": self.n_segments, "segment_length": self.segment_length}


@dataclass
class DecodingResult:
    """Held-out scores of a decoder.

    Attributes
    ----------
    r, r2, alpha, valid : arrays of shape (n_features,)
        Per decoded feature, as :class:`pipelines.fit.EncodingResult` defines them.
    identification : IdentificationResult
    predictions : array of shape (n_samples, n_features), float32, or None
        Held-out predicted features (NaN where no fold held the sample out).
    sample_fold : array of shape (n_samples,), int
    """

    r: np.ndarray
    r2: np.ndarray
    alpha: np.ndarray
    valid: np.ndarray
    identification: IdentificationResult
    predictions: np.ndarray | None
    sample_fold: np.ndarray


def decoding_design(Y: np.ndarray, run_lengths: Sequence[int], delays: Sequence[int]) -> np.ndarray:
    """Responses stacked at ``delays`` samples *after* each sample, within runs.

    The response to the stimulus at ``t`` arrives at ``t + d`` (e.g. 1-4 TRs of
    haemodynamic delay), so the decoder of the features at ``t`` reads the responses at
    ``t + d``: block ``k`` holds ``Y[t + delays[k]]`` (zero past the end of a run).
    """
    return make_delays(np.asarray(Y, dtype=np.float32), run_lengths, [-int(d) for d in delays])


def _segments(sample_fold: np.ndarray, usable: np.ndarray, length: int) -> list[np.ndarray]:
    """Consecutive windows of ``length`` usable held-out samples, never across folds."""
    segments = []
    for fold in np.unique(sample_fold[sample_fold >= 0]):
        rows = np.flatnonzero((sample_fold == fold) & usable)
        for start in range(0, rows.size - length + 1, length):
            segments.append(rows[start:start + length])
    return segments


def identification(F_true: np.ndarray, F_pred: np.ndarray, sample_fold: np.ndarray, *,
                   segment_length: int = 1) -> IdentificationResult:
    """Rank of each held-out segment's true features among all held-out segments.

    Parameters
    ----------
    F_true : array of shape (n_samples, n_features)
        True features.
    F_pred : array of shape (n_samples, n_features)
        Held-out predictions (NaN rows are skipped).
    sample_fold : array of shape (n_samples,), int
        Outer fold that held out each sample, -1 for none.
    segment_length : int
        Samples per segment (1: every held-out sample, e.g. every word epoch).

    Returns
    -------
    result : IdentificationResult

    Notes
    -----
    Features constant or non-finite over the held-out samples are left out; the others
    are z-scored over the held-out samples (true and predicted separately), so every
    feature weighs alike. A segment's vector is its samples' features concatenated, and
    similarity is Pearson correlation between vectors.
    """
    if isinstance(segment_length, bool) or not isinstance(segment_length, (int, np.integer)) or segment_length < 1:
        raise ConfigError(f"'segment_length' must be an integer >= 1; got {segment_length!r}.")
    T, P, sample_fold = paired_held_out(F_true, F_pred, sample_fold, np.float64, ("F_true", "F_pred"))
    held = sample_fold >= 0
    usable = held & np.isfinite(P).all(1) & np.isfinite(T).all(1)
    with np.errstate(invalid="ignore"):
        cols = (np.ptp(T[usable], axis=0) > 0) & (np.ptp(P[usable], axis=0) > 0) if usable.any() else []
    segments = _segments(sample_fold, usable, int(segment_length))
    if len(segments) < 2 or not np.any(cols):
        raise FitError(f"Identification needs at least 2 held-out segments of {segment_length} sample(s) and one "
                       f"varying feature; got {len(segments)} segment(s).")
    T, P = T[:, cols], P[:, cols]

    def vectors(A: np.ndarray) -> np.ndarray:
        A = (A - A[usable].mean(0)) / A[usable].std(0)
        V = np.stack([A[rows].ravel() for rows in segments])
        V = V - V.mean(1, keepdims=True)
        norm = np.linalg.norm(V, axis=1, keepdims=True)
        return V / np.where(norm > 0, norm, 1.0)

    sim = vectors(P) @ vectors(T).T  # sim[i, j]: predicted segment i vs true segment j
    own = np.diag(sim)[:, None]
    n = sim.shape[0]
    better = (sim > own).sum(1)
    ties = (sim == own).sum(1) - 1
    auc = float(np.mean(1.0 - (better + 0.5 * ties) / (n - 1)))
    return IdentificationResult(ranks=better.astype(np.int64), top1=float(np.mean(better < 1)),
                                top5=float(np.mean(better < 5)), chance_top1=1.0 / n, chance_top5=min(5, n) / n,
                                auc=auc, n_segments=n, segment_length=int(segment_length))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column of ``scores`` for the binary column of ``labels``.

    Parameters
    ----------
    labels : array of shape (n_samples, n_outputs) or (n_samples,), bool or 0/1
    scores : array of the same shape
        Decoded values (higher: more likely positive). NaN rows are skipped per column.

    Returns
    -------
    auc : array of shape (n_outputs,)
        Mann-Whitney estimate (ties count half); NaN for a column with only one class.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim == 1:
        y, s = y[:, None], s.reshape(-1, 1)
    if y.shape != s.shape:
        raise FitError(f"labels and scores must have the same shape; got {y.shape} and {s.shape}.")
    from scipy.stats import rankdata

    auc = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        ok = np.isfinite(s[:, j])
        pos = y[ok, j].astype(bool)
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = rankdata(s[ok, j])
            auc[j] = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return auc


def fit_decoding(
    X: np.ndarray,
    F: np.ndarray,
    groups: np.ndarray,
    alphas: Any,
    *,
    segment_length: int = 1,
    backend: str = "auto",
    gap: int = 0,
    n_targets_chunk: int | None = None,
    client: Client | None = None,
    test_groups: Sequence[Any] | None = None,
    solver: str = "auto",
    return_predictions: bool = True,
) -> DecodingResult:
    """Decode a feature space from brain responses, with nested CV, and score it.

    Parameters
    ----------
    X : array of shape (n_samples, n_responses)
        Brain responses (voxels / channels; see :func:`decoding_design` for delays).
    F : array of shape (n_samples, n_features)
        The feature space to decode (one target per feature).
    groups, alphas, backend, gap, n_targets_chunk, client, test_groups, solver
        As in :func:`pipelines.fit.fit_encoding` (with more responses than training
        samples, ``solver="auto"`` picks the kernel solver).
    segment_length : int
        Samples per identification segment (see :func:`identification`).
    return_predictions : bool
        Keep the held-out predicted features in the result.

    Returns
    -------
    result : DecodingResult
    """
    enc = fit_encoding(X, F, groups, alphas, backend=backend, gap=gap, n_targets_chunk=n_targets_chunk,
                       client=client, return_predictions=True, test_groups=test_groups, solver=solver)
    F = np.asarray(F, dtype=np.float32)
    if F.ndim == 1:
        F = F[:, None]
    pred = np.where(enc.valid[None, :], enc.predictions, 0.0)  # invalid features: no prediction, skipped
    ident = identification(np.where(enc.valid[None, :], F, 0.0), pred, enc.sample_fold,
                           segment_length=segment_length)
    return DecodingResult(r=enc.r, r2=enc.r2, alpha=enc.alpha, valid=enc.valid, identification=ident,
                          predictions=enc.predictions if return_predictions else None,
                          sample_fold=enc.sample_fold)
