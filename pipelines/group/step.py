"""The group step: after every subject's fit, their maps in a common space, tested across subjects.

``group_level(config, prepared, fits)`` reads the subjects' fitted maps from ``{output}/_work/``,
puts them in a common space (:mod:`pipelines.group.space`), tests the Fisher-z mean r across
subjects (:mod:`pipelines.group.stats`), summarises an atlas' regions (:mod:`pipelines.group.roi`)
and, where the data have no repeats, computes inter-subject ceilings (:mod:`pipelines.group.isc`).
It writes one work entry (arrays) and returns a small JSON-able record that publish renders into
``sub-group/``; with no ``group`` in the config it returns ``{"status": "off"}``, and where no
group map can be made ``{"status": "none", "reason": ...}`` (the reason goes into the report and
the manifest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cache import default_cache_dir, load_npz, save_npz, write_entry
from ..config import AnalysisConfig, as_config
from ..errors import DatasetError
from ..resultstore import open_store
from ..storage import sha256_file
from .isc import intersubject_ceiling
from .roi import Atlas, atlas_from_surfaces, atlas_from_table, atlas_from_volume, read_label_names, roi_table
from .space import CommonSpace, SubjectMaps, common_space
from .srm_step import srm_level
from .stats import sign_flip_test

__all__ = ["group_files", "group_level", "read_group_file", "read_transform"]

log = logging.getLogger("neuroflow")
FIT_STATS = ("mean_r", "t", "p", "q", "p_max", "significant")


def read_group_file(cfg: AnalysisConfig, spec: str, ingest, cache_dir: Path, what: str) -> Path:
    """A ``group.*`` file on disk: a key of the dataset (verified and recorded, through ``ingest``), an
    ``s3://`` URI, or an absolute local path."""
    try:
        if spec.startswith("s3://"):
            parent, _, name = spec.rpartition("/")
            dest = cache_dir / "group-files" / hashlib.sha256(spec.encode()).hexdigest()[:16] / name
            if not dest.is_file():
                open_store(parent).download(name, dest)
            return dest
        if spec.startswith("/") or spec.startswith("file://"):
            path = Path(spec[7:] if spec.startswith("file://") else spec)
            if not path.is_file():
                raise FileNotFoundError(spec)
            return path
        return ingest.fetch(spec)
    except DatasetError as err:
        raise DatasetError(f"'{what}' {spec}: {err}") from err
    except Exception as err:  # noqa: BLE001 - one line naming the file and the key, whatever the store said
        raise DatasetError(f"'{what}' {spec}: cannot be read ({type(err).__name__}: {err}); give a key inside the "
                           "dataset, an s3:// URI or an absolute path to an existing file") from err


def read_transform(path: Path, spec: str) -> np.ndarray | str:
    """A 4x4 world-to-template affine from a text file; a reason string for formats not read."""
    if path.name.endswith(".h5") or path.name.endswith(".mat"):
        return (f"{spec}: ANTs/ITK transforms ({path.suffix}: fMRIPrep's *_xfm.h5 composite warps, ITK .mat "
                "affines) are not read (no library here reads them cleanly); give 'group.transform' as a 4x4 "
                "world-to-template affine in a text file, or use the dataset's MNI-space derivatives")
    try:
        matrix = np.loadtxt(path, dtype=np.float64)
    except ValueError as err:
        raise DatasetError(f"{spec}: 'group.transform' must be a 4x4 affine as text (4 rows of 4 numbers); "
                           f"{err}") from err
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]) or not np.isfinite(matrix).all():
        raise DatasetError(f"{spec}: 'group.transform' must be a 4x4 affine whose last row is 0 0 0 1; got shape "
                           f"{matrix.shape}")
    return matrix


def _subject_maps(cfg: AnalysisConfig, store, ok: list[dict], tmp: Path) -> list[SubjectMaps]:
    import nibabel as nib  # volumes only need it; loaded once here

    out = []
    for fit in ok:
        arrays = load_npz(store.get_bytes(fit["result_rel"]))
        mask_img = None
        if fit.get("mask_rel"):
            path = store.download(fit["mask_rel"], tmp / f"mask-{fit['subject']}.nii.gz")
            img = nib.load(str(path))
            mask_img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        out.append(SubjectMaps(fit["subject"], fit["kind"], fit.get("space"), arrays, mask_img))
    return out


def group_files(cfg: AnalysisConfig, ok: list[dict], ingest, cache_dir: Path) -> dict[str, Path]:
    """Every ``group.*`` file the group level reads (spec -> local path), read before anything is computed."""
    g = cfg.group
    specs: dict[str, str] = {}
    if g.atlas:
        for h in (("L", "R") if "{hemi}" in g.atlas else ("",)):
            specs[g.atlas.replace("{hemi}", h)] = "group.atlas"
    if g.atlas_labels:
        specs[g.atlas_labels] = "group.atlas_labels"
    if g.reference:
        specs[g.reference] = "group.reference"
    if g.transform:
        for f in ok:
            if f.get("kind") == "bold" and not str(f.get("space") or "").startswith("MNI"):
                specs[g.transform.replace("{subject}", f["subject"])] = "group.transform"
    return {spec: read_group_file(cfg, spec, ingest, cache_dir, what) for spec, what in specs.items()}


