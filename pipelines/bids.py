"""BIDS file names: entities, suffixes and JSON sidecar inheritance."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

_ENTITY = re.compile(r"^([a-zA-Z]+)-([a-zA-Z0-9]+)$")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name: ``sub-01_task-x_run-1_bold.nii.gz``."""

    key: str
    entities: dict[str, str] = field(hash=False)
    suffix: str
    extension: str

    def get(self, entity: str, default: str | None = None) -> str | None:
        return self.entities.get(entity, default)


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
        return None
    return BidsName(key=key, entities=entities, suffix=suffix, extension=dot + ext)


def sidecar_candidates(key: str, root: str, listing: set[str]) -> list[str]:
    """JSON sidecars that apply to `key` by the inheritance principle, root first.

    A sidecar applies when it lies in the file's folder or a parent (down to `root`),
    has the same suffix and its entities are a subset of the file's entities.
    """
    target = parse_bids_name(key)
    if target is None:
        return []
    found: list[tuple[int, int, str]] = []
    root_parts = PurePosixPath(root).parts if root else ()
    for cand in listing:
        if not cand.endswith(".json"):
            continue
        c = parse_bids_name(cand)
        if c is None or c.suffix != target.suffix:
            continue
        folder = PurePosixPath(cand).parent
        if folder.parts[: len(root_parts)] != root_parts:
            continue
        if folder != PurePosixPath(key).parent and folder not in PurePosixPath(key).parents:
            continue
        if all(target.entities.get(k) == v for k, v in c.entities.items()):
            found.append((len(folder.parts), len(c.entities), cand))
    return [c for _, _, c in sorted(found)]
