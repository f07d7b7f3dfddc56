"""ROI summaries over an atlas the user names: the mean r of each region, per subject and for the group.

An atlas gives each common target a region: a label volume (resampled, nearest neighbour, to the
group grid), a label surface per hemisphere (one value per template vertex), or, for named
targets (ROI time courses, sensors), a table mapping target names to regions (each target its own
region when there is no atlas). A subject's value of a region is the mean of its r over the
region's targets where it has one; the group's is the Fisher-z mean of the subjects' values, tested
across subjects by sign flips (:func:`pipelines.group.stats.sign_flip_test`, FDR over regions).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DatasetError
from .space import CommonSpace
from .stats import sign_flip_test

__all__ = ["Atlas", "atlas_from_table", "atlas_from_volume", "atlas_from_surfaces", "roi_table", "read_label_names",
           "ROI_COLUMNS"]

ROI_COLUMNS = ["feature_space", "roi", "label", "subject", "n_targets", "mean_r", "p", "q", "p_max"]


@dataclass
class Atlas:
    """The region of every common target (0: none) and the regions' names."""

    labels: np.ndarray  # shape (n_targets,), int
    names: dict[int, str]
    source: str


def read_label_names(path, what: str) -> dict[int, str]:
    """``index`` -> ``name`` from a TSV (BIDS ``dseg.tsv``: columns ``index`` and ``name``)."""
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = [c for c in ("index", "name") if c not in table.columns]
    if missing:
        raise DatasetError(f"{what}: 'group.atlas_labels' needs columns 'index' and 'name'; it lacks {missing} "
                           f"(has {list(table.columns)})")
    try:
        return {int(i): str(n) for i, n in zip(table["index"], table["name"])}
    except ValueError as err:
        raise DatasetError(f"{what}: 'group.atlas_labels' column 'index' must hold integers ({err})") from err


def _names(labels: np.ndarray, names: dict[int, str] | None) -> dict[int, str]:
    found = sorted({int(v) for v in np.unique(labels) if v != 0})
    names = names or {}
    return {i: names.get(i, f"label-{i}") for i in found}


