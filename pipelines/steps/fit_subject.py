"""Step 3, fit_subject: one subject's encoding models, one per feature space and layer.

Reads the subject's responses and the feature cache entries the features step wrote (it never
computes features: a missing entry is an error naming the feature and the story); writes each
fit to ``{output}/_cache/fits/`` and the subject's results to ``{output}/_work/{analysis_id}/``,
metadata last, so a retry or a re-run never recomputes finished work.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import flatmap
from ..cache import default_cache_dir, load_npz, save_npz, sha256_bytes, write_entry
from ..compute import get_client
from ..config import AnalysisConfig, as_config
from ..decoding import decoding_design, fit_decoding, roc_auc
from ..errors import DatasetError, FitError, IntegrityError
from ..features.align import make_delays
from ..features.lags import lag_samples, trf_design
from ..features.registry import FeatureResult, align_to_samples
from ..fit import fit_banded_encoding, fit_encoding, fit_ridge_fixed_alpha, zscore_by_group
from ..fit.checks import is_stored
from ..limits import memory_budget
from ..models.export import ModelInputs, RunStats, fold_table, write_model
from ..ingest import Ingest, Run, check_run_timing, load_run_words, load_subject, open_dataset
from ..progress import Progress
from ..stats import auto_block_length, choose_permutation_method, fdr_bh, normalise_by_ceiling, permutation_test
from ..resultstore import ResultStore, Store, open_store
from ..fit.chunks import columns
from .feature_entries import FeatureEntries
from .features import feature_spec
from .response_matrix import ResponseMatrix
from .results import FeatureSet, SubjectFit

log = logging.getLogger("neuroflow")

FIT_CODE_VERSION = "1"

#: Targets, evenly spread over the matrix, from which an ``auto`` permutation block length is chosen.
AUTO_BLOCK_TARGETS: int = 4096


def is_ephys(runs: list[Run]) -> bool:
    """MEG / EEG / iEEG runs (sampled faster than 4 Hz), aligned by samples and TRF lags."""
    return min(r.tr for r in runs) < 0.25


def aligned_features(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str) -> np.ndarray:
    """One space of a feature on every run's samples (Lanczos / TR average for fMRI, the response
    rate for MEG / EEG / iEEG), runs concatenated, z-scored per run."""
    method = "samples" if is_ephys(runs) else cfg.model.resample
    blocks = [align_to_samples(result, run.times, method=method, window=cfg.model.lanczos_window, tr=run.tr,
                               space=space) for result, run in zip(results, runs)]
    lengths = [len(r.times) for r in runs]
    return zscore_by_group(np.concatenate(blocks).astype(np.float32), np.repeat(np.arange(len(runs)), lengths))


def design_matrix(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str) -> np.ndarray:
    """One space of a feature on every run's samples, z-scored per run, then FIR-delayed (fMRI) or
    TRF-lagged from ``model.tmin`` to ``model.tmax`` (MEG / EEG / iEEG), never across runs."""
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
    return sha256_bytes(json.dumps({"files": files, "options": options}, sort_keys=True, default=str).encode())


def fit_key(cfg: AnalysisConfig, subject: str, responses_sha: str, feature_rels: list[str], space: str) -> str:
    """Content key of one (subject, feature space) fit: its inputs and the model settings only.

    The analysis name, the other feature spaces and the output place are not part of it,
    so changing one feature space refits that one alone.
    """
    model = cfg.model.model_dump(mode="json")
    blob = json.dumps({"subject": subject, "responses": responses_sha, "features": feature_rels, "space": space,
                       "model": model, "code": FIT_CODE_VERSION}, sort_keys=True)
    return sha256_bytes(blob.encode())[:24]


def permutation_record(fitted: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"permutation_block": "run" | samples}`` for the metrics, where a permutation test ran."""
    if "permutation_block" not in fitted:
        return {}
    block = str(fitted["permutation_block"])
    return {"permutation_block": block if block == "run" else int(block)}


FIT_ARRAYS = ("r", "r2", "alpha", "valid", "p", "q", "significant", "lag_weights", "lag_times")


