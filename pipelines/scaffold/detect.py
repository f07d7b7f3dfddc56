"""Detect what an analysis of a dataset needs: version, responses, subjects, tasks, stories, word timings.

:func:`detect` lists the dataset through the same :class:`~pipelines.storage.DatasetSource` that
``neuroflow run`` uses, reads only small metadata files (``dataset_description.json``, ``CHANGES``,
a few sidecars and events.tsv, the header line of candidate word tables) and returns a
:class:`Plan`: the config as a dict, a comment per setting, the alternatives it did not choose, and
notes saying what it found and why it chose what it did.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AnalysisConfig, DatasetConfig, parse_config
from ..errors import ConfigError, DatasetError, NeuroflowError
from ..ingest import (
    Ingest,
    dataset_version,
    events_key_for,
    raw_sidecar,
    read_events,
    read_json,
    sidecar,
    stimulus_from_events,
)
from ..ingest.runs import DATATYPE
from ..storage import DatasetSource
from .known_layouts import KnownLayout, recognise
from .responses import Choice, choose_responses, natural
from .scan import Inventory, ResponseFile, scan_listing
from .timings import TimingSource, best_source, timing_sources

__all__ = ["Plan", "detect"]

#: events.tsv read to learn the runs' stories (one per task/session/run, then the first subjects' runs).
MAX_EVENTS_READ = 60
_EPHYS = ("meg", "ieeg", "eeg")


@dataclass
class Plan:
    """A config detected from a dataset, with what to say about each choice."""

    config: dict
    comments: dict[str, str] = field(default_factory=dict)  # dotted key -> end-of-line comment
    alternatives: dict[str, list[str]] = field(default_factory=dict)  # dotted key -> lines written as comments
    notes: list[str] = field(default_factory=list)  # what was found and chosen (the file's header)
    layout: KnownLayout | None = None


def _placeholder_config(source: str, version: str) -> AnalysisConfig:
    """A config carrying only the dataset's place: what :class:`Ingest` needs to list and fetch."""
    ds = DatasetConfig.model_construct(source=source.rstrip("/"), version=version, task="init", subjects=[])
    return AnalysisConfig.model_construct(dataset=ds)


def _check_arguments(source: str, output: str) -> None:
    """SOURCE and --output checked as the config checks them, before anything is listed ('/' is no dataset)."""
    probe = {"dataset": {"source": source, "version": "0", "task": "x", "subjects": ["x"],
                         "word_timings": {"format": "events"}},
             "features": [{"name": "w", "kind": "word_rate"}], "output": output}
    try:
        parse_config(probe, "neuroflow init SOURCE / --output")
    except ConfigError as err:
        raise ConfigError(str(err).replace("'dataset.source'", "SOURCE").replace("'output'", "--output")) from None


def _open(source: str, version: str, cache_root: Path) -> Ingest:
    return Ingest(_placeholder_config(source, version), DatasetSource(source, version, cache_root))


def _bids_root_hint(listing: dict) -> str:
    deeper = sorted((k for k in listing if k.endswith("/dataset_description.json")), key=lambda k: k.count("/"))
    if deeper:
        return f"; the dataset's root seems to be {deeper[0].rsplit('/', 1)[0]}/: add it to SOURCE"
    return "; neuroflow reads BIDS datasets (https://bids.neuroimaging.io): convert it first"


def _version(ingest: Ingest, given: str | None, source: str) -> tuple[str, str]:
    found = dataset_version(ingest)
    if given and found and given != found:
        raise DatasetError(f"{source}: the source holds version {found}, not {given}; pass --version {found} "
                           "or point SOURCE at the snapshot you want")
    if found:
        where = "CHANGES" if "CHANGES" in ingest.listing else "dataset_description.json"
        return found, f"stated in {where}"
    if given:
        return given, "given with --version (the dataset states none)"
    raise DatasetError(f"{source}: the dataset states no version (no CHANGES entry, DatasetDOI or Version in "
                       "dataset_description.json); pass --version V to pin the copy you analyse")


def _first_line(ingest: Ingest, key: str) -> str:
    if ingest.listing[key].size > 512 * 1024 * 1024:
        return ""
    try:
        with open(ingest.fetch(key), encoding="utf-8-sig", errors="replace") as fh:
            return fh.readline(64 * 1024)  # a header line; never a whole one-line file
    except (OSError, NeuroflowError):
        return ""


