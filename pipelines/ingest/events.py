"""Sidecars and events of a run: merged JSON sidecars (BIDS inheritance) and what events.tsv says of the story.

:func:`sidecar` / :func:`raw_sidecar` / :func:`run_sidecar` merge a run's JSON sidecars, most
specific last; :func:`events_key_for` finds the events.tsv that applies to a run, and
:func:`stimulus_from_events` reads the story, its onset and its end from it.
"""
from __future__ import annotations

import re
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

from ..bids import inherited_files, raw_key, sidecar_candidates
from ..errors import DatasetError
from ..limits import MAX_ABS_SECONDS, check_table
from ..readers import check_not_pointer
from .dataset import Ingest
from .runs import DATATYPE, RunFiles
from .sidecars import Sidecar, read_json

__all__ = ["events_key_for", "raw_sidecar", "read_events", "run_sidecar", "sidecar", "stimulus_from_events"]


def sidecar(ingest: Ingest, key: str) -> Sidecar:
    """The merged JSON sidecar of `key` (BIDS inheritance, most specific last)."""
    listing = set(ingest.source.list_files())
    root = key.split("sub-", 1)[0].rstrip("/")
    merged = Sidecar()
    for r in ([""] if not root else ["", root]):
        for cand in sidecar_candidates(key, r, listing):
            merged.merge(read_json(ingest.fetch(cand), cand), cand)
    return merged


def raw_sidecar(ingest: Ingest, entities: dict[str, str], datatype: str, suffix: str) -> Sidecar:
    """The merged raw-tree JSON sidecar of an acquisition, e.g. the ``bold.json`` of a derivative's run."""
    merged = Sidecar()
    if "sub" not in entities:
        return merged
    target = raw_key(entities, datatype, suffix, ".json")
    for cand in inherited_files(target, "", ingest.listing, suffix, ".json"):
        merged.merge(read_json(ingest.fetch(cand), cand), cand)
    return merged


def run_sidecar(ingest: Ingest, rf: RunFiles) -> Sidecar:
    """Raw sidecar of the run's acquisition, overlaid by the derivative's own sidecars."""
    datatype = DATATYPE[rf.kind]
    suffix = "bold" if datatype == "func" else rf.kind
    merged = raw_sidecar(ingest, rf.entities, datatype, suffix)
    for key in rf.keys.values():
        merged.merge(sidecar(ingest, key), key)
    return merged


def events_key_for(ingest: Ingest, entities: dict[str, str], datatype: str) -> str | None:
    """The events.tsv that applies to an acquisition (raw tree, inheritance), or None."""
    if "sub" not in entities or "task" not in entities:
        return None
    found = inherited_files(raw_key(entities, datatype, "events", ".tsv"), "", ingest.listing, "events", ".tsv")
    return found[-1] if found else None


def read_events(ingest: Ingest, key: str) -> pd.DataFrame:
    """The events.tsv `key` as strings (``n/a`` as missing); it must have an ``onset`` column."""
    path = ingest.fetch(key)
    check_not_pointer(path, key)
    check_table(path, key, "events.tsv")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str)
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable events.tsv ({err})") from err
    if "onset" not in table.columns:
        raise DatasetError(f"{key}: events.tsv has no 'onset' column (columns: {list(table.columns)})")
    return table


def _story_name(stim_file: str) -> str:
    stem = PurePosixPath(str(stim_file)).name.split(".")[0]
    return re.sub(r"_audio$", "", stem)


def _check_event_times(table: pd.DataFrame, onset: pd.Series, duration: pd.Series, rows: pd.Series,
                       key: str) -> None:
    """Refuse stimulus rows whose onset is not a finite time or whose duration is negative or not finite."""
    for name, values, ok in (("onset", onset, np.isfinite(onset) & (onset.abs() <= MAX_ABS_SECONDS)),
                             ("duration", duration, np.isfinite(duration) & (duration >= 0)
                              & (duration <= MAX_ABS_SECONDS))):
        bad = rows & ~ok
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raw = table[name].iloc[i] if name in table.columns else values.iloc[i]
            raise DatasetError(f"{key}: row {i + 1} has {name} {raw!r}, not a time in seconds "
                               f"({'>= 0, ' if name == 'duration' else ''}finite); fix the events.tsv")


def stimulus_from_events(ingest: Ingest, events_key: str, story_trial_type: str = "story") -> dict:
    """What a run's events.tsv says of its story: name, onset and end on the run's clock.

    The story is the ``story`` column when there is one, else the stimulus file of the rows
    whose trial_type is `story_trial_type` (else of all rows) with ``_audio`` and the extension
    removed (Narratives: ``pieman_audio.wav`` -> ``pieman``). The stimulus file starts playing
    at the earliest onset of the rows naming it: Narratives' ``pieman_audio.wav`` (450 s, the
    whole run) holds the music at 0 s and the story at 15 s; ``tunnel_audio.wav`` starts at 3 s.
    """
    table = read_events(ingest, events_key)
    onset = pd.to_numeric(table["onset"], errors="coerce")
    duration = pd.to_numeric(table.get("duration", pd.Series(0.0, index=table.index)), errors="coerce").fillna(0.0)
    if "story" in table.columns and table["story"].notna().any():
        stories = sorted(table["story"].dropna().unique())
        if len(stories) != 1:
            raise DatasetError(f"{events_key}: the run holds several stories {stories[:5]}; neuroflow takes one "
                               "story per run: split the run or choose the rows with 'story_trial_type'")
        rows = table["story"] == stories[0]
        _check_event_times(table, onset, duration, rows, events_key)
        return {"story": str(stories[0]), "onset": float(onset[rows].min()),
                "end": float((onset + duration)[rows].max()), "stim_file": None}
    if "stim_file" not in table.columns or not table["stim_file"].notna().any():
        raise DatasetError(f"{events_key}: names no story (no 'story' or 'stim_file' column); set "
                           "'dataset.responses.story_from: task' or add the column")
    rows = table["stim_file"].notna()
    if "trial_type" in table.columns and (table["trial_type"] == story_trial_type).any():
        rows &= table["trial_type"] == story_trial_type
    files = sorted(table.loc[rows, "stim_file"].unique())
    if len(files) != 1:
        raise DatasetError(f"{events_key}: the run plays several stimulus files {files[:5]}; set "
                           "'dataset.responses.story_trial_type' to the trial_type of the story rows")
    same_file = table["stim_file"] == files[0]
    _check_event_times(table, onset, duration, rows | same_file, events_key)
    return {"story": _story_name(files[0]), "onset": float(onset[same_file].min()),
            "end": float((onset + duration)[rows].max()), "stim_file": files[0]}
