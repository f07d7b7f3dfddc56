"""The group step's shared response model (``group.srm``): each subject predicted from the others.

``srm_level`` reads every fitted subject's responses and the features step's cache entries, lines
the subjects' runs up by story, runs :func:`pipelines.group.srm.srm_encoding` for every feature
space, compares each target's cross-subject r with the subject's own (within-subject) r, and keeps
the arrays in one work entry (cached by the group's key). ``render_srm`` writes, for publish, each
subject's maps in its own space (``desc-<space>SRM``: stats ``r``, ``ownr``, ``diff``) and one table
``sub-group/sub-group_task-<task>_desc-srm_summary.tsv`` (+ ``.json``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import load_npz, save_npz, write_entry
from ..config import AnalysisConfig
from ..errors import DatasetError
from ..fit import zscore_by_group
from .srm import srm_encoding

__all__ = ["SUMMARY_COLUMNS", "render_srm", "srm_level"]

log = logging.getLogger("neuroflow")

SUMMARY_COLUMNS = ["subject", "feature_space", "n_targets", "mean_r_srm", "mean_r_own", "mean_diff",
                   "n_srm_better", "mean_r_shared"]


def _mean(v: np.ndarray) -> float | None:
    v = v[np.isfinite(v)]
    return round(float(v.mean()), 6) if v.size else None


def _aligned_runs(ingest, subjects: list[str]) -> tuple[dict[str, list], list[str]]:
    """Every subject's runs, one per story, in one story order; one error where a story's lengths differ."""
    from ..ingest import load_subject  # reads every subject's responses again: only when an SRM is asked for

    by_subject: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for s in subjects:
        runs = {}
        for run in load_subject(ingest, s).runs:
            runs.setdefault(str(run.story), run)  # repeats of a story: the first run
            if s == subjects[0] and str(run.story) not in order:
                order.append(str(run.story))
        by_subject[s] = runs
    stories = [st for st in order if all(st in by_subject[s] for s in subjects)]
    if not stories:
        raise DatasetError(f"'group.srm': no story was heard by every subject ({', '.join(subjects)}); the shared "
                           "response model needs the same stimulus in every subject")
    for st in stories:
        lengths = {s: by_subject[s][st].data.shape[0] for s in subjects}
        if len(set(lengths.values())) != 1:
            raise DatasetError(f"'group.srm': story {st!r} has runs of different lengths across subjects "
                               f"({lengths} samples); the shared response model needs time-aligned runs: trim "
                               "them to the same length ('dataset.responses') or remove 'group.srm'")
    return {s: [by_subject[s][st] for st in stories] for s in subjects}, stories


def srm_level(cfg: AnalysisConfig, ok: list[dict], features: list[dict] | None, ingest, store, base: str,
              key: str) -> dict[str, Any]:
    """The ``srm`` record of the group result (see the module's docstring); ``{"status": "off"}`` without
    ``group.srm``. Arrays go to ``{base}/srm-{key}.npz``; a finished record is reused."""
    srm = cfg.group.srm if cfg.group is not None else None
    if srm is None:
        return {"status": "off"}
    meta_rel, rel = f"{base}/srm-{key}.json", f"{base}/srm-{key}.npz"
    if store.exists(meta_rel) and store.exists(rel):
        log.info("sub-group: reusing finished SRM result %s", rel)
        return json.loads(store.get_bytes(meta_rel))
    if not features:
        raise DatasetError("'group.srm' needs the features step's results: pass them to group_level "
                           "(neuroflow run and the DAG do)")
    # fit_subject's helpers (design matrices, folds, cached features): the steps import the group step
    from ..steps.features import feature_spec
    from ..steps.feature_entries import FeatureEntries
    from ..steps.fit_subject import cv_groups, design_matrix, longest_lag

    subjects = [f["subject"] for f in ok]
    runs_of, stories = _aligned_runs(ingest, subjects)
    ref = subjects[0]
    runs = runs_of[ref]
    lengths = [r.data.shape[0] for r in runs]
    groups, gap = cv_groups(cfg, lengths, ref, longest_lag(cfg, runs))
    test_groups = None
    if cfg.model.test_stories:
        test_groups = [i for i, st in enumerate(stories) if st in cfg.model.test_stories]
        if not test_groups or len(test_groups) == len(stories):
            raise DatasetError(f"'group.srm': 'model.test_stories' {cfg.model.test_stories} match {len(test_groups)} "
                               f"of the {len(stories)} stories every subject heard ({stories})")
    designs: dict[str, np.ndarray] = {}
    for feat in sorted(features, key=lambda f: f["feature"]):
        spec = feature_spec(cfg, feat["feature"])
        with FeatureEntries(store, spec, feat, runs, ref) as entries:  # one layer at a time
            for space in entries.spaces():
                designs[spec.name if space == "values" else f"{spec.name}_{space}"] = design_matrix(
                    cfg, entries.results(space), runs, space)
    run_of_sample = np.repeat(np.arange(len(runs)), lengths)
    Ys, finite = [], []
    for s in subjects:
        Y = zscore_by_group(np.concatenate([r.data for r in runs_of[s]]).astype(np.float32), run_of_sample)
        good = np.isfinite(Y).all(axis=0)
        Y[:, ~good] = 0.0
        Ys.append(Y)
        finite.append(good)
    log.info("sub-group: SRM of %d subjects (k=%d, %d iterations), %d feature space(s)", len(subjects),
             srm.features, srm.iterations, len(designs))
    result = srm_encoding(Ys, designs, groups, cfg.model.alphas, features=srm.features, iterations=srm.iterations,
                          gap=gap, test_groups=test_groups, backend=cfg.compute.backend, seed=srm.seed,
                          subjects=subjects)
    arrays: dict[str, np.ndarray] = {"subjects": np.asarray(subjects, dtype=str)}
    metrics: dict[str, dict[str, dict]] = {}
    for name in designs:
        metrics[name] = {}
        for i, fit in enumerate(ok):
            s = fit["subject"]
            r = np.where(finite[i], result.r[name][i], np.nan).astype(np.float32)
            own_arrays = load_npz(store.get_bytes(fit["result_rel"]))
            own = own_arrays.get(f"{name}__r", np.full(r.shape, np.nan, dtype=np.float32)).astype(np.float32)
            if own.shape != r.shape:
                raise DatasetError(f"'group.srm': sub-{s} has {r.shape[0]} targets but its fit {own.shape[0]}")
            diff = (r - own).astype(np.float32)
            arrays[f"{name}__r__{s}"], arrays[f"{name}__ownr__{s}"], arrays[f"{name}__diff__{s}"] = r, own, diff
            both = np.isfinite(diff)
            metrics[name][s] = {"n_targets": int(r.size), "mean_r_srm": _mean(r), "mean_r_own": _mean(own),
                                "mean_diff": _mean(diff), "n_srm_better": int((diff[both] > 0).sum()),
                                "mean_r_shared": _mean(result.r_shared[name][i])}
    write_entry(store, save_npz(arrays), rel)
    meta = {"status": "ok", "features": srm.features, "iterations": srm.iterations, "seed": srm.seed,
            "subjects": subjects, "stories": stories, "n_samples": int(sum(lengths)), "n_folds": result.n_folds,
            "result_rel": rel, "metrics": metrics,
            "fits": {f["subject"]: {k: f.get(k) for k in ("kind", "space", "result_rel", "mask_rel")} for f in ok}}
    store.put_bytes(json.dumps(meta, sort_keys=True).encode(), meta_rel, content_type="application/json")
    return meta


def summary_rows(srm: dict) -> list[dict[str, Any]]:
    """The summary table's rows: one per subject and feature space."""
    return [{"subject": s, "feature_space": name, **{c: m.get(c) for c in SUMMARY_COLUMNS[2:]}}
            for name, per in sorted(srm["metrics"].items()) for s, m in sorted(per.items())]


def render_srm(cfg: AnalysisConfig, srm: dict, store, out_dir: Path) -> list[dict]:
    """Each subject's SRM maps in its own space and the group summary table; the artifacts for the manifest."""
    import nibabel as nib  # volumes' masks; publish has loaded it already
    import pandas as pd

    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from ..maps import FSAVERAGE_VERTICES, bids_map_name, write_surface_map, write_target_table, write_volume_map

    if srm.get("status") != "ok":
        return []
    task = cfg.dataset.task
    arrays = load_npz(store.get_bytes(srm["result_rel"]))
    artifacts: list[dict] = []
    for s, fit in sorted(srm["fits"].items()):
        sub_dir = out_dir / f"sub-{s}"
        sub_dir.mkdir(parents=True, exist_ok=True)
        own = load_npz(store.get_bytes(fit["result_rel"]))
        mask_img = None
        if fit.get("mask_rel"):
            img = nib.load(str(store.download(fit["mask_rel"], out_dir / ".work" / f"srm-mask-{s}.nii.gz")))
            mask_img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        for name in sorted(srm["metrics"]):
            stats = {st: arrays[f"{name}__{st}__{s}"] for st in ("r", "ownr", "diff")}
            desc = "".join(ch for ch in name if ch.isalnum()) + "SRM"
            base = {"subject": s, "feature_space": f"{name}_srm"}
            if mask_img is not None:
                for st, values in stats.items():
                    path = sub_dir / bids_map_name(s, task, fit.get("space"), desc, st, ".nii.gz")
                    write_volume_map(values.astype(np.float32), mask_img, path)
                    artifacts.append({"file": path, "kind": "statmap_nifti", "stat": st, **base})
            elif "info__hemi" in own and "info__vertex" in own:
                hemi, vertex = own["info__hemi"].astype(str), own["info__vertex"].astype(np.int64)
                n_vertices = FSAVERAGE_VERTICES.get(fit.get("space") or "", int(vertex.max()) + 1)
                for h in sorted(set(hemi)):
                    rows = hemi == h
                    for st, values in stats.items():
                        name_h = bids_map_name(s, task, fit.get("space"), desc, st, ".func.gii").replace(
                            f"sub-{s}_task-{task}_", f"sub-{s}_task-{task}_hemi-{h}_")
                        path = write_surface_map(values[rows].astype(np.float32), vertex[rows], n_vertices,
                                                 sub_dir / name_h)
                        artifacts.append({"file": path, "kind": "statmap_gifti", "stat": st, **base})
            else:
                path = sub_dir / bids_map_name(s, task, fit.get("space"), desc, "r", ".tsv")
                write_target_table(stats, [str(n) for n in own["target_names"]], path)
                artifacts.append({"file": path, "kind": "statmap_tsv", "stat": ",".join(stats), **base})
    group_dir = out_dir / "sub-group"
    group_dir.mkdir(parents=True, exist_ok=True)
    stem = group_dir / f"sub-group_task-{task}_desc-srm_summary"
    rows = summary_rows(srm)
    pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(f"{stem}.tsv", sep="\t", index=False, na_rep="n/a",
                                                        float_format="%.6g")
    Path(f"{stem}.json").write_text(json.dumps({"features": srm["features"], "iterations": srm["iterations"],
                                                "columns": SUMMARY_COLUMNS, "rows": rows}, indent=1, sort_keys=True))
    artifacts += [{"file": Path(f"{stem}.tsv"), "kind": "srm_tsv", "subject": "group"},
                  {"file": Path(f"{stem}.json"), "kind": "srm_json", "subject": "group"}]
    return artifacts