def _run_files(choice: Choice) -> list[ResponseFile]:
    seen, out = set(), []
    for f in choice.runs:
        ident = tuple(sorted((k, v) for k, v in f.entities.items() if k in ("sub", "ses", "task", "acq", "run")))
        if ident not in seen:
            seen.add(ident)
            out.append(f)
    return out


def _sample_runs(runs: list[ResponseFile], subjects: list[str]) -> list[ResponseFile]:
    """Runs whose events are read: one per (task, session, run), then every run of the first three subjects."""
    picked, seen = [], set()
    for f in runs:
        ident = (f.entities.get("task"), f.entities.get("ses"), f.entities.get("run"))
        if ident not in seen:
            seen.add(ident)
            picked.append(f)
    first = set(subjects[:3])
    picked += [f for f in runs if f.subject in first and f not in picked]
    return picked[:MAX_EVENTS_READ]


def _events_facts(ingest: Ingest, runs: list[ResponseFile]) -> tuple[dict[str, str | None], dict[str, float], bool]:
    """For sampled runs: story from events (by run key), stimulus onsets, and whether events hold word rows."""
    stories: dict[str, str | None] = {}
    onsets: dict[str, float] = {}
    word_rows = False
    for f in runs:
        ents = {k: v for k, v in f.entities.items() if k in ("sub", "ses", "task", "acq", "run")}
        key = events_key_for(ingest, ents, DATATYPE[f.kind])
        if key is None:
            stories[f.key] = None
            continue
        try:
            stim = stimulus_from_events(ingest, key)
            stories[f.key], onsets[f.key] = stim["story"], stim["onset"]
        except NeuroflowError:
            stories[f.key] = None
        if not word_rows:
            try:
                table = read_events(ingest, key)
                word_rows = ("trial_type" in table.columns and "word" in table.columns
                             and bool((table["trial_type"] == "word").any()))
            except NeuroflowError:
                pass
    return stories, onsets, word_rows


def _sidecar_number(ingest: Ingest, key: str, name: str) -> float | None:
    try:
        value = sidecar(ingest, key).get(name)
    except NeuroflowError:
        return None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _ephys_settings(ingest: Ingest, choice: Choice, first: ResponseFile, plan: Plan) -> dict:
    """Filter and resampling for MEG/EEG/iEEG from the stated sampling rate."""
    fs = _sidecar_number(ingest, first.key, "SamplingFrequency")
    out: dict = {}
    if fs is None:
        plan.notes.append(f"{first.key}: no SamplingFrequency in its sidecar; recordings are kept at their own rate "
                          "(set dataset.responses.sfreq to resample)")
        return out
    top = 50.0 if first.kind == "ieeg" else 100.0
    sfreq = float(min(top, round(fs / 2.5, 3)))
    out["sfreq"] = sfreq
    if first.kind == "ieeg" and not first.root and fs >= 400:
        out["high_gamma"] = [70.0, 150.0]
    elif first.kind != "ieeg":
        out["h_freq"] = float(min(40.0, round(0.4 * sfreq, 3)))
    plan.comments["dataset.responses.sfreq"] = f"recorded at {fs:g} Hz ({first.key.rsplit('/', 1)[-1]} sidecar)"
    return out


def _restrict(choice: Choice, inv: Inventory, runs: list[ResponseFile], settings: dict, plan: Plan) -> None:
    """tasks / sessions: every task of the chosen files ('*'), or those with content when some are pointers."""
    kinds = {choice.kind} if settings.get("kind") != "auto" else {f.kind for f in runs}
    roots = {f.root for f in runs}
    all_files = [r for r in inv.responses if r.kind in kinds and r.root in roots]
    tasks = sorted({f.entities.get("task") for f in runs} - {None}, key=natural)
    all_tasks = sorted({f.entities.get("task") for f in all_files} - {None}, key=natural)
    if len(tasks) > 1:
        settings["tasks"] = ["*"] if tasks == all_tasks else tasks
        plan.comments["dataset.responses.tasks"] = (f"{len(tasks)} tasks, each read with its own story" if
                                                    tasks == all_tasks else f"the tasks with content ({len(tasks)} "
                                                    f"of {len(all_tasks)})")
    sessions = sorted({f.entities.get("ses") for f in runs} - {None}, key=natural)
    all_sessions = sorted({f.entities.get("ses") for f in all_files} - {None}, key=natural)
    if sessions and sessions != all_sessions and "sessions" not in settings:
        settings["sessions"] = sessions


