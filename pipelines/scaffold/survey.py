"""What a config finds in its dataset, per subject and story: runs, stated samples, words, timing file.

``neuroflow validate`` prints it as a table. Nothing is fitted and no response is downloaded: runs
are planned from the listing (:func:`pipelines.ingest.plan_runs`), words read from their timing
files. For the common mistakes each row says the fix: a story without a timing file gets the
closest names the dataset has (difflib), a subject without runs of the task gets the tasks it has.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from ..bids import parse_bids_name
from ..config import AnalysisConfig
from ..errors import NeuroflowError
from ..ingest import Ingest, check_subjects, load_run_words, open_dataset, plan_runs, read_json, word_timing_key
from ..manifest import printable

__all__ = ["StoryRow", "survey", "survey_table"]


@dataclass
class StoryRow:
    """One (subject, story): its runs, the samples the dataset states, its words, or what is wrong."""

    subject: str
    story: str | None
    runs: int = 0
    samples: int | None = None  # as the dataset states them (tr_counts); None: read only by `run`
    words: int | None = None
    timing: str | None = None  # the timing file (or "events.tsv")
    problem: str | None = None
    fix: str | None = None

    @property
    def matched(self) -> bool:
        return self.problem is None


def _timing_names(ingest: Ingest) -> dict[str, str]:
    """story -> key of every timing file the config's pattern or files can name."""
    w = ingest.words
    out = dict(w.files)
    if w.pattern and "{story}" in w.pattern:
        head, _, tail = w.pattern.partition("{story}")
        rx = re.compile("^" + re.escape(head) + r"([^/]+)" + re.escape(tail) + "$")
        for key in ingest.listing:
            m = rx.match(key)
            if m:
                out[m.group(1)] = key
    return out


def _closest(name: str | None, names: list[str]) -> list[str]:
    if not name:
        return []
    return difflib.get_close_matches(name, names, n=3, cutoff=0.5) or \
        difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=3, cutoff=0.4)


def _subject_tasks(ingest: Ingest, subject: str) -> list[str]:
    tasks = {n.get("task") for k in ingest.listing if f"sub-{subject}/" in k
             for n in [parse_bids_name(k)] if n is not None and n.get("task")}
    return sorted(tasks)


def _stated_samples(ingest: Ingest) -> dict[str, int]:
    key = ingest.responses.tr_counts
    if not key or key not in ingest.listing:
        return {}
    try:
        counts = read_json(ingest.fetch(key), key)
    except NeuroflowError:
        return {}
    trim = int(ingest.responses.tr_counts_trim)
    return {str(s): int(n) - trim for s, n in counts.items() if isinstance(n, (int, float))} \
        if isinstance(counts, dict) else {}


def _story_rows(ingest: Ingest, subject: str, names: dict[str, str], samples: dict[str, int]) -> list[StoryRow]:
    rows: dict[str | None, StoryRow] = {}
    events = ingest.words.format == "events"
    for run in plan_runs(ingest, subject):
        row = rows.setdefault(run.story, StoryRow(subject, run.story))
        row.runs += 1
        if run.story in samples:
            row.samples = (row.samples or 0) + samples[run.story]
        if row.problem:
            continue
        try:
            key = None if events else word_timing_key(ingest, run.story, run.task, None, run.session, None)
            if key is not None and key not in ingest.listing:
                row.problem = f"no timing file {key}"
                close = _closest(run.story, sorted(names))
                files = ", ".join(names[c] for c in close if c in names) or ", ".join(close)
                row.fix = (f"closest timing files: {files}" if close
                           else "add the file, or fix 'dataset.word_timings.pattern'/'files'")
                continue
            words = load_run_words(ingest, run)
            row.words = (row.words or 0) + int(len(words))
            row.timing = "events.tsv" if events else key
        except NeuroflowError as err:
            row.problem = str(err)
    return list(rows.values())


def survey(cfg: AnalysisConfig, cache_dir: str | Path, ingest: Ingest | None = None) -> list[StoryRow]:
    """One row per (subject, story) of the config's analysis, and one per subject that has no runs.

    ``ingest``: the dataset already opened for `cfg` (its listing, planned runs and words are
    reused); opened here if None. Raises what :func:`pipelines.ingest.open_dataset` and
    :func:`check_subjects` raise (a version that differs, an unknown subject): those stop the
    analysis as a whole.
    """
    if ingest is None:
        ingest = open_dataset(cfg, cache_dir)
    subjects = check_subjects(ingest)
    names = {} if ingest.words.format == "events" else _timing_names(ingest)
    samples = _stated_samples(ingest)
    rows: list[StoryRow] = []
    for subject in subjects:
        try:
            rows += _story_rows(ingest, subject, names, samples)
        except NeuroflowError as err:
            tasks = _subject_tasks(ingest, subject)
            close = _closest(cfg.dataset.task, tasks)
            fix = (f"sub-{subject}'s tasks: {', '.join(tasks[:10])}" + (f" (closest: {', '.join(close)})"
                                                                        if close else "")) if tasks else None
            rows.append(StoryRow(subject, None, problem=str(err), fix=fix))
    return rows


def survey_table(rows: list[StoryRow]) -> list[str]:
    """The rows as text lines: a table, then each problem with its fix."""
    out = [f"{'subject':<12} {'story':<28} {'runs':>4} {'samples':>8} {'words':>7}  timing"]
    for r in rows:
        samples = str(r.samples) if r.samples is not None else "-"
        words = str(r.words) if r.words is not None else "-"
        timing = printable(r.timing or "", 60) if r.matched else "UNMATCHED"
        out.append(f"{'sub-' + printable(r.subject, 20):<12} {printable(r.story or '-', 28):<28} {r.runs:>4} "
                   f"{samples:>8} {words:>7}  {timing}")
    bad = [r for r in rows if not r.matched]
    n_ok = len({(r.subject, r.story) for r in rows if r.matched})
    out.append(f"{n_ok} matched, {len(bad)} unmatched (subject, story) pairs")
    for r in bad:
        what = f"sub-{printable(r.subject, 20)}" + (f" story {printable(r.story, 40)}" if r.story else "")
        out.append(f"  {what}: {printable(r.problem or '', 300)}")
        if r.fix:
            out.append(f"    fix: {printable(r.fix, 300)}")
    return out
