"""A Narratives-size cohort of tiny subjects: many listeners of one story, few targets each.

The bundled demo dataset's top-level metadata (ds002322 layout, version 1.0.4) with one short
synthetic story (a TextGrid of words in bursts, ``N_TRS`` TRs at 2 s) and ``n_subjects``
simulated listeners (``sub-c001``, ``sub-c002``, ...): each one ROI time-series derivative
(``n_targets`` columns) whose first half of targets follow the story's word rate (an SNR that
varies by subject) and the rest are noise. Sidecars say ``"Simulated": true``. The tree is a
local BIDS folder (``dataset.source`` may be one).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipelines.demo import DEMO_SOURCE

from . import synthetic_words, textgrid_bytes, word_rate

TASK = "alice"
TR = 2.0
START = 0.0
N_TRS = 150
TEXTGRID = "stimuli/story.TextGrid"
DERIVATIVE = "derivatives/cohortroi"


def subject_labels(n_subjects: int) -> list[str]:
    """``c001``, ``c002``, ... (letters and digits only, as BIDS labels)."""
    return [f"c{i:03d}" for i in range(1, n_subjects + 1)]


def build_cohort(dest: Path, n_subjects: int, n_targets: int = 4, seed: int = 345) -> list[str]:
    """Write the cohort under `dest` (a new folder); return its subject labels."""
    rng = np.random.default_rng(seed)
    dest = Path(dest)
    dest.mkdir(parents=True)
    for name in ("dataset_description.json", "CHANGES", "README", "participants.json"):
        shutil.copy2(DEMO_SOURCE / name, dest / name)
    (dest / "stimuli").mkdir()
    words = synthetic_words(rng, 2.0, START + TR * N_TRS - 4.0)
    (dest / TEXTGRID).write_bytes(textgrid_bytes(words, START + TR * N_TRS))
    rate = word_rate(words, START + TR * np.arange(N_TRS))
    rate = (rate - rate.mean()) / rate.std()
    events = f"onset\tduration\tstim_file\n0.0\t{TR * N_TRS - 2:.1f}\tstory.wav\n"
    bold = json.loads((DEMO_SOURCE / "sub-18" / "sub-18_task-alice_bold.json").read_text())
    columns = [f"ROI{j + 1}" for j in range(n_targets)]
    planted = n_targets // 2 or 1
    labels = subject_labels(n_subjects)
    derivative = dest / DERIVATIVE
    derivative.mkdir(parents=True)
    (derivative / "dataset_description.json").write_text(json.dumps(
        {"Name": "simulated ROI time series", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "tests.datasets.cohort"}]}))
    participants = ["participant_id\tage\tsex"]
    for label in labels:
        raw = dest / f"sub-{label}"
        raw.mkdir()
        (raw / f"sub-{label}_task-{TASK}_events.tsv").write_text(events)
        (raw / f"sub-{label}_task-{TASK}_bold.json").write_text(json.dumps(bold))
        participants.append(f"sub-{label}\t{int(rng.integers(18, 40))}\t{rng.choice(['F', 'M'])}")
        data = 100.0 + rng.standard_normal((N_TRS, n_targets))
        data[:, :planted] += rng.uniform(0.3, 1.5) * np.roll(rate, 2)[:, None]  # ~4 s hemodynamic lag
        func = derivative / f"sub-{label}" / "func"
        func.mkdir(parents=True)
        stem = f"sub-{label}_task-{TASK}_desc-roi_timeseries"
        np.savetxt(func / f"{stem}.tsv", data, fmt="%.4f", delimiter="\t", header="\t".join(columns), comments="")
        (func / f"{stem}.json").write_text(json.dumps({"RepetitionTime": TR, "StartTime": START,
                                                       "Columns": columns, "Simulated": True}))
    (dest / "participants.tsv").write_text("\n".join(participants) + "\n")
    return labels


def cohort_config(source: str, output: str, subjects: list[str]) -> dict:
    """Word rate only, 4 delays, 5 contiguous folds, no dask: the smallest real analysis per subject."""
    return {
        "name": "cohort",
        "dataset": {"source": source, "version": "1.0.4", "task": TASK, "subjects": list(subjects),
                    "responses": {"kind": "timeseries", "derivatives": [DERIVATIVE]},
                    "word_timings": {"format": "textgrid", "files": {TASK: TEXTGRID}, "tier": "word"}},
        "features": [{"name": "wordrate", "kind": "word_rate"}],
        "model": {"kind": "ridge", "alphas": [1, 10, 100, 1000], "delays": [1, 2, 3, 4],
                  "cv": "contiguous_blocks", "n_folds": 5},
        "compute": {"backend": "numpy", "dask": "none"},
        "output": output,
    }
