"""Ingest: check the pinned dataset version, find each subject's runs, read responses.

Responses come back as float32 arrays [time x targets] with their sampling times,
so later stages never guess the clock. Every file read is recorded (key, size,
ETag, sha256) for the manifest.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .bids import parse_bids_name, sidecar_candidates
from .config import AnalysisConfig
from .errors import DatasetError
from .storage import DatasetSource, sha256_file
from .stimulus import read_textgrid_words

TIMING_TOLERANCE_S = 10.0


@dataclass
class Run:
    """One response run: data [n_samples x n_targets] sampled at ``times``."""

    label: str
    data: np.ndarray
    times: np.ndarray
    tr: float
    key: str


@dataclass
class SubjectResponses:
    subject: str
    kind: str  # "bold" or "timeseries"
    runs: list[Run]
    target_names: list[str]
    mask_img: object | None = None  # nibabel image for bold data
    space: str | None = None
    simulated: bool = False
    n_dropped_targets: int = 0


@dataclass
class FileRecord:
    key: str
    size: int
    etag: str
    sha256: str

    def as_dict(self) -> dict:
        return {"key": self.key, "size": self.size, "etag": self.etag, "sha256": self.sha256}


@dataclass
class Ingest:
    """A dataset opened at its pinned version, recording the files it reads."""

    config: AnalysisConfig
    source: DatasetSource
    files_read: dict[str, FileRecord] = field(default_factory=dict)

    def fetch(self, key: str) -> Path:
        path = self.source.fetch(key)
        if key not in self.files_read:
            info = self.source.list_files()[key]
            self.files_read[key] = FileRecord(key, info.size, info.etag, sha256_file(path))
        return path


def open_dataset(config: AnalysisConfig, cache_root: str | Path) -> Ingest:
    """List the dataset and check that its version matches ``dataset.version``."""
    ds = config.dataset
    ingest = Ingest(config, DatasetSource(ds.source, ds.version, cache_root))
    listing = ingest.source.list_files()
    found = dataset_version(ingest)
    if found is not None and found != ds.version:
        raise DatasetError(
            f"{ds.source}: the source holds version {found}, the config pins {ds.version}; "
            f"set 'dataset.version: \"{found}\"' to analyse it, or point at the pinned snapshot"
        )
    if "dataset_description.json" not in listing:
        raise DatasetError(f"{ds.source}: no dataset_description.json; this is not a BIDS dataset root")
    return ingest


def dataset_version(ingest: Ingest) -> str | None:
    """The snapshot version a BIDS dataset declares (CHANGES first entry, else the DOI)."""
    listing = ingest.source.list_files()
    if "CHANGES" in listing:
        for line in ingest.fetch("CHANGES").read_text(errors="replace").splitlines():
            m = re.match(r"^\s*v?(\d+\.\d+\.\d+)\b", line)
            if m:
                return m.group(1)
    if "dataset_description.json" in listing:
        desc = _read_json(ingest.fetch("dataset_description.json"))
        m = re.search(r"\.v(\d+\.\d+\.\d+)$", str(desc.get("DatasetDOI", "")))
        if m:
            return m.group(1)
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err}); fix or re-download the file") from None


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


# --- response files -----------------------------------------------------------------

def find_response_files(ingest: Ingest, subject: str) -> tuple[str, list[str]]:
    """(kind, keys) of the subject's response runs for the task, sorted by run."""
    cfg = ingest.config.dataset
    roots = [""] + [d + "/" for d in cfg.responses.derivatives]
    kinds = {"bold": ("bold", ".nii.gz"), "timeseries": ("timeseries", ".tsv")}
    wanted = [cfg.responses.kind] if cfg.responses.kind != "auto" else ["bold", "timeseries"]
    found: dict[str, list[str]] = {}
    for key in ingest.source.list_files():
        if not any(key.startswith(r + f"sub-{subject}/") for r in roots):
            continue
        name = parse_bids_name(key)
        if name is None or name.get("sub") != subject or name.get("task") != cfg.task:
            continue
        if cfg.responses.desc is not None and name.get("desc") != cfg.responses.desc:
            continue
        for kind in wanted:
            suffix, ext = kinds[kind]
            if name.suffix == suffix and name.extension == ext:
                found.setdefault(kind, []).append(key)
    if not found:
        where = ", ".join(["the raw tree"] + cfg.responses.derivatives)
        raise DatasetError(f"{cfg.source}: sub-{subject} has no {'/'.join(wanted)} files for task "
                           f"{cfg.task!r} in {where}; check 'dataset.task' and 'dataset.responses.derivatives'")
    if len(found) > 1:
        raise DatasetError(f"sub-{subject} has both bold and timeseries files for task {cfg.task!r}; "
                           "set 'dataset.responses.kind' to choose")
    kind, keys = next(iter(found.items()))
    by_run: dict[str, list[str]] = {}
    for key in keys:
        by_run.setdefault(parse_bids_name(key).get("run", "1"), []).append(key)
    dupes = {r: ks for r, ks in by_run.items() if len(ks) > 1}
    if dupes:
        raise DatasetError(f"sub-{subject} has several {kind} files per run ({next(iter(dupes.values()))}); "
                           "set 'dataset.responses.desc' to choose one")
    return kind, [by_run[r][0] for r in sorted(by_run, key=lambda r: (len(r), r))]


def sidecar(ingest: Ingest, key: str) -> dict:
    """The merged JSON sidecar of `key` (BIDS inheritance, most specific last)."""
    listing = set(ingest.source.list_files())
    root = key.split("sub-", 1)[0].rstrip("/")
    merged: dict = {}
    roots = [""] if not root else ["", root]
    for r in roots:
        for cand in sidecar_candidates(key, r, listing):
            merged.update(_read_json(ingest.fetch(cand)))
    return merged


