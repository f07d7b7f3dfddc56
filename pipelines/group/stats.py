"""Statistics across subjects: Fisher-z mean correlation and sign-flip permutation tests.

Each subject's held-out r of a target is one observation; under the null "the model predicts
nothing in the group", each subject's Fisher-z score is symmetric about zero, so flipping the
signs of whole subjects gives the null distribution of the group mean (Nichols & Holmes 2002).
With ``n`` subjects there are ``2**n`` sign patterns: all of them are used when that is at most
``n_permutations`` (an exact test), else ``n_permutations`` random ones (the identity included).
Per-target p-values are FDR-corrected (Benjamini-Hochberg, :func:`pipelines.stats.fdr_bh`); the
max-statistic p-values control the family-wise error (the same flips for every target).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..stats import fdr_bh

__all__ = ["GroupTest", "fisher_z_mean", "sign_flip_test", "sign_patterns"]


@dataclass
class GroupTest:
    """The group test of every target.

    Attributes
    ----------
    mean_r : array of shape (n_targets,)
        ``tanh`` of the mean Fisher-z of the subjects' r (NaN where a subject has none).
    t : array of shape (n_targets,)
        One-sample t of the subjects' Fisher-z (the statistic the flips permute).
    p : array of shape (n_targets,)
        Per-target sign-flip p-value (one-sided, "mean r > 0").
    q : array of shape (n_targets,)
        Benjamini-Hochberg adjusted p-values.
    p_max : array of shape (n_targets,)
        Max-statistic (family-wise) p-values.
    significant : array of shape (n_targets,), bool
        ``q <= fdr`` (``correction="fdr"``) or ``p_max <= fdr`` (``"maxstat"``).
    n_subjects : int
    n_permutations : int
        Sign patterns used (the identity included).
    exact : bool
        True when every sign pattern was used.
    """

    mean_r: np.ndarray
    t: np.ndarray
    p: np.ndarray
    q: np.ndarray
    p_max: np.ndarray
    significant: np.ndarray
    n_subjects: int
    n_permutations: int
    exact: bool


def fisher_z_mean(r: np.ndarray, axis: int = 0) -> np.ndarray:
    """``tanh(mean(arctanh(r)))`` along `axis`; r is clipped to +-0.999999 first (r = 1 has no z)."""
    z = np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -0.999999, 0.999999))
    return np.tanh(z.mean(axis=axis))


def sign_patterns(n_subjects: int, n_permutations: int, random_state: int = 0) -> tuple[np.ndarray, bool]:
    """Sign flips of shape (n_patterns, n_subjects), the identity first; ``exact`` when all ``2**n``."""
    if n_subjects < 2:
        raise ConfigError(f"a group test needs at least 2 subjects; got {n_subjects}")
    if n_permutations < 1:
        raise ConfigError(f"'group.permutations' must be >= 1; got {n_permutations}")
    if n_subjects <= 20 and 2 ** n_subjects <= n_permutations:
        flips = np.array(list(itertools.product([1.0, -1.0], repeat=n_subjects)))  # identity first
        return flips, True
    rng = np.random.default_rng(random_state)
    flips = rng.choice([1.0, -1.0], size=(n_permutations, n_subjects))
    flips[0] = 1.0
    return flips, False


def _t_of_means(mean: np.ndarray, sumsq: np.ndarray, n: int) -> np.ndarray:
    """One-sample t from the mean and the sum of squares of n values (the sum of squares does not
    change when signs flip, so every pattern's t needs only its mean: one matrix product)."""
    var = (sumsq - n * mean ** 2) / (n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean / np.sqrt(np.maximum(var, 0.0) / n)


def sign_flip_test(r: np.ndarray, *, n_permutations: int = 10_000, fdr: float = 0.05,
                   correction: str = "fdr", random_state: int = 0, batch: int = 256) -> GroupTest:
    """One-sided sign-flip test of "the subjects' mean Fisher-z r > 0", per target.

    Parameters
    ----------
    r : array of shape (n_subjects, n_targets)
        Held-out correlations; targets where any subject is NaN get NaN results.
    n_permutations : int
        Most sign patterns to draw (all ``2**n_subjects`` when that is not more).
    fdr : float
        Level of the FDR (or, with ``correction="maxstat"``, family-wise) control.
    correction : "fdr" or "maxstat"
    random_state : int
    batch : int
        Sign patterns per batch (memory: ``batch x n_targets`` floats).
    """
    if correction not in ("fdr", "maxstat"):
        raise ConfigError(f"'group.correction' must be 'fdr' or 'maxstat'; got {correction!r}")
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2:
        raise ConfigError(f"the group test takes r of shape (n_subjects, n_targets); got shape {r.shape}")
    n_subjects, n_targets = r.shape
    flips, exact = sign_patterns(n_subjects, n_permutations, random_state)
    finite = np.isfinite(r).all(axis=0)
    z = np.arctanh(np.clip(np.where(finite, r, 0.0), -0.999999, 0.999999))
    sumsq = (z ** 2).sum(axis=0)
    observed = _t_of_means(z.mean(axis=0), sumsq, n_subjects)
    ok = finite & np.isfinite(observed)  # all subjects equal: no spread, no test
    zs, obs, ss = z[:, ok], observed[ok], sumsq[ok]
    exceed = np.zeros(obs.shape)
    max_null = np.empty(len(flips))
    for start in range(0, len(flips), batch):
        f = flips[start:start + batch]
        null = _t_of_means(f @ zs / n_subjects, ss[None], n_subjects)  # (patterns, targets)
        null = np.where(np.isfinite(null), null, -np.inf)
        exceed += (null >= obs[None] - 1e-9 * np.abs(obs[None])).sum(axis=0)
        max_null[start:start + len(f)] = null.max(axis=1) if null.shape[1] else -np.inf
    n = len(flips)
    p = np.full(n_targets, np.nan)
    p_max = np.full(n_targets, np.nan)
    p[ok] = exceed / n  # the identity is among the patterns: p >= 1 / n
    ranked = np.sort(max_null)  # how many patterns' maxima reach each observed t, without a targets x patterns table
    p_max[ok] = (n - np.searchsorted(ranked, obs - 1e-9 * np.abs(obs), side="left")) / n
    _, q = fdr_bh(p, fdr)
    significant = (q <= fdr) if correction == "fdr" else (p_max <= fdr)
    mean_r = np.where(finite, np.tanh(z.mean(axis=0)), np.nan)
    return GroupTest(mean_r=mean_r, t=np.where(ok, observed, np.nan), p=p, q=q, p_max=p_max,
                     significant=np.where(ok, significant, False), n_subjects=n_subjects, n_permutations=n,
                     exact=exact)
