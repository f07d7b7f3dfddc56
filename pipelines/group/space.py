"""Subjects' maps in a common space, or the one line that says why there is none.

* volumes in an MNI template space (``space-MNI...``): as given; on one grid when every
  subject's is the same, else resampled (linear) to the first subject's grid;
* surfaces in a template space (``fsaverage*``, ``fsLR``): as given, vertex by vertex;
* named targets that mean the same thing in every subject (ROI time courses, MEG/EEG sensors of
  one montage): by name;
* subject-space volumes: through ``group.transform``, a world-to-template affine per subject
  (a 4x4 matrix as text), resampled to ``group.reference`` (or the first subject's grid).
  Nonlinear warps (fMRIPrep's ANTs ``*_xfm.h5``) are not read: no group map, and the reason.

Everything else (electrodes, pycortex voxels, subject-space volumes without a transform, mixed
spaces) gets no group map, and :func:`common_space` returns the reason instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CommonSpace", "SubjectMaps", "common_space", "feature_names", "TEMPLATE_SURFACES"]

TEMPLATE_SURFACES = ("fsaverage", "fsLR")
NAMED_KINDS = ("timeseries", "meg", "eeg")


@dataclass
class SubjectMaps:
    """One subject's fitted maps as :func:`pipelines.steps.fit_subject` stored them."""

    subject: str
    kind: str
    space: str | None
    arrays: dict[str, np.ndarray]
    mask_img: object | None = None  # nibabel image (volumes)
    transform: np.ndarray | None = None  # 4x4 world-to-template affine (subject-space volumes)


@dataclass
class CommonSpace:
    """The subjects' r of every feature space on common targets.

    ``values[feature]`` has shape (n_subjects, n_targets), NaN where a subject has no valid r.
    ``index[subject]`` maps each common target to the subject's own target (None when the maps
    were resampled: the targets are then not the subjects' own). ``mask_img`` (volumes) holds the
    common voxels; ``info`` (surfaces) their ``hemi`` and ``vertex``; ``n_vertices`` per hemisphere.
    """

    kind: str  # "volume" | "surface" | "targets"
    space: str | None
    subjects: list[str]
    target_names: list[str]
    values: dict[str, np.ndarray]
    how: str
    index: dict[str, np.ndarray] | None = None
    mask_img: object | None = None
    info: dict[str, np.ndarray] = field(default_factory=dict)
    n_vertices: dict[str, int] = field(default_factory=dict)

    @property
    def n_targets(self) -> int:
        return len(self.target_names)


def feature_names(subjects: list[SubjectMaps]) -> list[str]:
    """Feature spaces (and ``banded``) with an r map in every subject."""
    names = [{k[:-3] for k in s.arrays if k.endswith("__r")} for s in subjects]
    return sorted(set.intersection(*names)) if names else []


def _r(s: SubjectMaps, feat: str) -> np.ndarray:
    return np.where(s.arrays[f"{feat}__valid"].astype(bool), s.arrays[f"{feat}__r"], np.nan).astype(np.float64)


def _gather(subjects: list[SubjectMaps], feats: list[str], index: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f: np.stack([_r(s, f)[index[s.subject]] for s in subjects]) for f in feats}


def _by_keys(subjects: list[SubjectMaps], keys: dict[str, list]) -> tuple[list, dict[str, np.ndarray]]:
    """Keys present in every subject (in the first subject's order) and each subject's index of them."""
    common = set.intersection(*(set(k) for k in keys.values()))
    order = [k for k in keys[subjects[0].subject] if k in common]
    index = {}
    for s in subjects:
        pos = {k: i for i, k in enumerate(keys[s.subject])}
        index[s.subject] = np.array([pos[k] for k in order], dtype=np.int64)
    return order, index


def _named(subjects: list[SubjectMaps], feats: list[str]) -> CommonSpace | str:
    keys = {s.subject: [str(n) for n in s.arrays["target_names"]] for s in subjects}
    order, index = _by_keys(subjects, keys)
    if not order:
        return "the subjects share no target names; a group map needs targets that mean the same in everyone"
    return CommonSpace("targets", subjects[0].space, [s.subject for s in subjects], order,
                       _gather(subjects, feats, index),
                       f"{len(order)} targets named alike in every subject", index=index)


def _surface(subjects: list[SubjectMaps], feats: list[str]) -> CommonSpace | str:
    space = subjects[0].space
    keys = {s.subject: list(zip(s.arrays["info__hemi"].astype(str), s.arrays["info__vertex"].astype(np.int64)))
            for s in subjects}
    order, index = _by_keys(subjects, keys)
    if not order:
        return f"the subjects' {space} surfaces share no fitted vertex"
    from ..maps import FSAVERAGE_VERTICES  # maps imports matplotlib and nilearn (heavy)

    hemi = np.array([h for h, _ in order])
    vertex = np.array([v for _, v in order], dtype=np.int64)
    n_vertices = {h: FSAVERAGE_VERTICES.get(space or "", int(vertex[hemi == h].max()) + 1) for h in set(hemi)}
    return CommonSpace("surface", space, [s.subject for s in subjects], [f"{h}:{v}" for h, v in order],
                       _gather(subjects, feats, index), f"{space} surfaces as given, {len(order)} vertices",
                       index=index, info={"hemi": hemi, "vertex": vertex}, n_vertices=n_vertices)