def read_fit_cache(store: ResultStore, rel: str, n_targets: int) -> dict[str, np.ndarray] | None:
    if not store.exists(rel):
        return None
    try:
        arrays = load_npz(store.get_bytes(rel))
        if any(arrays[k].shape != (n_targets,) for k in ("r", "r2", "alpha", "valid")):
            raise IntegrityError("shape does not match")
        return arrays
    except Exception as err:  # noqa: BLE001 - a corrupt fit cache entry is refitted, never trusted
        log.warning("fit cache entry %s is corrupt (%s); refitting", rel, err)
        return None


@dataclass
class FitInputs:
    """What every fit of a subject shares: its runs, response matrix and folds."""

    ingest: Ingest
    store: Store
    responses: Any
    responses_sha: str
    runs: list[Run]
    lengths: list[int]
    Y: Any
    finite: np.ndarray
    constant: np.ndarray
    groups: np.ndarray
    gap: int
    test_groups: list[int] | None
    matrix: ResponseMatrix
    word_rates: np.ndarray  # words per second of each run (the published model's recipe)

    @property
    def valid(self) -> np.ndarray:
        return self.finite & ~self.constant


def _check_test_stories(cfg: AnalysisConfig, subject: str, runs: list[Run]) -> list[int] | None:
    if not cfg.model.test_stories:
        return None
    test_groups = [i for i, r in enumerate(runs) if r.story in cfg.model.test_stories]
    if not test_groups or len(test_groups) == len(runs):
        raise DatasetError(f"sub-{subject}: 'model.test_stories' {cfg.model.test_stories} match "
                           f"{len(test_groups)} of its {len(runs)} runs (stories "
                           f"{sorted({str(r.story) for r in runs})}); name stories it heard, not all of them")
    return test_groups


def load_fit_inputs(cfg: AnalysisConfig, subject: str, matrix: ResponseMatrix, cache_root: Path,
                    on_run: Callable[[Run], None] | None = None) -> FitInputs:
    """Read a subject's responses into ``matrix`` (or through ``on_run``, which must hand each run to
    ``matrix.add``), check them against the word timings, and make the folds."""
    ingest = open_dataset(cfg, cache_root)
    store = open_store(cfg.output)
    responses = load_subject(ingest, subject, on_run=on_run or matrix.add)
    word_rates = []
    for run in responses.runs:
        run_words = load_run_words(ingest, run)
        check_run_timing(run, run_words, subject)
        span = float(run_words["offset"].max() - run_words["onset"].min())
        word_rates.append(len(run_words) / span if span > 0 else np.nan)
    responses_sha = responses_key(ingest)
    if flatmap.enabled(cfg):  # after responses_sha: the pycortex files are no part of the fit's cache key
        flatmap.check_responses(ingest, subject, responses)
    runs = responses.runs
    lengths = [len(r.times) for r in runs]
    Y, finite, constant = matrix.finish()
    groups, gap = cv_groups(cfg, lengths, subject, longest_lag(cfg, runs))
    return FitInputs(ingest, store, responses, responses_sha, runs, lengths, Y, finite, constant, groups, gap,
                     _check_test_stories(cfg, subject, runs), matrix, np.asarray(word_rates, dtype=float))


def fit_one_space(cfg: AnalysisConfig, subject: str, inputs: FitInputs, name: str, results: list[FeatureResult],
                  rels: list[str], space: str, client=None) -> tuple[dict[str, np.ndarray], bool, Any]:
    """One (feature space, layer) fit of a subject, from the fit cache or computed and cached.

    Returns
    -------
    fitted : dict of arrays
        ``r``, ``r2``, ``alpha``, ``valid`` (and permutation maps, lag weights when asked for).
    computed : bool
        False when the fit cache already held it.
    client : dask client or None
        The client used (started here when a large fit needed one).
    """
    store, Y = inputs.store, inputs.Y
    key = fit_key(cfg, subject, inputs.responses_sha, rels, space)
    cache_rel = f"_cache/fits/sub-{subject}/{key}.npz"
    fitted = read_fit_cache(store, cache_rel, Y.shape[1])
    if fitted is not None:
        log.info("sub-%s: reused fit %s of %s", subject, cache_rel, name)
        return fitted, False, client
    X = design_matrix(cfg, results, inputs.runs, space)
    if client is None and Y.shape[1] > 64:
        client = get_client(cfg.compute.dask, cfg.compute.n_workers)
    log.info("sub-%s: fitting %s (%d samples x %d features -> %d targets)", subject, name,
             X.shape[0], X.shape[1], Y.shape[1])
    # held-out predictions (as large as Y) are kept only for the permutation test that needs them
    keep = cfg.model.permutations > 0
    matrix = inputs.matrix
    result = fit_encoding(X, Y, inputs.groups, cfg.model.alphas, backend=cfg.compute.backend, gap=inputs.gap,
                          client=client, test_groups=inputs.test_groups, return_predictions=keep,
                          predictions_out=matrix.predictions_like() if keep and matrix.out_of_core else None,
                          valid=inputs.valid)
    fitted = {"r": result.r.astype(np.float32), "r2": result.r2.astype(np.float32),
              "alpha": result.alpha.astype(np.float32), "valid": result.valid,
              "backend": np.asarray(result.backend)}
    if cfg.model.permutations > 0:
        fitted.update(_permutation_maps(cfg, Y, result))
    if is_ephys(inputs.runs):
        fitted.update(_lag_weights(cfg, X, Y, result, inputs.runs))
    write_entry(store, save_npz(fitted), cache_rel)
    return fitted, True, client


