"""One (subject, feature space, layer) fit on its own: the unit the DAG maps a layer sweep over.

A sweep of a 7B model gives 33 spaces per subject; fitted inside one ``fit_subject`` task they
run one after the other on one worker. :func:`fit_layer` fits a single layer and leaves it in
the fit cache (``{output}/_cache/fits/``, keyed by content), reading only that layer of the
feature entries; the subject's ``fit_subject`` then finds every layer fitted and assembles its
results without computing. The numbers are the ones ``fit_subject`` computes itself (same key,
same code: :func:`~pipelines.steps.fit_subject.fit_one_space`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypedDict

from ..cache import default_cache_dir
from ..config import AnalysisConfig, as_config
from ..errors import NeuroflowError
from .feature_entries import FeatureEntries
from .features import feature_spec
from .fit_subject import fit_one_space, load_fit_inputs
from .response_matrix import ResponseMatrix
from .results import FeatureSet

__all__ = ["LayerUnit", "layer_units", "fit_layer"]

log = logging.getLogger("neuroflow")


class LayerUnit(TypedDict):
    subject: str
    feature: str
    space: str


def layer_units(config: dict | AnalysisConfig, subjects: list[str], features: list[FeatureSet]) -> list[LayerUnit]:
    """The (subject, feature, layer) fits of every layer sweep: one mapped task each.

    Feature spaces with one space (no sweep) and banded ridge (one joint fit over the bands)
    are fitted in ``fit_subject`` itself and give no unit.
    """
    cfg = as_config(config)
    if cfg.model.kind == "banded_ridge":
        return []
    return [LayerUnit(subject=s, feature=f["feature"], space=space)
            for f in sorted(features, key=lambda f: f["feature"]) if len(f.get("spaces", [])) > 1
            for s in subjects for space in f["spaces"]]


def fit_layer(config: dict | AnalysisConfig, unit: LayerUnit, features: list[FeatureSet], *,
              cache_dir: str | Path | None = None, client=None) -> dict[str, Any]:
    """Fit one layer of one subject and cache it (see the module docstring).

    Returns
    -------
    dict
        The unit, ``computed`` (False when the cache held it already) and ``error``: the
        message of a problem with the subject's own input, which its ``fit_subject`` meets and
        records again (a retry of this task could not help, and the other layers go on).
    """
    cfg = as_config(config)
    feat = next((f for f in features if f["feature"] == unit["feature"]), None)
    if feat is None or unit["space"] not in feat.get("spaces", []):
        raise ValueError(f"{unit}: no such feature space among the extracted features "
                         f"{[f['feature'] for f in features]}")
    spec = feature_spec(cfg, feat["feature"])
    name = spec.name if unit["space"] == "values" else f"{spec.name}_{unit['space']}"
    cache_root = Path(cache_dir or default_cache_dir())
    try:
        with ResponseMatrix(cache_root / "staging") as matrix:
            inputs = load_fit_inputs(cfg, unit["subject"], matrix, cache_root)
            with FeatureEntries(inputs.store, spec, feat, inputs.runs, unit["subject"]) as entries:
                results = entries.results(unit["space"])
                _, computed, _ = fit_one_space(cfg, unit["subject"], inputs, name, results, entries.rels,
                                               unit["space"], client)
    except NeuroflowError as err:
        log.warning("sub-%s %s: %s (left to its fit_subject)", unit["subject"], name, err)
        return {**unit, "computed": False, "error": str(err)}
    return {**unit, "computed": computed, "error": None}
