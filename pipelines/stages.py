"""The analysis stages, as plain functions taking and returning small JSON-able dicts.

``prepare -> extract_features (per feature space) -> fit_subject (per subject) -> publish``.
The command line runs them in-process; the ``neuroflow_encoding`` DAG runs each as a
task. Large arrays live in S3 under the output bucket: feature arrays in the
content-addressed cache ``{output}/_cache/features/``, fit results in
``{output}/_work/{analysis_id}/``; only URIs and small dicts pass between stages.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import AnalysisConfig, LanguageModelFeature, parse_config
from .errors import DatasetError, IntegrityError
from .ingest import Ingest, check_run_timing, check_subjects, load_subject, load_words, open_dataset
from .storage import ResultStore, sha256_file

log = logging.getLogger("neuroflow")

FEATURE_CODE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEUROFLOW_CACHE", Path.home() / ".cache" / "neuroflow")).expanduser()


def _config(config: dict | AnalysisConfig) -> AnalysisConfig:
    return config if isinstance(config, AnalysisConfig) else parse_config(config, origin="config")


def _save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# --- prepare ----------------------------------------------------------------------

def prepare(config: dict | AnalysisConfig, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate the config against the dataset: version, subjects, stimulus, output bucket."""
    cfg = _config(config)
    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    subjects = check_subjects(ingest)
    words = load_words(ingest)
    ResultStore(cfg.output).ensure_bucket()
    return {
        "analysis_id": cfg.analysis_id,
        "config_hash": cfg.config_hash,
        "publish_uri": cfg.publish_prefix,
        "subjects": subjects,
        "feature_spaces": [f.name for f in cfg.features],
        "n_words": int(len(words)),
        "files_read": [r.as_dict() for r in ingest.files_read.values()],
    }


# --- features ---------------------------------------------------------------------

def _model_fingerprint(model: str, revision: str | None) -> str:
    """Content fingerprint of a local model folder (config + weights), or id@revision."""
    path = Path(model)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*")):
            if f.suffix in (".json", ".safetensors", ".txt", ".model"):
                h.update(f.name.encode())
                h.update(sha256_file(f).encode())
        return "dir:" + h.hexdigest()
    return f"hub:{model}@{revision or 'main'}"