def _timing_settings(ingest: Ingest, inv: Inventory, choice: Choice, runs: list[ResponseFile], plan: Plan,
                     known: KnownLayout | None) -> tuple[dict, str, list[str]]:
    """(word_timings, story mode, run stories) for the chosen runs."""
    if choice.hdf5 is not None:
        run_stories = {"task": [s for stories in choice.hdf5.stories.values() for s in stories]}
        onsets, word_rows, event_stories = {}, False, {}
    else:
        sample = _sample_runs(runs, choice.subjects)
        event_stories, onsets, word_rows = _events_facts(ingest, sample)
        run_stories = {"task": [f.entities.get("task") for f in sample]}
        if any(event_stories.get(f.key) for f in sample):
            run_stories["events"] = [event_stories.get(f.key) for f in sample]
    sources = timing_sources(inv, lambda k: _first_line(ingest, k), word_rows)
    if known is not None and known.word_timings and _known_files_present(known.word_timings, inv, run_stories):
        wt = dict(known.word_timings)
        mode = known.story_from or ("events" if "events" in run_stories else "task")
        if mode not in run_stories:
            mode = "task"
        others = [s.label for s in sources if not _same(s, wt)]
        if others:
            plan.alternatives["dataset.word_timings"] = [f"also in the dataset: {o}" for o in others]
        return wt, mode, [s for s in run_stories[mode] if s]
    best = best_source(sources, run_stories)
    if best is None:
        raise DatasetError(f"{ingest.config.dataset.source}: no word timings found for the runs' stories "
                           f"({', '.join(sorted({s for v in run_stories.values() for s in v if s})[:8])}): neuroflow "
                           "looks for Praat TextGrids, gentle align.json, word tables (word + onset columns) and "
                           "word rows in events.tsv; add them to the dataset")
    mode, src, timed = best
    stories = [s for s in run_stories[mode] if s]
    wt = src.settings(stories)
    if mode == "events" and src.format != "events" and onsets:
        wt["onset_from_events"] = True
        plan.comments["dataset.word_timings.onset_from_events"] = \
            "the timing file starts when the run's events.tsv starts its stimulus file"
    others = [s.label for s in sources if s is not src]
    if others:
        plan.alternatives["dataset.word_timings"] = [f"also in the dataset: {o}" for o in others]
        plan.notes.append(f"word timings: chose {src.label} (times {timed} of {len(stories)} runs sampled); "
                          f"{len(others)} other source(s) written as comments")
    untimed = sorted({s for s in stories if not src.key_for(s, len(set(stories)))})
    if untimed and src.format != "events":
        plan.notes.append(f"no word timings for stories {', '.join(untimed[:8])}: `neuroflow validate` names their "
                          "runs; drop those subjects or add the files")
    return wt, mode, stories


def _known_files_present(wt: dict, inv: Inventory, run_stories: dict) -> bool:
    if wt.get("format") == "events":
        return True
    if "files" in wt:
        return all(k in inv.keys for k in wt["files"].values())
    pattern = wt.get("pattern", "")
    head = pattern.split("{", 1)[0]
    return any(k.startswith(head) for k in inv.keys)


def _same(src: TimingSource, wt: dict) -> bool:
    if src.format != wt.get("format"):
        return False
    if src.format == "events":
        return True
    return (wt.get("pattern") is not None and wt.get("pattern") == src.pattern) or \
        set(wt.get("files", {}).values()) <= set(src.files.values())


