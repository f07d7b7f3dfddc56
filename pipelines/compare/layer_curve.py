"""Layer curves: the score of a layer sweep against layer, per target set, and the best layer per target.

A layer sweep (``features[].layer: all`` or a list) is fitted one space per layer, named
``<feature>_layer<k>``; its controls (``features[].baselines``) are ``<feature>_<baseline>_layer<k>``
and ``<feature>_random_embedding`` (:mod:`pipelines.features.baselines`). This module reads those
per-target arrays and computes, for the model and each control, the mean held-out r (and the mean
ceiling-normalised r where a noise ceiling exists) at every layer over

* ``all``: every valid target;
* ``top``: the :data:`TOP_FRACTION` best-predicted valid targets (by the model's r averaged over
  layers, so the set favours no layer; the controls are averaged over the same targets);
* each label of an optional label vector (ROIs of an atlas, or the targets themselves when they
  are ROIs), e.g. ``labels=atlas_labels_per_voxel``.

Pure functions of arrays; nothing here reads or writes files.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TOP_FRACTION", "SweepSpace", "split_space", "sweeps", "layer_curve", "best_layer_map",
           "subject_layer_curves"]

#: Share of the valid targets, best predicted first, that the ``top`` curve averages.
TOP_FRACTION = 0.1
_REST = re.compile(r"^(?:(untrained|shuffled|random_embedding)(?:_|$))?(?:layer(\d+))?$")


class SweepSpace(tuple):
    """(feature, baseline or None for the model itself, layer or None) of one fitted space name."""

    __slots__ = ()

    def __new__(cls, feature: str, baseline: str | None, layer: int | None):
        return super().__new__(cls, (feature, baseline, layer))

    feature = property(lambda self: self[0])
    baseline = property(lambda self: self[1])
    layer = property(lambda self: self[2])


def split_space(name: str, features: Sequence[str]) -> SweepSpace | None:
    """Which feature, control and layer a fitted space ``name`` is (None: not one of ``features``).

    ``features`` are the config's feature names; the longest matching one wins (``lm_big_layer2`` is
    layer 2 of ``lm_big`` when both ``lm`` and ``lm_big`` exist).

    >>> split_space("lm_untrained_layer3", ["lm"])
    ('lm', 'untrained', 3)
    """
    for feat in sorted(features, key=len, reverse=True):
        if name == feat:
            return SweepSpace(feat, None, None)
        if name.startswith(feat + "_"):
            m = _REST.match(name[len(feat) + 1:])
            if m and (m.group(1) or m.group(2)):
                return SweepSpace(feat, m.group(1), int(m.group(2)) if m.group(2) else None)
    return None


def sweeps(names: Sequence[str], features: Sequence[str]) -> dict[str, dict[str | None, dict[int | None, str]]]:
    """The layer sweeps among fitted space ``names``: ``{feature: {baseline or None: {layer: name}}}``.

    Only features fitted at two layers or more are sweeps; ``random_embedding`` (no layer) is kept
    beside its feature's sweep under the layer ``None``.
    """
    found: dict[str, dict[str | None, dict[int | None, str]]] = {}
    for name in names:
        sp = split_space(name, features)
        if sp is not None:
            found.setdefault(sp.feature, {}).setdefault(sp.baseline, {})[sp.layer] = name
    return {f: parts for f, parts in found.items()
            if len([k for k in parts.get(None, {}) if k is not None]) >= 2}


def _mean(values: np.ndarray) -> float | None:
    good = values[np.isfinite(values)]
    return round(float(good.mean()), 6) if good.size else None


def layer_curve(r: np.ndarray, layers: Sequence[int], *, valid: np.ndarray | None = None,
                rnorm: np.ndarray | None = None, labels: Sequence[Any] | np.ndarray | None = None,
                top: np.ndarray | None = None) -> dict[str, Any]:
    """Mean held-out r (and ceiling-normalised r) at each layer over every target set.

    Parameters
    ----------
    r : array of shape (n_layers, n_targets)
        Held-out correlation of each layer's fit.
    layers : sequence of int, length n_layers
    valid : array of bool, shape (n_targets,), optional
        Targets that were fitted (default: finite r at every layer).
    rnorm : array of shape (n_layers, n_targets), optional
        Ceiling-normalised r (NaN where a target has no reliable ceiling).
    labels : sequence of length n_targets, optional
        A label per target (an ROI name or atlas index); targets labelled ``""``, ``None`` or ``0``
        belong to no label. One curve per label.
    top : array of int, optional
        The targets of the ``top`` curve (default: the :data:`TOP_FRACTION` best by mean r over layers).

    Returns
    -------
    dict
        ``{"layers", "sets": {"all" | "top" | "label:<name>": {"n_targets", "mean_r": [...],
        "mean_r_normalised": [...] or None}}, "best_layer": the layer of highest mean r over all,
        "top_targets": [indices]}``.
    """
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != len(layers):
        raise ValueError(f"r must have shape (n_layers={len(layers)}, n_targets); got {r.shape}")
    ok = np.isfinite(r).all(axis=0) if valid is None else (np.asarray(valid, bool) & np.isfinite(r).all(axis=0))
    if top is None:
        top = top_targets(r, ok)
    sets: dict[str, np.ndarray] = {"all": np.flatnonzero(ok), "top": np.asarray(top, dtype=int)}
    if labels is not None:
        labels = np.asarray([str(x) for x in labels], dtype=object)
        if labels.shape[0] != r.shape[1]:
            raise ValueError(f"labels has {labels.shape[0]} entries for {r.shape[1]} targets")
        for lab in sorted({x for x in labels if x not in ("", "None", "0", "nan")}):
            sets[f"label:{lab}"] = np.flatnonzero(ok & (labels == lab))
    out_sets: dict[str, dict[str, Any]] = {}
    for key, idx in sets.items():
        entry = {"n_targets": int(idx.size), "mean_r": [_mean(r[i, idx]) for i in range(len(layers))],
                 "mean_r_normalised": None}
        if rnorm is not None:
            rn = np.asarray(rnorm, dtype=np.float64)
            entry["mean_r_normalised"] = [_mean(rn[i, idx]) for i in range(len(layers))]
        out_sets[key] = entry
    means = out_sets["all"]["mean_r"]
    best = None if all(m is None for m in means) else int(layers[int(np.nanargmax(
        [(-np.inf if m is None else m) for m in means]))])
    return {"layers": [int(k) for k in layers], "sets": out_sets, "best_layer": best,
            "top_targets": [int(i) for i in sets["top"]]}


def top_targets(r: np.ndarray, ok: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Indices of the ``fraction`` valid targets of highest r averaged over layers (at least one)."""
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return idx
    n = max(1, math.ceil(fraction * idx.size))
    score = np.asarray(r, dtype=np.float64)[:, idx].mean(axis=0)
    return np.sort(idx[np.argsort(-score, kind="stable")[:n]])


