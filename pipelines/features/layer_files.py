"""Layer sweeps that stream: each layer's rows go to its own file as they are computed.

A sweep over every layer of a 7B model (33 hidden states x 4,096 dims) over a 100,000-word
story is 54 GB of float32: it must never sit in memory at once. :class:`LayerFiles` keeps one
``.npy`` file per space, preallocated on disk, and writes each forward pass's rows straight
into place (``os.pwrite``: no memory map, so nothing of a file stays resident);
:func:`write_npz` joins the files into the usual ``.npz`` cache entry by copying them in
blocks. Peak memory is then one
batch of hidden states and one copy buffer, whatever the number of layers.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["LayerFiles", "all_finite", "write_npz"]

_BLOCK = 16 * 1024 * 1024  # bytes copied or checked at a time


class LayerFiles:
    """One preallocated float32 ``.npy`` file of shape (n_rows, n_dims) per space.

    Parameters
    ----------
    folder : Path
        Where the files are written (``<space>.npy``).
    spaces : sequence of str
        Space names (``"values"`` or ``"layer3"``...).
    n_rows, n_dims : int
        Shape of every space.
    """

    def __init__(self, folder: str | Path, spaces: Sequence[str], n_rows: int, n_dims: int) -> None:
        self.folder = Path(folder)
        self.spaces = list(spaces)
        self.n_rows, self.n_dims = int(n_rows), int(n_dims)
        self.paths = {s: self.folder / f"{s}.npy" for s in self.spaces}
        self._offset: dict[str, int] = {}
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                  "shape": (self.n_rows, self.n_dims)}
        for space, path in self.paths.items():
            with open(path, "wb") as fh:
                np.lib.format.write_array_header_2_0(fh, header)
                self._offset[space] = fh.tell()
                fh.truncate(self._offset[space] + self.n_rows * self.n_dims * 4)  # sparse: zeros until written
        self._fds = {s: os.open(p, os.O_WRONLY) for s, p in self.paths.items()}

    def write(self, space: str, dests: np.ndarray, rows: np.ndarray) -> None:
        """Write ``rows`` (float32, shape (len(dests), n_dims)) at row indices ``dests``.

        Runs of consecutive indices are written with one call each.
        """
        dests = np.asarray(dests, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (dests.size, self.n_dims):
            raise ValueError(f"rows must have shape ({dests.size}, {self.n_dims}), got {rows.shape}")
        if dests.size > 1 and np.any(np.diff(dests) < 0):
            order = np.argsort(dests, kind="stable")
            dests, rows = dests[order], rows[order]
        breaks = np.flatnonzero(np.diff(dests) != 1) + 1
        row_bytes = self.n_dims * 4
        for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [dests.size]])):
            # a view of the rows, not a copy (a layer sweep of a 7B model writes gigabytes)
            os.pwrite(self._fds[space], memoryview(rows[lo:hi]).cast("B"),
                      self._offset[space] + int(dests[lo]) * row_bytes)

    def close(self) -> None:
        """Flush and close the files (they stay on disk)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> "LayerFiles":
        return self

    def __exit__(self, *exc) -> None:
        if self._fds:
            self.close()



def all_finite(path: str | Path) -> bool:
    """Whether every value of a float32 ``.npy`` file is finite, read in blocks."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(fh)
        if dtype != np.float32:
            raise ValueError(f"{path}: expected float32 values, found {dtype}")
        while block := fh.read(_BLOCK):
            if not np.isfinite(np.frombuffer(block, dtype=np.float32)).all():
                return False
    return True


def write_npz(path: str | Path, files: Mapping[str, Path], arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` (what ``np.savez`` writes) of ``.npy`` files and small arrays.

    The files are copied in blocks, so memory stays at one block whatever their size.
    """
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, src in files.items():
            with open(src, "rb") as fin, zf.open(f"{name}.npy", "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, _BLOCK)
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fout:
                np.lib.format.write_array(fout, np.asanyarray(value), allow_pickle=False)
    return path