def _model(choice: Choice, runs: list[ResponseFile], known: KnownLayout | None, plan: Plan) -> dict:
    if choice.hdf5 is not None:
        per_subject = {s: len(v) for s, v in choice.hdf5.stories.items()}
    else:
        per_subject = {}
        for f in runs:
            per_subject[f.subject] = per_subject.get(f.subject, 0) + 1
    fewest = min(per_subject.values()) if per_subject else 0
    model: dict = {"alphas": [1, 10, 100, 1000, 10000, 100000]}
    if choice.kind in _EPHYS:
        model.update(tmin=-0.2, tmax=0.6)
        plan.comments["model.tmin"] = "TRF lags in seconds (MEG/EEG/iEEG)"
    else:
        model["delays"] = [1, 2, 3, 4]
        plan.comments["model.delays"] = "FIR delays in TRs"
    if fewest >= 3:
        model["cv"] = "leave_one_run_out"
        plan.comments["model.cv"] = f"every subject has at least {fewest} runs"
    else:
        model.update(cv="contiguous_blocks", n_folds=5)
        plan.comments["model.cv"] = f"a subject has only {fewest} run(s): held-out blocks within runs"
    if known is not None:
        model.update({k: v for k, v in known.model.items() if k not in ("cv", "n_folds") or fewest < 3})
    if known is not None and known.test_story:
        everyone = choice.hdf5 is not None and all(known.test_story in v for v in choice.hdf5.stories.values())
        if everyone and model["cv"] == "leave_one_run_out":
            model["test_stories"] = [known.test_story]
            plan.comments["model.test_stories"] = "the repeated test story of the dataset"
        else:
            plan.alternatives["model"] = [f"test_stories: [{known.test_story}]   # the dataset's test story: "
                                          "needs cv: leave_one_run_out and every subject to have heard it"]
    return model


