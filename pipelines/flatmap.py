"""pycortex flatmaps of voxel scores, drawn on the subject's own surfaces from the dataset.

Used when the config has ``maps.pycortex`` and pycortex is installed (the ``flatmap`` extra);
otherwise nothing here runs and nothing changes. The dataset carries a pycortex database (LeBel
et al.'s ds003020: ``derivative/pycortex-db/<subject>/``); of it only what a flatmap needs is
read, through the same verified, cached fetch as every other input:

- ``surfaces/{flat,pia,wm}_{lh,rh}.gii``: the flattened cortex and the two fiducial surfaces;
- ``transforms/<transform>/matrices.xfm`` and ``reference.nii.gz``: from surface to voxels;
- ``transforms/<transform>/mask_<mask>.nii.gz`` for HDF5 responses, whose columns are the
  voxels of that mask in pycortex's order (C order of the ``(z, y, x)`` volume).

Stages: :func:`check_database` (prepare: the files exist), :func:`check_responses` (fit: the
voxel count matches the mask, or the bold grid is the transform's reference), then
:func:`local_filestore` + :func:`render_flatmap_png` (publish).

pycortex reads its surfaces through one module-level ``cortex.db`` whose folder comes from
``~/.config/pycortex/options.cfg``. neuroflow never uses that folder: it copies the files it
fetched into a private filestore under the download cache (``<cache>/pycortex/<digest>/``, the
digest taken over the files' sha256, so a changed database gets a fresh one), and
:func:`using_filestore` points ``cortex.db`` at it for the duration of one drawing (under a
lock; the memoised surfaces and a configured ``cache`` folder are set aside and restored).
pycortex writes its derived caches (flatmap pixel maps, curvature) there, never into the
dataset or the installed package. Importing pycortex writes ``~/.config/pycortex/options.cfg``
when it is missing (pycortex's own behaviour; ``XDG_CONFIG_HOME`` moves it).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .readers import check_not_pointer
from .readers.nifti import load_nifti

log = logging.getLogger("neuroflow")

#: Response kinds a flatmap can be drawn from: masked cortical voxels, and volumes.
KINDS = ("hdf5", "bold")
SURFACES = ("flat", "pia", "wm")
SURFACE_EXTENSIONS = (".gii", ".npz", ".vtk")
#: Flatmap height in pixels (the width follows the flatmap's aspect, about twice that).
HEIGHT = 512
_DPI = 100
_LOCK = threading.Lock()


def pycortex_installed() -> bool:
    """Whether ``import cortex`` would find pycortex (nothing is imported)."""
    try:
        return importlib.util.find_spec("cortex") is not None
    except (ImportError, ValueError):
        return False


def enabled(config) -> bool:
    """The config asks for flatmaps and pycortex is installed; warn when only the first holds."""
    if config.maps.pycortex is None:
        return False
    if not pycortex_installed():
        log.warning("'maps.pycortex' is set but pycortex is not installed: no flatmaps are drawn "
                    "(pip install 'neuroflow[flatmap]' or pycortex)")
        return False
    return True


@dataclass(frozen=True)
class PycortexSubject:
    """One dataset subject's pycortex subject and transform, and the dataset keys of its files."""

    subject: str  # pycortex subject (a folder of the database)
    transform: str
    mask: str  # mask type: mask_<mask>.nii.gz in the transform's folder
    prefix: str  # dataset key of the subject's folder, e.g. derivative/pycortex-db/UTS01

    @property
    def transform_prefix(self) -> str:
        return f"{self.prefix}/transforms/{self.transform}"

    @property
    def mask_key(self) -> str:
        return f"{self.transform_prefix}/mask_{self.mask}.nii.gz"

    @property
    def reference_key(self) -> str:
        return f"{self.transform_prefix}/reference.nii.gz"


def pycortex_subject(config, subject: str) -> PycortexSubject:
    opts = config.maps.pycortex
    name, transform = opts.names(subject)
    return PycortexSubject(name, transform, opts.mask, f"{opts.database}/{name}")


def _children(listing, prefix: str) -> list[str]:
    """The names of the folders directly under `prefix` in the dataset's listing."""
    return sorted({k[len(prefix) + 1:].split("/", 1)[0] for k in listing if k.startswith(prefix + "/")
                   and "/" in k[len(prefix) + 1:]})


