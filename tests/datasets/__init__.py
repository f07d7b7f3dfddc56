"""Seed datasets laid out as they really are, for the ingest tests.

The real metadata (BIDS sidecars, events, channels, transcripts, TR counts) comes from
``../shared/realdata/<dataset>/bids`` unchanged unless a test says otherwise; the large files
that could not be brought here (their real paths and sizes are in each folder's
``ANNEXED_FILES.tsv``) are replaced by small synthetic binaries written at the same paths:

- NIfTI, GIFTI, HDF5, TextGrid, gentle ``align.json`` and EDF are written in their real format
  (EDF by :func:`edf_bytes`, a minimal EDF writer: 16-bit, 1 s records);
- MEG-MASC's KIT ``.con`` cannot be synthesised: a FIF written with MNE stands in its place
  (``..._meg.fif`` next to where the ``.con`` was);
- recordings are written at low sampling rates (MEG 25 Hz, high-gamma envelopes 10 Hz) so the
  files stay a few MB; where a sidecar states the rate, the test sets it to match.

The responses carry a planted signal: the word rate of the synthetic (or real) word timings,
sampled on the run's true clock. An ingest that misreads the clock loses the correlation.
"""
from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("NEUROFLOW_SHARED", REPO.parent / "shared"))
REALDATA = SHARED / "realdata"

VOCAB = ("the story began when a small boat came into the harbour and nobody on shore knew what it "
         "carried so they waited by the water until night fell over the town").split()


def realdata(name: str) -> Path:
    """``shared/realdata/<name>``; the test is skipped when shared/ is not beside the repository."""
    path = REALDATA / name
    if not path.is_dir():
        pytest.skip(f"real metadata {path} not available (shared/ is not beside the repository)")
    return path


def annexed(name: str) -> pd.DataFrame:
    """The dataset's ANNEXED_FILES.tsv: path, size_bytes, annex_key of the files not brought here."""
    return pd.read_csv(realdata(name) / "ANNEXED_FILES.tsv", sep="\t", dtype={"path": str, "annex_key": str})


def metadata_files(name: str, include=None) -> dict[str, Path]:
    """The real metadata files of a dataset, keyed by their path in the dataset."""
    root = realdata(name) / "bids"
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = path.relative_to(root).as_posix()
            if include is None or include(key):
                out[key] = path
    return out


def stage(uri: str, files: dict[str, Path | bytes | str]) -> str:
    """Upload `files` (key -> local path, bytes or text) under `uri` on the test S3 server."""
    from pipelines.s3 import endpoint_url, split_s3_uri
    from pipelines.s3 import client_for as _client
    from tests.conftest import make_bucket

    bucket, prefix = split_s3_uri(uri)
    make_bucket(bucket)
    client = _client(False, endpoint_url())

    def put(item):
        key, body = item
        if isinstance(body, Path):
            body = body.read_bytes()
        elif isinstance(body, str):
            body = body.encode()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=body)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files.items()))
    return uri.rstrip("/")


# --- synthetic stimuli ------------------------------------------------------------------

def synthetic_words(rng: np.random.Generator, start: float, end: float, *, pause_every=(6, 25),
                    pause=(2.0, 9.0)) -> pd.DataFrame:
    """Words between `start` and `end` s in bursts separated by pauses (so the word rate varies)."""
    rows, t = [], start
    next_pause = rng.integers(*pause_every)
    while True:
        dur = rng.uniform(0.15, 0.45)
        if t + dur > end:
            break
        rows.append((t, t + dur, str(rng.choice(VOCAB))))
        t += dur + rng.uniform(0.02, 0.25)
        next_pause -= 1
        if next_pause == 0:
            t += rng.uniform(*pause)
            next_pause = rng.integers(*pause_every)
    return pd.DataFrame(rows, columns=["onset", "offset", "word"])


def word_rate(words: pd.DataFrame, times: np.ndarray, window: int = 3) -> np.ndarray:
    """Lanczos-resampled word rate at `times` (the feature the pipeline aligns)."""
    from pipelines.features.align import lanczos_resample

    mid = ((words["onset"] + words["offset"]) / 2).to_numpy(float)
    return lanczos_resample(np.ones((len(words), 1), np.float32), mid, np.asarray(times, float), window=window)[:, 0]


