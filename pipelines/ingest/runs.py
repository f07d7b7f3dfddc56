"""Run discovery: which files hold a subject's response runs, of which kind, in which order.

Runs are looked up in the raw tree and in each folder of ``dataset.responses.derivatives``
(BIDS names), or matched by the ``dataset.responses.files`` pattern (``{subject}``, ``{story}``).
Nothing is downloaded: this reads the dataset's listing only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..bids import parse_bids_name
from ..config import ResponsesConfig
from ..errors import DatasetError
from .dataset import Ingest

__all__ = ["DATATYPE", "MNE_EXTENSIONS", "RunFiles", "find_response_files", "find_runs", "run_labels"]

#: Extensions of the recordings MNE reads (MEG, EEG, iEEG).
MNE_EXTENSIONS = (".fif", ".fif.gz", ".edf", ".bdf", ".con", ".sqd", ".vhdr", ".set", ".cnt", ".mef", ".nwb")
#: BIDS datatype folder of each response kind.
DATATYPE = {"bold": "func", "timeseries": "func", "gifti": "func", "hdf5": "func",
            "meg": "meg", "ieeg": "ieeg", "eeg": "eeg"}


@dataclass
class RunFiles:
    """The files of one run before reading: data key(s), entities, story (when the name gives it)."""

    kind: str
    keys: dict[str, str]  # "data" -> key, or "L"/"R" -> key for GIFTI
    entities: dict[str, str]
    story: str | None = None
    derivative: bool = False

    @property
    def key(self) -> str:
        return self.keys.get("data") or self.keys[sorted(self.keys)[0]]


def _tasks_ok(opts: ResponsesConfig, task: str | None) -> bool:
    return opts.tasks is None or "*" in opts.tasks or task in opts.tasks


def _pattern_regex(pattern: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out += re.escape(pattern[pos:m.start()]) + f"(?P<{m.group(1)}>[A-Za-z0-9][A-Za-z0-9._\\-]*)"
        pos = m.end()
    return re.compile("^" + out + re.escape(pattern[pos:]) + "$")


def _candidates(ingest: Ingest, subject: str) -> dict[str, list[RunFiles]]:
    """Every response file of the subject, by kind."""
    opts = ingest.responses
    roots = [""] + [d.strip("/") + "/" for d in opts.derivatives]
    found: dict[str, list[RunFiles]] = {}
    gifti: dict[tuple, dict[str, str]] = {}
    if opts.files:
        rx = _pattern_regex(opts.files)
        for key in ingest.listing:
            m = rx.match(key)
            if not m or m.groupdict().get("subject", subject) not in (subject, f"sub-{subject}"):
                continue
            story = m.groupdict().get("story")
            if opts.stories is not None and story not in opts.stories:
                continue
            found.setdefault("hdf5", []).append(RunFiles("hdf5", {"data": key}, {"sub": subject}, story=story,
                                                         derivative=True))
    for key in ingest.listing:
        root = next((r for r in reversed(roots) if r and key.startswith(r)), "")
        if not key.startswith(root + f"sub-{subject}/"):
            continue
        name = parse_bids_name(key)
        if name is None or name.get("sub") != subject or not _tasks_ok(opts, name.get("task")):
            continue
        if opts.sessions is not None and name.get("ses") not in opts.sessions:
            continue
        if opts.desc is not None and name.get("desc") != opts.desc:
            continue
        derivative = bool(root)
        ents = name.run_entities()
        if name.suffix == "bold" and name.extension in (".nii.gz", ".nii"):
            found.setdefault("bold", []).append(RunFiles("bold", {"data": key}, ents, derivative=derivative))
        elif name.suffix == "timeseries" and name.extension == ".tsv" and name.get("desc") != "confounds":
            # (fMRIPrep's *_desc-confounds_timeseries.tsv are confounds, read by dataset.responses.preprocess)
            found.setdefault("timeseries", []).append(RunFiles("timeseries", {"data": key}, ents,
                                                               derivative=derivative))
        elif name.extension == ".func.gii" and name.get("hemi") in opts.hemi:
            if opts.space is not None and name.get("space") != opts.space:
                continue
            group = (tuple(sorted(ents.items())), name.get("space"), name.get("desc"), name.suffix, root)
            gifti.setdefault(group, {})[name.get("hemi")] = key
        elif name.suffix in ("meg", "ieeg", "eeg") and name.extension in MNE_EXTENSIONS:
            if name.get("split") not in (None, "01", "1"):
                continue  # later parts of a split FIF are read with the first
            found.setdefault(name.suffix, []).append(RunFiles(name.suffix, {"data": key}, ents,
                                                              derivative=derivative))
    for (ents, space, _desc, _suffix, root), hemis in gifti.items():
        missing = [h for h in opts.hemi if h not in hemis]
        if missing:
            raise DatasetError(f"{next(iter(hemis.values()))}: no hemi-{missing[0]} file beside it for the same "
                               f"run; set 'dataset.responses.hemi' to {sorted(hemis)} or add the file")
        found.setdefault("gifti", []).append(RunFiles("gifti", dict(hemis), dict(ents), derivative=bool(root)))
    return found


def find_runs(ingest: Ingest, subject: str) -> tuple[str, list[RunFiles]]:
    """(kind, runs) of one subject, sorted by session, task and run."""
    opts = ingest.responses
    cfg = ingest.config.dataset
    found = _candidates(ingest, subject)
    if opts.files and not found.get("hdf5") and opts.kind in ("auto", "hdf5"):
        raise DatasetError(f"{cfg.source}: no file matches 'dataset.responses.files' = {opts.files!r} for "
                           f"sub-{subject}; check the pattern ({{subject}} is {subject!r})")
    if opts.kind == "auto":
        kinds = [k for k in ("bold", "timeseries", "gifti", "hdf5", "meg", "ieeg", "eeg") if found.get(k)]
    else:
        kinds = [opts.kind] if found.get(opts.kind) else []
    if not kinds:
        where = ", ".join(["the raw tree"] + list(opts.derivatives))
        wanted = opts.kind if opts.kind != "auto" else "bold/timeseries/gifti/meg/ieeg/eeg"
        tasks = "any task" if opts.tasks and "*" in opts.tasks else f"task {'/'.join(opts.tasks or ())!r}"
        raise DatasetError(f"{cfg.source}: sub-{subject} has no {wanted} files for {tasks} in {where}; check "
                           "'dataset.task', 'dataset.responses.kind' and 'dataset.responses.derivatives'")
    if len(kinds) > 1:
        raise DatasetError(f"sub-{subject} has {' and '.join(kinds)} files for task {cfg.task!r}; "
                           "set 'dataset.responses.kind' to choose")
    kind = kinds[0]
    runs = found[kind]
    if kind != "hdf5":
        by_run: dict[tuple, list[RunFiles]] = {}
        for rf in runs:
            by_run.setdefault(tuple(sorted(rf.entities.items())), []).append(rf)
        dupes = [rfs for rfs in by_run.values() if len(rfs) > 1]
        if dupes:
            raise DatasetError(f"sub-{subject} has several {kind} files per run ({[r.key for r in dupes[0]]}); "
                               "set 'dataset.responses.desc' (or 'space') to choose one")
    return kind, sorted(runs, key=_run_order)


def _natural(v: str | None) -> tuple:
    v = v or ""
    return (0, int(v), "") if v.isdigit() else (1, 0, v)


def _run_order(rf: RunFiles) -> tuple:
    e = rf.entities
    return (_natural(e.get("ses")), e.get("task") or rf.story or "", _natural(e.get("acq")), _natural(e.get("run")),
            rf.story or "")


def run_labels(runs: list[RunFiles]) -> list[str]:
    """Short unique run labels: the run entity when only it varies (``1``, ``2``), else ``ses-2_task-x``.

    HDF5 runs named by story are labelled by their story. Returns one label per run, in order.
    """
    if all(rf.story and rf.kind == "hdf5" for rf in runs):
        return [rf.story for rf in runs]
    varying = [e for e in ("ses", "task", "acq", "run") if len({rf.entities.get(e) for rf in runs}) > 1]
    if not varying or varying == ["run"]:
        return [rf.entities.get("run", "1") for rf in runs]
    return ["_".join(f"{e}-{rf.entities[e]}" for e in varying if rf.entities.get(e)) for rf in runs]


def find_response_files(ingest: Ingest, subject: str) -> tuple[str, list[str]]:
    """(kind, keys) of the subject's response runs, sorted by run (the first hemisphere for GIFTI)."""
    kind, runs = find_runs(ingest, subject)
    return kind, [rf.key for rf in runs]
