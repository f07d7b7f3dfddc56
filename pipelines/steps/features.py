"""Step 2, features: one feature space on every distinct stimulus of the analysis.

Reads the prepared dataset's runs; writes each (feature space, stimulus) result once to the
content-addressed cache ``{output}/_cache/features/``; returns the entries by stimulus hash.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import default_cache_dir, load_npz, save_npz, sha256_bytes, write_entry, write_entry_file
from ..config import AnalysisConfig, as_config
from ..errors import DatasetError, IntegrityError
from ..features.reduce import PcaFit, apply_pca, fit_pca
from ..features.layer_files import write_npz
from ..features.cache_keys import cache_key
from ..features.registry import (KINDS, FeatureResult, ModelCache, Stimulus, compute_feature,
                                 model_runtime, stream_feature)
from ..ingest import Ingest, Run, check_subjects, load_run_words, open_dataset, plan_runs, word_timing_key
from ..progress import Progress
from ..resultstore import ResultStore, open_store
from .policy import as_subject_error
from .results import FeatureSet

log = logging.getLogger("neuroflow")

FEATURE_CODE_VERSION = "2"
PCA_CODE_VERSION = "1"


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
        parts["words"] = sha256_bytes(json.dumps([[str(a), round(float(b), 4), round(float(c), 4)]
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
    return stim, sha256_bytes(json.dumps(parts, sort_keys=True).encode())


def feature_spec(cfg: AnalysisConfig, feature_name: str):
    spec = next((f for f in cfg.features if f.name == feature_name), None)
    if spec is None:
        raise DatasetError(f"no feature space {feature_name!r} in the config; it has "
                           f"{[f.name for f in cfg.features]}")
    return spec


def read_feature_cache(store: ResultStore, rel: str, feature_name: str) -> FeatureResult | None:
    """A verified cache entry, or None (missing or corrupt: then it is recomputed)."""
    if not store.exists(rel):
        return None
    try:
        result = FeatureResult.from_arrays(load_npz(store.get_bytes(rel)))
        for arr in result.values.values():
            if arr.ndim != 2 or arr.shape[0] != result.times.shape[0] or not np.isfinite(arr).all():
                raise IntegrityError("shape or values do not match")
        log.info("feature %s: reused cache entry %s", feature_name, rel)
        return result
    except Exception as err:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
        log.warning("feature %s: cache entry %s is corrupt (%s); recomputing", feature_name, rel, err)
        return None


def cached_spaces(store: ResultStore, rel: str, feature_name: str, workdir: Path) -> list[str] | None:
    """The spaces of a verified cache entry, checked one space at a time (never every layer in
    memory), or None (missing or corrupt: then it is recomputed)."""
    if not store.exists(rel):
        return None
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = store.download(rel, Path(tmp) / "entry.npz")
            with np.load(path, allow_pickle=False) as npz:
                n_rows = npz["__times"].shape[0]
                spaces = [k for k in npz.files if not k.startswith("__")]
                for space in spaces:
                    arr = npz[space]
                    if arr.ndim != 2 or arr.shape[0] != n_rows or not np.isfinite(arr).all():
                        raise IntegrityError(f"space {space}: shape or values do not match")
                    del arr
        log.info("feature %s: reused cache entry %s", feature_name, rel)
        return spaces
    except Exception as err:  # noqa: BLE001 - a corrupt cache entry is recomputed, never trusted
        log.warning("feature %s: cache entry %s is corrupt (%s); recomputing", feature_name, rel, err)
        return None


def stimulus_features(store: ResultStore, spec, stim: Stimulus, stim_sha: str, *,
                      models: ModelCache | None = None, runtime: dict | None = None,
                      workdir: str | Path | None = None) -> tuple[list[str], bool, str]:
    """(spaces, computed, cache rel) of one feature space on one stimulus, from the content cache.

    ``runtime`` (:func:`pipelines.features.registry.model_runtime`) puts the model's resolved
    dtype, quantization and device into the key. A kind that streams (a language-model layer
    sweep) writes each layer to a file under ``workdir`` as it is computed and uploads the
    entry from disk, so memory holds one batch, never every layer.
    """
    key = cache_key(spec, stim_sha, extra={"neuroflow_features": FEATURE_CODE_VERSION}, runtime=runtime)
    rel = f"_cache/features/{key}.npz"
    workdir = Path(workdir or default_cache_dir())
    workdir.mkdir(parents=True, exist_ok=True)
    if KINDS[spec.kind].streams:
        spaces = cached_spaces(store, rel, spec.name, workdir)
        if spaces is not None:
            return spaces, False, rel
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            (Path(tmp) / "spaces").mkdir()
            meta, files = stream_feature(spec, stim, Path(tmp) / "spaces", models=models)
            write_entry_file(store, write_npz(Path(tmp) / "entry.npz", files, meta.to_arrays()), rel)
            return sorted(files), True, rel
    cached = read_feature_cache(store, rel, spec.name)
    if cached is not None:
        return sorted(cached.values), False, rel
    result = compute_feature(spec, stim, models=models)
    write_entry(store, save_npz(result.to_arrays()), rel)
    return sorted(result.values), True, rel


def _space_of(store: ResultStore, rel: str, space: str, workdir: Path) -> np.ndarray:
    """One space of a cache entry, downloaded to disk first (the other spaces are not read into memory)."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        with np.load(store.download(rel, Path(tmp) / "entry.npz"), allow_pickle=False) as npz:
            return npz[space]


