"""Word-timing sources a dataset ships, and which stories each covers.

A source is a group of files read with one ``dataset.word_timings`` setting: Praat TextGrids of
one folder (``{dir}/{story}.TextGrid``), gentle alignments (``{dir}/{story}/align.json``), word
tables of one folder (``{dir}/{story}_words.tsv``, or one table for a single-story dataset), or
the word rows of the runs' own events.tsv. :func:`best_source` matches them against the runs'
stories and keeps the one that times the most runs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .scan import Inventory

__all__ = ["TimingSource", "best_source", "timing_sources"]

#: Preference among formats that time as many runs (the field's habit: aligned TextGrids first).
_FORMAT_ORDER = {"textgrid": 3, "gentle": 2, "words_tsv": 1, "events": 0}
_WORD_COLUMNS = {"word", "words", "token", "text", "label"}
_ONSET_COLUMNS = {"onset", "start", "word onset", "start_time", "tmin"}


@dataclass
class TimingSource:
    """Word-timing files read with one setting; ``files`` maps each story it covers to its file."""

    format: str
    files: dict[str, str]
    pattern: str | None = None  # when every file follows it
    label: str = ""
    single: bool = False  # one file: it times the story of a single-story dataset, whatever its name
    extra: dict = field(default_factory=dict)

    def key_for(self, story: str | None, n_stories: int) -> str | None:
        if story in self.files:
            return self.files[story]
        if self.single and n_stories == 1:
            return next(iter(self.files.values()))
        return None

    def settings(self, stories: list[str]) -> dict:
        """The ``dataset.word_timings`` block for runs hearing `stories`."""
        out: dict = {"format": self.format}
        if self.format == "events":
            return {**out, **self.extra}
        if self.single and len(set(stories)) == 1 and stories[0] not in self.files:
            return {**out, "files": {stories[0]: next(iter(self.files.values()))}, **self.extra}
        if self.pattern and len(self.files) > 1:
            return {**out, "pattern": self.pattern, **self.extra}
        return {**out, "files": dict(self.files), **self.extra}


def _by_folder(keys: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(str(PurePosixPath(k).parent), []).append(k)
    return out


def _stem_pattern(folder: str, keys: list[str]) -> tuple[str, dict[str, str]] | None:
    """``folder/{story}<suffix>`` where <suffix> is the names' common ending (``_words.tsv``, ``.TextGrid``)."""
    names = [PurePosixPath(k).name for k in keys]
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    cut = min(i for i, ch in enumerate(suffix + ".") if ch in "._-")  # start the ending at a separator
    suffix = suffix[cut:]
    stories = {n[: len(n) - len(suffix)]: k for n, k in zip(names, keys)}
    if len(names) < 2 or any(not s for s in stories):
        return None
    return f"{folder}/{{story}}{suffix}", stories


def _folder_sources(fmt: str, keys: list[str]) -> list[TimingSource]:
    out = []
    for folder, group in sorted(_by_folder(keys).items()):
        found = _stem_pattern(folder, group)
        if found is not None:
            pattern, stories = found
            out.append(TimingSource(fmt, stories, pattern, label=f"{fmt} files {pattern} ({len(stories)} stories)"))
        else:
            for key in group:
                stem = PurePosixPath(key).name.split(".")[0]
                out.append(TimingSource(fmt, {stem: key}, None, label=f"{fmt} file {key}", single=True))
    return out


def _is_word_table(header: str) -> bool:
    cols = {c.strip().lower() for c in header.rstrip("\r\n").split("\t")}
    return bool(cols & _WORD_COLUMNS) and bool(cols & _ONSET_COLUMNS)


def timing_sources(inv: Inventory, read_header, events_with_words: bool) -> list[TimingSource]:
    """Every word-timing source of the dataset.

    Parameters
    ----------
    inv : the dataset's inventory.
    read_header : callable key -> first line of a text file (used on word-table candidates only).
    events_with_words : whether the runs' events.tsv hold word rows (``trial_type`` ``word``, a ``word`` column).
    """
    sources = _folder_sources("textgrid", inv.textgrids)
    gentle: dict[str, dict[str, str]] = {}
    for key in inv.gentle:
        p = PurePosixPath(key)
        gentle.setdefault(str(p.parent.parent), {})[p.parent.name] = key
    for folder, stories in sorted(gentle.items()):
        sources.append(TimingSource("gentle", stories, f"{folder}/{{story}}/align.json",
                                    label=f"gentle alignments {folder}/{{story}}/align.json ({len(stories)} stories)",
                                    single=len(stories) == 1))
    tables = [k for k in inv.tables if k.endswith(".tsv") and _is_word_table(read_header(k))]
    sources += _folder_sources("words_tsv", tables)
    if events_with_words:
        sources.append(TimingSource("events", {}, None, label="word rows of each run's events.tsv"))
    return sources


def best_source(sources: list[TimingSource], run_stories: dict[str, list[str | None]]
                ) -> tuple[str, TimingSource, int] | None:
    """(story mode, source, runs timed) that times the most runs.

    ``run_stories`` maps a story mode (``task``, ``events``) to the story of each run under it.
    Ties go to names that match exactly (not through the single-file rule), then to the format
    the field prefers, then to stories named by the task.
    """
    best = None
    for mode, stories in run_stories.items():
        n_stories = len({s for s in stories if s})
        for src in sources:
            if src.format == "events":
                timed = exact = len(stories) if mode == "events" else 0
            else:
                timed = sum(1 for s in stories if src.key_for(s, n_stories))
                exact = sum(1 for s in stories if s in src.files)
            score = (timed, exact, _FORMAT_ORDER[src.format], mode == "task")
            if timed and (best is None or score > best[0]):
                best = (score, mode, src, timed)
    return None if best is None else (best[1], best[2], best[3])