def database_keys(ingest, subject: str, kind: str) -> tuple[PycortexSubject, list[str]]:
    """The dataset keys a flatmap of `subject` needs; DatasetError naming what is missing and the fix."""
    cfg = ingest.config
    pcs = pycortex_subject(cfg, subject)
    source = cfg.dataset.source
    if kind not in KINDS:
        raise DatasetError(f"sub-{subject}: 'maps.pycortex' draws voxel maps (HDF5 cortical voxels or bold volumes); "
                           f"its responses are {kind}: drop 'maps.pycortex'")
    listing = ingest.listing
    database = cfg.maps.pycortex.database
    if not any(k.startswith(pcs.prefix + "/") for k in listing):
        have = _children(listing, database)
        raise DatasetError(f"{source}: no pycortex subject {pcs.subject!r} for sub-{subject}: {pcs.prefix}/ is not in "
                           f"the dataset (pycortex subjects in {database}/: {', '.join(have) or 'none'}). Fix "
                           "'maps.pycortex.database' or 'maps.pycortex.subject', or drop 'maps.pycortex'")
    keys = []
    missing = []
    for surf in SURFACES:
        for hemi in ("lh", "rh"):
            stem = f"{pcs.prefix}/surfaces/{surf}_{hemi}"
            found = next((stem + ext for ext in SURFACE_EXTENSIONS if stem + ext in listing), None)
            if found:
                keys.append(found)
            else:
                missing.append(stem + ".gii")
    if missing:
        raise DatasetError(f"{source}: pycortex subject {pcs.subject!r} lacks the surfaces a flatmap needs: "
                           f"{', '.join(missing)}; use a complete pycortex database or drop 'maps.pycortex'")
    wanted = [f"{pcs.transform_prefix}/matrices.xfm", pcs.reference_key] + ([pcs.mask_key] if kind == "hdf5" else [])
    if not all(k in listing for k in wanted[:2]):
        have = _children(listing, f"{pcs.prefix}/transforms")
        raise DatasetError(f"{source}: pycortex subject {pcs.subject!r} has no transform {pcs.transform!r} "
                           f"({pcs.transform_prefix}/matrices.xfm and reference.nii.gz; its transforms: "
                           f"{', '.join(have) or 'none'}). Fix 'maps.pycortex.transform'")
    if kind == "hdf5" and pcs.mask_key not in listing:
        masks = sorted(k.rsplit("/mask_", 1)[1][:-len(".nii.gz")] for k in listing
                       if k.startswith(pcs.transform_prefix + "/mask_") and k.endswith(".nii.gz"))
        raise DatasetError(f"{source}: {pcs.mask_key} is not in the dataset: the HDF5 voxels are those of a pycortex "
                           f"mask, and transform {pcs.transform!r} has masks: {', '.join(masks) or 'none'}. Fix "
                           "'maps.pycortex.mask'")
    return pcs, keys + wanted


def check_database(ingest, subject: str, kind: str) -> PycortexSubject:
    """Prepare: every file a flatmap of `subject` needs is in the dataset (nothing is downloaded)."""
    return database_keys(ingest, subject, kind)[0]


def _fetch_nifti(ingest, key: str):
    return load_nifti(ingest.fetch(key), key)[0]


def check_responses(ingest, subject: str, responses) -> PycortexSubject:
    """Fit: the responses are in the pycortex subject's space (the mask's voxels, or its reference grid).

    HDF5: the number of columns equals the voxels of ``mask_<mask>.nii.gz``. Bold: the volumes'
    grid (shape and affine) is ``reference.nii.gz``'s.
    """
    pcs, _ = database_keys(ingest, subject, responses.kind)
    n_targets = len(responses.target_names)
    if responses.kind == "hdf5":
        mask = np.asarray(_fetch_nifti(ingest, pcs.mask_key).dataobj)
        n_mask = int(np.count_nonzero(np.nan_to_num(mask)))
        if n_mask != n_targets:
            key = responses.runs[0].key if responses.runs else f"sub-{subject}"
            raise DatasetError(f"{key}: sub-{subject}'s responses have {n_targets} voxels, the pycortex mask "
                               f"{pcs.mask_key} has {n_mask}: the columns must be that mask's voxels, in its order. "
                               "Set 'maps.pycortex.mask' (or 'transform') to the ones the data were extracted with, "
                               "or drop 'maps.pycortex'")
    else:
        ref = _fetch_nifti(ingest, pcs.reference_key)
        grid = responses.mask_img
        same_shape = tuple(grid.shape[:3]) == tuple(ref.shape[:3])
        if not same_shape or not np.allclose(grid.affine, ref.affine, atol=1e-2):
            differs = ("the affines differ" if same_shape
                       else f"shape {tuple(grid.shape[:3])}, not {tuple(ref.shape[:3])}")
            raise DatasetError(f"{responses.runs[0].key}: sub-{subject}'s bold volumes are not on the grid of the "
                               f"pycortex transform's reference {pcs.reference_key} ({differs}): a flatmap "
                               "samples the volume in that space. Name the transform of the data's space in "
                               "'maps.pycortex.transform', or drop 'maps.pycortex'")
    return pcs


