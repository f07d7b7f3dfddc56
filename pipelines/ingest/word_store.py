"""Parsed word-timing tables kept on disk by content, so each timing file is parsed once.

Every step (prepare, features, fit) reads the words of every run, each in its own process under
Airflow; parsing a TextGrid with praatio takes a third of a second, which for LeBel's 82 stories
is half a minute per step. A parsed table is stored under the source's cache folder, keyed by the
sha256 of the file's content (verified when it was fetched), the reader, its options and
:data:`WORD_TABLE_VERSION`, as an ``.npz`` read without pickle: a stale or altered entry can
only miss, never inject code, and one that does not load is parsed again.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("neuroflow")

__all__ = ["WORD_TABLE_VERSION", "load_table", "save_table", "table_key"]

#: Bump when a word reader's output changes: every stored table is parsed again.
WORD_TABLE_VERSION = "1"


def table_key(file_sha256: str, fmt: str, shift: float, options: dict, key: str = "") -> str:
    """The name of a parsed table: its file's content and key (named in the table), reader, shift and options."""
    blob = json.dumps({"sha256": file_sha256, "key": key, "format": fmt, "shift": round(float(shift), 9), "options": options,
                       "version": WORD_TABLE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save_table(folder: Path, key: str, table: pd.DataFrame) -> None:
    """Store ``table`` (columns of numbers or strings, JSON attrs) as ``folder/<key>.npz``, atomically;
    a table with other kinds of values is not stored (it is parsed each time)."""
    arrays: dict[str, np.ndarray] = {}
    for i, col in enumerate(table.columns):
        values = table[col].to_numpy()
        if values.dtype.kind in "biuf":
            arrays[f"c{i}"] = values
        elif all(isinstance(v, str) for v in values):
            arrays[f"c{i}"] = values.astype(str)
        else:
            return
    try:
        meta = json.dumps({"columns": [str(c) for c in table.columns], "attrs": table.attrs})
    except (TypeError, ValueError):
        return
    arrays["meta"] = np.asarray(meta)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, folder / f"{key}.npz")
    except OSError as err:  # a full or read-only cache: the words were parsed, the next step parses again
        log.warning("word table not cached (%s)", err)
        Path(tmp).unlink(missing_ok=True)


def load_table(folder: Path, key: str) -> pd.DataFrame | None:
    """The table stored under ``key``, or None (missing, a link, or not a table this module wrote)."""
    path = folder / f"{key}.npz"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            columns = meta["columns"]
            table = pd.DataFrame({name: npz[f"c{i}"] for i, name in enumerate(columns)}, columns=columns)
    except Exception as err:  # noqa: BLE001 - a damaged entry is parsed again, never trusted
        log.warning("word table %s unreadable (%s); parsing the file again", path, err)
        return None
    for col in table.columns:
        if table[col].dtype.kind == "U":
            table[col] = table[col].astype(object)
    table.attrs.update(meta.get("attrs", {}))
    return table
