"""Ingest: check the pinned dataset version, find each subject's runs, read responses and words.

Responses come back per run as float32 arrays [time x targets] with their sampling times and
the story the run heard, so later stages never guess the clock. Word timings come back per
run as one table (onset, offset, word, story) on that run's clock, whatever the source format.
Every file read is recorded (key, size, ETag, sha256, what was verified) for the manifest.

The options come from the config (``dataset.responses`` / ``dataset.word_timings``, field names
as in :class:`ResponseOptions` / :class:`WordOptions`); ``open_dataset(..., responses={...},
words={...})`` overrides them.

How each seed dataset maps onto the options::

    LeBel ds003020   responses: {kind: hdf5, files: "derivative/preprocessed_data/{subject}/{story}.hf5",
                                 start_time: 10.0, tr_counts: derivative/respdict.json, tr_counts_trim: 20}
                     word_timings: {format: textgrid, pattern: "derivative/TextGrids/{story}.TextGrid"}
    Narratives       responses: {kind: gifti, derivatives: [derivatives/afni-nosmooth], space: fsaverage6,
                                 story_from: events}
                     word_timings: {format: gentle, pattern: "stimuli/gentle/{story}/align.json",
                                    onset_from_events: true}
    MEG-MASC         responses: {kind: meg, tasks: ["0", "1", "2", "3"], sfreq: 50, story_from: events}
                     word_timings: {format: events}
    Podcast ds005574 responses: {kind: ieeg, high_gamma: [70, 150], sfreq: 32}   (raw EDF), or
                                {kind: ieeg, derivatives: [derivatives/ecogprep], desc: highgamma, sfreq: 32}
                     word_timings: {format: words_tsv, files: {podcast: stimuli/whisper-medium/transcript.tsv}}
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from .bids import RUN_ENTITIES, inherited_files, parse_bids_name, raw_key, sidecar_candidates
from .config import AnalysisConfig
from .errors import ConfigError, DatasetError
from .limits import MAX_ABS_SECONDS, check_table, check_text_size
from .readers import Responses, check_not_pointer, reader_for
from .storage import DatasetSource, hash_file, safe_key
from .wordtimings import read_word_timings

log = logging.getLogger("neuroflow")

#: fMRI: the stimulus may run this long past the last sample (haemodynamic tail, padding) before
#: the run is called truncated.
TIMING_TOLERANCE_S = 10.0
#: MEG / iEEG (sampling period under 0.25 s): the same tolerance.
EPHYS_TOLERANCE_S = 1.0
#: A recording may differ from its sidecar's RecordingDuration by this many of its samples.
DURATION_TOLERANCE_SAMPLES = 2

MNE_EXTENSIONS = (".fif", ".fif.gz", ".edf", ".bdf", ".con", ".sqd", ".vhdr", ".set", ".cnt", ".mef", ".nwb")
DATATYPE = {"bold": "func", "timeseries": "func", "gifti": "func", "hdf5": "func",
            "meg": "meg", "ieeg": "ieeg", "eeg": "eeg"}
_STORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


# --- options ---------------------------------------------------------------------------

@dataclass
class ResponseOptions:
    """Where a subject's responses are and how to read them (``dataset.responses``)."""

    kind: str = "auto"  # auto | bold | timeseries | gifti | hdf5 | meg | ieeg | eeg
    derivatives: tuple[str, ...] = ()  # folders searched besides the raw tree
    desc: str | None = None  # the desc entity to take when several variants exist
    tasks: tuple[str, ...] | None = None  # BIDS task entities read (None: the config's task; "*": all)
    sessions: tuple[str, ...] | None = None  # BIDS session entities read (None: all)
    files: str | None = None  # non-BIDS files: pattern with {subject}, {story} (e.g. LeBel's .hf5)
    hdf5_dataset: str | None = None
    repeats: str = "mean"  # 3-D HDF5 arrays [repeats, samples, targets]: mean | first | error
    tr: float | None = None  # seconds; default from the sidecars
    start_time: float | None = None  # time of the first sample on the stimulus clock; default sidecar/0
    tr_counts: str | None = None  # JSON {story: number of TRs} (LeBel: derivative/respdict.json)
    tr_counts_trim: int = 0  # samples counted there but not in the files (LeBel: 20)
    hemi: tuple[str, ...] = ("L", "R")
    space: str | None = None  # surface / volume template (gifti: checked vertex count), electrodes' space
    sfreq: float | None = None  # MEG/iEEG: resample to this rate (Hz)
    l_freq: float | None = None
    h_freq: float | None = None
    notch: float | None = None
    high_gamma: tuple[float, float] | None = None  # iEEG: envelope of this band (Hz)
    bad_channels: tuple[str, ...] = ()
    stories: tuple[str, ...] | None = None  # read only the runs of these stories (None: all)
    story_from: str = "task"  # task | events (story column or stim_file of the run's events.tsv)
    story_trial_type: str = "story"  # the events.tsv trial_type whose stim_file is the story