def atlas_from_volume(common: CommonSpace, atlas_img, names: dict[int, str] | None, source: str) -> Atlas:
    """Labels of the common voxels from a label NIfTI in the group's space (nearest neighbour)."""
    from nilearn.image import resample_to_img  # heavy: volumes only

    if common.kind != "volume":
        raise DatasetError(f"{source}: a label volume was given as 'group.atlas', but the group maps are "
                           f"{common.kind}s; give a label GIFTI per hemisphere or a target table")
    data = np.asarray(atlas_img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or not np.allclose(data, np.round(data)):
        raise DatasetError(f"{source}: 'group.atlas' must be a 3-D volume of integer labels; got shape {data.shape}")
    import nibabel as nib

    img = nib.Nifti1Image(np.round(data).astype(np.int32), atlas_img.affine)
    moved = resample_to_img(img, common.mask_img, interpolation="nearest", force_resample=True, copy_header=True)
    mask = np.asarray(common.mask_img.dataobj).astype(bool)
    labels = np.asarray(moved.dataobj).astype(np.int64)[mask]
    return Atlas(labels, _names(labels, names), source)


def atlas_from_surfaces(common: CommonSpace, by_hemi: dict[str, np.ndarray], names: dict[int, str] | None,
                        source: str) -> Atlas:
    """Labels of the common vertices from one label array per hemisphere (``L``/``R``)."""
    if common.kind != "surface":
        raise DatasetError(f"{source}: a label surface was given as 'group.atlas', but the group maps are "
                           f"{common.kind}s")
    labels = np.zeros(common.n_targets, dtype=np.int64)
    for h in np.unique(common.info["hemi"]):
        rows = common.info["hemi"] == h
        if h not in by_hemi:
            raise DatasetError(f"{source}: no label surface for hemisphere {h}")
        lab = np.asarray(by_hemi[h]).ravel()
        if lab.size != common.n_vertices[h]:
            raise DatasetError(f"{source}: hemisphere {h} has {lab.size} labels but the {common.space} surface has "
                               f"{common.n_vertices[h]} vertices")
        labels[rows] = lab[common.info["vertex"][rows]].astype(np.int64)
    return Atlas(labels, _names(labels, names), source)


def atlas_from_table(common: CommonSpace, table: pd.DataFrame | None, source: str) -> Atlas:
    """Regions of named targets from a table with columns ``target`` and ``roi`` (None: each target its own)."""
    if common.kind != "targets":
        raise DatasetError(f"{source}: a target table was given as 'group.atlas', but the group maps are "
                           f"{common.kind}s; give a label NIfTI or GIFTI")
    if table is None:
        return Atlas(np.arange(1, common.n_targets + 1), dict(enumerate(common.target_names, 1)),
                     "each target its own region")
    missing = [c for c in ("target", "roi") if c not in table.columns]
    if missing:
        raise DatasetError(f"{source}: 'group.atlas' as a table needs columns 'target' and 'roi'; it lacks {missing}")
    rois = sorted(set(table["roi"].astype(str)))
    ids = {r: i for i, r in enumerate(rois, 1)}
    of = dict(zip(table["target"].astype(str), table["roi"].astype(str)))
    unknown = sorted(set(of) - set(common.target_names))
    if unknown:
        raise DatasetError(f"{source}: targets {unknown[:5]} are not among the group's targets "
                           f"{common.target_names[:10]}")
    labels = np.array([ids[of[t]] if t in of else 0 for t in common.target_names], dtype=np.int64)
    return Atlas(labels, {i: r for r, i in ids.items()}, source)


def roi_table(common: CommonSpace, atlas: Atlas, *, n_permutations: int = 10_000, q: float = 0.05,
              random_state: int = 0) -> pd.DataFrame:
    """One row per feature space, region and subject (and ``group``): mean r over the region's targets.

    Subject rows: the mean of the subject's finite r over the region (``n_targets``: how many).
    Group rows: the Fisher-z mean of the subjects' region means, with the sign-flip p-value across
    subjects, its BH ``q`` over regions and the max-statistic ``p_max``.
    """
    rows = []
    ids = sorted(atlas.names)
    for feat in sorted(common.values):
        r = common.values[feat]  # (subjects, targets)
        means = np.full((len(common.subjects), len(ids)), np.nan)
        counts = np.zeros((len(common.subjects), len(ids)), dtype=np.int64)
        for j, label in enumerate(ids):
            cols = atlas.labels == label
            block = r[:, cols]
            counts[:, j] = np.isfinite(block).sum(axis=1)
            with np.errstate(invalid="ignore"):
                means[:, j] = np.where(counts[:, j] > 0, np.nansum(block, axis=1) / np.maximum(counts[:, j], 1),
                                       np.nan)
        for i, sub in enumerate(common.subjects):
            for j, label in enumerate(ids):
                rows.append({"feature_space": feat, "roi": atlas.names[label], "label": label, "subject": sub,
                             "n_targets": int(counts[i, j]), "mean_r": means[i, j]})
        test = sign_flip_test(means, n_permutations=n_permutations, fdr=q, random_state=random_state) \
            if len(common.subjects) >= 2 and ids else None
        for j, label in enumerate(ids):
            rows.append({"feature_space": feat, "roi": atlas.names[label], "label": label, "subject": "group",
                         "n_targets": int(counts[:, j].min()) if len(common.subjects) else 0,
                         "mean_r": float(test.mean_r[j]) if test is not None else np.nan,
                         "p": float(test.p[j]) if test is not None else np.nan,
                         "q": float(test.q[j]) if test is not None else np.nan,
                         "p_max": float(test.p_max[j]) if test is not None else np.nan})
    return pd.DataFrame(rows, columns=ROI_COLUMNS)
