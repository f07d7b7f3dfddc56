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

from . import flatmap
from .config import AnalysisConfig, parse_config
from .errors import DatasetError, FitError, IntegrityError, NeuroflowError
from .features.registry import KINDS, FeatureResult, ModelCache, Stimulus, align_to_samples, cache_key, compute_feature
from .ingest import (Ingest, Run, check_run_timing, check_subjects, find_runs, load_run_words, load_subject,
                     open_dataset, plan_runs, word_timing_key)
from .progress import Progress
from .publish import check_output_place
from .storage import ResultStore

log = logging.getLogger("neuroflow")

FEATURE_CODE_VERSION = "2"
FIT_CODE_VERSION = "1"


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


# --- stimuli ----------------------------------------------------------------------

def _sha_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_stimulus(ingest: Ingest, run: Run, needs: tuple[str, ...] | set[str]) -> tuple[Stimulus, str]:
    """What ``run`` heard, on its clock, and a hash of the parts ``needs`` names.

    ``words`` are the run's word timings (:func:`pipelines.ingest.load_run_words`); ``audio`` is
    ``stimuli/<stim_file>`` of the run's events.tsv, starting at the events' onset (plus
    ``word_timings.offset``); ``textgrid`` is the story's TextGrid (phone tier), shifted as its
    words are; ``events`` is the run's events.tsv. The hash covers only what ``needs`` names, so
    a story heard in several runs, sessions or subjects on the same clock is extracted once.
    """
    w = ingest.words
    words = load_run_words(ingest, run)
    shift = w.offset + (float(run.meta.get("stimulus_onset", 0.0)) if w.onset_from_events else 0.0)
    parts: dict[str, Any] = {}
    audio = textgrid = events = None
    offset = shift
    if "words" in needs:
        table = words[["word", "onset", "offset"]]
        parts["words"] = _sha_bytes(json.dumps([[str(a), round(float(b), 4), round(float(c), 4)]
                                                for a, b, c in table.itertuples(index=False)]).encode())
    if "textgrid" in needs:
        if w.format != "textgrid":
            raise DatasetError(f"{run.key}: a phone-based feature needs TextGrid word timings; "
                               f"'dataset.word_timings.format' is {w.format!r}: drop the feature or use TextGrids")
        key = word_timing_key(ingest, run.story, run.task, None, run.session, None)
        textgrid = ingest.fetch(key)
        parts["textgrid"] = ingest.files_read[key].sha256
    if "audio" in needs:
        stim_file = run.meta.get("stimulus_file")
        key = f"stimuli/{stim_file}" if stim_file else None
        if key is None or key not in ingest.listing:
            raise DatasetError(f"{run.key}: an audio feature needs the run's sound: its events.tsv names "
                               f"{stim_file!r}, and {key or 'stimuli/<stim_file>'} is not in the dataset; "
                               "drop the audio feature or add the stimulus to the dataset")
        audio = ingest.fetch(key)
        offset = w.offset + float(run.meta.get("stimulus_onset", 0.0))
        parts["audio"] = ingest.files_read[key].sha256
    if "events" in needs:
        if run.events_key is None:
            raise DatasetError(f"{run.key}: an events feature needs the run's events.tsv, which it does not have; "
                               "drop the feature or add the events")
        events = ingest.fetch(run.events_key)
        parts["events"] = ingest.files_read[run.events_key].sha256
    if "audio" in needs or "textgrid" in needs:
        parts["offset"] = round(offset, 6)
    stim = Stimulus(words=words, audio=audio, textgrid=textgrid, events=events, offset=offset)
    return stim, _sha_bytes(json.dumps(parts, sort_keys=True).encode())


def _feature_spec(cfg: AnalysisConfig, feature_name: str):
    spec = next((f for f in cfg.features if f.name == feature_name), None)
    if spec is None:
        raise DatasetError(f"no feature space {feature_name!r} in the config; it has "
                           f"{[f.name for f in cfg.features]}")
    return spec


def write_entry(store: ResultStore, data: bytes, rel: str) -> None:
    """Write a content-keyed cache or work entry once.

    A concurrent writer of the same key writes the same content (the key hashes the inputs), so
    when one is already there our write is dropped (conditional create) rather than racing its
    read-back check; a corrupt entry found earlier is overwritten.
    """
    if store.exists(rel):
        store.put_bytes(data, rel)  # only reached for an entry found corrupt and recomputed
    else:
        store.create_bytes(data, rel)


