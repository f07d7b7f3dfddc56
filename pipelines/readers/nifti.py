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


def load_nifti(path: Path, key: str):
    """A NIfTI file and its data as float32; DatasetError naming ``key`` when it is a pointer or corrupt,
    or when its header claims more voxels than the memory budget holds (checked before reading)."""
    import nibabel as nib

    check_not_pointer(path, key)
    try:
        img = nib.load(str(path))
        check_nifti_header(img, path, key)
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, TypeError, OverflowError,
            nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{key}: corrupt or truncated NIfTI ({type(err).__name__}: {err}); "
                           "re-download the file or remove it from the dataset") from err
    return img, vol


def read_bold(path: str | Path, key: str, *, tr: float | None = None, mask_path: str | Path | None = None,
              mask_key: str | None = None, space: str | None = None) -> Responses:
    """Read a 4-D NIfTI run.

    Parameters
    ----------
    path, key : the local file and its dataset key (named in errors).
    tr : RepetitionTime in seconds (from the JSON sidecar); the header's 4th zoom otherwise.
    mask_path : a brain mask (same grid); without one, voxels that vary over time and are finite.
    space : the template space, for the maps.

    Returns
    -------
    Responses with data [n_volumes, n_voxels] and ``mask_img`` (uint8, the run's affine).
    """
    import nibabel as nib

    img, vol = load_nifti(Path(path), key)
    if vol.ndim != 4:
        raise DatasetError(f"{key}: expected a 4-D NIfTI (x, y, z, time); got shape {vol.shape}")
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
        if mask.shape != vol.shape[:3]:
            raise DatasetError(f"{mask_key}: mask shape {mask.shape} differs from {key} {vol.shape[:3]}")
    else:
        finite = np.isfinite(vol).all(axis=3)
        mask = finite & (np.nanstd(np.where(np.isfinite(vol), vol, 0), axis=3) > 0)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    data = vol[mask].T.copy()
    return Responses(data=data, period=tr, target_names=[f"voxel{i}" for i in range(data.shape[1])],
                     mask_img=mask_img, space=space, meta={"shape": list(vol.shape)})
