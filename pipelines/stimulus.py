"""Word timings of a stimulus (kept for existing imports; the readers live in `wordtimings`).

The table has columns ``onset``, ``offset`` (seconds on the run's clock) and ``word``.
"""
from __future__ import annotations

from .wordtimings import (  # noqa: F401 - re-exported
    READERS,
    SILENCE_LABELS,
    read_events_words,
    read_gentle_words,
    read_textgrid_phones,
    read_textgrid_words,
    read_word_timings,
    read_words_tsv,
)
