"""Cross-validation folds made of whole groups (runs, stories, contiguous blocks).

Outer folds hold out each group in turn (or one fixed test set); inner folds are
leave-one-group-out splits of each outer training set, used to choose the alphas. An
optional ``gap`` drops training samples next to held-out ones, against leakage of
autocorrelated neighbours. Also the per-group z-scoring applied before a fit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import FitError

__all__ = ["OuterSplit", "nested_group_splits", "sample_fold", "zscore_by_group"]

_MIN_GROUPS = 3


def zscore_by_group(A: np.ndarray, groups: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Z-score the columns of ``A`` within each group (run).

    Parameters
    ----------
    A : array of shape (n_samples, n_columns) or (n_samples,)
        Data to standardize (features or responses).
    groups : array of shape (n_samples,)
        Group label of each sample (e.g. the run).
    out : float32 array of the shape of ``A``, optional
        Where to write the result; ``out=A`` (a float32 ``A``) z-scores in place, so that a
        response matrix is never held twice. Statistics are computed in float64 one group at a
        time, so the result is the same either way.

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
    if out is None:
        out = np.empty(A.shape, dtype=np.float32)
    elif out.shape != A.shape or out.dtype != np.float32:
        raise FitError(f"'out' must be float32 of shape {A.shape}; got {out.dtype} {out.shape}.")
    A2 = A.reshape(A.shape[0], -1)
    Z = out.reshape(A2.shape)
    for label in np.unique(groups):
        rows = groups == label
        block = A2[rows].astype(np.float64)  # one group in float64 at a time, never the whole matrix
        varies = np.ptp(block, axis=0) > 0  # exact test: a rounding-error std is not variance
        scale = np.where(varies, block.std(axis=0), np.inf)  # constant columns -> 0, not NaN
        block -= block.mean(axis=0)
        block /= scale
        Z[rows] = block
    return out


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


def sample_fold(splits: list[OuterSplit], n_samples: int) -> np.ndarray:
    """Index of the outer fold that holds out each sample.

    Parameters
    ----------
    splits : list of OuterSplit
    n_samples : int

    Returns
    -------
    fold : array of shape (n_samples,), int64
        ``k`` for the samples ``splits[k]`` holds out, -1 for samples no fold holds out.
    """
    fold = np.full(n_samples, -1, dtype=np.int64)
    for k, split in enumerate(splits):
        fold[split.test] = k
    return fold