def _image(path: Path, spec: str, what: str):
    """A NIfTI or GIFTI image, or one DatasetError naming the file and the key."""
    import nibabel as nib  # heavy: only when an image is named

    try:
        return nib.load(str(path))
    except Exception as err:  # noqa: BLE001 - whatever nibabel says, one line naming the file
        raise DatasetError(f"'{what}' {spec}: not a readable NIfTI/GIFTI image ({err}); give a label image") from err


def _atlas(cfg: AnalysisConfig, common: CommonSpace, files: dict[str, Path]) -> Atlas | None:
    g = cfg.group
    names = read_label_names(files[g.atlas_labels], g.atlas_labels) if g.atlas_labels else None
    if g.atlas is None:
        return atlas_from_table(common, None, "targets") if common.kind == "targets" else None
    if g.atlas.endswith(".tsv"):
        path = files[g.atlas]
        return atlas_from_table(common, pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False), g.atlas)
    if ".gii" in g.atlas:
        by_hemi, gifti_names = {}, {}
        for h in sorted(set(common.info.get("hemi", np.array(["L", "R"])))):
            spec = g.atlas.replace("{hemi}", h)
            img = _image(files[spec], spec, "group.atlas")
            by_hemi[h] = np.asarray(img.darrays[0].data)
            gifti_names.update({int(k): str(v) for k, v in img.labeltable.get_labels_as_dict().items()})
        return atlas_from_surfaces(common, by_hemi, names or gifti_names, g.atlas)
    img = _image(files[g.atlas], g.atlas, "group.atlas")
    return atlas_from_volume(common, img, names, g.atlas)


def _isc(cfg: AnalysisConfig, common: CommonSpace, subjects: list[SubjectMaps], ingest) -> tuple[dict, dict]:
    """Inter-subject ceilings (record, per-subject r_max in its own target order) or the reason there are none."""
    from ..ingest import load_subject  # reads every subject's responses again: only when asked for

    if any("noise_ceiling_r_max" in s.arrays for s in subjects):
        return {"status": "none", "reason": "the data have repeats: each subject's own noise ceiling is used"}, {}
    if common.index is None:
        return {"status": "none", "reason": "the subjects' maps were resampled to a common grid; inter-subject "
                "ceilings need the same targets in every subject"}, {}
    if len(subjects) < 3:
        return {"status": "none", "reason": "inter-subject ceilings need at least 3 subjects"}, {}
    by_subject = {}
    for s in subjects:
        runs = load_subject(ingest, s.subject).runs
        by_subject[s.subject] = {str(r.story): r.data for r in runs}
    stories = sorted(set.intersection(*(set(v) for v in by_subject.values())))
    if not stories:
        return {"status": "none", "reason": "no story was heard by every subject"}, {}
    parts, trimmed = [], {}
    for story in stories:
        n = min(by_subject[s.subject][story].shape[0] for s in subjects)
        longest = max(by_subject[s.subject][story].shape[0] for s in subjects)
        if longest != n:
            trimmed[story] = longest - n
        parts.append(np.stack([by_subject[s.subject][story][:n][:, common.index[s.subject]] for s in subjects]))
    Y = np.concatenate(parts, axis=1)
    ceiling = intersubject_ceiling(Y, reliability=cfg.group.reliability)
    own = {}
    for i, s in enumerate(subjects):
        full = np.full(s.arrays["target_names"].shape[0], np.nan, dtype=np.float32)
        full[common.index[s.subject]] = ceiling.r_max[i]
        own[s.subject] = full
    kept = np.isfinite(ceiling.r_max)
    record = {"status": "ok", "stories": stories, "n_samples": int(Y.shape[1]),
              "trimmed_samples": trimmed, "reliability": cfg.group.reliability,
              "n_with_ceiling": int(kept.sum()), "n_tested": int(kept.size),
              "mean_r_max": round(float(np.nanmean(ceiling.r_max)), 6) if kept.any() else None,
              "mean_r_loso": round(float(np.nanmean(ceiling.r_loso)), 6)}
    arrays = {"isc__r_max": ceiling.r_max.astype(np.float32), "isc__r_loso": ceiling.r_loso.astype(np.float32),
              "isc__p": ceiling.p_value.astype(np.float32)}
    return record, {**{f"isc_own__{k}": v for k, v in own.items()}, **arrays}


def _key(cfg: AnalysisConfig, ok: list[dict], files: dict[str, Path]) -> str:
    """The group result's cache key: the config, the subjects' fit results and the group files' content."""
    return hashlib.sha256(json.dumps({"config": cfg.config_hash, "fits": sorted(f["result_rel"] for f in ok),
                                      "files": {k: sha256_file(v) for k, v in files.items()}},
                                     sort_keys=True).encode()).hexdigest()[:16]


