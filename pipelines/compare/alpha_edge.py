"""Where the chosen ridge alpha sits at an edge of ``model.alphas``: counts, a map and a warning.

A target whose best alpha is the smallest or the largest of the grid might have wanted one beyond
it: its score is then a floor set by the grid, and comparisons across models or layers are unfair
to the one that needed more (or less) regularisation. Targets with no signal choose the largest
alpha whatever the grid (infinite shrinkage suits noise), so the warning counts only *predicted*
targets: significant ones where a permutation test ran, else those whose held-out r exceeds the
one-sided 5% level of a correlation over the held-out samples, ``1.645 / sqrt(n_samples)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["WARN_FRACTION", "alpha_edge_map", "alpha_edges", "edge_warning"]

#: A fit is warned about when more than this share of its predicted targets sit at an edge.
WARN_FRACTION = 0.1


def alpha_edge_map(alpha: np.ndarray, grid: Sequence[float], valid: np.ndarray | None = None) -> np.ndarray:
    """-1 where a target's alpha is the grid's smallest, +1 its largest, 0 inside, NaN where not fitted.

    Parameters
    ----------
    alpha : array of shape (n_targets,)
        Each target's chosen alpha.
    grid : sequence of float
        ``model.alphas``.
    valid : array of bool, shape (n_targets,), optional
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    ok = np.isfinite(alpha) if valid is None else (np.asarray(valid, bool) & np.isfinite(alpha))
    out = np.full(alpha.shape, np.nan, dtype=np.float32)
    out[ok] = 0
    if len(grid) < 2:  # one alpha is a choice, not a search: no edge
        return out
    lo, hi = float(min(grid)), float(max(grid))
    out[ok & np.isclose(alpha, lo, rtol=1e-4)] = -1
    out[ok & np.isclose(alpha, hi, rtol=1e-4)] = 1
    return out


def alpha_edges(alpha: np.ndarray, grid: Sequence[float], valid: np.ndarray, r: np.ndarray, n_samples: int,
                significant: np.ndarray | None = None) -> dict[str, Any]:
    """Counts of targets at the grid's edges, over every valid target and over the predicted ones.

    Returns
    -------
    dict
        ``{"alpha_min", "alpha_max", "n_at_min", "n_at_max"`` (valid targets), ``"n_predicted",
        "n_predicted_at_min", "n_predicted_at_max", "warn"}``: ``warn`` is True when more than
        :data:`WARN_FRACTION` of the predicted targets sit at one edge or the other.
    """
    edge = alpha_edge_map(alpha, grid, valid)
    r = np.asarray(r, dtype=np.float64)
    if significant is not None:
        predicted = np.asarray(significant, bool) & np.isfinite(edge)
    else:
        r_crit = 1.645 / math.sqrt(max(int(n_samples), 1))
        predicted = np.isfinite(edge) & np.isfinite(r) & (r > r_crit)
    n_pred = int(predicted.sum())
    at_min, at_max = int((predicted & (edge == -1)).sum()), int((predicted & (edge == 1)).sum())
    return {"alpha_min": float(min(grid)), "alpha_max": float(max(grid)),
            "n_at_min": int((edge == -1).sum()), "n_at_max": int((edge == 1).sum()),
            "n_predicted": n_pred, "n_predicted_at_min": at_min, "n_predicted_at_max": at_max,
            "warn": bool(n_pred and len(grid) >= 2 and (at_min + at_max) > WARN_FRACTION * n_pred)}


def edge_warning(subject: str, space: str, counts: dict[str, Any]) -> str:
    """The one-line warning of a fit whose predicted targets sit at the grid's edge."""
    parts = []
    if counts["n_predicted_at_max"]:
        parts.append(f"{counts['n_predicted_at_max']} chose the largest alpha ({counts['alpha_max']:g})")
    if counts["n_predicted_at_min"]:
        parts.append(f"{counts['n_predicted_at_min']} chose the smallest alpha ({counts['alpha_min']:g})")
    return (f"sub-{subject} {space}: of {counts['n_predicted']} predicted targets, {' and '.join(parts)} of "
            "'model.alphas': their best alpha may lie beyond the grid; widen 'model.alphas' "
            "(map stat-alphaedge: -1 smallest, +1 largest)")