@dataclass
class WordOptions:
    """Where each run's word timings are and how to read them (``dataset.word_timings``)."""

    format: str = "textgrid"  # textgrid | gentle | words_tsv | events
    files: dict[str, str] = field(default_factory=dict)  # story or task -> key
    pattern: str | None = None  # key with {story}, {task}, {subject}, {session}, {run}
    tier: str = "word"
    offset: float = 0.0  # seconds added (stimulus clock -> run clock)
    onset_from_events: bool = False  # also add the onset at which the run's events.tsv starts the story
    trial_type: str = "word"  # events: the trial_type of word rows
    word_column: str | None = None
    onset_column: str | None = None
    offset_column: str | None = None
    unaligned: str = "interpolate"  # gentle: interpolate | drop | error
    bad_rows: str = "error"  # rows ending before they start, or without a number: error | drop

    def reader_options(self) -> dict:
        if self.format == "textgrid":
            return {"tier": self.tier, "bad_rows": self.bad_rows}
        if self.format == "gentle":
            return {"unaligned": self.unaligned, "bad_rows": self.bad_rows}
        if self.format == "words_tsv":
            return {"word_column": self.word_column, "onset_column": self.onset_column,
                    "offset_column": self.offset_column, "bad_rows": self.bad_rows}
        return {"trial_type": self.trial_type, "word_column": self.word_column or "word", "bad_rows": self.bad_rows}


def _plain(value):
    return tuple(value) if isinstance(value, list) else (dict(value) if isinstance(value, dict) else value)


def _merge(cls, model, overrides):
    """Options from a config model (fields of the same name), then overrides (a dict or options)."""
    if isinstance(overrides, cls):
        return overrides
    names = {f.name for f in fields(cls)}
    values = {n: _plain(getattr(model, n)) for n in names if model is not None and hasattr(model, n)}
    unknown = set(overrides or {}) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} {sorted(unknown)}; valid: {sorted(names)}")
    values.update({k: _plain(v) for k, v in (overrides or {}).items()})
    return cls(**values)


def options_from_config(config: AnalysisConfig, responses: dict | ResponseOptions | None = None,
                        words: dict | WordOptions | None = None) -> tuple[ResponseOptions, WordOptions]:
    """The ingest options of a config, then `responses` / `words` overrides.

    Config fields are read by name, so a config without the newer fields gets the defaults.
    ``tasks`` falls back to ``dataset.tasks`` (if the config has it), then ``[dataset.task]``.
    """
    ds = config.dataset
    resp = _merge(ResponseOptions, ds.responses, responses)
    if resp.tasks is None:
        resp = replace(resp, tasks=tuple(getattr(ds, "tasks", None) or (ds.task,)))
    return resp, _merge(WordOptions, ds.word_timings, words)


# --- records ---------------------------------------------------------------------------

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
    subject: str
    kind: str  # bold | timeseries | gifti | hdf5 | meg | ieeg | eeg
    runs: list[Run]
    target_names: list[str]
    mask_img: object | None = None  # nibabel image for bold data
    space: str | None = None
    simulated: bool = False
    n_dropped_targets: int = 0
    target_info: pd.DataFrame | None = None  # per target: hemisphere/vertex, channel type, coordinates