def _check_not_pointer(path: Path, key: str) -> None:
    head = path.read_bytes()[:256] if path.stat().st_size < 4096 else b""
    if head.startswith(b"version https://git-lfs") or b"annex/objects/" in head or head.startswith(b"../"):
        raise DatasetError(f"{key}: is a git-annex pointer ({path.stat().st_size} bytes), not data; "
                           "the dataset was published without this file's content. Fetch it "
                           "(`datalad get`) or use a source that has it")


def read_bold_run(ingest: Ingest, key: str) -> tuple[np.ndarray, float, object, str | None]:
    """Read a 4-D NIfTI run: (data [T, voxels], TR, mask image, space)."""
    import nibabel as nib

    path = ingest.fetch(key)
    _check_not_pointer(path, key)
    try:
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{key}: corrupt or truncated NIfTI ({type(err).__name__}: {err}); "
                           "re-download the file or remove it from the dataset") from None
    if vol.ndim != 4:
        raise DatasetError(f"{key}: expected a 4-D NIfTI (x, y, z, time); got shape {vol.shape}")
    meta = sidecar(ingest, key)
    tr = float(meta.get("RepetitionTime") or img.header.get_zooms()[3] or 0)
    if not tr > 0:
        raise DatasetError(f"{key}: no RepetitionTime in its JSON sidecar or NIfTI header; add it to the sidecar")
    mask_key = _mask_for(ingest, key)
    if mask_key is not None:
        mpath = ingest.fetch(mask_key)
        _check_not_pointer(mpath, mask_key)
        try:
            mask_img = nib.load(str(mpath))
            mask = np.asarray(mask_img.dataobj) > 0
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"{mask_key}: unreadable mask ({err})") from None
        if mask.shape != vol.shape[:3]:
            raise DatasetError(f"{mask_key}: mask shape {mask.shape} differs from {key} {vol.shape[:3]}")
    else:
        finite = np.isfinite(vol).all(axis=3)
        mask = finite & (np.nanstd(np.where(np.isfinite(vol), vol, 0), axis=3) > 0)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), img.affine)
    data = vol[mask].T.copy()
    space = parse_bids_name(key).get("space")
    return data, tr, mask_img, space


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
    _check_not_pointer(path, key)
    try:
        table = pd.read_csv(path, sep="\t")
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable TSV ({err})") from None
    non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if non_numeric or table.empty:
        raise DatasetError(f"{key}: expected numeric columns only (one per ROI); got non-numeric {non_numeric}")
    meta = sidecar(ingest, key)
    tr = float(meta.get("RepetitionTime") or 0)
    if not tr > 0:
        raise DatasetError(f"{key}: its JSON sidecar needs RepetitionTime (seconds); add it")
    return table.to_numpy(np.float32), tr, float(meta.get("StartTime", 0.0)), [str(c) for c in table.columns]


def load_subject(ingest: Ingest, subject: str) -> SubjectResponses:
    """Every run of one subject for the configured task, as float32 arrays."""
    kind, keys = find_response_files(ingest, subject)
    runs: list[Run] = []
    names: list[str] = []
    mask_img = space = None
    simulated = False
    for key in keys:
        label = parse_bids_name(key).get("run", "1")
        if kind == "bold":
            data, tr, run_mask, space = read_bold_run(ingest, key)
            if mask_img is None:
                mask_img = run_mask
            elif not np.array_equal(np.asarray(mask_img.dataobj), np.asarray(run_mask.dataobj)):
                raise DatasetError(f"{key}: its brain mask differs from the subject's first run; "
                                   "give the runs one mask (desc-brain_mask) or use registered data")
            start = 0.0
            names = [f"voxel{i}" for i in range(data.shape[1])]
        else:
            data, tr, start, cols = read_timeseries_run(ingest, key)
            if names and cols != names:
                raise DatasetError(f"{key}: columns {cols} differ from the subject's first run {names}")
            names = cols
        simulated = simulated or bool(sidecar(ingest, key).get("Simulated", False))
        times = start + tr * np.arange(data.shape[0])
        runs.append(Run(label=label, data=data, times=times, tr=tr, key=key))
    return SubjectResponses(subject=subject, kind=kind, runs=runs, target_names=names,
                            mask_img=mask_img, space=space, simulated=simulated)


def load_words(ingest: Ingest) -> pd.DataFrame:
    """The word timings of the configured task's stimulus."""
    wt = ingest.config.dataset.word_timings
    key = wt.files[ingest.config.dataset.task]
    path = ingest.fetch(key)
    return read_textgrid_words(path, tier=wt.tier, offset=wt.offset)


def check_run_timing(run: Run, words: pd.DataFrame, subject: str) -> None:
    """The stimulus must fit in the run (within a tolerance) and the run must hear words."""
    run_end = float(run.times[-1] + run.tr)
    last_word = float(words["offset"].max())
    first_word = float(words["onset"].min())
    if last_word > run_end + TIMING_TOLERANCE_S:
        raise DatasetError(
            f"{run.key}: sub-{subject} run {run.label} has {len(run.times)} samples ending at {run_end:.1f} s, "
            f"but its stimulus words run until {last_word:.1f} s; the response is truncated or the TR "
            "(RepetitionTime) / StartTime in its sidecar is wrong"
        )
    if first_word > run_end or last_word < run.times[0]:
        raise DatasetError(f"{run.key}: no word of the stimulus falls within the run "
                           f"({run.times[0]:.1f}-{run_end:.1f} s); check 'dataset.word_timings.offset'")
