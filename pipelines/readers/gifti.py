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
from ..limits import check_allocation, human, n_elements
from . import Responses, check_not_pointer

#: vertices per hemisphere of the standard surfaces
SURFACE_VERTICES = {"fsaverage": 163842, "fsaverage7": 163842, "fsaverage6": 40962, "fsaverage5": 10242,
                    "fsaverage4": 2562, "fsaverage3": 642, "fsLR": 32492}


#: bytes per value of the GIFTI data types
GIFTI_ITEMSIZE = {"NIFTI_TYPE_UINT8": 1, "NIFTI_TYPE_INT8": 1, "NIFTI_TYPE_INT16": 2, "NIFTI_TYPE_UINT16": 2,
                  "NIFTI_TYPE_INT32": 4, "NIFTI_TYPE_UINT32": 4, "NIFTI_TYPE_FLOAT32": 4, "NIFTI_TYPE_INT64": 8,
                  "NIFTI_TYPE_UINT64": 8, "NIFTI_TYPE_FLOAT64": 8}


def _array_bytes(attrs: dict) -> int:
    dims = [int(attrs.get(f"Dim{i}", 0)) for i in range(int(attrs.get("Dimensionality", 1)))]
    return n_elements(dims) * GIFTI_ITEMSIZE.get(attrs.get("DataType", ""), 8)


def check_gifti_sizes(path: Path, key: str) -> int:
    """Stream the GIFTI's XML: refuse it when its data arrays' declared sizes exceed the memory budget,
    or when a gzip-compressed array inflates past its declared size (checked while inflating, in
    chunks). Returns the declared bytes of all arrays. Nothing is decoded into arrays here."""
    import base64
    import binascii
    import xml.etree.ElementTree as ET

    total = 0
    declared = 0
    try:
        for event, elem in ET.iterparse(str(path), events=("start", "end")):
            if elem.tag == "DataArray" and event == "start":
                declared = _array_bytes(elem.attrib)
                total += declared
                check_allocation(3 * total, key, f"its data arrays (declared {human(total)} so far)")
                encoding = elem.attrib.get("Encoding", "")
            elif elem.tag == "Data" and event == "end":
                if encoding == "GZipBase64Binary" and elem.text:
                    inflater = zlib.decompressobj()
                    raw = base64.b64decode(elem.text.strip())
                    got = len(inflater.decompress(raw, declared + 1))
                    if got > declared:
                        raise DatasetError(f"{key}: a data array inflates past its declared {human(declared)}; the "
                                           "file is damaged or a decompression bomb: re-download it")
                elem.clear()
            elif elem.tag == "DataArray" and event == "end":
                elem.clear()
    except (ET.ParseError, ValueError, binascii.Error, zlib.error) as err:
        raise DatasetError(f"{key}: corrupt or truncated GIFTI ({type(err).__name__}: {err}); "
                           "re-download the file") from err
    return total


def _hemi_array(path: Path, key: str) -> tuple[np.ndarray, float | None]:
    """[n_samples, n_vertices] of one hemisphere, and the TR the file states (seconds) if any."""
    import nibabel as nib

    check_not_pointer(path, key)
    check_gifti_sizes(path, key)
    try:
        img = nib.load(str(path))
        arrays = [np.asarray(d.data) for d in img.darrays]
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, ExpatError,
            nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{key}: corrupt or truncated GIFTI ({type(err).__name__}: {err}); "
                           "re-download the file") from err
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
            try:
                step = float(ts) / 1000.0  # GIFTI TimeStep is in milliseconds
            except ValueError as err:
                raise DatasetError(f"{key}: TimeStep {ts!r} is not a number of milliseconds; fix the file or set "
                                   "'dataset.responses.tr'") from err
            if not (np.isfinite(step) and 0 < step <= 100):
                raise DatasetError(f"{key}: TimeStep {ts!r} ms is not a TR (0-100000 ms); fix the file or set "
                                   "'dataset.responses.tr'")
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
