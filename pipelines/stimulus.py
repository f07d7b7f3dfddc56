"""Word timings of a stimulus, read into one table whatever the source format.

The table has columns ``onset``, ``offset`` (seconds on the run's clock) and ``word``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import DatasetError

SILENCE_LABELS = frozenset({"", "sp", "sil", "{sl}", "{lg}", "{ns}", "<sil>", "#"})


def read_textgrid_words(path: str | Path, tier: str = "word", offset: float = 0.0) -> pd.DataFrame:
    """Read the word tier of a Praat TextGrid (praatio), dropping silence marks.

    Parameters
    ----------
    path : the .TextGrid file.
    tier : name of the word tier.
    offset : seconds added to every time (stimulus clock -> run clock).

    Returns
    -------
    DataFrame with columns onset, offset, word; one row per spoken word, sorted by onset.
    """
    from praatio import textgrid

    path = Path(path)
    head = path.read_bytes()[:200]
    if head.startswith(b"version https://git-lfs") or b"/annex/objects/" in head:
        raise DatasetError(f"{path}: is a git-annex/LFS pointer, not a TextGrid; fetch the file's content "
                           "(e.g. `datalad get`) or point the config at the real file")
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad input file
        raise DatasetError(f"{path}: not a readable Praat TextGrid ({err}); check the file") from None
    if tier not in tg.tierNames:
        raise DatasetError(f"{path}: no tier {tier!r}; it has {list(tg.tierNames)}. "
                           "Set 'dataset.word_timings.tier' to one of them")
    rows = [(float(e.start) + offset, float(e.end) + offset, e.label.strip())
            for e in tg.getTier(tier).entries if e.label.strip().lower() not in SILENCE_LABELS]
    if not rows:
        raise DatasetError(f"{path}: tier {tier!r} holds no words; check the file and the tier name")
    words = pd.DataFrame(rows, columns=["onset", "offset", "word"]).sort_values("onset", kind="stable")
    return words.reset_index(drop=True)