def local_filestore(ingest, subject: str, kind: str, root: str | Path) -> tuple[Path, PycortexSubject]:
    """Fetch what a flatmap of `subject` needs and lay it out as a pycortex filestore of its own.

    Returns (filestore folder, pycortex subject). The folder is ``<root>/<digest>``, the digest
    over the files' keys and sha256; it is built in a temporary folder and renamed into place,
    so a concurrent or interrupted build never leaves half a filestore.
    """
    pcs, keys = database_keys(ingest, subject, kind)
    paths = {}
    for key in keys:
        paths[key] = ingest.fetch(key)
        check_not_pointer(paths[key], key)
    blob = json.dumps({"subject": pcs.subject, "files": [[k[len(pcs.prefix) + 1:], ingest.files_read[k].sha256]
                                                          for k in keys]}, sort_keys=True)
    final = Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:16]
    if (final / pcs.subject).is_dir():
        return final, pcs
    final.parent.mkdir(parents=True, exist_ok=True)
    # built in a folder of its own, renamed into place whole; TemporaryDirectory removes only that folder
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".tmp-", ignore_cleanup_errors=True) as staging:
        tmp = Path(staging)
        for key, path in paths.items():
            dest = tmp / pcs.subject / key[len(pcs.prefix) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)  # a copy: pycortex never writes next to the dataset's own files
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / pcs.subject).is_dir():  # not a concurrent build of the same files
                raise
    return final, pcs


def import_cortex():
    """``import cortex`` with its import-time prints (an Inkscape notice) sent to the debug log."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        import cortex
    if out.getvalue().strip():
        log.debug("pycortex: %s", out.getvalue().strip())
    return cortex


@contextlib.contextmanager
def using_filestore(path: str | Path):
    """Point pycortex's module-level database at `path` for the duration of the block.

    ``cortex.db`` is one object every pycortex module imported by name, so it is changed in
    place (folder, subjects, memoised surfaces) and restored afterwards; a ``cache`` folder set
    in the user's pycortex config is set aside too, so derived caches land inside `path`.
    """
    cortex = import_cortex()
    db = cortex.db
    config = cortex.options.config
    with _LOCK:
        saved = (db.filestore, db._subjects, db.__dict__.get("_memocache"), db.auxfile)
        saved_cache = config.get("basic", "cache", fallback=None)
        db.filestore, db._subjects, db._memocache, db.auxfile = str(path), None, {}, None
        config.remove_option("basic", "cache")
        try:
            yield db
        finally:
            db.filestore, db._subjects, db.auxfile = saved[0], saved[1], saved[3]
            if saved[2] is None:
                db.__dict__.pop("_memocache", None)
            else:
                db._memocache = saved[2]
            if saved_cache is not None:
                config.set("basic", "cache", saved_cache)


def render_flatmap_png(values: np.ndarray, filestore: str | Path, pcs: PycortexSubject, png_path: str | Path,
                       title: str, *, height: int = HEIGHT) -> Path:
    """Draw one score map on the subject's flatmap (pycortex quickflat) as a PNG.

    Parameters
    ----------
    values : ndarray, shape (n_voxels,) or (x, y, z)
        One value per voxel of ``mask_<mask>`` in pycortex's order (HDF5 responses), or a volume
        on the transform's reference grid in NIfTI order (bold). NaN is not drawn (the
        surface's curvature shows through).
    filestore : the folder :func:`local_filestore` made.
    pcs : the pycortex subject, transform and mask.
    png_path : output file; its pixels are the flatmap's (``height`` rows), with a colour bar
        and the title drawn inside.

    Returns
    -------
    Path
        The written PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=np.float32)
    finite = values[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax or 1.0
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    with using_filestore(filestore), contextlib.redirect_stdout(out), warnings.catch_warnings():
        import cortex

        warnings.filterwarnings("ignore", message="splu converted its input")  # pycortex's curvature, harmless

        if values.ndim == 1:
            vol = cortex.Volume(values, pcs.subject, pcs.transform, mask=pcs.mask, cmap="RdBu_r", vmin=-vmax,
                                vmax=vmax)
        else:
            vol = cortex.Volume(np.ascontiguousarray(values.T), pcs.subject, pcs.transform, cmap="RdBu_r",
                                vmin=-vmax, vmax=vmax)  # pycortex volumes are (z, y, x)
        fig = cortex.quickflat.make_figure(vol, height=height, dpi=_DPI, with_rois=False, with_sulci=False,
                                           with_labels=False, with_curvature=True, with_colorbar=True)
        try:
            fig.text(0.01, 0.99, title, ha="left", va="top", fontsize=11)
            fig.savefig(png_path, dpi=_DPI, format="png", facecolor="white")
        finally:
            plt.close(fig)
    if out.getvalue().strip():
        log.debug("pycortex: %s", out.getvalue().strip())
    return png_path
