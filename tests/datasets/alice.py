"""The Alice Dataset (ds002322) with real responses: its BIDS metadata, the hand-corrected TextGrid
and the 6 mm ROI time courses of Brennan et al. 2016, as files to stage on the S3 fixture."""
from __future__ import annotations

import pandas as pd

from . import metadata_files, realdata

NAME = "ds002322_alice_bids_meta"
ROI = "alice_brennan2016_roi"
TEXTGRID = "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"
COLUMNS = ["LATL", "RATL", "LPTL", "LIPL", "LPreM", "LIFG"]
DERIVATIVE = "derivatives/brennan2016roi"


def roi_subjects() -> list[str]:
    """Subjects with both BIDS metadata and ROI time courses (26)."""
    meta = metadata_files(NAME)
    return sorted({k.split("/")[0][4:] for k in meta if k.startswith("sub-")}
                  & {p.name[1:3] for p in (realdata(ROI) / "alice_data_shared/6mm").glob("s*-timecourses.txt")})


def alice_files(subjects) -> dict:
    """{key: content or path}: the metadata, the TextGrid and ``subjects``' ROI time courses as a
    ``*_timeseries.tsv`` derivative (``StartTime: 20``: the first 10 volumes were discarded)."""
    roi = realdata(ROI)
    files: dict = dict(metadata_files(NAME))
    files[TEXTGRID] = roi / "alice_stim_shared" / TEXTGRID.split("/")[1]
    for s in subjects:
        table = pd.read_csv(roi / f"alice_data_shared/6mm/s{s}-timecourses.txt", sep=r"\s+", header=None,
                            names=COLUMNS)
        base = f"{DERIVATIVE}/sub-{s}/func/sub-{s}_task-alice_desc-roi6mm_timeseries"
        files[base + ".tsv"] = table.to_csv(sep="\t", index=False)
        files[base + ".json"] = '{"RepetitionTime": 2.0, "StartTime": 20.0}'
    files[f"{DERIVATIVE}/dataset_description.json"] = \
        '{"Name": "Brennan 2016 ROI time courses", "BIDSVersion": "1.8.0", "DatasetType": "derivative"}'
    return files


def word_rate_config(name: str, source: str, subjects, output: str, group: dict) -> dict:
    """A word-rate analysis of the ROI time courses (cubic detrend, delays 1-4, 5 contiguous folds)."""
    return {
        "name": name,
        "dataset": {"source": source, "version": "1.0.4", "task": "alice", "subjects": list(subjects),
                    "responses": {"derivatives": [DERIVATIVE], "preprocess": {"polynomial": 3}},
                    "word_timings": {"format": "textgrid", "files": {"alice": TEXTGRID}, "tier": "word"}},
        "features": [{"name": "wordrate", "kind": "word_rate"}],
        "model": {"alphas": [1, 10, 100, 1000, 10000], "delays": [1, 2, 3, 4], "cv": "contiguous_blocks",
                  "n_folds": 5},
        "compute": {"backend": "numpy", "dask": "none"},
        "group": group,
        "output": output}
