"""A dataset opened at its pinned version: fetching and recording every file read, checksums, version.

:func:`open_dataset` lists the source, checks the version it declares (:func:`dataset_version`)
against ``dataset.version`` and returns an :class:`Ingest`, whose :meth:`Ingest.fetch` downloads
(or finds in the cache), verifies and records each file for the manifest (:class:`FileRecord`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .. import storage
from ..config import AnalysisConfig, ResponsesConfig, WordTimingsConfig
from ..errors import ConfigError, DatasetError
from ..keys import check_relative_key
from ..storage import DatasetSource
from .options import options_from_config
from .sidecars import read_json

__all__ = ["FileRecord", "Ingest", "check_subjects", "checksum_table_key", "dataset_version", "open_dataset",
           "read_checksum_table"]

log = logging.getLogger("neuroflow")


@dataclass
class FileRecord:
    """One file read: dataset key, size, ETag, sha256, version id and what was verified (for the manifest)."""

    key: str
    size: int
    etag: str
    sha256: str
    version_id: str = ""
    verified: str = ""

    def as_dict(self) -> dict:
        out = {"key": self.key, "size": self.size, "etag": self.etag, "sha256": self.sha256}
        if self.version_id:
            out["version_id"] = self.version_id
        if self.verified:
            out["verified"] = self.verified
        return out


@dataclass
class Ingest:
    """A dataset opened at its pinned version, recording the files it reads."""

    config: AnalysisConfig
    source: DatasetSource
    files_read: dict[str, FileRecord] = field(default_factory=dict)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig.model_construct)
    words: WordTimingsConfig = field(default_factory=WordTimingsConfig.model_construct)
    version_found: str | None = None
    word_cache: dict = field(default_factory=dict, repr=False)  # (key, shift, format) -> words, see words.py
    plan_cache: dict = field(default_factory=dict, repr=False)  # subject -> its planned runs, see responses.py

    def fetch(self, key: str) -> Path:
        """Download (or find) `key`, verify it, and record it for the manifest."""
        path = self.source.fetch(key)
        if key not in self.files_read:
            info = self.source.info(key)
            algo, _, where = self.source.expected_checksum(key)
            digests = self.source.digests.get(key)  # a cached copy the source checked against its record
            if digests is None or "sha256" not in digests or (algo and algo not in digests):
                # through the module, so that one patch of storage.hash_file (tests) reaches every caller
                digests = storage.hash_file(path, ("sha256",) + ((algo,) if algo and algo != "sha256" else ()))
            self.source.check_digests(key, path, digests)
            self.files_read[key] = FileRecord(key, info.size, info.etag, digests["sha256"],
                                              version_id=self.source.version_ids.get(key, ""),
                                              verified=f"size+{algo} ({where})" if algo else "size")
        return path

    @property
    def listing(self) -> dict:
        return self.source.list_files()


def open_dataset(config: AnalysisConfig, cache_root: str | Path, *,
                 responses: Mapping[str, Any] | ResponsesConfig | None = None,
                 words: Mapping[str, Any] | WordTimingsConfig | None = None,
                 checksums: dict[str, str] | str | Path | None = None) -> Ingest:
    """List the dataset and check that its version matches ``dataset.version``.

    Parameters
    ----------
    config : the analysis config (``dataset.source``, ``version``, ``task``, ...).
    cache_root : where downloads are cached, keyed by (source, version, key).
    responses, words : overrides of ``dataset.responses`` / ``dataset.word_timings`` (a dict of fields, or a
        whole :class:`ResponsesConfig` / :class:`WordTimingsConfig`; see :func:`options_from_config`).
    checksums : key -> git-annex key / ``md5:<hex>``, or a TSV with columns path and annex_key (as a
        git-annex listing): a ``str`` is always a key of the dataset (read through the same checks as
        every file; absolute paths and ``..`` are refused), a ``Path`` a local table the calling code
        vouches for; files read are verified against them (the config's ``dataset.checksums`` when not given).
    """
    ds = config.dataset
    if checksums is None and getattr(ds, "checksums", None):
        checksums = ds.checksums
    table_key = None
    if isinstance(checksums, Path):  # handed in by code: a local table the caller vouches for
        checksums = read_checksum_table(checksums)
    elif isinstance(checksums, str):  # from a config: always a file of the dataset itself, never a local path
        table_key, checksums = checksum_table_key(checksums), None
    resp, wopts = options_from_config(config, responses, words)
    ingest = Ingest(config, DatasetSource(ds.source, ds.version, cache_root, checksums=checksums),
                    responses=resp, words=wopts)
    listing = ingest.source.list_files()
    if table_key is not None:  # a checksum table shipped inside the dataset
        if table_key not in listing:
            raise DatasetError(f"{ds.source}: no checksum table {table_key!r} (neither a local file nor a file of "
                               "the dataset); fix 'dataset.checksums'")
        ingest.source.checksums.update(read_checksum_table(ingest.fetch(table_key)))
    found = dataset_version(ingest)
    ingest.version_found = found
    if found is not None and found != ds.version:
        raise DatasetError(
            f"{ds.source}: the source holds version {found}, the config pins {ds.version}; "
            f"set 'dataset.version: \"{found}\"' to analyse it, or point at the pinned snapshot"
        )
    if "dataset_description.json" not in listing:
        raise DatasetError(f"{ds.source}: no dataset_description.json; this is not a BIDS dataset root")
    if found is None:
        log.warning("%s: the dataset states no version (no CHANGES, DatasetDOI or Version); "
                    "pinning to %s cannot be checked", ds.source, ds.version)
    return ingest


def checksum_table_key(value: str) -> str:
    """The dataset key that ``dataset.checksums`` names; refuses anything that could leave the dataset.

    An absolute path, ``..``, ``.``/empty segments (``....//``), backslashes and control characters are
    refused: the table is one of the dataset's own files, read through the same checks as every other file.
    """
    try:
        check_relative_key(value, "dataset.checksums")
    except ValueError as err:
        raise ConfigError(f"{err} 'dataset.checksums' names a checksum table inside the dataset (e.g. "
                          "code/checksums.tsv), or is a mapping of path -> checksum") from err
    if not value or value.endswith("/") or any(p in (".", "") for p in value.split("/")):
        raise ConfigError(f"'dataset.checksums' has an empty or '.' path segment; got {value!r}. Name a file "
                          "of the dataset as a plain relative path (e.g. code/checksums.tsv)")
    return value


def read_checksum_table(path: str | Path) -> dict[str, str]:
    """``path<TAB>...<TAB>annex_key`` rows (a git-annex listing such as ANNEXED_FILES.tsv) -> {path: key}.

    Errors name the file and the columns it needs, never its content.
    """
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DatasetError(f"{path}: not a tab-separated checksum table ({type(err).__name__}); it needs columns "
                           "'path' and 'annex_key' (or md5/sha256)") from err
    col = next((c for c in ("annex_key", "key", "checksum", "md5", "sha256") if c in table.columns), None)
    if "path" not in table.columns or col is None:
        raise DatasetError(f"{path}: a checksum table needs columns 'path' and 'annex_key' (or md5/sha256); "
                           f"its header has {len(table.columns)} other column(s)")
    prefix = "" if col in ("annex_key", "key", "checksum") else f"{col}:"
    return {row["path"]: prefix + row[col] for _, row in table.iterrows() if row[col]}


def dataset_version(ingest: Ingest) -> str | None:
    """The snapshot version a dataset declares: CHANGES' newest entry, else the DOI, else ``Version``."""
    listing = ingest.source.list_files()
    if "CHANGES" in listing:
        for line in ingest.fetch("CHANGES").read_text(errors="replace").splitlines():
            m = re.match(r"^\s*v?(\d+\.\d+\.\d+)\b", line)
            if m:
                return m.group(1)
    if "dataset_description.json" in listing:
        desc = read_json(ingest.fetch("dataset_description.json"), "dataset_description.json")
        m = re.search(r"\.v(\d+\.\d+\.\d+)$", str(desc.get("DatasetDOI", "")))
        if m:
            return m.group(1)
        for name in ("Version", "DatasetVersion"):
            if re.fullmatch(r"v?\d+(\.\d+)*", str(desc.get(name, ""))):
                return str(desc[name]).lstrip("v")
    return None


def check_subjects(ingest: Ingest) -> list[str]:
    """Refuse unknown subjects, naming the ones the dataset has."""
    listing = ingest.source.list_files()
    have = sorted({m.group(1) for k in listing for m in [re.search(r"(?:^|/)sub-([A-Za-z0-9]+)/", k)] if m})
    missing = [s for s in ingest.config.dataset.subjects if s not in have]
    if missing:
        shown = ", ".join(have[:20]) + (" ..." if len(have) > 20 else "")
        raise DatasetError(f"{ingest.config.dataset.source}: no subject {', '.join('sub-' + s for s in missing)}; "
                           f"the dataset has: {shown}. Fix 'dataset.subjects'")
    return list(ingest.config.dataset.subjects)