def fit_subject(config: dict | AnalysisConfig, subject: str, features: list[FeatureSet], *,
                cache_dir: str | Path | None = None, client=None) -> SubjectFit:
    """Fit one subject's encoding models (one per feature space and layer) and store the scores.

    Each (feature space, layer) fit is cached by content under ``{output}/_cache/fits/``; the
    subject's results go to ``{output}/_work/{analysis_id}/sub-{subject}/``, metadata last, so
    a retry or re-run never recomputes finished work.
    """
    cfg = as_config(config)
    cache_root = Path(cache_dir or default_cache_dir())
    # the runs stay in memory while they fit half the memory budget, else they go to disk one by one
    run_stats = RunStats()  # each run's response mean and sd, for the published model (before z-scoring)

    def on_run(run: Run) -> None:
        if cfg.publish.models:
            run_stats.add(run)
        matrix.add(run)

    with ResponseMatrix(cache_root / "staging") as matrix:
        inputs = load_fit_inputs(cfg, subject, matrix, cache_root, on_run=on_run)
        ingest, store, responses, responses_sha = inputs.ingest, inputs.store, inputs.responses, inputs.responses_sha
        word_rates = inputs.word_rates
        inputs_key = hashlib.sha256(json.dumps(
            {"config": cfg.config_hash, "features": sorted(f["key"] for f in features), "files": responses_sha},
            sort_keys=True).encode()).hexdigest()[:16]
        base = f"_work/{cfg.analysis_id}/sub-{subject}"
        rel = f"{base}/results-{inputs_key}.npz"
        meta_rel = f"{base}/results-{inputs_key}.json"
        if store.exists(meta_rel) and store.exists(rel):  # the metadata is written last: the fit is whole
            meta = json.loads(store.get_bytes(meta_rel))
            log.info("sub-%s: reusing finished fit %s", subject, rel)
            meta["reused"] = True
            meta["computed_features"] = []
            return meta

        runs, lengths = inputs.runs, inputs.lengths
        Y, finite, constant = inputs.Y, inputs.finite, inputs.constant
        groups, gap, test_groups = inputs.groups, inputs.gap, inputs.test_groups

        arrays: dict[str, np.ndarray] = {"target_names": np.asarray(responses.target_names, dtype=str)}
        if responses.target_info is not None:  # hemisphere/vertex of surfaces, channel type and coordinates
            for col in responses.target_info.columns:
                values = responses.target_info[col].to_numpy()
                numeric = values.dtype.kind in "biuf"
                arrays[f"info__{col}"] = values.astype(np.float64) if numeric else values.astype(str)
        metrics: dict[str, Any] = {}
        computed_features: list[str] = []
        backend = ""
        progress = Progress(len(features), f"sub-{subject} fits", unit="feature spaces")
        bands: list[tuple[str, list[FeatureResult], str, list[str]]] = []
        models: list[dict[str, Any]] = []
        for feat in sorted(features, key=lambda f: f["feature"]):
            progress.update(detail=feat["feature"])
            spec = feature_spec(cfg, feat["feature"])
            with FeatureEntries(store, spec, feat, runs, subject) as entries:  # one layer in memory at a time
                rels = entries.rels
                for space in entries.spaces():
                    results = entries.results(space)
                    name = spec.name if space == "values" else f"{spec.name}_{space}"
                    if cfg.model.kind == "banded_ridge":  # fitted jointly below, one band per space
                        bands.append((name, results, space, rels))
                        continue
                    fitted, computed, client = fit_one_space(cfg, subject, inputs, name, results, rels, space, client)
                    if computed:
                        backend = str(fitted["backend"])
                        computed_features.append(name)
                    else:
                        backend = backend or str(fitted.get("backend", ""))
                    for stat in FIT_ARRAYS:
                        if stat in fitted:
                            arrays[f"{name}__{stat}"] = fitted[stat]
                    if cfg.publish.models and not getattr(spec, "pca", None):  # a PCA'd space: no model exported
                        models.append(write_model(cfg, store, f"{base}/models", ModelInputs(
                            subject=subject, name=name, spec=spec, space=space, results=results, runs=runs,
                            X=design_matrix(cfg, results, runs, space), Y=Y, groups=groups,
                            gap=gap, test_groups=test_groups, fitted=fitted, run_stats=run_stats, kind=responses.kind,
                            target_space=responses.space, target_names=list(responses.target_names),
                            target_info={c: responses.target_info[c].to_numpy() for c in ("hemi", "vertex")
                                         if responses.target_info is not None and c in responses.target_info.columns},
                            mask=None if responses.mask_img is None else np.asarray(responses.mask_img.dataobj),
                            affine=None if responses.mask_img is None else responses.mask_img.affine,
                            model_runtime=feat.get("model_runtime"),
                            words_per_second=float(np.nanmedian(word_rates)) if np.isfinite(word_rates).any()
                            else None)))
                    metrics[name] = summarize(fitted["r"], fitted["valid"])
                    # significant targets (permutations, BH-FDR 0.05); None when no permutations were asked for
                    metrics[name]["n_significant"] = int(fitted["significant"].sum()) if "significant" in fitted else None
                    metrics[name].update(permutation_record(fitted))
                    if cfg.decoding.enabled:
                        decoded, word_auc = _decode(cfg, results, runs, space, Y, finite, fitted, groups, gap, client,
                                                    test_groups)
                        arrays[f"{name}__decoding_r"] = decoded.r.astype(np.float32)
                        metrics[name]["decoding"] = {**decoded.identification.as_dict(), "word_roc_auc": word_auc,
                                                     "mean_r": round(float(np.nanmean(np.where(decoded.valid, decoded.r,
                                                                                               np.nan))), 6)
                                                     if decoded.valid.any() else None}
        progress.close()
        _ceiling_normalised(runs, arrays, metrics)
        if bands:
            if client is None and Y.shape[1] > 64:
                client = get_client(cfg.compute.dask, cfg.compute.n_workers)
            fitted, computed = _fit_banded(cfg, store, subject, responses_sha, bands, runs, Y, groups, gap, client,
                                           test_groups, matrix, finite & ~constant)
            backend = str(fitted.get("backend", ""))
            computed_features += ["banded"] if computed else []
            for stat in FIT_ARRAYS:
                if stat in fitted:
                    arrays[f"banded__{stat}"] = fitted[stat]
            metrics["banded"] = summarize(fitted["r"], fitted["valid"])
            metrics["banded"]["n_significant"] = int(fitted["significant"].sum()) if "significant" in fitted else None
            metrics["banded"].update(permutation_record(fitted))
            valid = fitted["valid"].astype(bool)
            for i, (name, *_rest) in enumerate(bands):
                arrays[f"{name}__r2split"] = fitted["r2_split"][i]
                share = fitted["r2_split"][i][valid]
                metrics["banded"][f"r2_split_mean:{name}"] = round(float(share.mean()), 6) if share.size else None
        mask_rel = None
        if responses.mask_img is not None:
            import nibabel as nib  # only volumes have a mask; nibabel is heavy to import for the others

            mask_rel = f"{base}/mask-{inputs_key}.nii.gz"
            with tempfile.TemporaryDirectory() as tmp:
                mpath = Path(tmp) / "mask.nii.gz"
                nib.save(responses.mask_img, mpath)
                store.put_file(mpath, mask_rel)
        write_entry(store, save_npz(arrays), rel)
        meta = {
            "subject": subject, "status": "ok", "kind": responses.kind, "space": responses.space,
            "simulated": responses.simulated, "n_samples": int(sum(lengths)), "n_runs": len(lengths),
            "stories": sorted({str(r.story) for r in runs}),
            "preprocess": {r.label: r.meta["preprocess"] for r in runs if "preprocess" in r.meta},  # per run, if any
            "n_targets": int(Y.shape[1]), "n_invalid_targets": int((~finite).sum()),
            "n_constant_targets": int(constant.sum()),
            "result_rel": rel, "mask_rel": mask_rel, "metrics": metrics, "backend": backend, "reused": False,
            "computed_features": sorted(computed_features),
            "folds": fold_table(runs, groups, gap, test_groups),  # which runs trained and tested each fold
            "models": models,  # the published models (pipelines.models.export), empty with publish.models: false
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
                test_groups: list[int] | None = None, matrix: ResponseMatrix | None = None,
                valid: np.ndarray | None = None) -> tuple[dict, bool]:
    """Banded ridge over every feature space (one band each), cached by content like single fits."""
    key = fit_key(cfg, subject, responses_sha, [r for band in bands for r in band[3]],
                  "banded:" + ",".join(f"{name}/{space}" for name, _, space, _ in bands))
    cache_rel = f"_cache/fits/sub-{subject}/{key}.npz"
    fitted = read_fit_cache(store, cache_rel, Y.shape[1])
    if fitted is not None and "r2_split" in fitted:
        return fitted, False
    Xs = {name: design_matrix(cfg, results, runs, space) for name, results, space, _ in bands}
    log.info("sub-%s: fitting banded ridge over %s (%d samples -> %d targets)", subject, list(Xs), Y.shape[0],
             Y.shape[1])
    keep = cfg.model.permutations > 0
    result = fit_banded_encoding(Xs, Y, groups, cfg.model.alphas, n_iter=cfg.model.n_iter,
                                 backend=cfg.compute.backend, gap=gap, client=client, test_groups=test_groups,
                                 return_predictions=keep,
                                 predictions_out=matrix.predictions_like() if keep and matrix and matrix.out_of_core
                                 else None, valid=valid)
    fitted = {"r": result.r.astype(np.float32), "r2": result.r2.astype(np.float32),
              "alpha": result.alpha.astype(np.float32), "valid": result.valid,
              "r2_split": np.asarray(result.r2_split, dtype=np.float32), "backend": np.asarray(result.backend)}
    if cfg.model.permutations > 0:
        fitted.update(_permutation_maps(cfg, Y, result))
    write_entry(store, save_npz(fitted), cache_rel)
    return fitted, True