def _read_pca_fits(store: ResultStore, rel: str, spaces: list[str]) -> dict[str, PcaFit] | None:
    """The PCA fits of an earlier run, or None (missing or unreadable: then they are fitted again)."""
    if not store.exists(rel):
        return None
    try:
        arrays = load_npz(store.get_bytes(rel))
        return {sp: PcaFit(mean=arrays[f"{sp}/mean"], components=arrays[f"{sp}/components"],
                           explained=float(arrays[f"{sp}/explained"]), n_rows=int(arrays[f"{sp}/n_rows"]))
                for sp in spaces}
    except Exception as err:  # noqa: BLE001 - a corrupt cache entry is refitted, never trusted
        log.warning("PCA fits %s are unreadable (%s); fitting again", rel, err)
        return None


def reduce_features(store: ResultStore, spec, entries: dict[str, str], train: set[str],
                    spaces: list[str], workdir: str | Path | None = None) -> tuple[dict[str, str], dict[str, dict]]:
    """Replace every space of every entry by its principal components (``spec.pca``).

    The PCA of each space is fitted on the entries of the ``train`` stimuli only (see
    :mod:`pipelines.features.reduce`); every entry is then projected. The fits and the reduced
    entries are content-keyed by the raw entries of the training stimuli and ``spec.pca``, so a
    change to a test stimulus re-projects that stimulus alone and never changes a fit.

    Returns
    -------
    entries : dict[str, str]
        Stimulus sha256 -> reduced cache entry.
    summary : dict[str, dict]
        Per space: ``n_components``, ``explained`` (fraction of the training variance), ``n_rows``.
    """
    what = f"features[{spec.name}].pca"
    workdir = Path(workdir or default_cache_dir())
    workdir.mkdir(parents=True, exist_ok=True)
    fit_key = sha256_bytes(json.dumps({"train": sorted(entries[sha] for sha in train), "pca": spec.pca,
                                       "code": PCA_CODE_VERSION}, sort_keys=True).encode())[:24]
    fits_rel = f"_cache/features/pca-{fit_key}.npz"
    fits = _read_pca_fits(store, fits_rel, spaces)
    if fits is None:
        fits = {}
        for sp in spaces:  # one space at a time: never every layer of every story in memory
            fits[sp] = fit_pca([_space_of(store, entries[sha], sp, workdir) for sha in sorted(train)], spec.pca,
                               what=what)
        arrays = {}
        for sp, fit in fits.items():
            arrays.update({f"{sp}/mean": fit.mean, f"{sp}/components": fit.components,
                           f"{sp}/explained": np.float64(fit.explained), f"{sp}/n_rows": np.int64(fit.n_rows)})
        write_entry(store, save_npz(arrays), fits_rel)
    reduced: dict[str, str] = {}
    for sha, rel in entries.items():
        out_rel = f"_cache/features/pca-{sha256_bytes(f'{fit_key}/{rel}'.encode())[:24]}.npz"
        if read_feature_cache(store, out_rel, spec.name) is None:
            raw = FeatureResult.from_arrays(load_npz(store.get_bytes(rel)))
            raw.values = {sp: apply_pca(raw.values[sp], fits[sp]) for sp in spaces}
            raw.columns = None
            write_entry(store, save_npz(raw.to_arrays()), out_rel)
        reduced[sha] = out_rel
    summary = {sp: {"n_components": int(f.components.shape[0]), "explained": round(f.explained, 6),
                    "n_rows": f.n_rows} for sp, f in fits.items()}
    return reduced, summary


