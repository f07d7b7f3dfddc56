"""Cross-subject encoding through a shared response model (SRM; Chen et al. 2015).

For each subject held out in turn and each outer fold of its runs, brainiak's probabilistic SRM
is fitted on the *training* samples of the other subjects (the shared responses S, k x t, and
their orthonormal maps W_i), the held-out subject's own map W_s is fitted to S on its training
samples (Procrustes, ``SRM.transform_subject``), the ridge encoding model
(:func:`pipelines.fit.fit_encoding`, alphas by leave-one-run-out over the training runs) learns
features -> S, and its prediction of the fold's samples in the shared space goes back to the
subject's own targets through W_s. No held-out sample enters the SRM, W_s or the ridge fit; the
fold's r per target are averaged over folds weighted by size, as the within-subject fit does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, DatasetError
from ..fit import fit_encoding
from ..fit.scores import fold_scores
from ..fit.splits import OuterSplit, nested_group_splits

__all__ = ["SrmFold", "SrmResult", "check_srm_inputs", "fit_shared", "srm_encoding", "srm_fold"]


@dataclass
class SrmFold:
    """One SRM fit on the training samples: the other subjects' shared responses and maps, the held-out's map."""

    shared: np.ndarray  # (n_train, k): the shared responses of the training samples
    w_others: list[np.ndarray]  # each (n_targets_i, k), orthonormal columns
    w_held: np.ndarray  # (n_targets_held, k): the held-out subject's map, fitted to ``shared``


@dataclass
class SrmResult:
    """Cross-subject scores: per design name, per subject, r (and R²) per target of that subject."""

    r: dict[str, list[np.ndarray]]
    r2: dict[str, list[np.ndarray]]
    r_shared: dict[str, list[np.ndarray]]  # per subject: r per shared dimension (prediction vs the others' S)
    n_folds: int
    predictions: dict[str, list[np.ndarray]] | None = field(default=None)  # (n_samples, n_targets_i), NaN unheld


def check_srm_inputs(Ys: Sequence[np.ndarray], features: int, subjects: Sequence[str] | None = None,
                     n_train: int | None = None) -> None:
    """One clear error for inputs the SRM cannot take.

    Parameters
    ----------
    Ys : sequence of arrays of shape (n_samples, n_targets_i)
        Each subject's responses on the same (time-aligned) samples.
    features : int
        The shared space's dimension k (``group.srm.features``).
    subjects : sequence of str, optional
        Labels, for the messages.
    n_train : int, optional
        The fewest training samples of a fold (k may not exceed it).
    """
    names = list(subjects) if subjects is not None else [str(i) for i in range(len(Ys))]
    if len(Ys) < 2:
        raise ConfigError(f"'group.srm' needs at least 2 subjects (one held out, the others to fit the shared "
                          f"space); got {len(Ys)} ({', '.join(names) or 'none'}): fit more subjects or remove "
                          "'group.srm'")
    lengths = {name: int(np.asarray(Y).shape[0]) for name, Y in zip(names, Ys)}
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"'group.srm' needs every subject's runs on the same samples; got {lengths} samples: "
                           "give subjects who heard the same stories with runs of the same length")
    fewest = min(int(np.asarray(Y).shape[1]) for Y in Ys)
    if features > fewest:
        who = min(names, key=lambda n: np.asarray(Ys[names.index(n)]).shape[1])
        raise ConfigError(f"'group.srm.features' = {features} exceeds the {fewest} targets of sub-{who}: set "
                          f"'group.srm.features' to at most {fewest}")
    if n_train is not None and features > n_train:
        raise ConfigError(f"'group.srm.features' = {features} exceeds the {n_train} training samples of a fold: "
                          f"set 'group.srm.features' to at most {n_train}")


def fit_shared(train: Sequence[np.ndarray], features: int, iterations: int, seed: int = 0) -> Any:
    """brainiak's probabilistic SRM fitted on each subject's training responses.

    Parameters
    ----------
    train : sequence of arrays of shape (n_train, n_targets_i)
    features, iterations, seed : int

    Returns
    -------
    srm : brainiak.funcalign.srm.SRM
        ``s_`` (k, n_train) and ``w_`` (list of (n_targets_i, k)).
    """
    # brainiak imports mpi4py (MPI) on import: loaded only when an SRM is asked for
    from brainiak.funcalign.srm import SRM

    model = SRM(n_iter=iterations, features=features, rand_seed=seed)
    return model.fit([np.ascontiguousarray(np.asarray(Y, dtype=np.float64).T) for Y in train])


def srm_fold(Ys: Sequence[np.ndarray], train: np.ndarray, held: int, features: int, iterations: int,
             seed: int = 0) -> SrmFold:
    """The SRM of one fold: fitted on the other subjects' ``train`` rows; the held-out subject's map on its own.

    Only the rows ``train`` of ``Ys`` are read: the held-out samples never enter the fit.
    """
    others = [np.asarray(Y)[train] for i, Y in enumerate(Ys) if i != held]
    model = fit_shared(others, features, iterations, seed)
    w_held = model.transform_subject(np.ascontiguousarray(np.asarray(Ys[held], dtype=np.float64)[train].T))
    return SrmFold(shared=np.asarray(model.s_.T, dtype=np.float64), w_others=[np.asarray(w) for w in model.w_],
                   w_held=np.asarray(w_held))


def srm_encoding(Ys: Sequence[np.ndarray], designs: dict[str, np.ndarray], groups: np.ndarray, alphas: Any, *,
                 features: int = 50, iterations: int = 10, gap: int = 0, test_groups: Sequence[Any] | None = None,
                 backend: str = "auto", seed: int = 0, subjects: Sequence[str] | None = None,
                 return_predictions: bool = False) -> SrmResult:
    """Predict each subject's held-out runs from the other subjects through the shared space.

    Parameters
    ----------
    Ys : sequence of arrays of shape (n_samples, n_targets_i)
        Each subject's responses (z-scored per run), on the same samples (same stories, same order).
    designs : dict of str to array of shape (n_samples, n_features)
        The design matrices (delayed features) of the stimulus, one per feature space.
    groups : array of shape (n_samples,)
        Run label of each sample: the folds (leave-one-run-out, or ``test_groups``).
    alphas : sequence of float
        Ridge alphas, chosen per shared dimension by leave-one-run-out over the training runs.
    features, iterations : int
        The shared space's dimension and brainiak's EM iterations (``group.srm``).
    gap, test_groups, backend
        As :func:`pipelines.fit.fit_encoding`.
    seed : int
        brainiak's ``rand_seed`` (its initial maps).
    subjects : sequence of str, optional
        Labels, for the error messages.
    return_predictions : bool
        Keep each subject's held-out predictions in its own targets.

    Returns
    -------
    result : SrmResult

    Raises
    ------
    ConfigError
        Fewer than 2 subjects, ``features`` above a subject's targets or a fold's training samples.
    DatasetError
        Subjects whose responses are not on the same samples.
    """
    groups = np.asarray(groups)
    splits: list[OuterSplit] = nested_group_splits(groups, gap=gap, test_groups=test_groups)
    check_srm_inputs(Ys, features, subjects, min(s.train.size for s in splits))
    n = groups.shape[0]
    for name, X in designs.items():
        if np.asarray(X).shape[0] != n:
            raise DatasetError(f"'group.srm': design {name!r} has {np.asarray(X).shape[0]} samples, the responses {n}")
    weights = np.array([s.test.size for s in splits], dtype=np.float64)
    weights /= weights.sum()
    out_r = {d: [np.zeros(np.asarray(Y).shape[1]) for Y in Ys] for d in designs}
    out_r2 = {d: [np.zeros(np.asarray(Y).shape[1]) for Y in Ys] for d in designs}
    out_rs = {d: [np.zeros(features) for _ in Ys] for d in designs}
    preds = ({d: [np.full(np.asarray(Y).shape, np.nan, dtype=np.float32) for Y in Ys] for d in designs}
             if return_predictions else None)
    for h, Y_h in enumerate(Ys):
        Y_h = np.asarray(Y_h)
        for k, split in enumerate(splits):
            fold = srm_fold(Ys, split.train, h, features, iterations, seed)
            others = [np.asarray(Y) for i, Y in enumerate(Ys) if i != h]
            # the fit's targets: S on the training rows; elsewhere the others' projection (scored, never fitted)
            shared = np.mean([Y @ w for Y, w in zip(others, fold.w_others)], axis=0)
            shared[split.train] = fold.shared
            for name, X in designs.items():
                fitted = fit_encoding(np.asarray(X, dtype=np.float32), shared.astype(np.float32), groups, alphas,
                                      backend=backend, gap=gap, test_groups=list(split.group) if isinstance(
                                          split.group, tuple) else [split.group], return_predictions=True)
                p_shared = np.asarray(fitted.predictions)[split.test].astype(np.float64)
                p_h = p_shared @ fold.w_held.T
                r, r2 = fold_scores(Y_h[split.test].astype(np.float64), p_h)
                out_r[name][h] += weights[k] * r
                out_r2[name][h] += weights[k] * r2
                out_rs[name][h] += weights[k] * np.nan_to_num(np.asarray(fitted.r, dtype=np.float64))
                if preds is not None:
                    preds[name][h][split.test] = p_h.astype(np.float32)
    as32 = {d: [v.astype(np.float32) for v in vs] for d, vs in out_r.items()}
    return SrmResult(r=as32, r2={d: [v.astype(np.float32) for v in vs] for d, vs in out_r2.items()},
                     r_shared={d: [v.astype(np.float32) for v in vs] for d, vs in out_rs.items()},
                     n_folds=len(splits), predictions=preds)
