"""4-D NIfTI volumes, masked to [time x voxels]."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..limits import check_allocation, check_gzip_size, n_elements
from . import Responses, check_not_pointer


#: Bytes per voxel held at once beyond the file's own: the float32 volume and the masked copy.
WORK_BYTES_PER_VOXEL = 8
#: Relative difference between the sidecar's RepetitionTime and the header's allowed before refusing.
TR_TOLERANCE = 0.01


def check_nifti_header(img, path: Path, key: str) -> None:
    """Refuse, from the header alone, a NIfTI whose data would not fit the memory budget, and a
    ``.nii.gz`` that inflates past what its header states (streamed, never held in memory)."""
    shape = img.header.get_data_shape()
    itemsize = img.header.get_data_dtype().itemsize
    n = n_elements(shape)
    check_allocation(n * (2 * itemsize + WORK_BYTES_PER_VOXEL), key,
                     f"its header's {' x '.join(str(d) for d in shape)} voxels ({img.header.get_data_dtype()})")
    if str(path).endswith(".gz"):
        offset = int(getattr(img.header, "get_data_offset", lambda: 352)() or 352)
        check_gzip_size(path, key, offset + n * itemsize, "header", label="NIfTI")


def header_tr(img) -> float | None:
    """The TR (seconds) a NIfTI header states: the 4th zoom in its time unit, None when unknown."""
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not zooms[3] > 0:
        return None
    try:
        unit = img.header.get_xyzt_units()[1]
    except Exception:  # noqa: BLE001 - a header without units: the zoom's unit is unknown
        return None
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit)
    return float(zooms[3]) * scale if scale else None


#: Bytes of float32 volumes read at a time when a run is read through its brain mask.
READ_BLOCK_BYTES = 64 * 2**20

_READ_ERRORS = (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, OverflowError)


def _corrupt(key: str, err: Exception) -> DatasetError:
    return DatasetError(f"{key}: corrupt or truncated NIfTI ({type(err).__name__}: {err}); "
                        "re-download the file or remove it from the dataset")


def open_nifti(path: Path, key: str):
    """A NIfTI image with its header checked (see :func:`check_nifti_header`) and no data read yet;
    the file stays open, so reading it in blocks of volumes decompresses a ``.nii.gz`` once."""
    import nibabel as nib

    check_not_pointer(path, key)
    try:
        img = nib.load(str(path), keep_file_open=True)
        check_nifti_header(img, path, key)
    except (*_READ_ERRORS, nib.filebasedimages.ImageFileError) as err:
        raise _corrupt(key, err) from err
    return img


def load_nifti(path: Path, key: str):
    """A NIfTI file and its data as float32; DatasetError naming ``key`` when it is a pointer or corrupt,
    or when its header claims more voxels than the memory budget holds (checked before reading)."""
    img = open_nifti(Path(path), key)
    try:
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except _READ_ERRORS as err:
        raise _corrupt(key, err) from err
    return img, vol


def read_masked(img, mask: np.ndarray, key: str) -> np.ndarray:
    """A 4-D image's voxels in ``mask`` as [n_volumes, n_voxels] float32, read a block of volumes at a
    time (never the whole 4-D array in memory), in the order of ``img.get_fdata()[mask]``."""
    n_volumes = int(img.shape[3])
    data = np.empty((n_volumes, int(mask.sum())), dtype=np.float32)
    step = max(1, READ_BLOCK_BYTES // (4 * max(1, int(np.prod(img.shape[:3])))))
    try:
        for first in range(0, n_volumes, step):
            block = np.asarray(img.dataobj[..., first:first + step], dtype=np.float32)
            data[first:first + block.shape[3]] = block[mask].T
    except _READ_ERRORS as err:
        raise _corrupt(key, err) from err
    return data


def read_bold(path: str | Path, key: str, *, tr: float | None = None, mask_path: str | Path | None = None,
              mask_key: str | None = None, space: str | None = None) -> Responses:
    """Read a 4-D NIfTI run.

    Parameters
    ----------
    path, key : the local file and its dataset key (named in errors).
    tr : RepetitionTime in seconds (from the JSON sidecar); the header's 4th zoom otherwise.
    mask_path : a brain mask (same grid); the run is then read through it, a block of volumes at a
        time. Without one: the voxels that vary over time and are finite (the whole run is read).
    space : the template space, for the maps.

    Returns
    -------
    Responses with data [n_volumes, n_voxels] and ``mask_img`` (uint8, the run's affine).
    """
    import nibabel as nib

    img = open_nifti(Path(path), key)
    shape = tuple(int(d) for d in img.shape)
    if len(shape) != 4:
        raise DatasetError(f"{key}: expected a 4-D NIfTI (x, y, z, time); got shape {shape}")
    stated = header_tr(img)
    if tr and stated and abs(float(tr) - stated) > TR_TOLERANCE * float(tr):
        raise DatasetError(f"{key}: its JSON sidecar says RepetitionTime {float(tr):g} s but its NIfTI header says "
                           f"{stated:g} s; one of them is wrong: fix the sidecar or the header (pixdim[4])")
    tr = float(tr or stated or img.header.get_zooms()[3] or 0)
    if not tr > 0:
        raise DatasetError(f"{key}: no RepetitionTime in its JSON sidecar or NIfTI header; add it to the sidecar")
    if mask_path is not None:
        mask_key = mask_key or str(mask_path)
        check_not_pointer(mask_path, mask_key)
        try:
            mask_nii = nib.load(str(mask_path))
            check_nifti_header(mask_nii, Path(mask_path), mask_key)
            mask = np.asarray(mask_nii.dataobj) > 0
        except DatasetError:
            raise
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{mask_key}: unreadable mask ({err}); re-download it") from err
        if mask.shape != shape[:3]:
            raise DatasetError(f"{mask_key}: mask shape {mask.shape} differs from {key} {shape[:3]}")
        data = read_masked(img, mask, key)
    else:
        try:
            vol = np.asarray(img.dataobj, dtype=np.float32)
        except _READ_ERRORS as err:
            raise _corrupt(key, err) from err
        finite = np.isfinite(vol).all(axis=3)
        mask = finite & (np.nanstd(np.where(np.isfinite(vol), vol, 0), axis=3) > 0)
        data = vol[mask].T.copy()
        del vol
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    return Responses(data=data, period=tr, target_names=[f"voxel{i}" for i in range(data.shape[1])],
                     mask_img=mask_img, space=space, meta={"shape": list(shape)})
