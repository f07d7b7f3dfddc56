"""Which responses an analysis of a dataset reads: the response source, its subjects, tasks and sessions.

Every group of response files of one kind from one pipeline (raw tree or a derivative folder,
one ``space`` and ``desc``) is a candidate; per-story HDF5 arrays are one more. The field analyses
preprocessed data where a dataset ships it, so a derivative wins over the raw tree, then the
candidate that covers the most subjects. Subjects that only another derivative folder of the same
kind and space holds are added (its folder listed after the chosen one), and subjects that only the
raw tree holds (with ``kind: auto``), each when no chosen subject is in it too (a run is never found
twice). Files under :data:`POINTER_BYTES` are
git-annex pointers (content not in this copy): their runs are left out, and said so.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .scan import Inventory, ResponseFile

__all__ = ["Choice", "Hdf5Layout", "choose_responses", "find_hdf5_layout", "natural"]

#: Preference among kinds when two candidates cover as many subjects.
_KIND_ORDER = {"hdf5": 0, "gifti": 1, "timeseries": 2, "bold": 3, "meg": 4, "ieeg": 5, "eeg": 6}


def natural(label: str) -> tuple:
    """Sort key: ``2`` before ``10``, ``UTS02`` before ``UTS10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", label) if p)


@dataclass
class Hdf5Layout:
    """Per-story HDF5 arrays: ``files`` pattern and the stories of each subject."""

    pattern: str
    stories: dict[str, list[str]]  # subject -> stories
    pointers: int = 0


@dataclass
class Choice:
    """The responses chosen: the config's ``dataset.responses`` and what it covers."""

    settings: dict
    kind: str  # the kind of the chosen candidate (``auto`` may be written when raw subjects are added)
    subjects: list[str]
    runs: list[ResponseFile] = field(default_factory=list)  # the chosen runs (one file per run; L for GIFTI)
    hdf5: Hdf5Layout | None = None
    tasks: list[str] = field(default_factory=list)
    label: str = ""
    alternatives: list[tuple[str, dict]] = field(default_factory=list)  # (what, its settings) not chosen
    notes: list[str] = field(default_factory=list)


def find_hdf5_layout(inv: Inventory) -> Hdf5Layout | None:
    """The pattern of per-story HDF5 files: a folder named by the subject, a file named by the story."""
    labels = set(inv.subjects)
    patterns: Counter = Counter()
    found: dict[str, dict[str, list[str]]] = {}
    pointers: Counter = Counter()
    for key in inv.hdf5:
        parts = key.split("/")
        sub = next((i for i, p in enumerate(parts[:-1]) if p in labels or (p[4:] in labels and p[:4] == "sub-")),
                   None)
        if sub is None:
            continue
        subject = parts[sub][4:] if parts[sub].startswith("sub-") else parts[sub]
        name = PurePosixPath(parts[-1])
        pattern = "/".join(parts[:sub] + ["{subject}" if parts[sub] == subject else "sub-{subject}"]
                           + parts[sub + 1:-1] + ["{story}" + name.suffix])
        if inv.keys.get(key, 0) < 1024:
            pointers[pattern] += 1
            continue
        patterns[pattern] += 1
        found.setdefault(pattern, {}).setdefault(subject, []).append(name.stem)
    if not patterns:
        return None
    pattern = patterns.most_common(1)[0][0]
    stories = {s: sorted(v) for s, v in sorted(found[pattern].items(), key=lambda kv: natural(kv[0]))}
    return Hdf5Layout(pattern, stories, pointers[pattern])


def _describe(kind: str, root: str, space: str | None, desc: str | None) -> str:
    where = root or "the raw tree"
    extra = "".join(f", {k} {v}" for k, v in (("space", space), ("desc", desc)) if v)
    return f"{kind} in {where}{extra}"


def _candidates(inv: Inventory) -> dict[tuple, list[ResponseFile]]:
    groups: dict[tuple, list[ResponseFile]] = {}
    for r in inv.responses:
        if r.has_content and (r.kind != "gifti" or r.entities.get("hemi") == "L"):
            groups.setdefault(r.source(), []).append(r)
    return groups


