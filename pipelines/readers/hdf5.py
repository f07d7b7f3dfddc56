"""Preprocessed responses stored as HDF5 arrays (e.g. LeBel et al. 2023's ``<story>.hf5``).

ds003020's ``derivative/preprocessed_data/<subject>/<story>.hf5`` hold one float array
``[n_TRs, n_voxels]`` of cortical voxels (the pycortex mask of the subject); the TR count of
each story is ``derivative/respdict.json[story] - 20`` (10 TRs trimmed at the start, 10 at the
end, as in the dataset's own code). Its test story ``wheretheressmoke`` holds the repeats of
one story; a 3-D array ``[n_repeats, n_TRs, n_voxels]`` is averaged over the repeats.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..limits import check_allocation, n_elements
from . import Responses, check_not_pointer

DEFAULT_DATASETS = ("data", "resp", "responses")


def _datasets(h5) -> dict[str, object]:
    import h5py

    found: dict[str, object] = {}
    h5.visititems(lambda name, obj: found.setdefault(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def check_hdf5_shape(shape: tuple[int, ...], key: str, name: str, repeats: str = "mean") -> None:
    """Refuse, from its declared shape, an array whose float32 copy (and, for repeats, the float64
    mean and the float32 repeats of the noise ceiling) would not fit the memory budget."""
    per_sample_block = n_elements(shape[-2:])
    if len(shape) == 3 and repeats != "error":
        n_repeats = shape[0] if repeats == "mean" else 1
        need = per_sample_block * (8 + 4) + (n_elements(shape) * 4 if n_repeats >= 2 else 0)
    else:
        need = n_elements(shape) * 4
    check_allocation(need, key, f"array {name!r} of shape {tuple(int(d) for d in shape)}")


def read_hdf5(path: str | Path, key: str, *, dataset: str | None = None, tr: float | None = None,
              start: float = 0.0, repeats: str = "mean", chunk_rows: int = 64) -> Responses:
    """Read one response array from an HDF5 file.

    Parameters
    ----------
    path, key : the local file and its dataset key (named in errors).
    dataset : the array's name inside the file; default ``data`` (or ``resp``), else the file's
        only 2-D/3-D array.
    tr : sampling period in seconds (required: HDF5 derivatives carry no BIDS sidecar).
    start : time of the first row on the stimulus clock, in seconds.
    repeats : a 3-D array ``[n_repeats, n_samples, n_targets]`` is averaged (``"mean"``),
        reduced to its first repeat (``"first"``) or refused (``"error"``).
    chunk_rows : rows converted to float32 at a time (bounded memory for multi-GB files).

    Returns
    -------
    Responses with data [n_samples, n_targets] (float32).
    """
    import h5py

    path = Path(path)
    check_not_pointer(path, key)
    if not (tr and tr > 0):
        raise DatasetError(f"{key}: the sampling period (TR) of an HDF5 derivative is unknown; set "
                           "'dataset.responses.tr' or give the raw runs a RepetitionTime sidecar")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{key}: not a readable HDF5 file ({err}); the download is truncated or the file "
                           "is damaged: re-download it") from err
    with h5:
        arrays = _datasets(h5)
        if dataset is not None:
            if dataset not in arrays:
                raise DatasetError(f"{key}: no dataset {dataset!r}; it has {sorted(arrays)}. "
                                   "Fix 'dataset.responses.hdf5_dataset'")
            name = dataset
        else:
            name = next((n for n in DEFAULT_DATASETS if n in arrays), None)
            if name is None:
                shaped = [n for n, a in arrays.items() if a.ndim in (2, 3)]
                if len(shaped) != 1:
                    raise DatasetError(f"{key}: cannot tell which array holds the responses ({sorted(arrays)}); "
                                       "set 'dataset.responses.hdf5_dataset'")
                name = shaped[0]
        arr = arrays[name]
        if not np.issubdtype(arr.dtype, np.number):
            raise DatasetError(f"{key}: array {name!r} is not numeric ({arr.dtype})")
        check_hdf5_shape(arr.shape, key, name, repeats)
        try:
            if arr.ndim == 2:
                data = np.empty(arr.shape, dtype=np.float32)
                for i in range(0, arr.shape[0], chunk_rows):
                    data[i:i + chunk_rows] = arr[i:i + chunk_rows]
                n_repeats = 1
            elif arr.ndim == 3:
                if repeats == "error":
                    raise DatasetError(f"{key}: array {name!r} has shape {arr.shape} (repeats x samples x "
                                       "targets); set 'dataset.responses.repeats' to 'mean' or 'first'")
                n_repeats = arr.shape[0] if repeats == "mean" else 1
                data = np.zeros(arr.shape[1:], dtype=np.float64)
                for r in range(n_repeats):
                    data += arr[r]
                data = (data / n_repeats).astype(np.float32)
                if n_repeats >= 2:  # the noise ceiling of the averaged repeats, for ceiling-normalised scores
                    from pipelines.stats import noise_ceiling

                    ceiling = noise_ceiling(np.asarray(arr[:n_repeats], dtype=np.float32))
                    r_max = ceiling.r_max.astype(np.float32)
            else:
                raise DatasetError(f"{key}: array {name!r} has shape {arr.shape}; expected "
                                   "[samples, targets] or [repeats, samples, targets]")
        except OSError as err:
            raise DatasetError(f"{key}: HDF5 array {name!r} is unreadable ({err}); the file is truncated or "
                               "damaged: re-download it") from err
    meta = {"hdf5_dataset": name, "n_repeats": n_repeats}
    if n_repeats >= 2:
        meta["r_max"] = r_max
    return Responses(data=data, period=float(tr), start=float(start),
                     target_names=[f"voxel{i}" for i in range(data.shape[1])], meta=meta)