@dataclass
class FileRecord:
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
    responses: ResponseOptions = field(default_factory=ResponseOptions)
    words: WordOptions = field(default_factory=WordOptions)
    version_found: str | None = None
    _word_cache: dict = field(default_factory=dict, repr=False)

    def fetch(self, key: str) -> Path:
        """Download (or find) `key`, verify it, and record it for the manifest."""
        path = self.source.fetch(key)
        if key not in self.files_read:
            info = self.source.info(key)
            algo, _, where = self.source.expected_checksum(key)
            digests = self.source.digests.get(key)  # a cached copy the source checked against its record
            if digests is None or "sha256" not in digests or (algo and algo not in digests):
                digests = hash_file(path, ("sha256",) + ((algo,) if algo and algo != "sha256" else ()))
            self.source.check_digests(key, path, digests)
            self.files_read[key] = FileRecord(key, info.size, info.etag, digests["sha256"],
                                              version_id=self.source.version_ids.get(key, ""),
                                              verified=f"size+{algo} ({where})" if algo else "size")
        return path

    @property
    def listing(self) -> dict:
        return self.source.list_files()


def open_dataset(config: AnalysisConfig, cache_root: str | Path, *, responses: dict | ResponseOptions | None = None,
                 words: dict | WordOptions | None = None,
                 checksums: dict[str, str] | str | Path | None = None) -> Ingest:
    """List the dataset and check that its version matches ``dataset.version``.

    Parameters
    ----------
    config : the analysis config (``dataset.source``, ``version``, ``task``, ...).
    cache_root : where downloads are cached, keyed by (source, version, key).
    responses, words : overrides of the options the config gives (see ResponseOptions, WordOptions).
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
    from .config import check_relative_key

    try:
        check_relative_key(value, "dataset.checksums")
    except ValueError as err:
        raise ConfigError(f"{err} 'dataset.checksums' names a checksum table inside the dataset (e.g. "
                          "code/checksums.tsv), or is a mapping of path -> checksum") from None
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
        desc = _read_json(ingest.fetch("dataset_description.json"), "dataset_description.json")
        m = re.search(r"\.v(\d+\.\d+\.\d+)$", str(desc.get("DatasetDOI", "")))
        if m:
            return m.group(1)
        for name in ("Version", "DatasetVersion"):
            if re.fullmatch(r"v?\d+(\.\d+)*", str(desc.get(name, ""))):
                return str(desc[name]).lstrip("v")
    return None


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for name, value in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen[name] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def _read_json(path: Path, key: str | None = None, *, want: type | None = dict) -> dict:
    """A JSON file (size-capped, UTF-8, no duplicate keys) whose top level is a `want` (an object)."""
    where = key or str(path)
    check_text_size(path, where, "JSON file")
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise DatasetError(f"{where}: key {err.args[0]!r} appears twice, so its value is ambiguous; keep one "
                           "and fix the file") from None
    except RecursionError:
        raise DatasetError(f"{where}: JSON nested too deeply; the file is damaged: fix or re-download it") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, bad UTF-8, a 5000-digit integer
        raise DatasetError(f"{where}: not valid JSON ({type(err).__name__}: {str(err)[:200]}); fix or re-download "
                           "the file") from None
    if want is not None and not isinstance(value, want):
        raise DatasetError(f"{where}: expected a JSON object {{\"Name\": value, ...}}, got a JSON "
                           f"{_json_type(value)}; fix the file")
    return value


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


class Sidecar(dict):
    """A merged JSON sidecar that remembers which file gave each field (``origin[field]``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.origin: dict[str, str] = {}

    def merge(self, other: dict, key: str) -> None:
        """Overlay `other` (read from `key`) on this sidecar."""
        self.update(other)
        self.origin.update({name: key for name in other})
        if isinstance(other, Sidecar):
            self.origin.update(other.origin)


#: Numeric sidecar fields: (lowest allowed, highest allowed, lowest exclusive?, unit)
SIDECAR_RANGES = {
    "RepetitionTime": (0.0, 100.0, True, "seconds"),
    "StartTime": (-MAX_ABS_SECONDS, MAX_ABS_SECONDS, False, "seconds"),
    "SamplingFrequency": (0.0, 1e6, True, "Hz"),
    "RecordingDuration": (0.0, MAX_ABS_SECONDS, True, "seconds"),
    "DelayTime": (0.0, 100.0, False, "seconds"),
}


def sidecar_number(side: dict, name: str, key: str, default: float | None = None) -> float | None:
    """A numeric sidecar field, validated: a finite JSON number (not a string, list or boolean) in range.

    Missing, ``null`` or ``"n/a"`` gives `default`. Anything else outside ``SIDECAR_RANGES[name]`` is a
    DatasetError naming the sidecar file that gave the value, the field and the fix.
    """
    value = side.get(name)
    if value is None or value == "n/a":
        return default
    where = getattr(side, "origin", {}).get(name, key)
    lo, hi, exclusive, unit = SIDECAR_RANGES.get(name, (-MAX_ABS_SECONDS, MAX_ABS_SECONDS, False, ""))
    bound = f"{'>' if exclusive else '>='} {lo:g} and <= {hi:g} {unit}".strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (write the number without quotes)" if isinstance(value, str) else ""
        raise DatasetError(f"{where}: {name} is {_short(value)}, a JSON {_json_type(value)}; it must be a number "
                           f"{bound}{hint}: fix the sidecar")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number) or number < lo or number > hi or (exclusive and number <= lo):
        raise DatasetError(f"{where}: {name} is {_short(value)}; it must be a number {bound}: fix the sidecar")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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