def extract_features(config: dict | AnalysisConfig, feature_name: str, *,
                     cache_dir: str | Path | None = None) -> FeatureSet:
    """One feature space on every distinct stimulus of the analysis, content-cached in S3.

    Returns the cache entries by stimulus hash, the stimulus hash of every run (so that the fit
    never re-derives it) and why a subject or run has none; ``computed`` says whether anything
    was computed (a re-run of the same analysis computes nothing).
    """
    cfg = as_config(config)
    spec = feature_spec(cfg, feature_name)
    needs = KINDS[spec.kind].needs
    cache_dir = Path(cache_dir or default_cache_dir())
    ingest = open_dataset(cfg, cache_dir)
    store = open_store(cfg.output)
    models = ModelCache()
    runtime = model_runtime(spec)  # the model's dtype and device on this worker: cache key and provenance
    entries: dict[str, str] = {}
    by_run: dict[str, str] = {}  # "<subject>/<run label>" -> stimulus sha256: the fit reads it, never re-derives it
    story_of: dict[str, str | None] = {}  # "<subject>/<run label>" -> story (test stories stay out of a PCA)
    problems: dict[str, str] = {}  # "<subject>" or "<subject>/<run label>" -> why it has no features
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
            problems[subject] = str(err)
            continue
        for run in runs:
            try:
                stim, sha = run_stimulus(ingest, run, needs)
            except Exception as err:  # noqa: BLE001
                err = as_subject_error(subject, err)
                log.warning("feature %s: skipping sub-%s run %s: %s", feature_name, subject, run.label, err)
                problems[f"{subject}/{run.label}"] = str(err)
                continue
            by_run[f"{subject}/{run.label}"] = sha
            story_of[f"{subject}/{run.label}"] = run.story
            if sha in entries:
                continue
            names, computed, rel = stimulus_features(store, spec, stim, sha, models=models, runtime=runtime,
                                                     workdir=cache_dir)
            entries[sha] = rel
            spaces.update(names)
            n_computed += int(computed)
    models.clear()
    progress.close()
    pca_summary = None
    if getattr(spec, "pca", None) is not None and entries:
        test = {sha for run_key, sha in by_run.items() if story_of[run_key] in (cfg.model.test_stories or [])}
        entries, pca_summary = reduce_features(store, spec, entries, set(entries) - test, sorted(spaces),
                                               workdir=cache_dir)
        log.info("feature %s: PCA fitted on %d training stimuli, %d held out", feature_name,
                 len(set(entries) - test), len(test))
    key = sha256_bytes(json.dumps(sorted(entries.values())).encode())[:24]
    return {"feature": feature_name, "kind": spec.kind, "key": key, "entries": entries, "runs": by_run,
            "problems": problems, "spaces": sorted(spaces), "model_runtime": runtime, "pca": pca_summary,
            "computed": n_computed > 0, "n_computed": n_computed, "n_stimuli": len(entries),
            "files_read": [r.as_dict() for r in ingest.files_read.values()]}