def _lag_weights(cfg: AnalysisConfig, X: np.ndarray, Y: np.ndarray, result, runs: list[Run]) -> dict[str, np.ndarray]:
    """The TRF's weight per lag and target: the norm over features of the ridge weights at that lag.

    Weights come from a refit on all samples with each target's alpha rounded to the grid
    (targets sharing an alpha are fitted together); ``lag_times`` are the lags in seconds.
    """
    sfreq = runs[0].sfreq
    lags = lag_samples(cfg.model.tmin, cfg.model.tmax, sfreq)
    grid = np.asarray(cfg.model.alphas, dtype=np.float64)
    valid = result.valid & np.isfinite(result.alpha)
    nearest = np.full(Y.shape[1], -1)
    nearest[valid] = np.abs(np.log(grid)[None, :] - np.log(result.alpha[valid].astype(np.float64))[:, None]).argmin(1)
    weights = np.full((lags.size, Y.shape[1]), np.nan, dtype=np.float32)
    for k in np.unique(nearest[valid]):
        cols = np.flatnonzero(nearest == k)
        coef = fit_ridge_fixed_alpha(X, columns(Y, cols), float(grid[k]), backend=cfg.compute.backend)
        weights[:, cols] = np.linalg.norm(coef.reshape(lags.size, -1, cols.size), axis=1)
    return {"lag_weights": weights, "lag_times": (lags / sfreq).astype(np.float32)}