# --- finding runs -------------------------------------------------------------------------

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


def _tasks_ok(opts: ResponseOptions, task: str | None) -> bool:
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
        elif name.suffix == "timeseries" and name.extension == ".tsv":
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


def _labels(runs: list[RunFiles]) -> list[str]:
    """Short unique run labels: the run entity when only it varies (``1``, ``2``), else ``ses-2_task-x``."""
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


# --- sidecars and events --------------------------------------------------------------

def sidecar(ingest: Ingest, key: str) -> Sidecar:
    """The merged JSON sidecar of `key` (BIDS inheritance, most specific last)."""
    listing = set(ingest.source.list_files())
    root = key.split("sub-", 1)[0].rstrip("/")
    merged = Sidecar()
    for r in ([""] if not root else ["", root]):
        for cand in sidecar_candidates(key, r, listing):
            merged.merge(_read_json(ingest.fetch(cand), cand), cand)
    return merged


def raw_sidecar(ingest: Ingest, entities: dict[str, str], datatype: str, suffix: str) -> Sidecar:
    """The merged raw-tree JSON sidecar of an acquisition, e.g. the ``bold.json`` of a derivative's run."""
    merged = Sidecar()
    if "sub" not in entities:
        return merged
    target = raw_key(entities, datatype, suffix, ".json")
    for cand in inherited_files(target, "", ingest.listing, suffix, ".json"):
        merged.merge(_read_json(ingest.fetch(cand), cand), cand)
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


def _read_events(ingest: Ingest, key: str) -> pd.DataFrame:
    path = ingest.fetch(key)
    check_not_pointer(path, key)
    check_table(path, key, "events.tsv")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=str)
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable events.tsv ({err})") from None
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
    table = _read_events(ingest, events_key)
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


# --- reading runs ---------------------------------------------------------------------------

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


def _tr_counts(ingest: Ingest) -> dict[str, int] | None:
    key = ingest.responses.tr_counts
    if not key:
        return None
    if key not in ingest.listing:
        raise DatasetError(f"{ingest.config.dataset.source}/{key}: the TR-count file ('dataset.responses.tr_counts') "
                           "is not in the dataset; fix the path")
    counts = _read_json(ingest.fetch(key), key)
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
    kind, run_files = find_runs(ingest, subject)
    opts = ingest.responses
    planned = []
    for rf, label in zip(run_files, _labels(run_files)):
        story, events_key, stim = _run_story(ingest, rf, kind)
        if opts.stories is None or story in opts.stories:
            planned.append((rf, label, story, events_key, stim))
    if not planned:
        raise DatasetError(f"sub-{subject}: none of its {len(run_files)} {kind} runs is of the stories "
                           f"{list(opts.stories or [])}; fix 'dataset.responses.stories'")
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


