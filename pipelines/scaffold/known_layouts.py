"""Datasets the field uses, recognised by their own metadata, with the settings their authors' code uses.

Each layout is recognised by its ``dataset_description.json`` (the OpenNeuro DOI, or the name),
never by where it is stored, so a mirror or a local copy is recognised too. Its settings are the
ones the README documents for it; a setting that names a file is only used when the file is
there (a partial copy falls back to what :mod:`.detect` finds).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["KNOWN_LAYOUTS", "KnownLayout", "recognise"]


@dataclass(frozen=True)
class KnownLayout:
    """What neuroflow knows of one dataset beyond what its file names say."""

    id: str
    title: str
    doi: str | None = None  # an OpenNeuro accession in DatasetDOI ("ds003020")
    name_pattern: str | None = None  # a regex on dataset_description's Name
    task: str | None = None  # the analysis' task label
    prefer_root: str | None = None  # the derivative the field reads, when present
    responses: Mapping[str, object] = field(default_factory=dict)  # used when the chosen kind is `responses_kind`
    responses_kind: str | None = None
    responses_raw_only: bool = False  # the settings apply to the raw recordings, not to a derivative
    word_timings: Mapping[str, object] = field(default_factory=dict)  # used when its files are in the dataset
    story_from: str | None = None
    model: Mapping[str, object] = field(default_factory=dict)
    test_story: str | None = None  # held out for the scores when every subject heard it
    notes: tuple[str, ...] = ()

    def matches(self, description: Mapping[str, object]) -> bool:
        doi = str(description.get("DatasetDOI", ""))
        name = str(description.get("Name", ""))
        if self.doi and re.search(rf"\b{self.doi}\b", doi):
            return True
        return bool(self.name_pattern and re.search(self.name_pattern, name))


KNOWN_LAYOUTS: tuple[KnownLayout, ...] = (
    KnownLayout(
        "ds003020", "LeBel et al. 2023, natural language fMRI (ds003020)", doi="ds003020", task="stories",
        responses_kind="hdf5",
        responses={"files": "derivative/preprocessed_data/{subject}/{story}.hf5", "start_time": 10.0,
                   "tr_counts": "derivative/respdict.json", "tr_counts_trim": 20},
        word_timings={"format": "textgrid", "pattern": "derivative/TextGrids/{story}.TextGrid", "tier": "word"},
        test_story="wheretheressmoke",
        notes=("the preprocessed responses drop 10 TRs at each end of a story: rows start at 10 s on the story's "
               "clock (start_time), and respdict.json's TR counts minus 20 are their lengths (tr_counts_trim)",)),
    KnownLayout(
        "ds002345", "Narratives, Nastase et al. 2021 (ds002345)", doi="ds002345",
        prefer_root="derivatives/afni-nosmooth", story_from="events",
        responses_kind="gifti", responses={"space": "fsaverage6"},
        word_timings={"format": "gentle", "pattern": "stimuli/gentle/{story}/align.json", "onset_from_events": True},
        notes=("each run's story is the stimulus file its events.tsv plays (pieman_audio.wav -> pieman), and the "
               "gentle transcript starts when that file starts (onset_from_events)",)),
    KnownLayout(
        "megmasc", "MEG-MASC, Gwilliams et al. 2023", name_pattern=r"MEG-MASC", story_from="events",
        responses_kind="meg", responses={"sessions": ["0"]},
        word_timings={"format": "events"},
        model={"cv": "contiguous_blocks", "n_folds": 5, "tmin": -0.2, "tmax": 0.6},
        notes=("words are the 'word' rows of each run's events.tsv; session 0 only (session 1 repeats the "
               "stories)",)),
    KnownLayout(
        "ds005574", "Podcast ECoG, Zada et al. 2025 (ds005574)", doi="ds005574", task="podcast",
        responses_kind="ieeg", responses_raw_only=True,
        responses={"high_gamma": [70.0, 150.0], "sfreq": 50.0, "bad_channels": []},
        word_timings={"format": "words_tsv", "files": {"podcast": "stimuli/whisper-medium/transcript.tsv"}},
        model={"cv": "contiguous_blocks", "n_folds": 5, "tmin": -0.2, "tmax": 0.6},
        notes=("the whisper-medium transcript is on the recording's clock; high-gamma (70-150 Hz) envelope as the "
               "dataset's tutorials",)),
    KnownLayout(
        "ds002322", "The Alice Dataset, Bhattasali et al. 2020 (ds002322)", doi="ds002322", task="alice",
        word_timings={"format": "textgrid", "files": {"alice": "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"},
                      "tier": "word"},
        story_from="task",
        notes=("the hand-corrected word TextGrid of chapter 1 times every run (one story)",)),
)


def recognise(description: Mapping[str, object]) -> KnownLayout | None:
    """The known layout whose DOI or name ``dataset_description.json`` states, else None."""
    return next((k for k in KNOWN_LAYOUTS if k.matches(description)), None)