def group_level(config: dict[str, Any] | AnalysisConfig, prepared: dict, fits: list[dict], *,
                cache_dir: str | Path | None = None, features: list[dict] | None = None) -> dict[str, Any]:
    """The group result of the fitted subjects (see the module's docstring); cached by the fits' results and
    the group files' content. ``features`` (the features step's results) are needed by ``group.srm`` only;
    its record (:func:`pipelines.group.srm_step.srm_level`) is the result's ``srm`` entry, with or
    without a group map."""
    cfg = as_config(config)
    if cfg.group is None:
        return {"status": "off"}
    g = cfg.group
    ok = sorted((f for f in fits if f.get("status") == "ok"), key=lambda f: f["subject"])
    if len(ok) < g.min_subjects:
        return {"status": "none", "reason": f"{len(ok)} subject(s) fitted; the group level needs at least "
                f"{g.min_subjects} ('group.min_subjects')", "subjects": [f["subject"] for f in ok]}
    from ..ingest import open_dataset  # lists the dataset: only when the group level runs

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    ingest = open_dataset(cfg, cache)
    files = group_files(cfg, ok, ingest, cache)
    store = open_store(cfg.output)
    base = f"_work/{cfg.analysis_id}/sub-group"
    key = _key(cfg, ok, files)
    meta_rel, rel = f"{base}/group-{key}.json", f"{base}/group-{key}.npz"
    if store.exists(meta_rel) and store.exists(rel):
        log.info("sub-group: reusing finished group result %s", rel)
        return json.loads(store.get_bytes(meta_rel))
    srm = srm_level(cfg, ok, features, ingest, store, base, key)  # in each subject's own space: no common one
    with tempfile.TemporaryDirectory() as tmp:
        subjects = _subject_maps(cfg, store, ok, Path(tmp))
        reference = None
        if g.transform:
            for s in subjects:
                if s.kind != "bold" or str(s.space or "").startswith("MNI"):
                    continue
                spec = g.transform.replace("{subject}", s.subject)
                found = read_transform(files[spec], spec)
                if isinstance(found, str):
                    return {"status": "none", "reason": found, "subjects": [f["subject"] for f in ok], "srm": srm}
                s.transform = found
        if g.reference:
            reference = _image(files[g.reference], g.reference, "group.reference")
        common = common_space(subjects, reference)
        if isinstance(common, str):
            log.info("sub-group: no group map: %s", common)
            return {"status": "none", "reason": common, "subjects": [f["subject"] for f in ok], "srm": srm}
        arrays: dict[str, np.ndarray] = {"target_names": np.asarray(common.target_names, dtype=str),
                                         "subjects": np.asarray(common.subjects, dtype=str)}
        for k, v in common.info.items():
            arrays[f"info__{k}"] = v
        metrics: dict[str, dict] = {}
        for feat, r in common.values.items():
            test = sign_flip_test(r, n_permutations=g.permutations, fdr=g.q, correction=g.correction)
            for stat in FIT_STATS:
                arrays[f"{feat}__{stat}"] = getattr(test, stat).astype(np.float32 if stat != "significant" else bool)
            arrays[f"{feat}__subject_r"] = r.astype(np.float32)
            finite = test.mean_r[np.isfinite(test.mean_r)]
            metrics[feat] = {"mean_r": round(float(finite.mean()), 6) if finite.size else None,
                             "max_r": round(float(finite.max()), 6) if finite.size else None,
                             "n_targets": common.n_targets, "n_tested": int(np.isfinite(test.p).sum()),
                             "n_significant": int(test.significant.sum()), "n_permutations": test.n_permutations,
                             "exact": test.exact, "correction": g.correction, "q": g.q}
        isc = {"status": "off"}
        if g.isc_ceiling:
            isc, isc_arrays = _isc(cfg, common, subjects, ingest)
            arrays.update(isc_arrays)
        atlas = _atlas(cfg, common, files)
        roi: dict[str, Any] = {"status": "none", "reason": "no 'group.atlas' named"}
        if atlas is not None:
            table = roi_table(common, atlas, n_permutations=g.permutations, q=g.q)
            table_rel = f"{base}/group-{key}-roi.json"  # the table stays in the store: XCom carries its key
            store.put_bytes(table.to_json(orient="records").encode(), table_rel, content_type="application/json")
            roi = {"status": "ok", "source": atlas.source, "n_regions": len(atlas.names), "table_rel": table_rel}
        mask_rel = None
        if common.mask_img is not None:
            import nibabel as nib

            mask_rel = f"{base}/mask-{key}.nii.gz"
            mpath = Path(tmp) / "group-mask.nii.gz"
            nib.save(common.mask_img, mpath)
            store.put_file(mpath, mask_rel)
    write_entry(store, save_npz(arrays), rel)
    meta = {"status": "ok", "kind": common.kind, "space": common.space, "how": common.how,
            "subjects": common.subjects, "n_subjects": len(common.subjects), "n_targets": common.n_targets,
            "n_vertices": common.n_vertices,
            "result_rel": rel, "mask_rel": mask_rel, "metrics": metrics, "isc": isc, "roi": roi, "srm": srm,
            "files_read": [r.as_dict() for r in ingest.files_read.values()]}
    store.put_bytes(json.dumps(meta, sort_keys=True).encode(), meta_rel, content_type="application/json")
    return meta