def load_subject(ingest: Ingest, subject: str) -> SubjectResponses:
    """Every run of one subject, as float32 arrays on their own clocks, each with its story."""
    kind, planned = _planned(ingest, subject)
    opts = ingest.responses
    runs: list[Run] = []
    names: list[str] = []
    mask_img = space = target_info = None
    simulated = False
    for rf, label, story, events_key, stim in planned:
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
        simulated = simulated or bool(side.get("Simulated", False))
        times = start + tr * np.arange(data.shape[0])
        runs.append(Run(label=label, data=data, times=times, tr=tr, key=key, story=story,
                        task=rf.entities.get("task"), session=rf.entities.get("ses"), events_key=events_key,
                        meta=meta))
    return SubjectResponses(subject=subject, kind=kind, runs=runs, target_names=names, mask_img=mask_img,
                            space=space, simulated=simulated, target_info=target_info)


# --- word timings -------------------------------------------------------------------------

def word_timing_key(ingest: Ingest, story: str | None, task: str | None = None, subject: str | None = None,
                    session: str | None = None, run: str | None = None) -> str:
    """The key of a story's word-timing file: ``files[story]``, ``files[task]``, else ``pattern``."""
    w = ingest.words
    for name in (story, task):
        if name is not None and name in w.files:
            return w.files[name]
    if w.pattern:
        values = {"story": story, "task": task, "subject": subject, "session": session, "run": run}
        try:
            key = w.pattern.format_map({k: v for k, v in values.items() if v is not None})
        except KeyError as err:
            raise DatasetError(f"'dataset.word_timings.pattern' {w.pattern!r} uses {{{err.args[0]}}}, which this "
                               "run does not have; use {story}, {task}, {subject}, {session} or {run}") from None
        return safe_key(key, ingest.config.dataset.source)
    raise DatasetError(f"no word timings for story {story!r}: 'dataset.word_timings.files' has "
                       f"{sorted(w.files)} and no 'pattern' is set; add the story or a pattern such as "
                       "'derivative/TextGrids/{story}.TextGrid'")


def _words_from(ingest: Ingest, key: str, shift: float, fmt: str | None = None) -> pd.DataFrame:
    w = ingest.words
    fmt = fmt or w.format
    cache_key = (key, round(shift, 9), fmt)
    if cache_key not in ingest._word_cache:
        path = ingest.fetch(key)
        ingest._word_cache[cache_key] = read_word_timings(path, fmt, shift, key=key, **w.reader_options())
    return ingest._word_cache[cache_key].copy()


def load_run_words(ingest: Ingest, run: Run) -> pd.DataFrame:
    """The words `run` heard, on its clock: DataFrame(onset, offset, word, story).

    ``format: events`` takes the word rows of the run's own events.tsv; the other formats read
    the story's file (``word_timings.files[story]`` or ``pattern``), shifted by ``offset`` and,
    with ``onset_from_events``, by the onset at which the run's events.tsv starts the story's
    stimulus file. A run without word timings is an error naming the run and the fix.
    """
    w = ingest.words
    where = f"{run.key} (run {run.label}, story {run.story!r})"
    if w.format == "events":
        if run.events_key is None:
            raise DatasetError(f"{where}: no events.tsv, so no word timings; this run cannot be aligned: use a "
                               "word-timing file ('dataset.word_timings.format/pattern') or drop the run")
        words = _words_from(ingest, run.events_key, w.offset)
    else:
        key = word_timing_key(ingest, run.story, run.task, None, run.session, None)
        if key not in ingest.listing:
            raise DatasetError(f"{where}: no word timings: {key} is not in dataset version "
                               f"{ingest.config.dataset.version}; fix 'dataset.word_timings.pattern'/'files' or "
                               "drop the run")
        shift = w.offset
        if w.onset_from_events:
            if "stimulus_onset" not in run.meta:
                raise DatasetError(f"{where}: 'onset_from_events' is set but the run's events.tsv gives no stimulus "
                                   "onset; unset it or add the events")
            shift += run.meta["stimulus_onset"]
        words = _words_from(ingest, key, shift)
    if "story" not in words.columns:
        words["story"] = run.story
    if words.empty:
        raise DatasetError(f"{where}: holds no words; check the word-timing file")
    return words