def detect(source: str, output: str, *, version: str | None = None, cache_dir: str | Path) -> Plan:
    """Detect the config of an analysis of `source` publishing to `output`.

    Parameters
    ----------
    source : ``s3://bucket/prefix`` or a local folder (a BIDS dataset's root).
    output : where ``neuroflow run`` publishes (``s3://bucket[/prefix]`` or an absolute local folder).
    version : the version to pin when the dataset states none (else it must agree with the dataset's).
    cache_dir : the download cache (metadata files only are fetched).

    Returns
    -------
    Plan : the config dict with its comments, alternatives and notes.
    """
    _check_arguments(source, output)
    if not source.startswith("s3://") and "://" not in source and source.strip():
        source = str(Path(source).expanduser().resolve())  # the config is read from anywhere: an absolute path
    source = source.rstrip("/") if source.strip("/") else source
    cache_root = Path(cache_dir).expanduser()
    ingest = _open(source, version or "unversioned", cache_root)
    listing = ingest.listing
    if not listing:
        raise DatasetError(f"{source}: no files there; check SOURCE (s3://bucket/prefix or a local folder)")
    if "dataset_description.json" not in listing:
        raise DatasetError(f"{source}: no dataset_description.json at its top{_bids_root_hint(listing)}")
    found_version, version_from = _version(ingest, version, source)
    if found_version != (version or "unversioned"):
        ingest = _open(source, found_version, cache_root)
    description = read_json(ingest.fetch("dataset_description.json"), "dataset_description.json")
    known = recognise(description)
    inv = scan_listing(ingest.listing)
    plan = Plan(config={}, layout=known)
    title = str(description.get("Name", "")).strip()
    plan.notes.append(f"dataset: {title or ingest.config.dataset.dataset_id}, version {found_version} "
                      f"({version_from})")
    if known is not None:
        plan.notes.append(f"recognised: {known.title}, from its dataset_description.json; its usual settings are "
                          "used: " + "; ".join(known.notes))
    choice = choose_responses(inv, known.prefer_root if known else None)
    if choice is None:
        pointers = [r.key for r in inv.responses]
        why = (f"its {len(pointers)} response file(s) are git-annex pointers (e.g. {pointers[0]}): fetch their "
               "content (datalad get) first") if pointers else \
            "neuroflow reads *_bold.nii.gz, *_timeseries.tsv, *.func.gii, MEG/EEG/iEEG recordings and per-story HDF5"
        raise DatasetError(f"{source}: no response data found; {why}")
    runs = _run_files(choice)
    settings = dict(choice.settings)
    if known is not None and known.responses_kind == choice.kind and not (known.responses_raw_only and
                                                                         settings.get("derivatives")):
        settings.update(known.responses)
    n = len(choice.subjects)
    plan.notes.append(f"responses: {choice.label}, {n} subject{'s' if n != 1 else ''}")
    plan.notes += choice.notes
    if choice.alternatives:
        lines = []
        for what, snippet in choice.alternatives:
            if known is not None and known.responses_kind == snippet["kind"] and not snippet.get("derivatives"):
                snippet = {**snippet, **known.responses}  # a known layout's settings for its raw recordings
            lines.append(f"also in the dataset: {what}; to read it: {json.dumps(snippet)}")
        plan.alternatives["dataset.responses"] = lines
        plan.notes.append(f"responses: {len(choice.alternatives)} other source(s) written as comments; the "
                          "preprocessed derivative covering the most subjects is read")
    if choice.hdf5 is None:
        _restrict(choice, inv, runs, settings, plan)
        if "sessions" in settings and known and "sessions" in known.responses:
            kept = [f for f in runs if f.entities.get("ses") in settings["sessions"]]
            if kept:
                runs = kept
            else:  # this copy has none of the sessions the layout usually reads: read the ones it has
                settings.pop("sessions")
        first = runs[0]
        if choice.kind in _EPHYS:
            for k, v in _ephys_settings(ingest, choice, first, plan).items():
                settings.setdefault(k, v)
        else:
            tr = _sidecar_number(ingest, first.key, "RepetitionTime") or _raw_tr(ingest, first)
            start = _sidecar_number(ingest, first.key, "StartTime")
            if tr:
                plan.notes.append(f"TR {tr:g} s" + (f", StartTime {start:g} s" if start else "") +
                                  f" (sidecars of {first.key.rsplit('/', 1)[-1]}; read per run)")
    else:
        story = next(iter(choice.hdf5.stories.values()))[0]
        tr = _raw_tr(ingest, None, story=story)
        if tr:
            plan.notes.append(f"TR {tr:g} s (task-{story}_bold.json)")
        elif "tr" not in settings:
            raise DatasetError(f"{source}: the HDF5 responses' TR is stated nowhere (no task-<story>_bold.json "
                               "with RepetitionTime); neuroflow init cannot pin it: add the sidecar")
        if "tr_counts" in settings and settings["tr_counts"] not in inv.keys:
            for k in ("tr_counts", "tr_counts_trim"):
                settings.pop(k, None)
    subjects = [s for s in choice.subjects if choice.hdf5 is not None or any(f.subject == s for f in runs)]
    wt, mode, _stories = _timing_settings(ingest, inv, choice, runs, plan, known)
    if mode == "events" and choice.hdf5 is None:
        settings["story_from"] = "events"
        plan.comments["dataset.responses.story_from"] = "each run's story is named by its events.tsv"
    multi = "tasks" in settings or choice.hdf5 is not None
    tasks = sorted({f.entities.get("task") for f in runs} - {None})
    task = (known.task if known and known.task else None) or ("stories" if multi or not tasks else tasks[0])
    ds_id = ingest.config.dataset.dataset_id
    name = re.sub(r"[^a-z0-9-]+", "-", ds_id.lower()).strip("-")[:40] or "analysis"
    plan.config = {
        "name": name if name[0].isalnum() else f"d{name}"[:40],
        "dataset": {"source": source, "version": found_version, "task": task, "subjects": subjects,
                    "responses": settings, "word_timings": wt},
        "features": [{"name": "wordrate", "kind": "word_rate"}],
        "model": _model(choice, runs, known, plan),
        "compute": {"backend": "auto", "dask": "local"},
        "output": output.rstrip("/"),
    }
    plan.comments["dataset.version"] = version_from
    plan.comments["dataset.subjects"] = f"every subject with responses ({len(subjects)})"
    plan.comments["dataset.task"] = ("a label for the published files; the runs' tasks are below" if multi
                                     else "the task every run has")
    plan.alternatives["features"] = [
        "{name: gpt2L6, kind: language_model, model: gpt2, layer: 6, context_words: 32}   # a local folder or a "
        "hub id (downloads need the internet)"]
    return plan


def _raw_tr(ingest: Ingest, first: ResponseFile | None, story: str | None = None) -> float | None:
    """The TR a raw bold sidecar states for a derivative's run or an HDF5 story (top-level task-<story>_bold.json)."""
    ents = {"sub": first.subject, **{k: v for k, v in first.entities.items() if k in ("ses", "task", "run")}} \
        if first is not None else None
    if ents is None:
        candidates = [k for k in ingest.listing if k == f"task-{story}_bold.json" or
                      k.endswith(f"_task-{story}_bold.json")]
        for key in sorted(candidates, key=len):
            try:
                value = read_json(ingest.fetch(key), key).get("RepetitionTime")
                return float(value) if value is not None else None
            except (NeuroflowError, TypeError, ValueError):
                continue
        return None
    try:
        value = raw_sidecar(ingest, ents, "func", "bold").get("RepetitionTime")
        return float(value) if value is not None else None
    except (NeuroflowError, TypeError, ValueError):
        return None
