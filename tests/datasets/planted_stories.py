"""Four stories heard by one listener whose ROI responses follow one dimension of a language model.

The bundled demo dataset's top-level metadata (ds002322 layout, version 1.0.4) with four short
synthetic stories (``story1`` .. ``story4``: TextGrids of words of the tiny test models'
vocabulary, one run each of task ``listen``, the story named by the run's events.tsv) and one
simulated subject ``sub-p01`` (an ROI time-series derivative): ROIs ``PLANT1`` .. ``PLANT4`` are
dimension :data:`DIM` of the model's layer :data:`LAYER` (aligned to the TRs as the pipeline aligns
it, z-scored per run) two TRs later, plus noise; ``NOISE1`` .. ``NOISE4`` are noise. Each story
also has a sound, ``stimuli/storyK.wav`` (amplitude-modulated noise at :data:`AUDIO_RATE` Hz, the
run's events.tsv starting it at 0 s), for acoustic features. Sidecars say ``"Simulated": true``. A local BIDS folder (``dataset.source`` may be one).

So the sentences that drive the planted ROIs are known: those whose words have a high value of
that dimension (:func:`dimension_of`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.demo import DEMO_SOURCE

from . import textgrid_bytes

TASK = "listen"
TR = 2.0
N_TRS = 110
STORIES = ("story1", "story2", "story3", "story4")
DERIVATIVE = "derivatives/planted"
LAYER = 2
CONTEXT = 4
DIM = 5
DELAY = 2
N_PLANTED = 4
AUDIO_RATE = 4000
#: The tiny test models' vocabulary (tests/conftest.py): every word is a known token.
VOCAB = ("alice was beginning to get very tired of sitting by her sister on the bank and having nothing do once "
         "or twice she had peeped into book reading but it no pictures conversations in what is use a thought "
         "without rabbit white pink eyes ran close").split()


def feature(model_dir: Path | str) -> dict:
    """The language-model feature space of the analysis (and of the planting)."""
    return {"name": "lm", "kind": "language_model", "model": str(model_dir), "layer": LAYER,
            "context_words": CONTEXT}


def _words(rng: np.random.Generator, end: float) -> pd.DataFrame:
    rows, t = [], 1.0
    while True:
        dur = rng.uniform(0.2, 0.4)
        if t + dur > end:
            break
        rows.append((t, t + dur, str(rng.choice(VOCAB))))
        t += dur + rng.uniform(0.02, 0.2)
        if rng.random() < 0.06:
            t += rng.uniform(1.0, 4.0)
    return pd.DataFrame(rows, columns=["onset", "offset", "word"])


def dimension_of(model_dir: Path | str, words: pd.DataFrame, times: np.ndarray) -> np.ndarray:
    """Dimension :data:`DIM` of the feature on ``times`` (Lanczos, as the fit aligns it), not z-scored."""
    from pipelines.features.registry import Stimulus, align_to_samples, compute_feature

    result = compute_feature(feature(model_dir), Stimulus(words=words))
    return align_to_samples(result, times, method="lanczos", window=3)[:, DIM]


def write_wav(path: Path, rng: np.random.Generator, seconds: float) -> None:
    """Amplitude-modulated noise, 16-bit mono at :data:`AUDIO_RATE` Hz."""
    import wave

    t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
    slow = np.interp(t, np.arange(0, seconds + 3, 3.0), rng.uniform(0.05, 1.0, int(seconds // 3) + 2))
    audio = np.clip(slow * rng.standard_normal(t.size) * 0.3, -1, 1)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(AUDIO_RATE)
        fh.writeframes((audio * 32767).astype("<i2").tobytes())


def build_planted_stories(dest: Path, model_dir: Path | str, seed: int = 19, snr: float = 2.0) -> Path:
    """Write the dataset under ``dest`` (a new folder named like a dataset, e.g. ``.../ds002322``)."""
    from pipelines.wordtimings import read_word_timings

    rng = np.random.default_rng(seed)
    dest = Path(dest)
    dest.mkdir(parents=True)
    for name in ("dataset_description.json", "CHANGES", "README", "participants.json"):
        shutil.copy2(DEMO_SOURCE / name, dest / name)
    (dest / "participants.tsv").write_text("participant_id\tage\tsex\nsub-p01\t30\tF\n")
    (dest / "stimuli").mkdir()
    derivative = dest / DERIVATIVE
    (derivative / "sub-p01" / "func").mkdir(parents=True)
    (derivative / "dataset_description.json").write_text(json.dumps(
        {"Name": "simulated ROI time series", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "tests.datasets.planted_stories"}]}))
    raw = dest / "sub-p01" / "func"
    raw.mkdir(parents=True)
    bold = json.loads((DEMO_SOURCE / "sub-18" / "sub-18_task-alice_bold.json").read_text())
    columns = [f"PLANT{j + 1}" for j in range(N_PLANTED)] + [f"NOISE{j + 1}" for j in range(4)]
    times = TR * np.arange(N_TRS)
    for k, story in enumerate(STORIES, start=1):
        path = dest / "stimuli" / f"{story}.TextGrid"
        path.write_bytes(textgrid_bytes(_words(rng, TR * N_TRS - 12.0), TR * N_TRS))
        write_wav(dest / "stimuli" / f"{story}.wav", np.random.default_rng(seed + k), TR * N_TRS - 2)
        words = read_word_timings(path, "textgrid", 0.0, key=str(path), tier="word")
        x = dimension_of(model_dir, words, times)
        x = (x - x.mean()) / x.std()
        driven = np.zeros(N_TRS)
        driven[DELAY:] = x[:-DELAY]
        data = 100.0 + rng.standard_normal((N_TRS, len(columns)))
        data[:, :N_PLANTED] += snr * driven[:, None] * np.linspace(1.0, 0.6, N_PLANTED)[None, :]
        stem = f"sub-p01_task-{TASK}_run-{k}"
        (raw / f"{stem}_events.tsv").write_text(f"onset\tduration\tstim_file\n0.0\t{TR * N_TRS - 2:.1f}\t"
                                                f"{story}.wav\n")
        (raw / f"{stem}_bold.json").write_text(json.dumps(bold))
        func = derivative / "sub-p01" / "func"
        np.savetxt(func / f"{stem}_desc-roi_timeseries.tsv", data, fmt="%.5f", delimiter="\t",
                   header="\t".join(columns), comments="")
        (func / f"{stem}_desc-roi_timeseries.json").write_text(json.dumps(
            {"RepetitionTime": TR, "StartTime": 0.0, "Columns": columns, "Simulated": True}))
    return dest


def planted_config(source: str, output: str, model_dir: Path | str, **model) -> dict:
    """The LM feature, delays 1-4, story4 held out (its scores are the held-out r), no dask."""
    return {
        "name": "planted",
        "dataset": {"source": source, "version": "1.0.4", "task": TASK, "subjects": ["p01"],
                    "responses": {"kind": "timeseries", "derivatives": [DERIVATIVE], "story_from": "events"},
                    "word_timings": {"format": "textgrid", "pattern": "stimuli/{story}.TextGrid", "tier": "word"}},
        "features": [feature(model_dir)],
        "model": {"kind": "ridge", "alphas": [0.1, 1, 10, 100, 1000], "delays": [1, 2, 3, 4],
                  "test_stories": ["story4"], **model},
        "compute": {"backend": "numpy", "dask": "none"},
        "output": output,
    }