def load_words(ingest: Ingest) -> pd.DataFrame:
    """The word timings of the configured task's stimulus (single-story analyses)."""
    task = ingest.config.dataset.task
    key = word_timing_key(ingest, task, task)
    if key not in ingest.listing:
        raise DatasetError(f"{ingest.config.dataset.source}/{key}: the word timings of task {task!r} are not in the "
                           "dataset; fix 'dataset.word_timings.files'")
    return _words_from(ingest, key, ingest.words.offset, "textgrid" if ingest.words.format == "events"
                       else ingest.words.format)


def timing_tolerance(run: Run) -> float:
    """The stated tolerance (seconds) of :func:`check_run_timing` for a run."""
    return TIMING_TOLERANCE_S if run.tr >= 0.25 else EPHYS_TOLERANCE_S


def check_run_timing(run: Run, words: pd.DataFrame, subject: str, tolerance_s: float | None = None) -> None:
    """Refuse a run whose length disagrees with its stimulus, or that hears no word.

    Checks, each an error naming the file and the fix:

    - the number of samples equals the count the dataset states (``tr_counts``, exact);
    - the recording lasts as long as its sidecar's ``RecordingDuration`` (within
      ``DURATION_TOLERANCE_SAMPLES`` samples);
    - the story (events.tsv onset + duration) and its last word end no later than the last
      sample plus the tolerance: ``TIMING_TOLERANCE_S`` (10 s) for fMRI, ``EPHYS_TOLERANCE_S``
      (1 s) for MEG/iEEG;
    - at least one word falls within the run.
    """
    tol = timing_tolerance(run) if tolerance_s is None else float(tolerance_s)
    n = len(run.times)
    run_end = float(run.times[-1] + run.tr) if n else float("nan")
    who = f"sub-{subject} run {run.label}" + (f" (story {run.story!r})" if run.story else "")
    if words is None or len(words) == 0:
        raise DatasetError(f"{run.key}: {who} has no word timings; it cannot be aligned: fix the word-timing "
                           "file or drop the run")
    expected = run.meta.get("expected_samples")
    if expected is not None and n != expected:
        raise DatasetError(f"{run.key}: {who} has {n} samples, but {run.meta.get('expected_from', 'the dataset')} "
                           f"= {expected}; the response is truncated or padded, or belongs to another story: "
                           "re-download it or fix 'dataset.responses.tr_counts(_trim)'")
    stated = run.meta.get("recording_duration")
    if stated is not None and "duration_file" in run.meta:
        got = float(run.meta["duration_file"])
        slack = DURATION_TOLERANCE_SAMPLES / float(run.meta.get("sfreq_file") or run.sfreq)
        if abs(got - stated) > slack:
            raise DatasetError(f"{run.key}: {who} lasts {got:.3f} s, but its sidecar says RecordingDuration "
                               f"{stated:.3f} s; the recording is truncated or is not this run's: re-download it "
                               "or fix the sidecar")
    last_word = float(words["offset"].max())
    first_word = float(words["onset"].min())
    if last_word > run_end + tol:
        raise DatasetError(
            f"{run.key}: {who} has {n} samples ending at {run_end:.1f} s, "
            f"but its stimulus words run until {last_word:.1f} s; the response is truncated or the TR "
            "(RepetitionTime) / StartTime in its sidecar is wrong"
        )
    stim_end = run.meta.get("stimulus_end")
    if stim_end is not None and stim_end > run_end + tol:
        raise DatasetError(f"{run.key}: {who} has {n} samples ending at {run_end:.1f} s, but its events.tsv "
                           f"({run.events_key}) plays the story until {stim_end:.1f} s; the response is "
                           "truncated or the TR/sampling rate in its sidecar is wrong")
    if first_word > run_end or last_word < run.times[0]:
        raise DatasetError(f"{run.key}: no word of the stimulus falls within the run "
                           f"({run.times[0]:.1f}-{run_end:.1f} s); check 'dataset.word_timings.offset'")
