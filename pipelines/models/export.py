"""Publishable encoding models: weights, intercepts and the recipe that rebuilds the features.

One safetensors file per (subject, feature space) holds

- ``weights`` (n_delayed_features, n_targets) and ``intercept`` (n_targets,), float32 or float16
  (``publish.models_dtype``); ``alpha``, ``valid`` and the published held-out ``r`` per target;
- ``feature_mean`` / ``feature_std`` (n_runs, n_dims) and ``response_mean`` / ``response_std``
  (n_runs, n_targets): each run's z-score statistics as the fit used them (features aligned to the
  run's samples, responses as read and preprocessed), float32;
- the target layout: ``mask`` (a volume's brain mask, with ``affine`` in the recipe), or ``vertex``
  and ``hemi`` (surfaces);

and, as its metadata ``recipe`` (JSON, also in the manifest's artifact record), everything needed to
rebuild the features of a new stimulus: the feature spec (model id, layer, context...), the model
folder's fingerprint and file sha256s, the resampling, the delays or TRF lags, the sampling clock,
the word-timing reader, and which runs trained the model and which it was scored on.

``fit_subject`` writes the files to the work area (:func:`write_model`); ``publish`` copies them
into the published folder as artifacts of kind ``encoding_model`` (:func:`model_artifacts`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import sha256_bytes
from ..errors import IntegrityError
from ..features.registry import KINDS, FeatureResult, align_to_samples
from ..fit.splits import nested_group_splits
from ..storage import sha256_file

from .weights import ridge_weights

log = logging.getLogger("neuroflow")

__all__ = ["MODEL_KIND", "RECIPE_VERSION", "RunStats", "ModelInputs", "fold_table", "write_model",
           "model_artifacts", "read_model_bytes", "encode_model", "model_files"]

#: The manifest artifact kind of a published model.
MODEL_KIND = "encoding_model"
RECIPE_VERSION = 1
#: How the fit standardised its inputs, stated in every recipe.
ZSCORE_RULE = ("each run z-scored on its own (mean 0, sd 1, ddof 0) before the fit: the features after alignment "
               "to the run's samples and before the delays or lags, and the responses as read and preprocessed; a "
               "new stimulus is z-scored on its own the same way, so predictions are in units of a run's sd")


class RunStats:
    """Each run's response mean and sd per target (float64 sums, float32 results), collected as runs are read."""

    def __init__(self) -> None:
        self.labels: list[str] = []
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []

    def add(self, run: Any) -> None:
        data = run.data
        n = max(data.shape[0], 1)
        total = np.zeros(data.shape[1])
        squares = np.zeros(data.shape[1])
        for first in range(0, data.shape[0], 1024):  # row blocks: no full-size float64 copy
            block = np.nan_to_num(np.asarray(data[first:first + 1024], dtype=np.float64), nan=0.0, posinf=0.0,
                                  neginf=0.0)
            total += block.sum(axis=0)
            squares += (block * block).sum(axis=0)
        mean = total / n
        self.labels.append(str(run.label))
        self.means.append(mean.astype(np.float32))
        self.stds.append(np.sqrt(np.clip(squares / n - mean * mean, 0.0, None)).astype(np.float32))


@dataclass
class ModelInputs:
    """What one (subject, feature space) model is made of (given by ``fit_subject``)."""

    subject: str
    name: str  # the fitted space's name (``lm`` or ``lm_layer3``)
    spec: Any  # the feature's spec (pydantic)
    space: str  # ``values`` or ``layer{k}``
    results: list[FeatureResult]
    runs: list[Any]
    X: np.ndarray
    Y: Any
    groups: np.ndarray
    gap: int
    test_groups: list[int] | None
    fitted: dict[str, np.ndarray]
    run_stats: RunStats
    kind: str  # the responses' kind (bold, gifti, timeseries, meg...)
    target_space: str | None
    target_names: list[str]
    target_info: dict[str, np.ndarray] = field(default_factory=dict)
    mask: np.ndarray | None = None
    affine: np.ndarray | None = None
    model_runtime: dict | None = None
    words_per_second: float | None = None


def _is_ephys(runs: list[Any]) -> bool:
    return min(r.tr for r in runs) < 0.25


def fold_table(runs: list[Any], groups: np.ndarray, gap: int, test_groups: list[int] | None) -> list[dict[str, Any]]:
    """Per outer fold of the fit: the runs it trained on and the runs (or samples) it was scored on.

    Parameters
    ----------
    runs : the subject's runs, in the order of the samples.
    groups, gap, test_groups : the fit's fold labels, gap and held-out groups.

    Returns
    -------
    list of dict
        ``{"fold", "train_runs", "test_runs", "n_train", "n_test"}``; with contiguous blocks the
        runs are those the block's samples fall in, and ``test_samples`` gives the block's range.
    """
    run_of = np.repeat(np.arange(len(runs)), [len(r.times) for r in runs])
    out = []
    for k, split in enumerate(nested_group_splits(groups, gap=gap, test_groups=test_groups)):
        fold = {"fold": k, "train_runs": [runs[i].label for i in np.unique(run_of[split.train])],
                "test_runs": [runs[i].label for i in np.unique(run_of[split.test])],
                "n_train": int(split.train.size), "n_test": int(split.test.size)}
        if len(np.unique(run_of[split.test])) == 1 and split.test.size < (run_of == run_of[split.test[0]]).sum():
            fold["test_samples"] = [int(split.test[0]), int(split.test[-1]) + 1]
        out.append(fold)
    return out