def _decode(cfg: AnalysisConfig, results: list[FeatureResult], runs: list[Run], space: str, Y: np.ndarray,
            finite: np.ndarray, fitted: dict[str, np.ndarray], groups: np.ndarray, gap: int, client,
            test_groups: list[int] | None = None):
    """A decoder of one feature space from the responses best predicted by its encoding model.

    The decoder reads the ``decoding.max_targets`` valid targets of highest encoding r (chosen
    on held-out data of the same folds, so identification is slightly optimistic when targets are
    many; every target when they are fewer), at ``decoding.delays`` samples after each sample.
    """
    lengths = [len(r.times) for r in runs]
    F = aligned_features(cfg, results, runs, space)
    valid = fitted["valid"].astype(bool) & finite
    order = np.argsort(-np.where(valid, fitted["r"], -np.inf), kind="stable")[:cfg.decoding.max_targets]
    order = order[valid[order]]
    if order.size == 0:
        raise FitError("decoding: no valid target to decode from; disable 'decoding.enabled'")
    X = decoding_design(_take(Y, np.sort(order)), lengths, cfg.decoding.delays)
    word_level = is_ephys(runs) and all(res.sampling == "events" for res in results)
    decoded = fit_decoding(X, F, groups, cfg.model.alphas, segment_length=cfg.decoding.segment_length,
                           test_groups=test_groups,
                           backend=cfg.compute.backend, gap=max(gap, max(abs(d) for d in cfg.decoding.delays)
                                                                if cfg.model.cv != "leave_one_run_out" else 0),
                           client=client, return_predictions=word_level)
    word_auc = None
    if word_level:  # MEG / ECoG: does the decoder tell the samples where a word falls from the others?
        raw = np.concatenate([align_to_samples(res, run.times, method="samples", space=space)
                              for res, run in zip(results, runs)])
        held = decoded.sample_fold >= 0
        aucs = roc_auc(raw[held] != 0, decoded.predictions[held])
        word_auc = round(float(np.nanmean(aucs)), 6) if np.isfinite(aucs).any() else None
    return decoded, word_auc