def feature_cache_key(cfg: AnalysisConfig, feature_name: str, stimulus_sha256: str) -> str:
    """Hash of (stimulus bytes, feature parameters, model content, feature code version)."""
    spec = next(f for f in cfg.features if f.name == feature_name)
    params = spec.model_dump(mode="json")
    params.pop("name")
    params.pop("batch_size", None)
    if isinstance(spec, LanguageModelFeature):
        params["model"] = _model_fingerprint(spec.model, spec.revision)
    blob = json.dumps({"stimulus": stimulus_sha256, "params": params, "code": FEATURE_CODE_VERSION,
                       "tier": cfg.dataset.word_timings.tier}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def compute_word_features(spec, words) -> np.ndarray:
    """Word-level features (n_words, n_dims) of one feature space."""
    if spec.kind == "word_rate":
        from .features.word_rate import word_rate_values

        return word_rate_values(len(words))
    from .features.language_model import extract_word_features

    out = extract_word_features(list(words["word"]), spec.model, [spec.layer], spec.context_words,
                                revision=spec.revision, batch_size=spec.batch_size, pooling=spec.pooling)
    return np.asarray(out[spec.layer], dtype=np.float32)


def extract_features(config: dict | AnalysisConfig, feature_name: str, *,
                     cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Word-level features of the task's stimulus for one feature space, content-cached in S3."""
    cfg = _config(config)
    spec = next((f for f in cfg.features if f.name == feature_name), None)
    if spec is None:
        raise DatasetError(f"no feature space {feature_name!r} in the config; it has "
                           f"{[f.name for f in cfg.features]}")
    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    words = load_words(ingest)
    stim_key = cfg.dataset.word_timings.files[cfg.dataset.task]
    stim_sha = ingest.files_read[stim_key].sha256
    key = feature_cache_key(cfg, feature_name, stim_sha)
    rel = f"_cache/features/{key}.npz"
    store = ResultStore(cfg.output)
    computed = False
    if store.exists(rel):
        try:
            cached = _load_npz(store.get_bytes(rel))
            if cached["values"].shape[0] != len(words) or not np.isfinite(cached["values"]).all():
                raise IntegrityError("shape or values do not match")
            log.info("feature %s: reused cache entry %s", feature_name, rel)
        except Exception as err:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
            log.warning("feature %s: cache entry %s is corrupt (%s); recomputing", feature_name, rel, err)
            cached = None
    else:
        cached = None
    if cached is None:
        values = compute_word_features(spec, words)
        if not np.isfinite(values).all():
            raise DatasetError(f"feature {feature_name!r}: the model produced NaN or Inf values")
        store.put_bytes(_save_npz({"values": values.astype(np.float32)}), rel)
        computed = True
        n_dims = int(values.shape[1])
    else:
        n_dims = int(cached["values"].shape[1])
    return {"feature": feature_name, "uri": store.uri_of(rel), "rel": rel, "key": key,
            "computed": computed, "n_words": int(len(words)), "n_dims": n_dims,
            "files_read": [r.as_dict() for r in ingest.files_read.values()]}


# --- fit --------------------------------------------------------------------------

def design_matrix(cfg: AnalysisConfig, word_values: np.ndarray, words, runs) -> np.ndarray:
    """Features aligned to every run's samples, z-scored per run, with FIR delays per run."""
    from .features.align import average_within_tr, lanczos_resample, make_delays
    from .fit import zscore_by_group

    times = ((words["onset"] + words["offset"]) / 2).to_numpy(np.float64)
    blocks = []
    for run in runs:
        if cfg.model.resample == "lanczos":
            blocks.append(lanczos_resample(word_values, times, run.times, window=cfg.model.lanczos_window))
        else:
            blocks.append(average_within_tr(word_values, times, run.times, run.tr))
    lengths = [len(r.times) for r in runs]
    X = np.concatenate(blocks).astype(np.float32)
    X = zscore_by_group(X, np.repeat(np.arange(len(runs)), lengths))
    return make_delays(X, lengths, cfg.model.delays)


def cv_groups(cfg: AnalysisConfig, lengths: list[int], subject: str) -> tuple[np.ndarray, int]:
    """Fold labels per sample and the gap (samples) kept between test and training data."""
    if cfg.model.cv == "leave_one_run_out":
        if len(lengths) < 3:
            raise DatasetError(
                f"sub-{subject} has {len(lengths)} run(s) of task {cfg.dataset.task!r}; leave-one-run-out "
                "needs at least 3. Set 'model.cv: contiguous_blocks' (with 'model.n_folds')"
            )
        return np.repeat(np.arange(len(lengths)), lengths), 0
    n = sum(lengths)
    block = n // cfg.model.n_folds
    longest = max(abs(d) for d in cfg.model.delays)
    if block <= 2 * longest:
        raise DatasetError(
            f"sub-{subject}: {n} samples in {cfg.model.n_folds} blocks of {block} are too short for delays "
            f"up to {longest} (each block must be longer than twice the longest delay); lower "
            "'model.n_folds' or 'model.delays'"
        )
    edges = np.linspace(0, n, cfg.model.n_folds + 1).round().astype(int)
    groups = np.zeros(n, dtype=int)
    for k in range(cfg.model.n_folds):
        groups[edges[k]:edges[k + 1]] = k
    return groups, max(abs(d) for d in cfg.model.delays)


def summarize(r: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    good = r[valid & np.isfinite(r)]
    if good.size == 0:
        return {"mean_r": None, "median_r": None, "max_r": None, "n_targets": int(r.size), "n_valid": 0}
    return {"mean_r": round(float(good.mean()), 6), "median_r": round(float(np.median(good)), 6),
            "max_r": round(float(good.max()), 6), "n_targets": int(r.size), "n_valid": int(valid.sum())}


def fit_subject(config: dict | AnalysisConfig, subject: str, features: list[dict[str, Any]], *,
                cache_dir: str | Path | None = None, client=None) -> dict[str, Any]:
    """Fit one subject's encoding models (one per feature space) and store the scores.

    Results go to ``{output}/_work/{analysis_id}/sub-{subject}/results.npz``; a result
    already there for the same inputs is reused (a retry never recomputes finished work).
    """
    cfg = _config(config)
    from .compute import get_client
    from .fit import fit_encoding, zscore_by_group

    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    store = ResultStore(cfg.output)
    responses = load_subject(ingest, subject)
    words = load_words(ingest)
    for run in responses.runs:
        check_run_timing(run, words, subject)
    inputs_key = hashlib.sha256(json.dumps(
        {"config": cfg.config_hash, "features": sorted(f["key"] for f in features),
         "files": sorted(r.sha256 for r in ingest.files_read.values())}, sort_keys=True).encode()).hexdigest()[:16]
    base = f"_work/{cfg.analysis_id}/sub-{subject}"
    rel = f"{base}/results-{inputs_key}.npz"
    meta_rel = f"{base}/results-{inputs_key}.json"
    if store.exists(meta_rel) and store.exists(rel):  # the metadata is written last: the fit is whole
        meta = json.loads(store.get_bytes(meta_rel))
        log.info("sub-%s: reusing finished fit %s", subject, rel)
        meta["reused"] = True
        return meta

    lengths = [len(r.times) for r in responses.runs]
    Y = np.concatenate([r.data for r in responses.runs]).astype(np.float32)
    run_ids = np.repeat(np.arange(len(lengths)), lengths)
    finite = np.isfinite(Y).all(axis=0)
    Y = np.where(np.isfinite(Y), Y, 0.0).astype(np.float32)
    Y = zscore_by_group(Y, run_ids)
    Y[:, ~finite] = np.nan  # NaN/Inf targets are reported invalid by the fit, never fitted
    groups, gap = cv_groups(cfg, lengths, subject)
    if client is None:
        client = get_client(cfg.compute.dask, cfg.compute.n_workers) if Y.shape[1] > 64 else None

    arrays: dict[str, np.ndarray] = {"target_names": np.asarray(responses.target_names, dtype=str)}
    metrics: dict[str, Any] = {}
    backend = ""
    for feat in sorted(features, key=lambda f: f["feature"]):
        values = _load_npz(store.get_bytes(feat["rel"]))["values"]
        if values.shape[0] != len(words):
            raise IntegrityError(f"{feat['uri']}: {values.shape[0]} rows for {len(words)} words; "
                                 "the feature cache entry does not match the stimulus")
        X = design_matrix(cfg, values, words, responses.runs)
        log.info("sub-%s: fitting %s (%d samples x %d features -> %d targets)", subject, feat["feature"],
                 X.shape[0], X.shape[1], Y.shape[1])
        result = fit_encoding(X, Y, groups, cfg.model.alphas, backend=cfg.compute.backend, gap=gap,
                              client=client)
        backend = result.backend
        name = feat["feature"]
        arrays[f"{name}__r"] = result.r.astype(np.float32)
        arrays[f"{name}__r2"] = result.r2.astype(np.float32)
        arrays[f"{name}__alpha"] = result.alpha.astype(np.float32)
        arrays[f"{name}__valid"] = result.valid
        metrics[name] = summarize(result.r, result.valid)
    if responses.mask_img is not None:
        import nibabel as nib

        with tempfile.TemporaryDirectory() as tmp:
            mpath = Path(tmp) / "mask.nii.gz"
            nib.save(responses.mask_img, mpath)
            store.put_file(mpath, f"{base}/mask-{inputs_key}.nii.gz")
    store.put_bytes(_save_npz(arrays), rel)
    meta = {
        "subject": subject, "status": "ok", "kind": responses.kind, "space": responses.space,
        "simulated": responses.simulated, "n_samples": int(sum(lengths)), "n_runs": len(lengths),
        "n_targets": int(Y.shape[1]), "n_invalid_targets": int((~finite).sum()),
        "result_rel": rel, "mask_rel": f"{base}/mask-{inputs_key}.nii.gz" if responses.mask_img is not None else None,
        "metrics": metrics, "backend": backend, "reused": False,
        "files_read": [r.as_dict() for r in ingest.files_read.values()],
    }
    store.put_bytes(json.dumps(meta, sort_keys=True).encode(), meta_rel, content_type="application/json")
    return meta


def failed_fit(subject: str, error: Exception | str) -> dict[str, Any]:
    """The record of a subject whose fit failed, for a partial manifest."""
    return {"subject": subject, "status": "failed", "error": str(error)[:1000], "metrics": {}}


# --- publish ----------------------------------------------------------------------

def publish_from_config(config: dict | AnalysisConfig, prepared: dict, features: list[dict], fits: list[dict], *,
                        cache_dir: str | Path | None = None, airflow_run_id: str | None = None) -> dict[str, Any]:
    """Render maps and report, upload them verified, write the manifest last."""
    from .publish import publish

    cfg = _config(config)
    local_dir = Path(cache_dir or default_cache_dir()) / "published" / cfg.analysis_id
    return publish(cfg, prepared, features, fits, local_dir=local_dir, airflow_run_id=airflow_run_id)
