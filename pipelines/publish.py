"""Publish: render maps and the report, upload every artifact verified, manifest last.

The manifest is the only commit point: it is written after every artifact it lists has
been uploaded and read back with the right size and sha256. A crash before that leaves
no manifest, and readers trust nothing a manifest does not list.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from . import flatmap
from .cache import default_cache_dir, load_npz
from .compare.artifacts import analysis_layer_curves, subject_comparison
from .config import AnalysisConfig
from .errors import ConfigError, PublishConflictError
from .faults import failpoint
from .gallery import update_index
from .group.render import isc_ceilings, manifest_record, render_group, with_isc_ceiling
from .ingest import open_dataset
from .localdir import check_local_dir, install
from .models.export import model_artifacts
from .models.methods import methods_block
from .manifest import SCHEMA_VERSION, library_versions, utc_now, validate_manifest
from .report import INDEX_ABOVE_SUBJECTS, render_report, render_report_pages
from .localstore import is_local_uri, local_path
from .resultstore import ResultStore, Store, open_store
from .s3 import split_s3_uri
from .storage import sha256_file

log = logging.getLogger("neuroflow")

def _desc(name: str) -> str:
    return "".join(ch for ch in name if ch.isalnum())


def _surface_maps(sub: str, task: str, space: str | None, desc: str, feat: str, arrays: dict[str, np.ndarray],
                  sub_dir: Path, fig_dir: Path) -> tuple[list[dict], Path | None]:
    """GIFTI maps per hemisphere and statistic, and one picture of r on the inflated surface."""
    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from .maps import FSAVERAGE_VERTICES, bids_map_name, render_surface_png, write_surface_map

    hemi = arrays["info__hemi"].astype(str)
    vertex = arrays["info__vertex"].astype(np.int64)
    n_vertices = FSAVERAGE_VERTICES.get(space or "", int(vertex.max()) + 1)
    artifacts, r_full = [], {}
    valid = arrays[f"{feat}__valid"].astype(bool)
    for h in sorted(set(hemi)):
        rows = hemi == h
        for stat in [s for s in ("r", "r2", "alpha", "p", "significant", "rnorm") if f"{feat}__{s}" in arrays]:
            name = bids_map_name(sub, task, space, desc, stat, ".func.gii").replace(f"sub-{sub}_task-{task}_",
                                                                                 f"sub-{sub}_task-{task}_hemi-{h}_")
            values = np.where(valid, arrays[f"{feat}__{stat}"].astype(np.float32), np.nan)  # n/a: not fitted
            path = write_surface_map(values[rows], vertex[rows], n_vertices, sub_dir / name)
            artifacts.append({"file": path, "kind": "statmap_gifti", "subject": sub, "feature_space": feat,
                              "stat": stat})
        full = np.full(n_vertices, np.nan, dtype=np.float32)
        full[vertex[rows]] = np.where(valid, arrays[f"{feat}__r"], np.nan)[rows]
        r_full[h] = full
    png = fig_dir / bids_map_name(sub, task, space, desc, "r", ".png").replace("_statmap.png", "_surface.png")
    return artifacts, render_surface_png(r_full, png, f"sub-{sub} {feat}: held-out r")


def _flatmap(sub: str, task: str, desc: str, feat: str, arrays: dict[str, np.ndarray], mask_img, kind: str,
             flat: tuple[Path, Any], fig_dir: Path, artifacts: list[dict]) -> dict:
    """One feature space's held-out r on the subject's pycortex flatmap; its report image."""
    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from .maps import bids_map_name, mask_bool

    filestore, pcs = flat
    r = np.where(arrays[f"{feat}__valid"].astype(bool), arrays[f"{feat}__r"], np.nan).astype(np.float32)
    if kind == "bold":  # volumes: r back on the reference grid, NaN outside the brain mask
        mask = mask_bool(mask_img)
        values = np.full(mask.shape, np.nan, dtype=np.float32)
        values[mask] = r
    else:  # HDF5: r is already one value per voxel of the pycortex mask, in its order
        values = r
    png = fig_dir / bids_map_name(sub, task, None, desc, "r", ".png").replace("_statmap.png", "_flatmap.png")
    flatmap.render_flatmap_png(values, filestore, pcs, png,
                               f"sub-{sub} {feat}: held-out r ({pcs.subject}, {pcs.transform})")
    artifacts.append({"file": png, "kind": "flatmap_png", "subject": sub, "feature_space": feat, "stat": "r"})
    return {"path": str(png), "caption": f"{feat}: held-out correlation on the flattened cortex of {pcs.subject} "
                                         "(pycortex)"}


def _viewer(cfg: AnalysisConfig, fit: dict, arrays: dict[str, np.ndarray], mask_img, feat: str, sub_dir: Path,
            artifacts: list[dict]) -> dict:
    """One feature space's interactive viewer of r (:mod:`pipelines.viewers`): the report entry's
    ``viewers`` (and ``viewer_note`` when the targets have no volume or surface)."""
    from .maps import bids_map_name
    from .viewers import VIEWER_KIND, feature_viewers, viewer_name

    if not cfg.maps.viewers.enabled:
        return {}
    sub = fit["subject"]
    name = viewer_name(bids_map_name(sub, cfg.dataset.task, fit.get("space"), _desc(feat), "r", ".nii.gz"))
    path, caption = feature_viewers(fit["kind"], arrays, mask_img, f"{feat}__r", sub_dir / "viewers" / name,
                                    title=f"sub-{sub} {feat}: held-out r", threshold=cfg.maps.viewers.threshold,
                                    space=fit.get("space"))
    if path is None:
        return {"viewers": [], "viewer_note": caption}
    artifacts.append({"file": path, "kind": VIEWER_KIND, "subject": sub, "feature_space": feat, "stat": "r"})
    return {"viewers": [{"path": str(path), "caption": f"{feat}: {caption}"}]}


def render_subject(cfg: AnalysisConfig, fit: dict, arrays: dict[str, np.ndarray], mask_img,
                   out_dir: Path, flat: tuple[Path, Any] | None = None) -> tuple[list[dict], list[dict]]:
    """Write one subject's maps and pictures; return (artifacts, report feature entries).

    ``flat`` is (pycortex filestore, :class:`pipelines.flatmap.PycortexSubject`) when each
    feature space's r is also drawn on the subject's flatmap.
    """
    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from .maps import (bids_map_name, render_electrodes_png, render_histogram_png, render_slices_png,
                       render_targets_png, render_topomaps_png, render_volume_png, write_target_table,
                       write_volume_map)

    sub = fit["subject"]
    task = cfg.dataset.task
    sub_dir = out_dir / f"sub-{sub}"
    fig_dir = sub_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    names = [str(n) for n in arrays["target_names"]]
    artifacts: list[dict] = []
    entries: list[dict] = []
    by_feature: dict[str, np.ndarray] = {}
    for feat in sorted(fit["metrics"]):
        desc = _desc(feat)
        r = arrays[f"{feat}__r"]
        by_feature[feat] = r
        images = []
        if fit["kind"] == "bold":
            r_path = None
            for stat in [s for s in ("r", "r2", "alpha", "p", "significant", "rnorm") if f"{feat}__{s}" in arrays]:
                path = sub_dir / bids_map_name(sub, task, fit.get("space"), desc, stat, ".nii.gz")
                write_volume_map(arrays[f"{feat}__{stat}"], mask_img, path)
                artifacts.append({"file": path, "kind": "statmap_nifti", "subject": sub,
                                  "feature_space": feat, "stat": stat})
                r_path = r_path or path
            png = fig_dir / bids_map_name(sub, task, fit.get("space"), desc, "r", ".nii.gz").replace(
                "_statmap.nii.gz", "_glassbrain.png")
            render_volume_png(r_path, png, f"sub-{sub} {feat}: held-out r")
            slices = Path(str(png).replace("_glassbrain.png", "_slices.png"))
            render_slices_png(r_path, slices, f"sub-{sub} {feat}: held-out r, axial slices")
            artifacts.append({"file": slices, "kind": "figure_png", "subject": sub, "feature_space": feat})
            images.append({"path": str(slices), "caption": f"{feat}: held-out correlation, axial slices"})
        elif fit["kind"] == "gifti" and "info__hemi" in arrays:
            surf, png = _surface_maps(sub, task, fit.get("space"), desc, feat, arrays, sub_dir, fig_dir)
            artifacts += surf
            if png is not None:
                artifacts.append({"file": png, "kind": "figure_png", "subject": sub, "feature_space": feat})
                images.append({"path": str(png), "caption": f"{feat}: held-out correlation on the surface"})
        if fit["kind"] != "bold":
            path = sub_dir / bids_map_name(sub, task, fit.get("space"), desc, "r", ".tsv")
            stats = [s for s in ("r", "r2", "alpha", "p", "q", "significant", "rnorm") if f"{feat}__{s}" in arrays]
            info = {k[6:]: arrays[k] for k in sorted(arrays) if k.startswith("info__") and k[6:] != "name"}
            write_target_table({**{stat: arrays[f"{feat}__{stat}"] for stat in stats}, **info}, names, path)
            artifacts.append({"file": path, "kind": "statmap_tsv", "subject": sub, "feature_space": feat,
                              "stat": ",".join(stats)})
            sensors = "info__coordinates" in arrays and str(arrays["info__coordinates"][0]) == "sensor"
            if sensors and f"{feat}__lag_weights" in arrays:  # MEG/EEG: the TRF's weight per lag and sensor
                xyz = np.stack([arrays[f"info__{c}"] for c in ("x", "y", "z")], axis=1)
                tpng = fig_dir / bids_map_name(sub, task, None, desc, "r", ".tsv").replace(
                    "_statmap.tsv", "_topomaps.png")
                render_topomaps_png(arrays[f"{feat}__lag_weights"], xyz, arrays[f"{feat}__lag_times"], tpng,
                                    f"sub-{sub} {feat}: TRF weight per lag")
                artifacts.append({"file": tpng, "kind": "figure_png", "subject": sub, "feature_space": feat})
                images.append({"path": str(tpng), "caption": f"{feat}: encoding weight per lag and sensor"})
            elif all(f"info__{c}" in arrays for c in ("x", "y", "z")):  # electrodes with coordinates
                xyz = np.stack([arrays[f"info__{c}"] for c in ("x", "y", "z")], axis=1)
                epng = fig_dir / bids_map_name(sub, task, None, desc, "r", ".tsv").replace(
                    "_statmap.tsv", "_electrodes.png")
                if render_electrodes_png(r, xyz, epng, f"sub-{sub} {feat}: held-out r per electrode") is not None:
                    artifacts.append({"file": epng, "kind": "figure_png", "subject": sub, "feature_space": feat})
                    images.append({"path": str(epng), "caption": f"{feat}: electrodes at their coordinates, by r"})
            png = fig_dir / bids_map_name(sub, task, None, desc, "r", ".tsv").replace("_statmap.tsv", "_bar.png")
            render_targets_png(names, r, png, f"sub-{sub} {feat}: held-out r per target")
        artifacts.append({"file": png, "kind": "figure_png", "subject": sub, "feature_space": feat})
        images.append({"path": str(png), "caption": f"{feat}: held-out correlation"})
        if flat is not None:
            images.append(_flatmap(sub, task, desc, feat, arrays, mask_img, fit["kind"], flat, fig_dir, artifacts))
        entries.append({"name": feat, "metrics": fit["metrics"][feat], "images": images,
                        **_viewer(cfg, fit, arrays, mask_img, feat, sub_dir, artifacts)})
    for key in sorted(k for k in arrays if k.endswith("__r2split")):  # banded ridge: R² split per band
        band = key[: -len("__r2split")]
        if fit["kind"] == "bold":
            path = sub_dir / bids_map_name(sub, task, fit.get("space"), _desc(band), "r2split", ".nii.gz")
            write_volume_map(arrays[key], mask_img, path)
            artifacts.append({"file": path, "kind": "statmap_nifti", "subject": sub, "feature_space": band,
                              "stat": "r2split"})
        else:
            path = sub_dir / bids_map_name(sub, task, fit.get("space"), _desc(band), "r2split", ".tsv")
            write_target_table({"r2split": arrays[key]}, names, path)
            artifacts.append({"file": path, "kind": "statmap_tsv", "subject": sub, "feature_space": band,
                              "stat": "r2split"})
    hist = fig_dir / f"sub-{sub}_task-{task}_desc-all_histogram.png"
    render_histogram_png(by_feature, hist, f"sub-{sub}: held-out r per feature space")
    artifacts.append({"file": hist, "kind": "figure_png", "subject": sub})
    if entries:
        entries[0]["images"].append({"path": str(hist), "caption": "distribution of held-out r"})
    decoded = {f: m["decoding"] for f, m in fit["metrics"].items() if m.get("decoding")}
    if decoded:
        # maps imports matplotlib and nilearn (heavy): loaded only when drawing
        from .maps import render_decoding_png

        djson = sub_dir / "decoding.json"
        djson.write_text(json.dumps(decoded, indent=2, sort_keys=True))
        artifacts.append({"file": djson, "kind": "decoding_json", "subject": sub})
        dpng = fig_dir / f"sub-{sub}_task-{task}_desc-all_decoding.png"
        render_decoding_png(decoded, dpng, f"sub-{sub}: decoding, identification of held-out segments")
        artifacts.append({"file": dpng, "kind": "figure_png", "subject": sub})
        entries[0]["images"].append({"path": str(dpng), "caption": "decoding: identification accuracy"})
    return artifacts, entries


def publish(config: AnalysisConfig, prepared: dict, features: list[dict], fits: list[dict], *,
            local_dir: str | Path | None, started: str | None = None, airflow_run_id: str | None = None,
            cache_dir: str | Path | None = None, group: dict | None = None) -> dict[str, Any]:
    """Render, upload and commit one analysis; return the manifest URI and a summary.

    Files are rendered in a private staging folder under the cache and copied into `local_dir`
    only once committed (:mod:`pipelines.localdir`: never among anyone else's files); with a local
    ``output`` and no `local_dir`, no copy is made (the published folder is on disk already). A complete
    published result is never replaced by a re-run with failed subjects, and a partial one never
    by a partial one with fewer subjects: :class:`PublishConflictError`, before any upload.
    ``cache_dir`` is the download cache (staging, locks, and ``maps.pycortex``'s database;
    default :func:`pipelines.cache.default_cache_dir`). ``group`` is the group step's record
    (:func:`pipelines.group.step.group_level`), rendered under ``sub-group/``.
    """
    cfg = config
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    local_shown = local_dir
    if local_dir is not None:
        check_local_copy(cfg, local_dir, cache_dir)
    store = open_store(cfg.output)
    prefix_rel = cfg.publish_prefix[len(store.uri) + 1:]
    manifest_rel = f"{prefix_rel}/manifest.json"
    existing = _guard(store, manifest_rel, cfg, fits)
    if existing is not None and existing["status"] == "complete":
        log.info("%s is already published and complete; nothing to do", store.uri_of(manifest_rel))
        _update_gallery(cfg.output)  # a run killed before its index update left it stale: repair it
        return _reused(store, manifest_rel, existing, local_shown, cache_dir)
    staging_root = cache_dir / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    # a private staging folder per run: removed whole when done, and nothing else ever is
    with tempfile.TemporaryDirectory(prefix=f"{cfg.analysis_id}-", dir=staging_root) as staging:
        return _publish_staged(cfg, prepared, features, fits, store, prefix_rel, manifest_rel, Path(staging),
                               local_shown, cache_dir, started, airflow_run_id, group)


def _feature_models(features: list[dict]) -> dict[str, dict]:
    """Per feature space that runs a model: the dtype, quantization and device it ran with."""
    return {f["feature"]: f["model_runtime"] for f in features if f.get("model_runtime")}


def _publish_staged(cfg: AnalysisConfig, prepared: dict, features: list[dict], fits: list[dict], store: Store,
                    prefix_rel: str, manifest_rel: str, out_dir: Path, local_dir: str | Path | None, cache_dir: Path,
                    started: str | None, airflow_run_id: str | None, group: dict | None = None) -> dict[str, Any]:
    """Render into the staging folder `out_dir`, upload verified, commit the manifest, then copy locally."""
    import nibabel as nib

    artifacts: list[dict] = []
    report_subjects = []
    subject_info: dict[str, dict] = {}
    metrics: dict[str, dict] = {}
    flatmaps = _Flatmaps(cfg, cache_dir)
    group = group if group and group.get("status") != "off" else None
    isc = isc_ceilings(group, load_npz(store.get_bytes(group["result_rel"])) if group and group.get("result_rel")
                       else None)
    layer_curves: dict[str, dict] = {}
    warnings: list[str] = []
    for fit in sorted(fits, key=lambda f: f["subject"]):
        sub = fit["subject"]
        if fit.get("status") != "ok":
            subject_info[sub] = {"status": "failed", "error": fit.get("error", "unknown error")}
            continue
        arrays = load_npz(store.get_bytes(fit["result_rel"]))
        mask_img = None
        if fit.get("mask_rel"):
            mask_path = store.download(fit["mask_rel"], out_dir / ".work" / f"mask-{sub}.nii.gz")
            mask_img = nib.load(str(mask_path))
            mask_img = nib.Nifti1Image(np.asarray(mask_img.dataobj), mask_img.affine)
        if sub in isc:  # no repeats: the inter-subject ceiling normalises this subject's scores
            arrays, ceiled = with_isc_ceiling(arrays, fit["metrics"], isc[sub])
            fit = {**fit, "metrics": ceiled}
        subj_artifacts, entries = render_subject(cfg, fit, arrays, mask_img, out_dir, flatmaps.of(sub, fit["kind"]))
        artifacts += subj_artifacts
        # model comparison: alpha-edge counts (into fit["metrics"]) and maps, layer curves of sweeps
        extra, curves, notes = subject_comparison(cfg, fit, arrays, mask_img, out_dir, entries)
        artifacts += extra
        layer_curves.update({sub: curves} if curves else {})
        warnings += notes
        artifacts += model_artifacts(cfg, fit, store, out_dir)  # publish.models: weights and feature recipe
        metrics[sub] = fit["metrics"]
        subject_info[sub] = {k: fit[k] for k in ("status", "simulated", "kind", "space", "n_targets",
                                                  "n_invalid_targets", "n_samples", "n_runs", "n_constant_targets",
                                                  "stories", "preprocess") if k in fit and fit[k] != {}}
        report_subjects.append({"label": sub, "simulated": bool(fit.get("simulated")), "feature_spaces": entries})

    backend = next((f.get("backend") for f in fits if f.get("backend")), "")
    provenance_static = {"neuroflow_version": __version__, "libraries": library_versions(),
                         "backend": backend, "device": _device(backend), "config_hash": cfg.config_hash}
    (out_dir / "config.yaml").write_text(cfg.resolved_yaml())
    artifacts.append({"file": out_dir / "config.yaml", "kind": "config_yaml"})
    (out_dir / "dataset_description.json").write_text(json.dumps({
        "Name": f"neuroflow encoding models of {cfg.dataset.dataset_id} {cfg.dataset.version}",
        "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "neuroflow", "Version": __version__, "Description": cfg.analysis_id}],
        "SourceDatasets": [{"URL": cfg.dataset.source, "Version": cfg.dataset.version}],
    }, indent=2, sort_keys=True))
    artifacts.append({"file": out_dir / "dataset_description.json", "kind": "dataset_description"})
    artifacts += analysis_layer_curves(cfg, layer_curves, out_dir)
    report = {
        "title": f"neuroflow: {cfg.dataset.dataset_id} {cfg.dataset.version} — {cfg.name}",
        "dataset": {"id": cfg.dataset.dataset_id, "version": cfg.dataset.version, "source": cfg.dataset.source},
        "analysis_id": cfg.analysis_id, "config_yaml": cfg.resolved_yaml(),
        "provenance": {**{k: v for k, v in provenance_static.items() if k != "libraries"},
                       **{f"version {k}": v for k, v in provenance_static["libraries"].items()},
                       "published at": cfg.publish_prefix},
        "subjects": report_subjects, "warnings": warnings,
    }
    if group is not None:
        group_artifacts, report["group"] = render_group(cfg, group, store, out_dir)
        artifacts += group_artifacts
    artifacts += _render_report(report, subject_info, out_dir / "report.html")

    existing = _guard(store, manifest_rel, cfg, fits)  # again: another run may have committed meanwhile
    if existing is not None and existing["status"] == "complete":
        log.info("%s was committed by another run meanwhile; keeping it", store.uri_of(manifest_rel))
        _update_gallery(cfg.output)
        return _reused(store, manifest_rel, existing, local_dir, cache_dir)
    if existing is not None:
        _withdraw_changed(store, manifest_rel, existing,
                          {Path(a["file"]).relative_to(out_dir).as_posix(): sha256_file(a["file"]) for a in artifacts})
    records = []
    for art in artifacts:
        rel = Path(art["file"]).relative_to(out_dir).as_posix()
        ctype = {"report_html": "text/html", "subject_report_html": "text/html", "figure_png": "image/png",
                 "viewer_html": "text/html",
                 "flatmap_png": "image/png", "config_yaml": "text/yaml",
                 "decoding_json": "application/json", "layer_curve_json": "application/json",
                 "group_report_html": "text/html", "group_json": "application/json", "roi_json": "application/json",
                 "roi_tsv": "text/tab-separated-values", "srm_json": "application/json",
                 "srm_tsv": "text/tab-separated-values",
                 "dataset_description": "application/json"}.get(art["kind"])
        failpoint("publish.upload")
        rec = store.put_file(art["file"], f"{prefix_rel}/{rel}", content_type=ctype)
        rec["path"] = rel
        records.append({**rec, **{k: v for k, v in art.items() if k not in ("file",)}})
    records.sort(key=lambda r: r["path"])

    inputs: dict[str, dict] = {}
    for item in [prepared, *features, *fits, flatmaps.files_read(), group or {}]:
        for rec in item.get("files_read", []):
            inputs[rec["key"]] = rec
    failed = [s for s, info in subject_info.items() if info["status"] != "ok"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "partial" if failed else "complete",
        "dataset": {"id": cfg.dataset.dataset_id, "version": cfg.dataset.version, "source": cfg.dataset.source},
        "analysis_id": cfg.analysis_id,
        "config_hash": cfg.config_hash,
        "subjects": sorted(subject_info),
        "subject_info": subject_info,
        "feature_spaces": [f.model_dump(mode="json") for f in cfg.features],
        "metrics": metrics,
        **({"warnings": warnings} if warnings else {}),  # e.g. alphas at the grid's edge; absent when none
        "artifacts": records,
        "inputs": [inputs[k] for k in sorted(inputs)],
        "methods": methods_block(cfg, fits),  # how every number was made (metric, folds, repeats, models)
        "provenance": {**provenance_static, "feature_models": _feature_models(features),
                       "started": started or utc_now(), "finished": utc_now(), "airflow_run_id": airflow_run_id},
    }
    if group is not None:
        manifest["group"] = manifest_record(group)
    validate_manifest(manifest)
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    failpoint("publish.commit")
    current = _guard(store, manifest_rel, cfg, fits)
    if current is None:
        created = store.create_bytes(body, manifest_rel, content_type="application/json")
    else:  # an earlier partial result of this analysis that this one may replace (_guard said so)
        created = None if current["status"] == "complete" else store.put_bytes(
            body, manifest_rel, content_type="application/json")
    if created is None:
        # an identical analysis committed between our check and our write: adopt its manifest
        winner = current if current is not None else _guard(store, manifest_rel, cfg, fits)
        if winner is not None and winner["status"] == "complete":
            log.info("%s was committed concurrently by another run; keeping it", store.uri_of(manifest_rel))
            _update_gallery(cfg.output)
            return _reused(store, manifest_rel, winner, local_dir, cache_dir)
        store.put_bytes(body, manifest_rel, content_type="application/json")
    (out_dir / "manifest.json").write_bytes(body)
    failpoint("publish.gallery")
    _update_gallery(cfg.output)
    files = sorted({r["path"] for r in records} | {"manifest.json"})
    local = (_published_folder(cfg) if local_dir is None
             else install(out_dir, files, local_dir, cfg.analysis_id, cache_dir=cache_dir))
    return _result(store, manifest_rel, manifest, local, reused=False)


def _render_report(report: dict, subject_info: dict[str, dict], report_path: Path) -> list[dict]:
    """The report's artifacts: one page (``report.html``) up to ``INDEX_ABOVE_SUBJECTS`` subjects; past
    that an index (``report.html``) and one page per fitted subject (``sub-<label>/report.html``)."""
    if len(subject_info) <= INDEX_ABOVE_SUBJECTS:
        return [{"file": render_report(report, report_path), "kind": "report_html"}]
    for subj in report["subjects"]:
        subj["page"] = f"sub-{subj['label']}/report.html"
    report["failed"] = [{"label": s, "error": i.get("error", "failed")} for s, i in sorted(subject_info.items())
                        if i["status"] != "ok"]
    return [{"file": path, "kind": "report_html"} if sub is None
            else {"file": path, "kind": "subject_report_html", "subject": sub}
            for path, sub in render_report_pages(report, report_path)]


_ANALYSIS_ID = re.compile(r"[a-z0-9][a-z0-9\-]{0,40}-[0-9a-f]{12}")


def _key_inside(key: str, prefix: str) -> bool:
    """True when the S3 key prefix `key` is `prefix` or lies under it ("" is the bucket root)."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


def check_output_place(cfg: AnalysisConfig) -> None:
    """Refuse an output that would write into the dataset being read or into a published analysis.

    Refused: an ``output`` (or the publish prefix under it) equal to or inside the dataset's S3
    source (or local folder, for a local output); an ``output`` equal to or inside a published
    analysis' folder (a prefix above it holds a ``manifest.json``, or is named like an analysis id
    and holds its ``config.yaml``).
    """
    if is_local_uri(cfg.output):
        _check_local_output_place(cfg)
        return
    out_bucket, out_key = split_s3_uri(cfg.output)
    if cfg.dataset.source.startswith("s3://"):
        src_bucket, src_key = split_s3_uri(cfg.dataset.source)
        publish_key = split_s3_uri(cfg.publish_prefix)[1]
        if src_bucket == out_bucket and (_key_inside(out_key, src_key) or _key_inside(publish_key, src_key)):
            raise ConfigError(f"'output' {cfg.output} would write results under {cfg.publish_prefix}, inside the "
                              f"dataset source {cfg.dataset.source}, which neuroflow only reads; choose an output "
                              "prefix outside the dataset (e.g. another bucket)")
    store = ResultStore(f"s3://{out_bucket}")
    parts = out_key.split("/") if out_key else []
    for depth in range(len(parts), -1, -1):
        folder = "/".join(parts[:depth])
        rel = f"{folder}/" if folder else ""
        marker = f"{rel}manifest.json"
        if store.exists(marker) or (depth and _ANALYSIS_ID.fullmatch(parts[depth - 1])
                                    and store.exists(f"{rel}config.yaml")):
            root = "/".join(parts[:max(depth - 3, 0)])
            raise ConfigError(f"'output' {cfg.output} lies inside the published analysis s3://{out_bucket}/{folder} "
                              f"(it holds {marker.rsplit('/', 1)[-1] if store.exists(marker) else 'config.yaml'}); "
                              "neuroflow never writes into another analysis: use an output root outside every "
                              f"analysis folder, e.g. s3://{out_bucket}{'/' + root if root else ''}")


def _check_local_output_place(cfg: AnalysisConfig) -> None:
    """:func:`check_output_place` for an output folder (links resolved, as the files would land)."""
    out = local_path(cfg.output).resolve()
    publish = local_path(cfg.publish_prefix).resolve()
    if not cfg.dataset.source.startswith("s3://"):
        src = Path(cfg.dataset.source).expanduser().resolve()
        if _path_inside(out, src) or _path_inside(publish, src):
            raise ConfigError(f"'output' {cfg.output} would write results under {cfg.publish_prefix}, inside the "
                              f"dataset folder {cfg.dataset.source}, which neuroflow only reads; choose an output "
                              "folder outside the dataset")
    for folder in [out, *out.parents]:
        marker = folder / "manifest.json"
        if marker.is_file() or (_ANALYSIS_ID.fullmatch(folder.name) and (folder / "config.yaml").is_file()):
            raise ConfigError(f"'output' {cfg.output} lies inside the published analysis {folder} (it holds "
                              f"{'manifest.json' if marker.is_file() else 'config.yaml'}); neuroflow never writes "
                              "into another analysis: use an output folder outside every analysis folder, e.g. "
                              f"{folder.parents[2] if len(folder.parents) > 2 else folder.parent}")


def _path_inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _published_folder(cfg: AnalysisConfig) -> Path:
    """The analysis' folder when the output is local (its files are on disk already)."""
    return local_path(cfg.publish_prefix)


def check_local_copy(cfg: AnalysisConfig, local_dir: str | Path, cache_dir: Path) -> Path:
    """:func:`pipelines.localdir.check_local_dir`, and, for a local output, refuse a copy inside the
    output folder or holding it (it would write among published files)."""
    resolved = check_local_dir(local_dir, cfg.analysis_id, cache_dir=cache_dir, protected=local_sources(cfg))
    if is_local_uri(cfg.output):
        out = local_path(cfg.output).resolve()
        if _path_inside(resolved, out) or _path_inside(out, resolved):
            raise ConfigError(f"--local-dir {local_dir}: is inside the output folder {out} or holds it; with a "
                              "local 'output' the published files are already on disk there: leave --local-dir "
                              "out, or pass a folder outside the output for a second copy")
    return resolved


def local_sources(cfg: AnalysisConfig) -> tuple[str, ...]:
    """The dataset folder when the source is local (a local copy is never written into it)."""
    return () if cfg.dataset.source.startswith("s3://") else (cfg.dataset.source,)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ok_subjects(fits: list[dict]) -> set[str]:
    return {f["subject"] for f in fits if f.get("status") == "ok"}


def _guard(store: Store, manifest_rel: str, cfg: AnalysisConfig, fits: list[dict]) -> dict | None:
    """The valid manifest of this analysis already published (None: none, or one not worth keeping).

    Raises :class:`PublishConflictError` when this run's result (`fits`) would downgrade it: a
    complete result and this run has failed subjects, or a partial one whose published subjects
    this run does not all have.
    """
    existing = _published_manifest(store, manifest_rel, cfg.config_hash)
    if existing is None:
        return None
    uri = store.uri_of(manifest_rel)
    failed = [f for f in fits if f.get("status") != "ok"]
    if existing["status"] == "complete" and failed:
        why = "; ".join(f"sub-{f['subject']}: {_one_line(f.get('error', 'failed'), 200)}" for f in failed)
        raise PublishConflictError(
            f"{uri}: a complete result of this analysis is already published and stands as it is; this re-run "
            f"failed ({why}), so nothing was uploaded. Fix that input, or change the config to publish a new "
            "analysis")
    if existing["status"] != "complete":
        lost = sorted(_ok_subjects([{"subject": s, **i} for s, i in existing["subject_info"].items()])
                      - _ok_subjects(fits))
        if lost:
            raise PublishConflictError(
                f"{uri}: the published partial result of this analysis has subjects {lost} that this re-run "
                "failed; it stands as it is and nothing was uploaded. Fix their input and run again")
    return existing


def _withdraw_changed(store: Store, manifest_rel: str, existing: dict, new_digests: dict[str, str]) -> None:
    """Before artifacts of a published partial result are overwritten with different bytes, drop
    them from its manifest, so a reader never sees a manifest whose listed sha256 is wrong."""
    changing = [a for a in existing["artifacts"] if a["path"] in new_digests and new_digests[a["path"]] != a["sha256"]]
    if not changing:
        return
    kept = dict(existing, artifacts=[a for a in existing["artifacts"] if a not in changing])
    validate_manifest(kept)
    log.info("%s: %d artifacts of the earlier partial result change; they leave its manifest until the new one "
             "is committed", store.uri_of(manifest_rel), len(changing))
    store.put_bytes(json.dumps(kept, indent=2, sort_keys=True).encode(), manifest_rel, content_type="application/json")


class _Flatmaps:
    """The pycortex filestore of each subject, fetched from the dataset when first needed."""

    def __init__(self, cfg: AnalysisConfig, cache_dir: str | Path | None):
        self.cfg, self.kinds, self.ingest = cfg, flatmap.KINDS, None
        self.on = flatmap.enabled(cfg)
        if cache_dir is None:
                    cache_dir = default_cache_dir()
        self.cache_dir = Path(cache_dir)

    def of(self, subject: str, kind: str) -> tuple[Path, Any] | None:
        if not self.on or kind not in self.kinds:
            return None
        if self.ingest is None:
            self.ingest = open_dataset(self.cfg, self.cache_dir)
        return flatmap.local_filestore(self.ingest, subject, kind, self.cache_dir / "pycortex")

    def files_read(self) -> dict:
        return {"files_read": [r.as_dict() for r in self.ingest.files_read.values()] if self.ingest else []}


def _update_gallery(output: str) -> None:
    """Refresh the index of analyses at the output root; the manifest is already committed, so
    a failure here is logged, never fatal (``neuroflow_maps_consumer`` refreshes it again)."""
    try:
        update_index(output)
    except Exception as err:  # noqa: BLE001 - the index is derived data, rebuilt by the next update
        log.warning("the index at %s was not updated (%s); neuroflow_maps_consumer will refresh it", output, err)


def _published_manifest(store: Store, manifest_rel: str, config_hash: str) -> dict | None:
    """The manifest at `manifest_rel` if it is valid and of this config (any status); else None."""
    if not store.exists(manifest_rel):
        return None
    try:
        manifest = json.loads(store.get_bytes(manifest_rel))
        validate_manifest(manifest)
    except Exception:  # noqa: BLE001 - an unreadable manifest is replaced, never trusted
        log.warning("%s is unreadable or invalid; it will be replaced", store.uri_of(manifest_rel))
        return None
    if manifest["config_hash"] != config_hash:
        return None
    return manifest


def _complete_manifest(store: Store, manifest_rel: str, config_hash: str) -> dict | None:
    """The manifest at `manifest_rel` if it is complete, valid and of this config; else None."""
    manifest = _published_manifest(store, manifest_rel, config_hash)
    return manifest if manifest is not None and manifest["status"] == "complete" else None


def _reused(store: Store, manifest_rel: str, manifest: dict, local_dir: str | Path | None, cache_dir: Path) -> dict:
    """The result of an analysis already committed: its manifest and report copied to `local_dir`
    (None: a local output's own folder, nothing copied)."""
    if local_dir is None:
        return _result(store, manifest_rel, manifest, local_path(store.uri_of(manifest_rel)).parent, reused=True)
    staging_root = cache_dir / "staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reused-", dir=staging_root) as staging:
        tmp = Path(staging)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        files = ["manifest.json"]
        if any(a["path"] == "report.html" for a in manifest["artifacts"]):
            store.download(manifest_rel.rsplit("/", 1)[0] + "/report.html", tmp / "report.html")
            files.append("report.html")
        local = install(tmp, files, local_dir, manifest["analysis_id"], cache_dir=cache_dir, prune=False)
    return _result(store, manifest_rel, manifest, local, reused=True)


def _result(store: Store, manifest_rel: str, manifest: dict, local_dir: str | Path, *, reused: bool) -> dict:
    local_dir = Path(local_dir)
    return {"manifest_uri": store.uri_of(manifest_rel), "report_path": str(local_dir / "report.html"),
            "local_dir": str(local_dir), "status": manifest["status"], "metrics": manifest["metrics"],
            "failed_subjects": sorted(s for s, i in manifest["subject_info"].items() if i["status"] != "ok"),
            "reused": reused}


def _device(backend: str) -> str:
    if backend == "torch_cuda":
        try:
            import torch

            return torch.cuda.get_device_name(0)
        except Exception:  # noqa: BLE001
            return "cuda"
    return "cpu"
