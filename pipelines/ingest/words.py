"""Word timings of each run, on the run's clock, and the check that a run's length fits its stimulus.

:func:`load_run_words` reads the words a run heard (``dataset.word_timings``: a TextGrid, a gentle
alignment or a words TSV per story, or the word rows of the run's events.tsv) as one table
(onset, offset, word, story); :func:`check_run_timing` refuses a run whose samples, sidecar or
events disagree with its stimulus.
"""
from __future__ import annotations

import pandas as pd

from ..config import WordTimingsConfig
from ..errors import DatasetError
from ..storage import safe_key
from ..wordtimings import read_word_timings
from .dataset import Ingest
from .responses import Run
from .word_store import load_table, save_table, table_key

__all__ = ["DURATION_TOLERANCE_SAMPLES", "EPHYS_TOLERANCE_S", "TIMING_TOLERANCE_S", "check_run_timing",
           "load_run_words", "load_words", "timing_tolerance", "word_reader_options", "word_timing_key"]

#: fMRI: the stimulus may run this long past the last sample (haemodynamic tail, padding) before
#: the run is called truncated.
TIMING_TOLERANCE_S = 10.0
#: MEG / iEEG (sampling period under 0.25 s): the same tolerance.
EPHYS_TOLERANCE_S = 1.0
#: A recording may differ from its sidecar's RecordingDuration by this many of its samples.
DURATION_TOLERANCE_SAMPLES = 2


def word_reader_options(words: WordTimingsConfig) -> dict:
    """The keyword arguments of :func:`pipelines.wordtimings.read_word_timings` for ``words.format``."""
    if words.format == "textgrid":
        return {"tier": words.tier, "bad_rows": words.bad_rows}
    if words.format == "gentle":
        return {"unaligned": words.unaligned, "bad_rows": words.bad_rows}
    if words.format == "words_tsv":
        return {"word_column": words.word_column, "onset_column": words.onset_column,
                "offset_column": words.offset_column, "bad_rows": words.bad_rows}
    return {"trial_type": words.trial_type, "word_column": words.word_column or "word", "bad_rows": words.bad_rows}


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
                               "run does not have; use {story}, {task}, {subject}, {session} or {run}") from err
        return safe_key(key, ingest.config.dataset.source)
    raise DatasetError(f"no word timings for story {story!r}: 'dataset.word_timings.files' has "
                       f"{sorted(w.files)} and no 'pattern' is set; add the story or a pattern such as "
                       "'derivative/TextGrids/{story}.TextGrid'")


def _words_from(ingest: Ingest, key: str, shift: float, fmt: str | None = None) -> pd.DataFrame:
    w = ingest.words
    fmt = fmt or w.format
    cache_key = (key, round(shift, 9), fmt)
    if cache_key not in ingest.word_cache:
        path = ingest.fetch(key)
        options = word_reader_options(w)
        # parsed once per file content: every later step (its own process under Airflow) loads the table
        folder = ingest.source.cache_home / "words"
        name = table_key(ingest.files_read[key].sha256, fmt, shift, options, key)
        table = load_table(folder, name)
        if table is None:
            table = read_word_timings(path, fmt, shift, key=key, **options)
            save_table(folder, name, table)
        ingest.word_cache[cache_key] = table
    return ingest.word_cache[cache_key].copy()


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
