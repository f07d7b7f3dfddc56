"""Response loading: each run of a subject read by its kind, on its own clock, with its story.

:func:`plan_runs` lists a subject's runs (story, events, stimulus onset) without reading data;
:func:`load_subject` reads them: ``bold`` (4-D NIfTI, masked), ``timeseries`` (derivative TSV),
``gifti`` (both hemispheres), ``hdf5`` (per-story arrays, TR counts checked), ``meg`` / ``ieeg`` /
``eeg`` (MNE / mne-bids). Each run comes back as float32 data of shape (n_samples, n_targets)
sampled at ``times = start + tr * arange(n_samples)`` (seconds, run clock).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from ..bids import RUN_ENTITIES, build_name, inherited_files, parse_bids_name, raw_key
from ..errors import DatasetError
from ..preprocess import preprocess_run, read_confounds, select_confounds
from ..readers import Responses, check_not_pointer, reader_for
from .dataset import Ingest
from .events import events_key_for, raw_sidecar, run_sidecar, sidecar, stimulus_from_events
from .runs import DATATYPE, MNE_EXTENSIONS, RunFiles, find_runs, run_labels
from .sidecars import read_json, sidecar_number

__all__ = ["Run", "SubjectResponses", "load_subject", "plan_runs", "read_bold_run", "read_timeseries_run"]

_STORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


@dataclass
class Run:
    """One response run: data [n_samples x n_targets] sampled at ``times`` (seconds, run clock)."""

    label: str
    data: np.ndarray
    times: np.ndarray
    tr: float  # sampling period (seconds): the TR, or 1 / sfreq
    key: str
    story: str | None = None  # the stimulus heard; selects the run's word timings
    task: str | None = None
    session: str | None = None
    events_key: str | None = None
    meta: dict = field(default_factory=dict)  # expected_samples, stimulus_onset/end, recording_duration, ...

    @property
    def sfreq(self) -> float:
        return 1.0 / self.tr


@dataclass
class SubjectResponses:
    """Every run of one subject, read: the runs share ``target_names`` (n_targets columns of ``Run.data``)."""

    subject: str
    kind: str  # bold | timeseries | gifti | hdf5 | meg | ieeg | eeg
    runs: list[Run]
    target_names: list[str]
    mask_img: object | None = None  # nibabel image for bold data
    space: str | None = None
    simulated: bool = False
    n_dropped_targets: int = 0
    target_info: pd.DataFrame | None = None  # per target: hemisphere/vertex, channel type, coordinates


def read_bold_run(ingest: Ingest, key: str) -> tuple[np.ndarray, float, object, str | None]:
    """Read a 4-D NIfTI run: (data [T, voxels], TR, mask image, space)."""
    path = ingest.fetch(key)
    meta = sidecar(ingest, key)
    mask_key = _mask_for(ingest, key)
    mask_path = ingest.fetch(mask_key) if mask_key else None
    r = reader_for("bold")(path, key, tr=sidecar_number(meta, "RepetitionTime", key), mask_path=mask_path, mask_key=mask_key,
                           space=parse_bids_name(key).get("space"))
    return r.data, r.period, r.mask_img, r.space


def _mask_for(ingest: Ingest, key: str) -> str | None:
    name = parse_bids_name(key)
    folder = key.rsplit("/", 1)[0]
    for cand in ingest.source.list_files():
        c = parse_bids_name(cand)
        if (c and cand.rsplit("/", 1)[0] == folder and c.suffix == "mask" and c.get("desc") == "brain"
                and c.get("sub") == name.get("sub") and c.get("space") == name.get("space")):
            return cand
    return None


def read_timeseries_run(ingest: Ingest, key: str) -> tuple[np.ndarray, float, float, list[str]]:
    """Read a derivative time-series TSV: (data [T, rois], TR, StartTime, column names)."""
    path = ingest.fetch(key)
    meta = sidecar(ingest, key)
    r = reader_for("timeseries")(path, key, tr=sidecar_number(meta, "RepetitionTime", key),
                                 start=sidecar_number(meta, "StartTime", key, 0.0))
    return r.data, r.period, r.start, r.target_names


def confounds_key(ingest: Ingest, key: str) -> str:
    """fMRIPrep's confounds table of a run: ``*_desc-confounds_timeseries.tsv`` (or the older ``_regressors``)
    in the run's folder with the run's entities (``sub``, ``ses``, ``task``, ``run``, ...), else DatasetError."""
    name = parse_bids_name(key)
    folder = key.rsplit("/", 1)[0] if "/" in key else ""
    if name is None:
        raise DatasetError(f"{key}: 'dataset.responses.preprocess.confounds' reads fMRIPrep's confounds table beside "
                           "each BIDS run, and this file is not a BIDS run; remove 'confounds'")
    wanted = {k: v for k, v in name.entities.items() if k in RUN_ENTITIES}
    found = []
    for cand in ingest.listing:
        if (cand.rsplit("/", 1)[0] if "/" in cand else "") != folder:
            continue
        c = parse_bids_name(cand)
        if (c is not None and c.get("desc") == "confounds" and c.suffix in ("timeseries", "regressors")
                and c.extension == ".tsv" and {k: v for k, v in c.entities.items() if k in RUN_ENTITIES} == wanted):
            found.append(cand)
    if not found:
        raise DatasetError(f"{key}: 'dataset.responses.preprocess.confounds' needs fMRIPrep's confounds table beside "
                           f"the run ({build_name({**wanted, 'desc': 'confounds'}, 'timeseries', '.tsv')} in "
                           f"{folder or 'the dataset root'}); none is there: add it, or remove 'confounds'")
    return sorted(found, key=lambda k: ("regressors" in k, k))[0]


def _preprocess(ingest: Ingest, data: np.ndarray, tr: float, key: str, kind: str) -> tuple[np.ndarray, dict]:
    """``dataset.responses.preprocess`` applied to one run, fitted on that run alone (see pipelines.preprocess)."""
    opts = ingest.responses.preprocess
    confounds = None
    record: dict = {}
    if opts.confounds:
        if kind in ("hdf5", "meg", "ieeg", "eeg"):
            raise DatasetError(f"{key}: 'dataset.responses.preprocess.confounds' reads fMRIPrep's confounds tables, "
                               f"which {kind} runs do not have; remove 'confounds'")
        ckey = confounds_key(ingest, key)
        path = ingest.fetch(ckey)
        check_not_pointer(path, ckey)
        confounds, columns = select_confounds(read_confounds(path, ckey), opts.confounds, ckey)
        record = {"confounds_file": ckey, "confounds": columns}
    data, done = preprocess_run(data, tr, opts, confounds, key=key)
    return data, {**done, **record}


def _tr_counts(ingest: Ingest) -> dict[str, int] | None:
    key = ingest.responses.tr_counts
    if not key:
        return None
    if key not in ingest.listing:
        raise DatasetError(f"{ingest.config.dataset.source}/{key}: the TR-count file ('dataset.responses.tr_counts') "
                           "is not in the dataset; fix the path")
    counts = read_json(ingest.fetch(key), key)
    if not isinstance(counts, dict):
        raise DatasetError(f"{key}: expected a JSON object {{story: number of TRs}}")
    return counts


def _read_hdf5_run(ingest: Ingest, rf: RunFiles, subject: str) -> tuple[Responses, dict]:
    opts = ingest.responses
    story = rf.story
    meta: dict = {}
    tr = opts.tr
    if tr is None and story:  # LeBel: the raw runs' sidecars (top-level task-<story>_bold.json) give the TR
        tr = sidecar_number(raw_sidecar(ingest, {"sub": subject, "task": story}, "func", "bold"), "RepetitionTime",
                            rf.key)
    r = reader_for("hdf5")(ingest.fetch(rf.key), rf.key, dataset=opts.hdf5_dataset, tr=tr,
                           start=opts.start_time or 0.0, repeats=opts.repeats)
    counts = _tr_counts(ingest)
    if counts is not None:
        if story not in counts:
            raise DatasetError(f"{rf.key}: story {story!r} is not in {opts.tr_counts}; the response has no stated "
                               "length to check against: fix 'dataset.responses.tr_counts'")
        meta["expected_samples"] = int(counts[story]) - int(opts.tr_counts_trim)
        meta["expected_from"] = f"{opts.tr_counts}[{story!r}] = {counts[story]} minus {opts.tr_counts_trim}"
    return r, meta


def _prefetch_bids_sidecars(ingest: Ingest, rf: RunFiles) -> Path:
    """Fetch what MNE-BIDS reads beside a raw recording; return the local BIDS root."""
    key = rf.key
    name = parse_bids_name(key)
    folder = PurePosixPath(key).parent
    for cand, info in ingest.listing.items():
        if cand == key:
            continue
        c_folder = PurePosixPath(cand).parent
        if c_folder != folder and c_folder not in folder.parents:
            continue
        c = parse_bids_name(cand)
        if c is None:
            if str(c_folder) == "." and cand in ("participants.tsv", "participants.json", "dataset_description.json"):
                ingest.fetch(cand)
            continue
        if c.suffix in (name.suffix,) and c.extension in MNE_EXTENSIONS:
            continue  # another recording
        if info.size > 64 << 20 or not all(name.entities.get(k) == v for k, v in c.entities.items()
                                           if k in RUN_ENTITIES):
            continue
        kit = name.extension in (".con", ".sqd")  # KIT recordings are read with their marker/head-shape files
        if c.suffix == "scans" or c.extension in (".json", ".tsv") or (
                kit and c.extension in (".pos", ".mrk", ".elp", ".hsp", ".txt")):
            ingest.fetch(cand)
    return ingest.source.cache_dir if ingest.source.is_s3 else ingest.source.root


def _electrodes(ingest: Ingest, rf: RunFiles) -> tuple[pd.DataFrame | None, str | None]:
    """The electrodes.tsv of an iEEG run (space option, else an MNI one, else the first)."""
    ents = {k: v for k, v in rf.entities.items() if k in ("sub", "ses")}
    cands = [k for k in ingest.listing if k.endswith("_electrodes.tsv") and f"sub-{ents['sub']}/" in k
             and not k.startswith("derivatives/")]
    if not cands:
        return None, None
    space = ingest.responses.space
    chosen = next((k for k in cands if space and f"space-{space}_" in k), None) or \
        next((k for k in cands if "space-MNI" in k), None) or sorted(cands)[0]
    path = ingest.fetch(chosen)
    check_not_pointer(path, chosen)
    table = pd.read_csv(path, sep="\t", encoding="utf-8-sig", na_values=["n/a"], dtype={"name": str})
    return table, chosen


def _read_mne_run(ingest: Ingest, rf: RunFiles) -> tuple[Responses, dict]:
    opts = ingest.responses
    path = ingest.fetch(rf.key)
    if parse_bids_name(rf.key).get("split"):  # the later parts of a split FIF are read with the first
        stem = rf.key.split("_split-")[0]
        for other in ingest.listing:
            if other != rf.key and other.startswith(stem + "_split-"):
                ingest.fetch(other)
    side = run_sidecar(ingest, rf)
    duration = sidecar_number(side, "RecordingDuration", rf.key)  # checked before the recording is read
    stated = sidecar_number(side, "SamplingFrequency", rf.key)
    channels_key = None
    bids_root = None
    if rf.derivative:
        found = inherited_files(raw_key(rf.entities, rf.kind, "channels", ".tsv"), "", ingest.listing, "channels",
                                ".tsv")
        channels_key = found[-1] if found else None
    else:
        bids_root = _prefetch_bids_sidecars(ingest, rf)
    electrodes, electrodes_key = (_electrodes(ingest, rf) if rf.kind == "ieeg" else (None, None))
    r = reader_for(rf.kind)(path, rf.key, kind=rf.kind, bids_root=bids_root,
                            channels_tsv=ingest.fetch(channels_key) if channels_key else None,
                            channels_key=channels_key, bad_channels=tuple(opts.bad_channels), l_freq=opts.l_freq,
                            h_freq=opts.h_freq, notch=opts.notch, high_gamma=opts.high_gamma, sfreq=opts.sfreq,
                            electrodes=electrodes)
    meta = {"sfreq_file": r.meta["sfreq_file"], "duration_file": r.meta["duration_file"],
            "bad_channels": r.meta["bad_channels"], "reader": r.meta["reader"]}
    if electrodes_key:
        meta["electrodes"] = electrodes_key
    if duration is not None:
        meta["recording_duration"] = duration
    if not rf.derivative and stated is not None:
        if abs(stated - r.meta["sfreq_file"]) > 1e-3 * stated:
            raise DatasetError(f"{rf.key}: the recording is sampled at {r.meta['sfreq_file']:g} Hz but its sidecar "
                               f"says SamplingFrequency {stated:g} Hz; one of them is wrong: fix the sidecar or "
                               "re-download the recording")
    return r, meta


def _run_story(ingest: Ingest, rf: RunFiles, kind: str) -> tuple[str | None, str | None, dict]:
    """(story, events key, stimulus meta) of a run, before its data is read."""
    opts = ingest.responses
    task = rf.entities.get("task")
    events_key = events_key_for(ingest, rf.entities, DATATYPE[kind]) if task else None
    story, meta = rf.story, {}
    if story is None and opts.story_from == "events":
        if events_key is None:
            raise DatasetError(f"{rf.key}: 'story_from: events' but the run has no events.tsv; set "
                               "'dataset.responses.story_from: task'")
        stim = stimulus_from_events(ingest, events_key, opts.story_trial_type)
        story = stim["story"]
        meta = {"stimulus_onset": stim["onset"], "stimulus_end": stim["end"], "stimulus_file": stim["stim_file"]}
    elif story is None:
        story = task
        if events_key is not None:
            try:
                stim = stimulus_from_events(ingest, events_key, opts.story_trial_type)
                meta = {"stimulus_onset": stim["onset"], "stimulus_end": stim["end"],
                        "stimulus_file": stim["stim_file"]}
            except DatasetError:
                pass  # events that name no stimulus file: nothing to check the run against
    if story is not None and not _STORY.match(story):
        raise DatasetError(f"{rf.key}: story name {story!r} is not a plain name (letters, digits, '.', '_', '-')")
    return story, events_key, meta


def _planned(ingest: Ingest, subject: str) -> tuple[str, list[tuple]]:
    """(kind, [(run files, label, story, events key, stimulus)]): planned once per opened dataset and subject."""
    if subject in ingest.plan_cache:
        return ingest.plan_cache[subject]
    kind, run_files = find_runs(ingest, subject)
    opts = ingest.responses
    planned = []
    for rf, label in zip(run_files, run_labels(run_files)):
        story, events_key, stim = _run_story(ingest, rf, kind)
        if opts.stories is None or story in opts.stories:
            planned.append((rf, label, story, events_key, stim))
    if not planned:
        raise DatasetError(f"sub-{subject}: none of its {len(run_files)} {kind} runs is of the stories "
                           f"{list(opts.stories or [])}; fix 'dataset.responses.stories'")
    ingest.plan_cache[subject] = (kind, planned)
    return kind, planned


def plan_runs(ingest: Ingest, subject: str) -> list[Run]:
    """A subject's runs (story, events, stimulus onset) without reading their data.

    The runs have empty ``data`` and ``times``; :func:`load_run_words` accepts them, so the
    stimuli of an analysis can be listed (and their features extracted) before any response
    is downloaded.
    """
    kind, planned = _planned(ingest, subject)
    return [Run(label=label, data=np.zeros((0, 0), np.float32), times=np.zeros(0), tr=0.0, key=rf.key, story=story,
                task=rf.entities.get("task"), session=rf.entities.get("ses"), events_key=events_key, meta=dict(stim))
            for rf, label, story, events_key, stim in planned]


def _prefetch(ingest: Ingest, rf: RunFiles) -> None:
    """Fetch (download, verify, hash) a run's files ahead of reading them; a failure is left for the
    reading to meet and report (it fetches again)."""
    for key in rf.keys.values():
        try:
            ingest.fetch(key)
        except Exception:  # noqa: BLE001 - the read that follows raises the error, with its file and fix
            return


def load_subject(ingest: Ingest, subject: str, on_run: Callable[[Run], None] | None = None) -> SubjectResponses:
    """Every run of one subject, as float32 arrays on their own clocks, each with its story.

    ``on_run`` is called with each run as soon as it is read, before the next is read: it may
    take the run's data away (e.g. onto disk, replacing ``run.data`` with an empty array), so
    that the subject's runs are never all in memory at once.
    """
    kind, planned = _planned(ingest, subject)
    opts = ingest.responses
    runs: list[Run] = []
    names: list[str] = []
    mask_img = space = target_info = None
    simulated = False
    # the next run's files are fetched and hashed in the background while this one is read
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuroflow-prefetch") as pool:
        ahead = None
        for i, (rf, label, story, events_key, stim) in enumerate(planned):
            if ahead is not None:
                ahead.result()
            ahead = pool.submit(_prefetch, ingest, planned[i + 1][0]) if i + 1 < len(planned) else None
            key = rf.key
            meta: dict = dict(stim)
            side: dict = {}
            if kind == "bold":
                data, tr, run_mask, space = read_bold_run(ingest, key)
                if mask_img is None:
                    mask_img = run_mask
                elif not np.array_equal(np.asarray(mask_img.dataobj), np.asarray(run_mask.dataobj)):
                    raise DatasetError(f"{key}: its brain mask differs from the subject's first run; "
                                       "give the runs one mask (desc-brain_mask) or use registered data")
                start = 0.0
                cols = [f"voxel{i}" for i in range(data.shape[1])]
                side = sidecar(ingest, key)
            elif kind == "timeseries":
                data, tr, start, cols = read_timeseries_run(ingest, key)
                side = sidecar(ingest, key)
            elif kind == "gifti":
                side = run_sidecar(ingest, rf)
                paths = {h: ingest.fetch(k) for h, k in rf.keys.items()}
                space = opts.space or parse_bids_name(key).get("space")
                r = reader_for("gifti")(paths, rf.keys, tr=opts.tr or sidecar_number(side, "RepetitionTime", key),
                                        space=space)
                data, tr, start, cols, target_info = r.data, r.period, r.start, r.target_names, r.target_info
            elif kind == "hdf5":
                r, extra = _read_hdf5_run(ingest, rf, subject)
                meta.update(extra)
                if "r_max" in r.meta:  # a story presented several times: its noise ceiling per target
                    meta["r_max"] = r.meta["r_max"]
                data, tr, start, cols = r.data, r.period, r.start, r.target_names
            else:  # meg / ieeg / eeg
                r, extra = _read_mne_run(ingest, rf)
                meta.update(extra)
                data, tr, start, cols = r.data, r.period, r.start, r.target_names
                if target_info is None:
                    target_info = r.target_info
            if opts.start_time is not None and kind != "hdf5":
                start = float(opts.start_time)
            if names and cols != names:
                raise DatasetError(f"{key}: its targets ({len(cols)}: {cols[:5]}...) differ from the subject's first "
                                   f"run ({len(names)}: {names[:5]}...); the runs must share targets (same mask, "
                                   "surface or good channels): mark channels bad in every run or use registered data")
            names = cols
            if opts.preprocess.active:  # within this run only, before the runs are stacked and z-scored
                data, meta["preprocess"] = _preprocess(ingest, data, tr, key, kind)
            simulated = simulated or bool(side.get("Simulated", False))
            times = start + tr * np.arange(data.shape[0])
            runs.append(Run(label=label, data=data, times=times, tr=tr, key=key, story=story,
                            task=rf.entities.get("task"), session=rf.entities.get("ses"), events_key=events_key,
                            meta=meta))
            data = r = None  # the run holds its array alone: on_run may release it
            if on_run is not None:
                on_run(runs[-1])
    return SubjectResponses(subject=subject, kind=kind, runs=runs, target_names=names, mask_img=mask_img,
                            space=space, simulated=simulated, target_info=target_info)