def _read_feature_cache(store: ResultStore, rel: str, feature_name: str) -> FeatureResult | None:
    """A verified cache entry, or None (missing or corrupt: then it is recomputed)."""
    if not store.exists(rel):
        return None
    try:
        result = FeatureResult.from_arrays(_load_npz(store.get_bytes(rel)))
        for arr in result.values.values():
            if arr.ndim != 2 or arr.shape[0] != result.times.shape[0] or not np.isfinite(arr).all():
                raise IntegrityError("shape or values do not match")
        log.info("feature %s: reused cache entry %s", feature_name, rel)
        return result
    except Exception as err:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
        log.warning("feature %s: cache entry %s is corrupt (%s); recomputing", feature_name, rel, err)
        return None


def stimulus_features(store: ResultStore, spec, stim: Stimulus, stim_sha: str, *,
                      models: ModelCache | None = None) -> tuple[FeatureResult, bool, str]:
    """(result, computed, cache rel) of one feature space on one stimulus, from the content cache."""
    key = cache_key(spec, stim_sha, extra={"neuroflow_features": FEATURE_CODE_VERSION})
    rel = f"_cache/features/{key}.npz"
    cached = _read_feature_cache(store, rel, spec.name)
    if cached is not None:
        return cached, False, rel
    result = compute_feature(spec, stim, models=models)
    write_entry(store, _save_npz(result.to_arrays()), rel)
    return result, True, rel


# --- prepare ----------------------------------------------------------------------