def smooth_rate(words: pd.DataFrame, times: np.ndarray, width: float = 0.5) -> np.ndarray:
    """Word onsets convolved with a Gaussian of `width` s, at `times` (a fast-sampled planted signal)."""
    onsets = words["onset"].to_numpy(float)
    out = np.zeros(len(times))
    for chunk in np.array_split(np.arange(len(onsets)), max(1, len(onsets) // 200)):
        out += np.exp(-0.5 * ((np.asarray(times)[:, None] - onsets[chunk][None, :]) / width) ** 2).sum(axis=1)
    return out


def corr(a, b) -> float:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def textgrid_bytes(words: pd.DataFrame, xmax: float | None = None, word_tier: str = "word",
                   phone_tier: str = "phone") -> bytes:
    """A long-format Praat TextGrid with a phone tier then a word tier ("sp" between words), as LeBel's."""
    xmax = float(xmax if xmax is not None else words["offset"].max() + 1.0)

    def tier(name, items):
        cells, t = [], 0.0
        for on, off, label in items:
            if on > t + 1e-9:
                cells.append((t, on, "sp"))
            cells.append((on, off, label))
            t = off
        if t < xmax:
            cells.append((t, xmax, "sp"))
        lines = ['        class = "IntervalTier" ', f'        name = "{name}" ', "        xmin = 0 ",
                 f"        xmax = {xmax!r} ", f"        intervals: size = {len(cells)} "]
        for i, (a, b, lab) in enumerate(cells, 1):
            lines += [f"        intervals [{i}]:", f"            xmin = {a!r} ", f"            xmax = {b!r} ",
                      f'            text = "{lab}" ']
        return lines

    phones = []
    for on, off, w in words[["onset", "offset", "word"]].itertuples(index=False):
        k = 2 if len(w) < 4 else 3
        edges = np.linspace(on, off, k + 1)
        phones += [(float(edges[i]), float(edges[i + 1]), w[i % len(w)].upper() + "H") for i in range(k)]
    head = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0 ", f"xmax = {xmax!r} ",
            "tiers? <exists> ", "size = 2 ", "item []: "]
    body = ["    item [1]:"] + tier(phone_tier, phones) + ["    item [2]:"] + tier(
        word_tier, list(words[["onset", "offset", "word"]].itertuples(index=False, name=None)))
    return ("\n".join(head + body) + "\n").encode()


def gentle_bytes(words: pd.DataFrame, unaligned: tuple[int, ...] = ()) -> bytes:
    """A gentle ``align.json``; words at the `unaligned` indices are 'not-found-in-audio' (no times)."""
    import json

    entries, pos = [], 0
    for i, (on, off, w) in enumerate(words[["onset", "offset", "word"]].itertuples(index=False)):
        e = {"word": w, "startOffset": pos, "endOffset": pos + len(w)}
        if i in unaligned:
            e["case"] = "not-found-in-audio"
        else:
            e.update(case="success", alignedWord=w.lower(), start=round(float(on), 3), end=round(float(off), 3),
                     phones=[{"phone": "ah_B", "duration": round(float(off - on), 3)}])
        entries.append(e)
        pos += len(w) + 1
    return json.dumps({"transcript": " ".join(words["word"]), "words": entries}).encode()


# --- synthetic recordings ---------------------------------------------------------------

def _via_file(suffix: str, write) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x" + suffix)
        write(path)
        return path.read_bytes()


def hf5_bytes(data: np.ndarray, dataset: str = "data") -> bytes:
    """An HDF5 file holding `data` (float64, as ds003020's) under `dataset`."""
    import h5py

    def write(path):
        with h5py.File(path, "w") as h5:
            h5.create_dataset(dataset, data=np.asarray(data, dtype=np.float64))
    return _via_file(".hf5", write)


def gifti_bytes(data: np.ndarray) -> bytes:
    """A ``.func.gii`` with one float32 array per volume (data [n_volumes, n_vertices])."""
    import nibabel as nib

    arrays = [nib.gifti.GiftiDataArray(np.asarray(d, np.float32), intent="NIFTI_INTENT_TIME_SERIES",
                                       datatype="NIFTI_TYPE_FLOAT32", encoding="GZipBase64Binary") for d in data]
    return _via_file(".func.gii", lambda p: nib.save(nib.gifti.GiftiImage(darrays=arrays), str(p)))


def nifti_bytes(data: np.ndarray, tr: float) -> bytes:
    """A 4-D NIfTI (gzip) with voxel size 3 mm and TR `tr` in the header."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, tr))
    return _via_file(".nii.gz", lambda p: nib.save(img, str(p)))


def fif_bytes(ch_names: list[str], ch_types: list[str], sfreq: float, data: np.ndarray,
              positions: np.ndarray | None = None) -> bytes:
    """A raw FIF written by MNE (float32 samples): data [n_channels, n_samples] in SI units.

    ``positions`` (n_channels, 3), metres: the sensors' locations (``loc[:3]``), if given.
    """
    import mne

    info = mne.create_info(list(ch_names), float(sfreq), list(ch_types))
    if positions is not None:
        for ch, xyz in zip(info["chs"], np.asarray(positions, dtype=float)):
            ch["loc"][:3] = xyz
    raw = mne.io.RawArray(np.asarray(data, float), info, verbose="error")
    return _via_file("_raw.fif", lambda p: raw.save(p, fmt="single", overwrite=True, verbose="error"))


def helmet_positions(n: int, radius: float = 0.11) -> np.ndarray:
    """``n`` sensor positions spread over the upper half of a sphere (a helmet), metres."""
    k = np.arange(n) + 0.5
    z = 1 - k / n  # 1 .. 0: the upper hemisphere, evenly in height
    phi = np.pi * (1 + 5 ** 0.5) * k  # golden-angle spiral
    rho = np.sqrt(1 - z ** 2)
    return radius * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def edf_bytes(ch_names: list[str], sfreq: int, data_uv: np.ndarray, limit_uv: float = 3000.0) -> bytes:
    """A plain EDF (16-bit, 1 s data records): data_uv [n_channels, n_samples] in microvolts."""
    n_ch, n = data_uv.shape
    n_rec = n // sfreq
    digital = np.clip(np.round(data_uv[:, : n_rec * sfreq] / limit_uv * 32767), -32767, 32767).astype("<i2")

    def field(values, width):
        return b"".join(str(v)[:width].ljust(width).encode("ascii") for v in values)

    header = (field(["0"], 8) + field(["X X X X"], 80) + field(["Startdate 01-JAN-2020 X X X"], 80)
              + field(["01.01.20"], 8) + field(["00.00.00"], 8) + field([256 * (n_ch + 1)], 8) + field([""], 44)
              + field([n_rec], 8) + field(["1"], 8) + field([n_ch], 4))
    header += (field(ch_names, 16) + field([""] * n_ch, 80) + field(["uV"] * n_ch, 8)
               + field([f"{-limit_uv:g}"] * n_ch, 8) + field([f"{limit_uv:g}"] * n_ch, 8)
               + field(["-32767"] * n_ch, 8) + field(["32767"] * n_ch, 8) + field([""] * n_ch, 80)
               + field([sfreq] * n_ch, 8) + field([""] * n_ch, 32))
    body = io.BytesIO()
    for r in range(n_rec):
        body.write(digital[:, r * sfreq:(r + 1) * sfreq].tobytes())
    return header + body.getvalue()


def annex_pointer(key: str) -> bytes:
    """The small text file git-annex leaves in place of content it does not have."""
    return f"/annex/objects/{key}\n".encode()


def planted(rng: np.random.Generator, signal: np.ndarray, n_targets: int, planted_idx, snr: float = 4.0,
            scale: float = 1.0, base: float = 0.0) -> np.ndarray:
    """[n_samples, n_targets] noise, with z-scored `signal` * snr added at `planted_idx`."""
    s = (signal - signal.mean()) / (signal.std() + 1e-12)
    out = rng.standard_normal((len(signal), n_targets))
    out[:, planted_idx] += snr * s[:, None]
    return base + scale * out
