"""Ingest: check the pinned dataset version, find each subject's runs, read responses and words.

Responses come back per run as float32 arrays [time x targets] with their sampling times and
the story the run heard, so later stages never guess the clock. Word timings come back per
run as one table (onset, offset, word, story) on that run's clock, whatever the source format.
Every file read is recorded (key, size, ETag, sha256, what was verified) for the manifest.

The options are the config's own models, ``dataset.responses`` (:class:`ResponsesConfig`) and
``dataset.word_timings`` (:class:`WordTimingsConfig`); ``open_dataset(..., responses={...},
words={...})`` overrides their fields (validated, see :func:`options_from_config`).

One module per concern, all re-exported here:

- :mod:`.options`: the config models and their overrides;
- :mod:`.sidecars`: strict JSON reading and checked sidecar numbers;
- :mod:`.dataset`: :class:`Ingest`, :func:`open_dataset`, checksums, :func:`dataset_version`;
- :mod:`.runs`: run discovery (:func:`find_runs`);
- :mod:`.events`: a run's merged sidecars and its events.tsv (:func:`stimulus_from_events`);
- :mod:`.responses`: reading runs by kind (:func:`plan_runs`, :func:`load_subject`);
- :mod:`.words`: word timings per run and the run-length checks (:func:`check_run_timing`).

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

from ..config import ResponsesConfig, WordTimingsConfig
from ..storage import hash_file  # noqa: F401  (kept importable here: tests patch pipelines.ingest.hash_file)
from .dataset import (
    FileRecord,
    Ingest,
    check_subjects,
    checksum_table_key,
    dataset_version,
    log,
    open_dataset,
    read_checksum_table,
)
from .events import events_key_for, raw_sidecar, read_events, run_sidecar, sidecar, stimulus_from_events
from .options import ResponseOptions, WordOptions, options_from_config, with_overrides
from .responses import Run, SubjectResponses, load_subject, plan_runs, read_bold_run, read_timeseries_run
from .runs import DATATYPE, MNE_EXTENSIONS, RunFiles, find_response_files, find_runs, run_labels
from .sidecars import SIDECAR_RANGES, Sidecar, json_type, read_json, sidecar_number
from .words import (
    DURATION_TOLERANCE_SAMPLES,
    EPHYS_TOLERANCE_S,
    TIMING_TOLERANCE_S,
    check_run_timing,
    load_run_words,
    load_words,
    timing_tolerance,
    word_reader_options,
    word_timing_key,
)

__all__ = [
    "DATATYPE", "DURATION_TOLERANCE_SAMPLES", "EPHYS_TOLERANCE_S", "MNE_EXTENSIONS", "SIDECAR_RANGES",
    "TIMING_TOLERANCE_S", "FileRecord", "Ingest", "ResponseOptions", "ResponsesConfig", "Run", "RunFiles",
    "Sidecar", "SubjectResponses", "WordOptions", "WordTimingsConfig", "check_run_timing", "check_subjects",
    "checksum_table_key", "dataset_version", "events_key_for", "find_response_files", "find_runs", "json_type",
    "load_run_words", "load_subject", "load_words", "log", "open_dataset", "options_from_config", "plan_runs",
    "raw_sidecar", "read_bold_run", "read_checksum_table", "read_events", "read_json", "read_timeseries_run",
    "run_labels", "run_sidecar", "sidecar", "sidecar_number", "stimulus_from_events", "timing_tolerance",
    "with_overrides", "word_reader_options", "word_timing_key",
]