def prepare(config: dict | AnalysisConfig, *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Validate the config against the dataset: version, subjects, runs, word timings, output bucket
    (and, with ``maps.pycortex``, each subject's pycortex database)."""
    cfg = _config(config)
    check_output_place(cfg)  # never write into the dataset or into another analysis' folder
    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    subjects = check_subjects(ingest)
    stories: dict[str, int] = {}
    problems: dict[str, str] = {}
    flatmaps = flatmap.enabled(cfg)
    for subject in subjects:
        try:
            for run in plan_runs(ingest, subject):
                stories[str(run.story)] = int(len(load_run_words(ingest, run)))
            if flatmaps:
                flatmap.check_database(ingest, subject, find_runs(ingest, subject)[0])
        except Exception as err:  # noqa: BLE001 - reported as this subject's failure by its fit; the others go on
            problems[subject] = str(as_subject_error(subject, err))
    if problems and len(problems) == len(subjects):
        raise DatasetError(next(iter(problems.values())))
    ResultStore(cfg.output).ensure_bucket()
    return {
        "analysis_id": cfg.analysis_id,
        "config_hash": cfg.config_hash,
        "publish_uri": cfg.publish_prefix,
        "subjects": subjects,
        "feature_spaces": [f.name for f in cfg.features],
        "stories": stories,
        "n_words": int(sum(stories.values())),
        "subject_problems": problems,
        "files_read": [r.as_dict() for r in ingest.files_read.values()],
    }


# --- features ---------------------------------------------------------------------

def extract_features(config: dict | AnalysisConfig, feature_name: str, *,
                     cache_dir: str | Path | None = None) -> dict[str, Any]:
    """One feature space on every distinct stimulus of the analysis, content-cached in S3.

    Returns the cache entries by stimulus hash; ``computed`` says whether anything was
    computed (a re-run of the same analysis computes nothing).
    """
    cfg = _config(config)
    spec = _feature_spec(cfg, feature_name)
    needs = KINDS[spec.kind].needs
    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    store = ResultStore(cfg.output)
    models = ModelCache()
    entries: dict[str, str] = {}
    spaces: set[str] = set()
    n_computed = 0
    subjects = check_subjects(ingest)
    progress = Progress(len(subjects), f"features {feature_name}: subjects' stimuli", unit="subjects")
    for subject in subjects:
        progress.update(detail=f"sub-{subject}, {n_computed} computed")
        try:
            runs = plan_runs(ingest, subject)
        except Exception as err:  # noqa: BLE001
            err = as_subject_error(subject, err)  # this subject's fit reports it; the others' features are still needed
            log.warning("feature %s: skipping sub-%s: %s", feature_name, subject, err)
            continue
        for run in runs:
            try:
                stim, sha = run_stimulus(ingest, run, needs)
            except Exception as err:  # noqa: BLE001
                err = as_subject_error(subject, err)
                log.warning("feature %s: skipping sub-%s run %s: %s", feature_name, subject, run.label, err)
                continue
            if sha in entries:
                continue
            result, computed, rel = stimulus_features(store, spec, stim, sha, models=models)
            entries[sha] = rel
            spaces.update(result.values)
            n_computed += int(computed)
    models.clear()
    progress.close()
    key = _sha_bytes(json.dumps(sorted(entries.values())).encode())[:24]
    return {"feature": feature_name, "kind": spec.kind, "key": key, "entries": entries, "spaces": sorted(spaces),
            "computed": n_computed > 0, "n_computed": n_computed, "n_stimuli": len(entries),
            "files_read": [r.as_dict() for r in ingest.files_read.values()]}


# --- fit --------------------------------------------------------------------------

def is_ephys(runs: list[Run]) -> bool:
    """MEG / EEG / iEEG runs (sampled faster than 4 Hz), aligned by samples and TRF lags."""
    return min(r.tr for r in runs) < 0.25


def aligned_features(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str) -> np.ndarray:
    """One space of a feature on every run's samples (Lanczos / TR average for fMRI, the response
    rate for MEG / EEG / iEEG), runs concatenated, z-scored per run."""
    from .fit import zscore_by_group

    method = "samples" if is_ephys(runs) else cfg.model.resample
    blocks = [align_to_samples(result, run.times, method=method, window=cfg.model.lanczos_window, tr=run.tr,
                               space=space) for result, run in zip(results, runs)]
    lengths = [len(r.times) for r in runs]
    return zscore_by_group(np.concatenate(blocks).astype(np.float32), np.repeat(np.arange(len(runs)), lengths))


def design_matrix(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str) -> np.ndarray:
    """One space of a feature on every run's samples, z-scored per run, then FIR-delayed (fMRI) or
    TRF-lagged from ``model.tmin`` to ``model.tmax`` (MEG / EEG / iEEG), never across runs."""
    from .features.align import make_delays
    from .features.lags import trf_design

    lengths = [len(r.times) for r in runs]
    X = aligned_features(cfg, results, runs, space)
    if is_ephys(runs):
        X, _ = trf_design(X, lengths, runs[0].sfreq, cfg.model.tmin, cfg.model.tmax)
    else:
        X = make_delays(X, lengths, cfg.model.delays)
    return np.asarray(X, dtype=np.float32)


def longest_lag(cfg: AnalysisConfig, runs: list[Run]) -> int:
    """The longest delay or TRF lag, in samples."""
    if is_ephys(runs):
        sfreq = runs[0].sfreq
        return int(max(abs(round(cfg.model.tmin * sfreq)), abs(round(cfg.model.tmax * sfreq))))
    return max(abs(d) for d in cfg.model.delays)


def cv_groups(cfg: AnalysisConfig, lengths: list[int], subject: str, longest: int | None = None
              ) -> tuple[np.ndarray, int]:
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
    longest = max(abs(d) for d in cfg.model.delays) if longest is None else longest
    if block <= 2 * longest:
        raise DatasetError(
            f"sub-{subject}: {n} samples in {cfg.model.n_folds} blocks of {block} are too short for delays "
            f"up to {longest} samples (each block must be longer than twice the longest delay); lower "
            "'model.n_folds' or 'model.delays' / 'model.tmax'"
        )
    edges = np.linspace(0, n, cfg.model.n_folds + 1).round().astype(int)
    groups = np.zeros(n, dtype=int)
    for k in range(cfg.model.n_folds):
        groups[edges[k]:edges[k + 1]] = k
    return groups, longest


def summarize(r: np.ndarray, valid: np.ndarray) -> dict[str, Any]:
    good = r[valid & np.isfinite(r)]
    if good.size == 0:
        return {"mean_r": None, "median_r": None, "max_r": None, "n_targets": int(r.size), "n_valid": 0}
    return {"mean_r": round(float(good.mean()), 6), "median_r": round(float(np.median(good)), 6),
            "max_r": round(float(good.max()), 6), "n_targets": int(r.size), "n_valid": int(valid.sum())}


def responses_key(ingest: Ingest) -> str:
    """Content key of a subject's responses: every file read as (key, sha256) and the options they were read with.

    Keys are paired with their digests (a sorted list of digests alone is the same for two datasets whose
    files are swapped between runs), and ``dataset.responses`` (band, trim, repeats, ...) changes the arrays
    read from the same bytes. The source's URI is no part of it: identical content shares one fit.
    """
    files = sorted((key, rec.sha256) for key, rec in ingest.files_read.items())
    options = ingest.responses.model_dump()
    return _sha_bytes(json.dumps({"files": files, "options": options}, sort_keys=True, default=str).encode())


def fit_key(cfg: AnalysisConfig, subject: str, responses_sha: str, feature_rels: list[str], space: str) -> str:
    """Content key of one (subject, feature space) fit: its inputs and the model settings only.

    The analysis name, the other feature spaces and the output place are not part of it,
    so changing one feature space refits that one alone.
    """
    model = cfg.model.model_dump(mode="json")
    blob = json.dumps({"subject": subject, "responses": responses_sha, "features": feature_rels, "space": space,
                       "model": model, "code": FIT_CODE_VERSION}, sort_keys=True)
    return _sha_bytes(blob.encode())[:24]


FIT_ARRAYS = ("r", "r2", "alpha", "valid", "p", "q", "significant", "lag_weights", "lag_times")


def _read_fit_cache(store: ResultStore, rel: str, n_targets: int) -> dict[str, np.ndarray] | None:
    if not store.exists(rel):
        return None
    try:
        arrays = _load_npz(store.get_bytes(rel))
        if any(arrays[k].shape != (n_targets,) for k in ("r", "r2", "alpha", "valid")):
            raise IntegrityError("shape does not match")
        return arrays
    except Exception as err:  # noqa: BLE001 - a corrupt fit cache entry is refitted, never trusted
        log.warning("fit cache entry %s is corrupt (%s); refitting", rel, err)
        return None


def fit_subject(config: dict | AnalysisConfig, subject: str, features: list[dict[str, Any]], *,
                cache_dir: str | Path | None = None, client=None) -> dict[str, Any]:
    """Fit one subject's encoding models (one per feature space and layer) and store the scores.

    Each (feature space, layer) fit is cached by content under ``{output}/_cache/fits/``; the
    subject's results go to ``{output}/_work/{analysis_id}/sub-{subject}/``, metadata last, so
    a retry or re-run never recomputes finished work.
    """
    cfg = _config(config)
    from .compute import get_client
    from .fit import fit_encoding, zscore_by_group

    ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    store = ResultStore(cfg.output)
    responses = load_subject(ingest, subject)
    for run in responses.runs:
        check_run_timing(run, load_run_words(ingest, run), subject)
    responses_sha = responses_key(ingest)
    inputs_key = hashlib.sha256(json.dumps(
        {"config": cfg.config_hash, "features": sorted(f["key"] for f in features), "files": responses_sha},
        sort_keys=True).encode()).hexdigest()[:16]
    base = f"_work/{cfg.analysis_id}/sub-{subject}"
    rel = f"{base}/results-{inputs_key}.npz"
    meta_rel = f"{base}/results-{inputs_key}.json"
    if flatmap.enabled(cfg):  # after responses_sha: the pycortex files are no part of the fit's cache key
        flatmap.check_responses(ingest, subject, responses)
    if store.exists(meta_rel) and store.exists(rel):  # the metadata is written last: the fit is whole
        meta = json.loads(store.get_bytes(meta_rel))
        log.info("sub-%s: reusing finished fit %s", subject, rel)
        meta["reused"] = True
        meta["computed_features"] = []
        return meta

    runs = responses.runs
    lengths = [len(r.times) for r in runs]
    Y = np.concatenate([r.data for r in runs]).astype(np.float32)
    run_ids = np.repeat(np.arange(len(lengths)), lengths)
    finite = np.isfinite(Y).all(axis=0)
    Y = np.where(np.isfinite(Y), Y, 0.0).astype(np.float32)
    Y = zscore_by_group(Y, run_ids)
    constant = finite & ~(np.abs(Y).sum(axis=0) > 0)
    Y[:, ~finite] = np.nan  # NaN/Inf targets are reported invalid by the fit, never fitted
    groups, gap = cv_groups(cfg, lengths, subject, longest_lag(cfg, runs))
    test_groups = None
    if cfg.model.test_stories:
        test_groups = [i for i, r in enumerate(runs) if r.story in cfg.model.test_stories]
        if not test_groups or len(test_groups) == len(runs):
            raise DatasetError(f"sub-{subject}: 'model.test_stories' {cfg.model.test_stories} match "
                               f"{len(test_groups)} of its {len(runs)} runs (stories "
                               f"{sorted({str(r.story) for r in runs})}); name stories it heard, not all of them")

    arrays: dict[str, np.ndarray] = {"target_names": np.asarray(responses.target_names, dtype=str)}
    if responses.target_info is not None:  # hemisphere/vertex of surfaces, channel type and coordinates
        for col in responses.target_info.columns:
            values = responses.target_info[col].to_numpy()
            numeric = values.dtype.kind in "biuf"
            arrays[f"info__{col}"] = values.astype(np.float64) if numeric else values.astype(str)
    metrics: dict[str, Any] = {}
    computed_features: list[str] = []
    backend = ""
    models = ModelCache()
    progress = Progress(len(features), f"sub-{subject} fits", unit="feature spaces")
    bands: list[tuple[str, list[FeatureResult], str, list[str]]] = []
    for feat in sorted(features, key=lambda f: f["feature"]):
        progress.update(detail=feat["feature"])
        spec = _feature_spec(cfg, feat["feature"])
        results, rels = [], []
        for run in runs:
            stim, sha = run_stimulus(ingest, run, KINDS[spec.kind].needs)
            if sha in feat.get("entries", {}):
                cached = _read_feature_cache(store, feat["entries"][sha], spec.name)
            else:
                cached = None
            if cached is None:  # not extracted (or the entry went bad): computed here, cached for later
                cached, _, entry_rel = stimulus_features(store, spec, stim, sha, models=models)
            else:
                entry_rel = feat["entries"][sha]
            results.append(cached)
            rels.append(entry_rel)
        spaces = sorted(results[0].values)
        for space in spaces:
            name = spec.name if space == "values" else f"{spec.name}_{space}"
            if cfg.model.kind == "banded_ridge":  # fitted jointly below, one band per space
                bands.append((name, results, space, rels))
                continue
            key = fit_key(cfg, subject, responses_sha, rels, space)
            cache_rel = f"_cache/fits/sub-{subject}/{key}.npz"
            fitted = _read_fit_cache(store, cache_rel, Y.shape[1])
            if fitted is None:
                X = design_matrix(cfg, results, runs, space)
                if client is None and Y.shape[1] > 64:
                    client = get_client(cfg.compute.dask, cfg.compute.n_workers)
                log.info("sub-%s: fitting %s (%d samples x %d features -> %d targets)", subject, name,
                         X.shape[0], X.shape[1], Y.shape[1])
                result = fit_encoding(X, Y, groups, cfg.model.alphas, backend=cfg.compute.backend, gap=gap,
                                      client=client, test_groups=test_groups)
                backend = result.backend
                fitted = {"r": result.r.astype(np.float32), "r2": result.r2.astype(np.float32),
                          "alpha": result.alpha.astype(np.float32), "valid": result.valid,
                          "backend": np.asarray(result.backend)}
                if cfg.model.permutations > 0:
                    fitted.update(_permutation_maps(cfg, Y, result))
                if is_ephys(runs):
                    fitted.update(_lag_weights(cfg, X, Y, result, runs))
                write_entry(store, _save_npz(fitted), cache_rel)
                computed_features.append(name)
            else:
                log.info("sub-%s: reused fit %s of %s", subject, cache_rel, name)
                backend = backend or str(fitted.get("backend", ""))
            for stat in FIT_ARRAYS:
                if stat in fitted:
                    arrays[f"{name}__{stat}"] = fitted[stat]
            metrics[name] = summarize(fitted["r"], fitted["valid"])
            # significant targets (permutations, BH-FDR 0.05); None when no permutations were asked for
            metrics[name]["n_significant"] = int(fitted["significant"].sum()) if "significant" in fitted else None
            if cfg.decoding.enabled:
                decoded, word_auc = _decode(cfg, results, runs, space, Y, fitted, groups, gap, client,
                                            test_groups)
                arrays[f"{name}__decoding_r"] = decoded.r.astype(np.float32)
                metrics[name]["decoding"] = {**decoded.identification.as_dict(), "word_roc_auc": word_auc,
                                             "mean_r": round(float(np.nanmean(np.where(decoded.valid, decoded.r,
                                                                                       np.nan))), 6)
                                             if decoded.valid.any() else None}
    models.clear()
    progress.close()
    _ceiling_normalised(runs, arrays, metrics)
    if bands:
        if client is None and Y.shape[1] > 64:
            client = get_client(cfg.compute.dask, cfg.compute.n_workers)
        fitted, computed = _fit_banded(cfg, store, subject, responses_sha, bands, runs, Y, groups, gap, client,
                                       test_groups)
        backend = str(fitted.get("backend", ""))
        computed_features += ["banded"] if computed else []
        for stat in FIT_ARRAYS:
            if stat in fitted:
                arrays[f"banded__{stat}"] = fitted[stat]
        metrics["banded"] = summarize(fitted["r"], fitted["valid"])
        metrics["banded"]["n_significant"] = int(fitted["significant"].sum()) if "significant" in fitted else None
        valid = fitted["valid"].astype(bool)
        for i, (name, *_rest) in enumerate(bands):
            arrays[f"{name}__r2split"] = fitted["r2_split"][i]
            share = fitted["r2_split"][i][valid]
            metrics["banded"][f"r2_split_mean:{name}"] = round(float(share.mean()), 6) if share.size else None
    mask_rel = None
    if responses.mask_img is not None:
        import nibabel as nib

        mask_rel = f"{base}/mask-{inputs_key}.nii.gz"
        with tempfile.TemporaryDirectory() as tmp:
            mpath = Path(tmp) / "mask.nii.gz"
            nib.save(responses.mask_img, mpath)
            store.put_file(mpath, mask_rel)
    write_entry(store, _save_npz(arrays), rel)
    meta = {
        "subject": subject, "status": "ok", "kind": responses.kind, "space": responses.space,
        "simulated": responses.simulated, "n_samples": int(sum(lengths)), "n_runs": len(lengths),
        "stories": sorted({str(r.story) for r in runs}),
        "n_targets": int(Y.shape[1]), "n_invalid_targets": int((~finite).sum()),
        "n_constant_targets": int(constant.sum()),
        "result_rel": rel, "mask_rel": mask_rel, "metrics": metrics, "backend": backend, "reused": False,
        "computed_features": sorted(computed_features),
        "files_read": [r.as_dict() for r in ingest.files_read.values()],
    }
    if store.create_bytes(json.dumps(meta, sort_keys=True).encode(), meta_rel, content_type="application/json") is None:
        # the same fit finished concurrently (two identical analyses at once): keep its record
        meta = json.loads(store.get_bytes(meta_rel))
        meta["reused"], meta["computed_features"] = True, []
    return meta


def _ceiling_normalised(runs: list[Run], arrays: dict[str, np.ndarray], metrics: dict[str, Any]) -> None:
    """Add ``<space>__rnorm`` = r / r_max where a run's repeats give a noise ceiling (LeBel's test story).

    The ceiling is that of the repeated story's averaged responses; the score it divides is the
    held-out r over all folds, so it is an estimate of how close the model comes to the ceiling.
    """
    from .stats import normalise_by_ceiling

    ceilings = [r.meta["r_max"] for r in runs if "r_max" in r.meta]
    if not ceilings:
        return
    r_max = np.asarray(ceilings[0], dtype=np.float32)
    arrays["noise_ceiling_r_max"] = r_max
    for key in [k for k in arrays if k.endswith("__r")]:
        name = key[:-3]
        rnorm = normalise_by_ceiling(arrays[key], r_max).astype(np.float32)
        arrays[f"{name}__rnorm"] = rnorm
        finite = rnorm[np.isfinite(rnorm) & arrays[f"{name}__valid"].astype(bool)]
        metrics[name]["mean_r_normalised"] = round(float(finite.mean()), 6) if finite.size else None
        metrics[name]["n_with_ceiling"] = int(finite.size)


def _fit_banded(cfg: AnalysisConfig, store: ResultStore, subject: str, responses_sha: str, bands: list[tuple],
                runs: list[Run], Y: np.ndarray, groups: np.ndarray, gap: int, client,
                test_groups: list[int] | None = None) -> tuple[dict, bool]:
    """Banded ridge over every feature space (one band each), cached by content like single fits."""
    from .fit import fit_banded_encoding

    key = fit_key(cfg, subject, responses_sha, [r for band in bands for r in band[3]],
                  "banded:" + ",".join(f"{name}/{space}" for name, _, space, _ in bands))
    cache_rel = f"_cache/fits/sub-{subject}/{key}.npz"
    fitted = _read_fit_cache(store, cache_rel, Y.shape[1])
    if fitted is not None and "r2_split" in fitted:
        return fitted, False
    Xs = {name: design_matrix(cfg, results, runs, space) for name, results, space, _ in bands}
    log.info("sub-%s: fitting banded ridge over %s (%d samples -> %d targets)", subject, list(Xs), Y.shape[0],
             Y.shape[1])
    result = fit_banded_encoding(Xs, Y, groups, cfg.model.alphas, n_iter=cfg.model.n_iter,
                                 backend=cfg.compute.backend, gap=gap, client=client, test_groups=test_groups)
    fitted = {"r": result.r.astype(np.float32), "r2": result.r2.astype(np.float32),
              "alpha": result.alpha.astype(np.float32), "valid": result.valid,
              "r2_split": np.asarray(result.r2_split, dtype=np.float32), "backend": np.asarray(result.backend)}
    if cfg.model.permutations > 0:
        fitted.update(_permutation_maps(cfg, Y, result))
    write_entry(store, _save_npz(fitted), cache_rel)
    return fitted, True


def _lag_weights(cfg: AnalysisConfig, X: np.ndarray, Y: np.ndarray, result, runs: list[Run]) -> dict[str, np.ndarray]:
    """The TRF's weight per lag and target: the norm over features of the ridge weights at that lag.

    Weights come from a refit on all samples with each target's alpha rounded to the grid
    (targets sharing an alpha are fitted together); ``lag_times`` are the lags in seconds.
    """
    from .features.lags import lag_samples
    from .fit import fit_ridge_fixed_alpha

    sfreq = runs[0].sfreq
    lags = lag_samples(cfg.model.tmin, cfg.model.tmax, sfreq)
    grid = np.asarray(cfg.model.alphas, dtype=np.float64)
    valid = result.valid & np.isfinite(result.alpha)
    nearest = np.full(Y.shape[1], -1)
    nearest[valid] = np.abs(np.log(grid)[None, :] - np.log(result.alpha[valid].astype(np.float64))[:, None]).argmin(1)
    weights = np.full((lags.size, Y.shape[1]), np.nan, dtype=np.float32)
    for k in np.unique(nearest[valid]):
        cols = np.flatnonzero(nearest == k)
        coef = fit_ridge_fixed_alpha(X, Y[:, cols], float(grid[k]), backend=cfg.compute.backend)
        weights[:, cols] = np.linalg.norm(coef.reshape(lags.size, -1, cols.size), axis=1)
    return {"lag_weights": weights, "lag_times": (lags / sfreq).astype(np.float32)}


def _decode(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str, Y: np.ndarray,
            fitted: dict[str, np.ndarray], groups: np.ndarray, gap: int, client,
            test_groups: list[int] | None = None):
    """A decoder of one feature space from the responses best predicted by its encoding model.

    The decoder reads the ``decoding.max_targets`` valid targets of highest encoding r (chosen
    on held-out data of the same folds, so identification is slightly optimistic when targets are
    many; every target when they are fewer), at ``decoding.delays`` samples after each sample.
    """
    from .decoding import decoding_design, fit_decoding

    lengths = [len(r.times) for r in runs]
    F = aligned_features(cfg, results, runs, space)
    valid = fitted["valid"].astype(bool) & np.isfinite(Y).all(axis=0)
    order = np.argsort(-np.where(valid, fitted["r"], -np.inf), kind="stable")[:cfg.decoding.max_targets]
    order = order[valid[order]]
    if order.size == 0:
        raise FitError("decoding: no valid target to decode from; disable 'decoding.enabled'")
    X = decoding_design(Y[:, np.sort(order)], lengths, cfg.decoding.delays)
    word_level = is_ephys(runs) and all(res.sampling == "events" for res in results)
    decoded = fit_decoding(X, F, groups, cfg.model.alphas, segment_length=cfg.decoding.segment_length,
                           test_groups=test_groups,
                           backend=cfg.compute.backend, gap=max(gap, max(abs(d) for d in cfg.decoding.delays)
                                                                if cfg.model.cv != "leave_one_run_out" else 0),
                           client=client, return_predictions=word_level)
    word_auc = None
    if word_level:  # MEG / ECoG: does the decoder tell the samples where a word falls from the others?
        from .decoding import roc_auc

        raw = np.concatenate([align_to_samples(res, run.times, method="samples", space=space)
                              for res, run in zip(results, runs)])
        held = decoded.sample_fold >= 0
        aucs = roc_auc(raw[held] != 0, decoded.predictions[held])
        word_auc = round(float(np.nanmean(aucs)), 6) if np.isfinite(aucs).any() else None
    return decoded, word_auc


def _permutation_maps(cfg: AnalysisConfig, Y: np.ndarray, result) -> dict[str, np.ndarray]:
    """Block-permutation p-values of the held-out r, and Benjamini-Hochberg FDR at 0.05."""
    from .stats import fdr_bh, permutation_test

    perm = permutation_test(Y, result.predictions, result.sample_fold, n_permutations=cfg.model.permutations,
                            backend=cfg.compute.backend)
    p = np.where(perm.valid, perm.p_values, np.nan).astype(np.float32)
    significant, q = fdr_bh(p, 0.05)
    return {"p": p, "q": np.asarray(q, dtype=np.float32), "significant": np.asarray(significant, dtype=bool)}


SUBJECT_ERRORS = (DatasetError, FitError, IntegrityError)  # a subject's own bad input: others go on


def as_subject_error(subject: str, err: Exception) -> Exception:
    """`err` if it is one of ours; else a DatasetError naming the subject (the cause chained, logged).

    A library raising TypeError/ValueError/MemoryError on one subject's odd file must fail that
    subject alone, with one line, never the whole analysis.
    """
    if isinstance(err, SUBJECT_ERRORS):
        return err
    if isinstance(err, NeuroflowError):
        # a transient S3 outage, a config or model error: the run's problem, not this subject's; the run
        # stops (and a retry resumes) rather than publishing a result with this subject marked failed
        raise err
    log.info("sub-%s: unexpected error", subject, exc_info=err)
    wrapped = DatasetError(f"sub-{subject}: its files could not be read ({type(err).__name__}: "
                           f"{str(err)[:300]}); check them (run with -v for details) or drop the subject")
    wrapped.__cause__ = err
    return wrapped


def failed_fit(subject: str, error: Exception | str) -> dict[str, Any]:
    """The record of a subject whose fit failed, for a partial manifest."""
    return {"subject": subject, "status": "failed", "error": str(error)[:1000], "metrics": {}}


def record_failed_fit(config: dict | AnalysisConfig, subject: str, error: Exception | str) -> dict[str, Any]:
    """Store a subject's failure under the analysis' work prefix, for publish to put in the manifest."""
    cfg = _config(config)
    record = failed_fit(subject, error)
    ResultStore(cfg.output).put_bytes(json.dumps(record, sort_keys=True).encode(),
                                      f"_work/{cfg.analysis_id}/sub-{subject}/failed.json",
                                      content_type="application/json")
    return record


def collect_fits(config: dict | AnalysisConfig, subjects: list[str], fits: list[dict]) -> list[dict]:
    """The fits that finished, plus a failed record for every other subject of the analysis.

    A subject's failure is the one ``record_failed_fit`` stored, else "its fit task failed"
    (e.g. retries exhausted): a subject is never silently left out of the manifest.
    """
    cfg = _config(config)
    store = ResultStore(cfg.output)
    done = {f["subject"]: f for f in fits if f}
    out = []
    for subject in subjects:
        if subject in done:
            out.append(done[subject])
            continue
        rel = f"_work/{cfg.analysis_id}/sub-{subject}/failed.json"
        if store.exists(rel):
            out.append(json.loads(store.get_bytes(rel)))
        else:
            out.append(failed_fit(subject, "its fit_subject task failed (see the task log)"))
    return out


# --- publish ----------------------------------------------------------------------

def publish_from_config(config: dict | AnalysisConfig, prepared: dict, features: list[dict], fits: list[dict], *,
                        cache_dir: str | Path | None = None, airflow_run_id: str | None = None) -> dict[str, Any]:
    """Render maps and report, upload them verified, write the manifest last."""
    from .publish import publish

    cfg = _config(config)
    local_dir = Path(cache_dir or default_cache_dir()) / "published" / cfg.analysis_id
    return publish(cfg, prepared, features, fits, local_dir=local_dir, airflow_run_id=airflow_run_id,
                   cache_dir=cache_dir or default_cache_dir())