def _model_record(spec: Any) -> dict[str, Any] | None:
    """The model a feature runs: id, revision, folder fingerprint and each file's sha256 (a local folder)."""
    from ..features.cache_keys import model_fingerprint

    model_field = KINDS[spec.kind].model_field
    if model_field is None:
        return None
    model = str(getattr(spec, model_field))
    revision = getattr(spec, "revision", None)
    record: dict[str, Any] = {"id": model, "revision": revision, "fingerprint": model_fingerprint(model, revision)}
    folder = Path(model).expanduser()
    if folder.is_dir():
        record["files"] = {f.name: sha256_file(f) for f in sorted(folder.glob("*"))
                           if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".model")}
    return record


def _feature_stats(inputs: ModelInputs, method: str, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each run's mean and sd of the aligned features (before z-scoring), shape (n_runs, n_dims)."""
    means, stds = [], []
    for result, run in zip(inputs.results, inputs.runs):
        A = align_to_samples(result, run.times, method=method, window=window, tr=run.tr,
                             space=inputs.space).astype(np.float64)
        means.append(A.mean(axis=0))
        stds.append(A.std(axis=0))
    return np.asarray(means, dtype=np.float32), np.asarray(stds, dtype=np.float32)


def build_model(cfg: Any, inputs: ModelInputs) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the recipe of one model (see the module docstring)."""
    runs = inputs.runs
    ephys = _is_ephys(runs)
    splits = nested_group_splits(inputs.groups, gap=inputs.gap, test_groups=inputs.test_groups)
    run_of = np.repeat(np.arange(len(runs)), [len(r.times) for r in runs])
    if len(splits) == 1:  # a held-out test set: the model is that fold's, so it reproduces the held-out scores
        train, test = splits[0].train, splits[0].test
        trained = ("the outer fold's training runs, each target's alpha chosen by leave-one-run-out "
                   "inside them: this is the model that made the held-out scores")
    else:
        train, test = np.arange(inputs.X.shape[0]), np.empty(0, dtype=np.int64)
        trained = ("refit on every run, each target's alpha the geometric mean of the alphas the outer folds "
                   "chose; the held-out scores come from the cross-validation folds, not from this model")
    fitted = inputs.fitted
    alpha = np.asarray(fitted["alpha"], dtype=np.float64)
    valid = np.asarray(fitted["valid"]).astype(bool)
    weights, intercept = ridge_weights(inputs.X, inputs.Y, train, alpha, valid)
    dtype = np.float16 if cfg.publish.models_dtype == "float16" else np.float32
    method = "samples" if ephys else cfg.model.resample
    f_mean, f_std = _feature_stats(inputs, method, cfg.model.lanczos_window)
    arrays = {"weights": weights.astype(dtype), "intercept": intercept.astype(dtype),
              "alpha": alpha.astype(np.float32), "valid": valid.astype(np.uint8),
              "r": np.asarray(fitted["r"], dtype=np.float32),  # the published held-out r (selects best targets)
              "feature_mean": f_mean, "feature_std": f_std,
              "response_mean": np.asarray(inputs.run_stats.means, dtype=np.float32),
              "response_std": np.asarray(inputs.run_stats.stds, dtype=np.float32)}
    layout: dict[str, Any] = {"kind": inputs.kind, "space": inputs.target_space, "n_targets": int(intercept.size)}
    if inputs.mask is not None:
        arrays["mask"] = np.asarray(inputs.mask, dtype=np.uint8)
        layout["affine"] = np.asarray(inputs.affine, dtype=float).round(8).tolist()
    for key in ("hemi", "vertex"):
        if key in inputs.target_info:
            values = inputs.target_info[key]
            arrays[key] = (np.asarray([{"L": 0, "R": 1}.get(str(v), 2) for v in values], dtype=np.uint8)
                           if key == "hemi" else np.asarray(values, dtype=np.int64))
    if inputs.mask is None:
        layout["target_names"] = [str(n) for n in inputs.target_names]
    sampling = {"tr": float(np.median([r.tr for r in runs])),
                "start_time": float(np.median([float(r.times[0]) for r in runs]))}
    if ephys:
        sampling["sfreq"] = float(runs[0].sfreq)
        design = {"kind": "trf_lags", "tmin": cfg.model.tmin, "tmax": cfg.model.tmax, "sfreq": float(runs[0].sfreq)}
    else:
        design = {"kind": "fir_delays", "delays": list(cfg.model.delays)}
    words = cfg.dataset.word_timings
    recipe = {
        "format": "neuroflow-encoding-model", "version": RECIPE_VERSION,
        "subject": inputs.subject, "feature_space": inputs.name, "space": inputs.space,
        "feature": inputs.spec.model_dump(mode="json"), "model": _model_record(inputs.spec),
        "model_runtime": inputs.model_runtime,
        "resampling": {"method": method, "lanczos_window": cfg.model.lanczos_window},
        "design": design, "zscore": ZSCORE_RULE, "sampling": sampling,
        "word_timings": {"format": words.format, "tier": words.tier, "offset": words.offset,
                         "bad_rows": words.bad_rows, "words_per_second": inputs.words_per_second},
        "runs": [{"label": r.label, "story": str(r.story), "n_samples": int(len(r.times)),
                  "start_time": float(r.times[0]), "tr": float(r.tr),
                  "role": "test" if test.size and np.isin(i, run_of[test]) else "train"}
                 for i, r in enumerate(runs)],
        "trained_on": [runs[i].label for i in np.unique(run_of[train])],
        "held_out": [runs[i].label for i in np.unique(run_of[test])] if test.size else [],
        "training": trained, "ridge": "one alpha per target, unpenalised intercept, features centred on the "
                                      "training rows (himalaya's Ridge with fit_intercept)",
        "n_features": int(weights.shape[0]), "n_dims": int(f_mean.shape[1]),
        "weights_dtype": cfg.publish.models_dtype, "targets": layout,
    }
    return arrays, recipe


def encode_model(arrays: dict[str, np.ndarray], recipe: dict[str, Any]) -> bytes:
    """The safetensors bytes of a model (the recipe in its metadata)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                metadata={"recipe": json.dumps(recipe, sort_keys=True)})