def _permutation_maps(cfg: AnalysisConfig, Y: np.ndarray, result) -> dict[str, np.ndarray]:
    """Permutation p-values of the held-out r (``model.permutation_block``), and Benjamini-Hochberg FDR at 0.05.

    ``permutation_block`` records the null used: ``"run"``, or the block length in samples. An
    ``auto`` block length is chosen once, from :data:`AUTO_BLOCK_TARGETS` targets evenly spread
    over the matrix. On storage (``Y`` and the predictions out of core) the test runs a block of
    columns at a time: every call draws the same permutations (one seed) with that one block
    length, so the p-values are those of one call on all targets.
    """
    block = cfg.model.permutation_block
    method = "run" if block == "run" else "block"
    if block == "auto" and cfg.model.cv == "leave_one_run_out":
        n_held = np.unique(result.sample_fold[result.sample_fold >= 0]).size
        method = choose_permutation_method(n_held, cfg.model.permutations)
    length = block
    if method == "block" and block == "auto":
        spread = np.unique(np.linspace(0, Y.shape[1] - 1, min(Y.shape[1], AUTO_BLOCK_TARGETS)).astype(int))
        length = auto_block_length(_take(Y, spread), _take(result.predictions, spread), result.sample_fold)
    options = {"n_permutations": cfg.model.permutations, "method": method, "backend": cfg.compute.backend,
               "block_length": length if method == "block" else "auto"}
    if is_stored(Y):
        width = max(1, memory_budget() // (16 * Y.shape[0]))  # Y and predictions of a block, in float32 and z-scored
        parts = [permutation_test(columns(Y, cols), columns(result.predictions, cols), result.sample_fold, **options)
                 for cols in (np.arange(a, min(a + width, Y.shape[1])) for a in range(0, Y.shape[1], width))]
        valid = np.concatenate([p.valid for p in parts])
        p_values = np.concatenate([p.p_values for p in parts])
        perm = parts[0]
    else:
        perm = permutation_test(Y, result.predictions, result.sample_fold, **options)
        valid, p_values = perm.valid, perm.p_values
    p = np.where(valid, p_values, np.nan).astype(np.float32)
    significant, q = fdr_bh(p, 0.05)
    return {"p": p, "q": np.asarray(q, dtype=np.float32), "significant": np.asarray(significant, dtype=bool),
            "permutation_block": np.asarray("run" if perm.method == "run" else str(perm.block_length))}


def _take(Y, cols: np.ndarray) -> np.ndarray:
    """``Y[:, cols]`` for a few increasing columns, in memory or on storage (read column by column there)."""
    if isinstance(Y, np.ndarray):
        return Y[:, cols]
    return np.asarray(Y[:, cols.tolist()], dtype=np.float32) if cols.size else np.empty((Y.shape[0], 0), np.float32)
