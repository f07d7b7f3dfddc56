"""Surface time series in GIFTI (``.func.gii``), one file per hemisphere.

Narratives' surface derivatives (fMRIPrep / AFNI, ``*_space-fsaverage6_hemi-L*.func.gii``)
store one data array per volume (40962 vertices each on fsaverage6); some tools write one
2-D array [vertices x time]. Both are read. The vertex count is checked against the space.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from xml.parsers.expat import ExpatError

import numpy as np
import pandas as pd

from ..errors import DatasetError
from . import Responses, check_not_pointer

#: vertices per hemisphere of the standard surfaces
SURFACE_VERTICES = {"fsaverage": 163842, "fsaverage7": 163842, "fsaverage6": 40962, "fsaverage5": 10242,
                    "fsaverage4": 2562, "fsaverage3": 642, "fsLR": 32492}


def _hemi_array(path: Path, key: str) -> tuple[np.ndarray, float | None]:
    """[n_samples, n_vertices] of one hemisphere, and the TR the file states (seconds) if any."""
    import nibabel as nib

    check_not_pointer(path, key)
    try:
        img = nib.load(str(path))
        arrays = [np.asarray(d.data) for d in img.darrays]
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ExpatError,
            nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{key}: corrupt or truncated GIFTI ({type(err).__name__}: {err}); "
                           "re-download the file") from None
    if not arrays:
        raise DatasetError(f"{key}: the GIFTI file holds no data arrays")
    if len(arrays) == 1 and arrays[0].ndim == 2:
        data = arrays[0].T  # [vertices, time] -> [time, vertices]
    else:
        if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
            raise DatasetError(f"{key}: expected one 1-D array per volume; got shapes "
                               f"{sorted({a.shape for a in arrays})}")
        data = np.stack(arrays)
    step = None
    for d in img.darrays[:1]:
        ts = d.meta.get("TimeStep") if d.meta is not None else None
        if ts:
            step = float(ts) / 1000.0  # GIFTI TimeStep is in milliseconds
    return np.asarray(data, dtype=np.float32), step


def read_gifti(paths: dict[str, str | Path], keys: dict[str, str], *, tr: float | None = None,
               space: str | None = None, start: float = 0.0) -> Responses:
    """Read one run's hemispheres and join them (left first).

    Parameters
    ----------
    paths, keys : ``{"L": local path, "R": ...}`` and their dataset keys (named in errors).
    tr : RepetitionTime in seconds (sidecar); else the GIFTI ``TimeStep`` metadata.
    space : the surface (``fsaverage6``, ...): the vertex count is checked against it.

    Returns
    -------
    Responses with data [n_samples, n_vertices_L + n_vertices_R]; targets named ``L:<vertex>``.
    """
    blocks, names, hemis, verts = [], [], [], []
    n_samples = None
    steps = []
    for hemi in sorted(paths, key=lambda h: {"L": 0, "R": 1}.get(h, 2)):
        key = keys[hemi]
        data, step = _hemi_array(Path(paths[hemi]), key)
        if step:
            steps.append(step)
        expected = SURFACE_VERTICES.get(space or "")
        if expected and data.shape[1] != expected:
            raise DatasetError(f"{key}: {data.shape[1]} vertices, but {space} has {expected} per hemisphere; "
                               "the file is from another surface or damaged")
        if n_samples is not None and data.shape[0] != n_samples:
            raise DatasetError(f"{key}: {data.shape[0]} volumes, but the other hemisphere has {n_samples}; "
                               "the hemispheres of a run must have the same length")
        n_samples = data.shape[0]
        blocks.append(data)
        names += [f"{hemi}:{i}" for i in range(data.shape[1])]
        hemis += [hemi] * data.shape[1]
        verts += list(range(data.shape[1]))
    period = float(tr or (steps[0] if steps else 0))
    if not period > 0:
        raise DatasetError(f"{', '.join(keys.values())}: no RepetitionTime in a JSON sidecar (derivative or raw) "
                           "nor TimeStep in the GIFTI; set 'dataset.responses.tr'")
    info = pd.DataFrame({"hemi": hemis, "vertex": verts})
    return Responses(data=np.concatenate(blocks, axis=1), period=period, start=float(start), target_names=names,
                     space=space, target_info=info, meta={"hemis": sorted(paths)})
