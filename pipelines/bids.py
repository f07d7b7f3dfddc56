"""BIDS file names: entities, suffixes, JSON sidecar inheritance and matching files.

Names are parsed from the last path part only; a file's folder does not change its entities.
Derivatives written by fMRIPrep < 20.2 end on an entity (``..._space-fsaverage6_hemi-L.func.gii``):
such names parse with an empty suffix.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterable

_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")

#: The entities that identify one acquisition (a run); space, hemi, desc, ... describe a derivative of it.
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "dir", "rec", "run", "echo")
#: The order in which BIDS writes entities in a file name.
ENTITY_ORDER = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "mod", "echo", "recording", "proc",
                "space", "hemi", "res", "den", "label", "desc")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name: ``sub-01_task-x_run-1_bold.nii.gz``."""

    key: str
    entities: dict[str, str] = field(hash=False)
    suffix: str
    extension: str

    def get(self, entity: str, default: str | None = None) -> str | None:
        return self.entities.get(entity, default)

    def run_entities(self) -> dict[str, str]:
        """The entities naming the acquisition (sub, ses, task, acq, run, ...), without space/hemi/desc."""
        return {k: v for k, v in self.entities.items() if k in RUN_ENTITIES}


def parse_bids_name(key: str) -> BidsName | None:
    """Parse the last path part of `key`; None when it is not a BIDS-style name."""
    name = PurePosixPath(key).name
    stem, dot, ext = name.partition(".")
    parts = stem.split("_")
    if len(parts) < 2:
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if not m:
            return None
        entities[m.group(1)] = m.group(2)
    suffix = parts[-1]
    if "-" in suffix:
        m = _ENTITY.match(suffix)
        if not m:
            return None
        entities[m.group(1)] = m.group(2)
        suffix = ""
    return BidsName(key=key, entities=entities, suffix=suffix, extension=dot + ext)


def build_name(entities: dict[str, str], suffix: str, extension: str) -> str:
    """``{"sub": "01", "task": "x"}, "bold", ".json"`` -> ``sub-01_task-x_bold.json`` (BIDS entity order)."""
    order = [k for k in ENTITY_ORDER if k in entities] + sorted(k for k in entities if k not in ENTITY_ORDER)
    parts = [f"{k}-{entities[k]}" for k in order] + ([suffix] if suffix else [])
    return "_".join(parts) + extension


def raw_key(entities: dict[str, str], datatype: str, suffix: str, extension: str) -> str:
    """Where the raw file of an acquisition lives: ``sub-01/[ses-1/]<datatype>/<name>``."""
    run = {k: v for k, v in entities.items() if k in RUN_ENTITIES}
    folder = f"sub-{run['sub']}/" + (f"ses-{run['ses']}/" if "ses" in run else "") + datatype
    return f"{folder}/{build_name(run, suffix, extension)}"


def inherited_files(key: str, root: str, listing: Iterable[str], suffix: str, extension: str) -> list[str]:
    """Files that apply to `key` by the BIDS inheritance principle, least specific first.

    A file applies when it lies in `key`'s folder or a parent (down to `root`), has the given
    suffix and extension, and its entities are a subset of `key`'s. ``key`` need not exist
    (pass the path a raw file would have, see :func:`raw_key`).
    """
    target = parse_bids_name(key)
    if target is None:
        return []
    found: list[tuple[int, int, str]] = []
    root_parts = PurePosixPath(root).parts if root else ()
    parent = PurePosixPath(key).parent
    for cand in listing:
        if not cand.endswith(extension):
            continue
        c = parse_bids_name(cand)
        if c is None or c.suffix != suffix or c.extension != extension:
            continue
        folder = PurePosixPath(cand).parent
        if folder.parts[: len(root_parts)] != root_parts:
            continue
        if len(folder.parts) > len(root_parts) and folder.parts[len(root_parts)] == "derivatives" \
                and not root_parts:
            continue  # a derivative's files never apply to the raw tree
        if folder != parent and folder not in parent.parents:
            continue
        if all(target.entities.get(k) == v for k, v in c.entities.items()):
            found.append((len(folder.parts), len(c.entities), cand))
    return [c for _, _, c in sorted(found)]


def sidecar_candidates(key: str, root: str, listing: set[str]) -> list[str]:
    """JSON sidecars that apply to `key` by the inheritance principle, root first.

    A sidecar applies when it lies in the file's folder or a parent (down to `root`),
    has the same suffix and its entities are a subset of the file's entities.
    """
    target = parse_bids_name(key)
    if target is None:
        return []
    return inherited_files(key, root, listing, target.suffix, ".json")
