"""The content-addressed caches: where they live, how entries are written and read.

Feature arrays live in ``{output}/_cache/features/<key>.npz`` and fit results in
``{output}/_work/<analysis_id>/``, keyed by hashes of what was read; downloads live in the local
folder :func:`default_cache_dir`. A lower layer: it knows storage, nothing of the steps.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from .resultstore import ResultStore


def default_cache_dir() -> Path:
    """``$NEUROFLOW_CACHE``, else ``~/.cache/neuroflow``: downloads, staging, local copies."""
    return Path(os.environ.get("NEUROFLOW_CACHE", Path.home() / ".cache" / "neuroflow")).expanduser()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def save_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays as the bytes of an ``.npz`` (no pickles)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz``'s bytes; object arrays (pickles) are refused."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def write_entry_file(store: ResultStore, path: str | Path, rel: str) -> None:
    """:func:`write_entry` for an entry on disk: uploaded in parts and read back in blocks to
    verify it, never whole in memory (a concurrent writer of the same key writes the same bytes)."""
    store.put_file(path, rel)


def write_entry(store: ResultStore, data: bytes, rel: str) -> None:
    """Write a content-keyed cache or work entry once.

    A concurrent writer of the same key writes the same content (the key hashes the inputs), so
    when one is already there our write is dropped (conditional create) rather than racing its
    read-back check; a corrupt entry found earlier is overwritten.
    """
    if store.exists(rel):
        store.put_bytes(data, rel)  # only reached for an entry found corrupt and recomputed
    else:
        store.create_bytes(data, rel)
