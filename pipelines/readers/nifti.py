"""4-D NIfTI volumes, masked to [time x voxels]."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from . import Responses, check_not_pointer


def load_nifti(path: Path, key: str):
    """A NIfTI file and its data as float32; DatasetError naming ``key`` when it is a pointer or corrupt."""
    import nibabel as nib

    check_not_pointer(path, key)
    try:
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{key}: corrupt or truncated NIfTI ({type(err).__name__}: {err}); "
                           "re-download the file or remove it from the dataset") from None
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
    tr = float(tr or img.header.get_zooms()[3] or 0)
    if not tr > 0:
        raise DatasetError(f"{key}: no RepetitionTime in its JSON sidecar or NIfTI header; add it to the sidecar")
    if mask_path is not None:
        mask_key = mask_key or str(mask_path)
        check_not_pointer(mask_path, mask_key)
        try:
            mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{mask_key}: unreadable mask ({err}); re-download it") from None
        if mask.shape != vol.shape[:3]:
            raise DatasetError(f"{mask_key}: mask shape {mask.shape} differs from {key} {vol.shape[:3]}")
    else:
        finite = np.isfinite(vol).all(axis=3)
        mask = finite & (np.nanstd(np.where(np.isfinite(vol), vol, 0), axis=3) > 0)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    data = vol[mask].T.copy()
    return Responses(data=data, period=tr, target_names=[f"voxel{i}" for i in range(data.shape[1])],
                     mask_img=mask_img, space=space, meta={"shape": list(vol.shape)})