def read_model_bytes(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and recipe of a published model file; :class:`IntegrityError` naming ``where`` if unreadable."""
    from safetensors.numpy import load

    try:
        arrays = load(data)
        # the header: 8 bytes of little-endian length, then JSON whose "__metadata__" holds the recipe
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
        recipe = json.loads(meta["recipe"])
    except Exception as err:  # noqa: BLE001 - any decoding failure is the same fault: a bad file
        raise IntegrityError(f"{where}: not a readable neuroflow model (safetensors with a recipe): {err}; "
                             "download it again or republish the analysis") from err
    if not isinstance(recipe, dict):
        raise IntegrityError(f"{where}: the model's recipe is not a JSON object; republish the analysis")
    if recipe.get("format") != "neuroflow-encoding-model" or recipe.get("version") != RECIPE_VERSION:
        raise IntegrityError(f"{where}: model recipe format {recipe.get('format')!r} version "
                             f"{recipe.get('version')!r} is not one this neuroflow reads (version {RECIPE_VERSION})")
    return arrays, recipe


def write_model(cfg: Any, store: Any, folder_rel: str, inputs: ModelInputs) -> dict[str, Any]:
    """Build one model and store it under ``folder_rel`` (the subject's work area); return its record."""
    arrays, recipe = build_model(cfg, inputs)
    body = encode_model(arrays, recipe)
    rel = f"{folder_rel}/{inputs.name}-{sha256_bytes(body)[:16]}.safetensors"
    if not store.exists(rel):
        store.put_bytes(body, rel, content_type="application/octet-stream")
    log.info("sub-%s: model of %s stored (%d bytes, %s)", inputs.subject, inputs.name, len(body),
             cfg.publish.models_dtype)
    return {"rel": rel, "feature_space": inputs.name, "bytes": len(body)}


def model_files(subject: str, task: str, name: str) -> str:
    """The published path of a model: ``sub-{s}/models/sub-{s}_task-{t}_desc-{name}_model.safetensors``."""
    desc = "".join(ch for ch in name if ch.isalnum())
    return f"sub-{subject}/models/sub-{subject}_task-{task}_desc-{desc}_model.safetensors"


def model_artifacts(cfg: Any, fit: dict, store: Any, out_dir: Path) -> list[dict[str, Any]]:
    """Copy a subject's models from the work area into the staging folder; their artifact records.

    Each record carries ``subject``, ``feature_space`` and the model's ``recipe`` (small: no arrays).
    """
    out = []
    for record in fit.get("models", []) if cfg.publish.models else []:
        data = store.get_bytes(record["rel"])
        _, recipe = read_model_bytes(data, record["rel"])
        path = out_dir / model_files(fit["subject"], cfg.dataset.task, record["feature_space"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        recipe.get("targets", {}).pop("target_names", None)  # in the file; the manifest stays small
        out.append({"file": path, "kind": MODEL_KIND, "subject": fit["subject"],
                    "feature_space": record["feature_space"], "recipe": recipe})
    return out