def _grid(img) -> tuple[np.ndarray, tuple[int, ...]]:
    return np.asarray(img.affine, dtype=np.float64), tuple(img.shape[:3])


def _volume(subjects: list[SubjectMaps], feats: list[str], reference=None) -> CommonSpace | str:
    import nibabel as nib  # volumes only: heavy to import for the others
    from nilearn.image import resample_img

    from ..maps import mask_bool

    spaces = {s.space for s in subjects if s.transform is None}
    native = [s for s in subjects if s.transform is None and not str(s.space or "").startswith("MNI")]
    if native:
        s = native[0]
        return (f"sub-{s.subject}: volumes in {'space-' + s.space if s.space else 'subject (native) space'} and no "
                "'group.transform' for it; a group map needs MNI volumes, template surfaces, or a world-to-template "
                "affine per subject")
    template = "template (through group.transform)" if any(s.transform is not None for s in subjects) else None
    if len(spaces) > 1:
        return f"the subjects' volumes are in different spaces ({', '.join(sorted(map(str, spaces)))})"
    space = next(iter(spaces)) if spaces else None
    grids = [_grid(s.mask_img) for s in subjects]
    same = reference is None and all(s.transform is None for s in subjects) and all(
        g[1] == grids[0][1] and np.allclose(g[0], grids[0][0], atol=1e-4) for g in grids)
    names = [s.subject for s in subjects]
    if same:
        masks = [mask_bool(s.mask_img) for s in subjects]
        common = np.logical_and.reduce(masks)
        index = {}
        for s, m in zip(subjects, masks):
            order = np.cumsum(m.ravel()) - 1  # position of each voxel among the subject's mask voxels (C order)
            index[s.subject] = order[common.ravel()].astype(np.int64)
        mask_img = nib.Nifti1Image(common.astype(np.uint8), grids[0][0])
        return CommonSpace("volume", space, names, [str(i) for i in np.flatnonzero(common.ravel())],
                           _gather(subjects, feats, index), f"{space} volumes as given, one grid, "
                           f"{int(common.sum())} voxels in every subject's mask", index=index, mask_img=mask_img)
    if reference is not None:
        affine, shape = _grid(reference)
    else:
        first = subjects[0]
        affine = (first.transform if first.transform is not None else np.eye(4)) @ grids[0][0]
        shape = grids[0][1]
    stacks: dict[str, list[np.ndarray]] = {f: [] for f in feats}
    common = np.ones(shape, dtype=bool)
    for s, (aff, _) in zip(subjects, grids):
        moved = (s.transform if s.transform is not None else np.eye(4)) @ aff
        mask = mask_bool(s.mask_img)
        common &= np.asarray(resample_img(nib.Nifti1Image(mask.astype(np.float32), moved), target_affine=affine,
                                          target_shape=shape, interpolation="nearest",
                                          force_resample=True, copy_header=True).dataobj) > 0.5
        for f in feats:
            full = np.full(mask.shape, np.nan, dtype=np.float32)
            full[mask] = _r(s, f)
            out = resample_img(nib.Nifti1Image(full, moved), target_affine=affine, target_shape=shape,
                               interpolation="linear", force_resample=True, copy_header=True)
            stacks[f].append(np.asarray(out.dataobj, dtype=np.float64))
    mask_img = nib.Nifti1Image(common.astype(np.uint8), affine)
    values = {f: np.stack([v[common] for v in stacks[f]]) for f in feats}
    how = (f"{space or template} volumes resampled (linear) to "
           f"{'group.reference' if reference is not None else 'sub-' + subjects[0].subject + chr(39) + 's grid'}, "
           f"{int(common.sum())} voxels in every subject's mask")
    return CommonSpace("volume", space or "template", names, [str(i) for i in np.flatnonzero(common.ravel())], values,
                       how, index=None, mask_img=mask_img)


def common_space(subjects: list[SubjectMaps], reference=None) -> CommonSpace | str:
    """The subjects' r maps on common targets, or one line saying why there are none.

    ``reference`` is a nibabel image whose grid transformed volumes are resampled to.
    """
    feats = feature_names(subjects)
    if not feats:
        return "the subjects share no fitted feature space"
    kinds = {s.kind for s in subjects}
    if len(kinds) > 1:
        return f"the subjects' responses are of different kinds ({', '.join(sorted(kinds))})"
    kind = kinds.pop()
    if kind == "bold":
        return _volume(subjects, feats, reference)
    if kind == "gifti":
        spaces = {s.space for s in subjects}
        space = next(iter(spaces))
        if len(spaces) > 1 or not str(space or "").startswith(TEMPLATE_SURFACES):
            return (f"surfaces in {', '.join(sorted(map(str, spaces)))}: a group map needs every subject on one "
                    f"template surface ({', '.join(TEMPLATE_SURFACES)})")
        return _surface(subjects, feats)
    if kind in NAMED_KINDS:
        return _named(subjects, feats)
    why = {"ieeg": "electrodes differ from subject to subject", "hdf5": "the voxels are each subject's own "
           "(pycortex masks in subject space)"}.get(kind, f"{kind} targets have no common space")
    return f"{kind} responses: {why}; no group map (ROI summaries per subject need an atlas per subject)"