def _add_disjoint_derivatives(groups: dict[tuple, list[ResponseFile]], chosen: tuple, settings: dict,
                              subjects: set[str], runs: list[ResponseFile], alternatives: list[tuple[str, dict]],
                              notes: list[str]) -> list[tuple[str, dict]]:
    """Read the subjects only another derivative folder holds (same kind and space), when none of the chosen
    subjects is in it: its folder is added to ``settings["derivatives"]`` (so no run is found twice).

    ``subjects`` and ``runs`` are extended in place; returns the alternatives without the folders added.
    """
    kind, root, space = chosen
    added = []
    for (k, r, s, _d), files in sorted(groups.items(), key=lambda kv: (-len({f.subject for f in kv[1]}), kv[0][1])):
        if k != kind or not r or r == root or s != space or sum(g[0] == k and g[1] == r for g in groups) != 1:
            continue
        theirs = {f.subject for f in files}
        if theirs & subjects:
            continue
        settings["derivatives"].append(r)
        runs += files
        subjects |= theirs
        added.append(r)
        notes.append(f"sub-{', sub-'.join(sorted(theirs, key=natural))} only have {kind} files in {r}: read too "
                     f"(listed in 'derivatives' after {root}; no subject is in both)")
    return [(what, snip) for what, snip in alternatives
            if not (snip.get("kind") == kind and snip.get("derivatives", [None])[0] in added)]


def choose_responses(inv: Inventory, prefer_root: str | None = None) -> Choice | None:
    """The response source an analysis should read, or None when the dataset holds no response with content.

    ``prefer_root``: a derivative folder ranked first when it holds responses (a known layout's).
    """
    groups = _candidates(inv)
    hdf5 = find_hdf5_layout(inv)
    ranked: list[tuple] = []
    for (kind, root, space, desc), files in groups.items():
        subjects = {f.subject for f in files}
        ranked.append(((root == prefer_root, bool(root), len(subjects), -_KIND_ORDER[kind]), (kind, root, space, desc)))
    if hdf5 is not None:
        ranked.append(((False, True, len(hdf5.stories), -_KIND_ORDER["hdf5"]), ("hdf5", hdf5.pattern, None, None)))
    if not ranked:
        return None
    ranked.sort(reverse=True)
    (kind, root, space, desc) = ranked[0][1]
    alternatives = []
    for score, (k, r, s, d) in ranked[1:]:
        n = f"{score[2]} subject{'s' if score[2] != 1 else ''}"
        if k == "hdf5":
            alternatives.append((f"per-story HDF5 files {r} ({n})", {"kind": "hdf5", "files": r}))
        else:
            snippet = {"kind": k, **({"derivatives": [r]} if r else {}), **({"space": s} if s else {}),
                       **({"desc": d} if d else {})}
            alternatives.append((f"{_describe(k, r, s, d)} ({n})", snippet))
    pointers = [r for r in inv.responses if not r.has_content]
    notes = []
    if pointers:
        notes.append(f"{len(pointers)} response file(s) are git-annex pointers or empty (under 1 KiB, e.g. "
                     f"{pointers[0].key}); their runs are left out: fetch their content (datalad get) and run "
                     "`neuroflow init` again to include them")
    if kind == "hdf5":
        if hdf5.pointers:
            notes.append(f"{hdf5.pointers} HDF5 file(s) are git-annex pointers or empty (under 1 KiB): left out; "
                         "fetch their content (datalad get) and run `neuroflow init` again to include them")
        return Choice({"kind": "hdf5", "files": hdf5.pattern}, "hdf5", list(hdf5.stories), hdf5=hdf5,
                      label=f"per-story HDF5 files {hdf5.pattern}", alternatives=alternatives, notes=notes)
    files = groups[(kind, root, space, desc)]
    settings: dict = {"kind": kind}
    if root:
        settings["derivatives"] = [root]
    same_root_kind = [g for g in groups if g[0] == kind and g[1] == root and g != (kind, root, space, desc)]
    raw_same_kind = root and any(g[0] == kind and not g[1] for g in groups)
    if kind == "gifti" and space:
        settings["space"] = space
    if desc and (raw_same_kind or any(g[2] == space for g in same_root_kind)):
        settings["desc"] = desc
    subjects = {f.subject for f in files}
    runs = list(files)
    if root and "desc" not in settings:
        alternatives = _add_disjoint_derivatives(groups, (kind, root, space), settings, subjects, runs, alternatives,
                                                 notes)
    # subjects only the raw tree holds, when no chosen subject has raw runs too: read with kind auto
    if root and "desc" not in settings:
        raw = [f for (k, r, _s, _d), fs in groups.items() if not r for f in fs]
        extra = {f.subject for f in raw} - subjects
        if extra and not any(f.subject in subjects for f in raw):
            settings["kind"] = "auto"
            runs += [f for f in raw if f.subject in extra]
            notes.append(f"sub-{', sub-'.join(sorted(extra, key=natural))} only have raw "
                         f"{'/'.join(sorted({f.kind for f in raw}))} files: read too ('kind: auto' takes the "
                         "kind each subject has)")
            subjects |= extra
    tasks = sorted({f.entities["task"] for f in runs if "task" in f.entities})
    return Choice(settings, kind, sorted(subjects, key=natural), runs=sorted(runs, key=lambda f: f.key),
                  tasks=tasks, label=_describe(kind, root, space, desc), alternatives=alternatives, notes=notes)