def best_layer_map(r: np.ndarray, layers: Sequence[int], valid: np.ndarray | None = None) -> np.ndarray:
    """Per target, the layer whose fit predicts it best (float32, NaN where not fitted).

    Parameters
    ----------
    r : array of shape (n_layers, n_targets)
    layers : sequence of int, length n_layers
    valid : array of bool, shape (n_targets,), optional
    """
    r = np.asarray(r, dtype=np.float64)
    ok = np.isfinite(r).all(axis=0) if valid is None else (np.asarray(valid, bool) & np.isfinite(r).all(axis=0))
    out = np.full(r.shape[1], np.nan, dtype=np.float32)
    if ok.any():
        out[ok] = np.asarray(layers, dtype=np.float32)[np.argmax(r[:, ok], axis=0)]
    return out


def subject_layer_curves(arrays: Mapping[str, np.ndarray], names: Sequence[str], features: Sequence[str], *,
                         labels: Sequence[Any] | np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Every layer sweep of one subject's fit, with its controls, as curves and a best-layer map.

    Parameters
    ----------
    arrays : mapping
        The subject's fit arrays (``<space>__r``, ``<space>__valid``, ``<space>__rnorm``...).
    names : sequence of str
        The fitted spaces (the subject's metrics keys).
    features : sequence of str
        The config's feature names.
    labels : optional
        A label per target (see :func:`layer_curve`).

    Returns
    -------
    dict
        ``{feature: {"layers", "model": curve, "baselines": {baseline: curve}, "best_layer_map": array}}``;
        a control without layers (``random_embedding``) is one value repeated at every layer, so it
        draws as a flat line beside the curve.
    """
    out: dict[str, dict[str, Any]] = {}
    for feat, parts in sweeps(list(names), features).items():
        model = parts[None]
        layers = sorted(k for k in model if k is not None)
        r = np.stack([arrays[f"{model[k]}__r"] for k in layers])
        valid = np.logical_and.reduce([arrays[f"{model[k]}__valid"].astype(bool) for k in layers])
        has_norm = all(f"{model[k]}__rnorm" in arrays for k in layers)
        rnorm = np.stack([arrays[f"{model[k]}__rnorm"] for k in layers]) if has_norm else None
        curve = layer_curve(r, layers, valid=valid, rnorm=rnorm, labels=labels)
        top = np.asarray(curve["top_targets"], dtype=int)
        controls: dict[str, dict[str, Any]] = {}
        for baseline, spaces in sorted((b, s) for b, s in parts.items() if b is not None):
            flat = set(spaces) == {None}
            if flat:  # no layers: the same space at every layer
                spaces = {k: spaces[None] for k in layers}
            if not all(k in spaces for k in layers):
                continue
            br = np.stack([arrays[f"{spaces[k]}__r"] for k in layers])
            bvalid = valid & np.logical_and.reduce([arrays[f"{spaces[k]}__valid"].astype(bool) for k in layers])
            brnorm = (np.stack([arrays[f"{spaces[k]}__rnorm"] for k in layers])
                      if all(f"{spaces[k]}__rnorm" in arrays for k in layers) else None)
            controls[baseline] = layer_curve(br, layers, valid=bvalid, rnorm=brnorm, labels=labels, top=top)
            controls[baseline].pop("top_targets")
            if flat:
                controls[baseline]["best_layer"] = None  # a flat line has no best layer
        out[feat] = {"layers": layers, "spaces": {str(k): model[k] for k in layers}, "model": curve,
                     "baselines": controls, "best_layer_map": best_layer_map(r, layers, valid)}
    return out
