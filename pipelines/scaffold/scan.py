"""One pass over a dataset's listing: response files, word-timing files and events, by name only.

Nothing is downloaded here. Response files are classified by the same BIDS names that
:mod:`pipelines.ingest.runs` reads (``*_bold.nii.gz``, ``*_timeseries.tsv``, ``*_hemi-L/R_*.func.gii``,
MEG/EEG/iEEG recordings); per-story HDF5 arrays are found by their path (a folder named by the
subject, a file named by the story, as LeBel's ``derivative/preprocessed_data/UTS01/<story>.hf5``).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Mapping

from ..bids import parse_bids_name
from ..ingest.runs import MNE_EXTENSIONS

__all__ = ["POINTER_BYTES", "Inventory", "ResponseFile", "scan_listing"]

#: A recording smaller than this is a git-annex pointer or an empty placeholder, not data.
POINTER_BYTES = 1024
_HDF5 = (".hf5", ".h5", ".hdf5")
_SUB = re.compile(r"(?:^|/)sub-([A-Za-z0-9]+)/")


@dataclass(frozen=True)
class ResponseFile:
    """One response file as its name describes it."""

    key: str
    kind: str  # bold | timeseries | gifti | meg | ieeg | eeg
    root: str  # "" for the raw tree, else the derivative folder ("derivatives/fmriprep")
    entities: Mapping[str, str]
    size: int

    @property
    def subject(self) -> str:
        return self.entities["sub"]

    @property
    def has_content(self) -> bool:
        return self.size >= POINTER_BYTES

    def source(self) -> tuple[str, str, str | None, str | None]:
        """(kind, root, space, desc): the files of one kind from one pipeline."""
        return self.kind, self.root, self.entities.get("space"), self.entities.get("desc")


@dataclass
class Inventory:
    """What a dataset's listing holds, by name."""

    keys: dict[str, int]  # key -> size
    subjects: list[str]
    responses: list[ResponseFile] = field(default_factory=list)
    hdf5: list[str] = field(default_factory=list)
    textgrids: list[str] = field(default_factory=list)
    gentle: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)  # TSVs outside the subjects' folders (word tables?)
    events: list[str] = field(default_factory=list)  # raw-tree *_events.tsv

    def tasks(self) -> list[str]:
        return sorted({r.entities["task"] for r in self.responses if "task" in r.entities})


def _root_of(key: str) -> str:
    """The folder a BIDS tree starts at: '' for the raw tree, else the part before ``sub-<label>/``."""
    m = _SUB.search(key)
    if not m:
        return ""
    return key[: m.start()].strip("/")


def _classify(key: str) -> tuple[str, dict[str, str]] | None:
    name = parse_bids_name(key)
    if name is None or "sub" not in name.entities:
        return None
    ents = dict(name.entities)
    if name.suffix == "bold" and name.extension in (".nii.gz", ".nii"):
        return "bold", ents
    if name.suffix == "timeseries" and name.extension == ".tsv":
        return "timeseries", ents
    if name.extension == ".func.gii" and name.get("hemi") in ("L", "R"):
        return "gifti", ents
    if name.suffix in ("meg", "ieeg", "eeg") and name.extension in MNE_EXTENSIONS:
        if name.get("split") not in (None, "01", "1"):
            return None
        return name.suffix, ents
    return None


def scan_listing(listing: Mapping[str, object]) -> Inventory:
    """Classify every key of a listing (key -> object info with ``size``)."""
    sizes = {k: int(getattr(v, "size", 0) or 0) for k, v in listing.items()}
    subjects = Counter(m.group(1) for k in sizes for m in [_SUB.search(k)] if m)
    inv = Inventory(keys=sizes, subjects=sorted(subjects))
    for key, size in sizes.items():
        low = key.lower()
        in_subject = _SUB.search(key) is not None
        if low.endswith(_HDF5):
            inv.hdf5.append(key)
        elif low.endswith(".textgrid"):
            inv.textgrids.append(key)
        elif low.endswith("/align.json") and not in_subject:
            inv.gentle.append(key)
        elif low.endswith("_events.tsv") and in_subject and not key.startswith("derivative"):
            inv.events.append(key)
        elif low.endswith((".tsv", ".csv")) and not in_subject and "/" in key \
                and not PurePosixPath(key).name.startswith(("participants", "scans", "sessions")):
            inv.tables.append(key)
        if in_subject:
            found = _classify(key)
            if found is not None:
                kind, ents = found
                inv.responses.append(ResponseFile(key, kind, _root_of(key), ents, size))
    for lst in (inv.hdf5, inv.textgrids, inv.gentle, inv.tables, inv.events):
        lst.sort()
    inv.responses.sort(key=lambda r: r.key)
    return inv
