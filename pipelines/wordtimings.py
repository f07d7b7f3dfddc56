"""Word timings of a stimulus, read into one table whatever the source format.

Every reader returns a DataFrame with columns ``onset``, ``offset`` (seconds, plus the
``offset`` argument: stimulus clock -> run clock) and ``word``, one row per spoken word,
sorted by onset; readers of sources that name the story add a ``story`` column. Silence and
noise marks are dropped; a file with no word left, a time that is not a number, or a word
ending before it starts is an error naming the file.

========== ===================================================== ==================================
format     source                                                 seen in
========== ===================================================== ==================================
textgrid   Praat TextGrid, word tier (phones: read_textgrid_phones) ds003020 ``derivative/TextGrids``, Alice
gentle     gentle forced-aligner ``align.json``                    Narratives ``stimuli/gentle/*/``
words_tsv  a table with word, onset/start and offset/end columns   ds005574 ``stimuli/*/transcript.tsv``
events     BIDS ``events.tsv`` rows of one ``trial_type``           MEG-MASC (``word`` rows)
========== ===================================================== ==================================
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DatasetError
from .limits import MAX_ABS_SECONDS, check_table, check_text_size
from .storage import pointer_text

#: marks that are not words: silences, breaths, laughs, noise (Praat/MFA/P2FA/Huth-lab conventions)
SILENCE_LABELS = frozenset({"", "sp", "sil", "<sil>", "#", "{sl}", "{lg}", "{ns}", "{br}", "{ls}", "{sp}",
                            "br", "lg", "ls", "ns", "sentence_start", "sentence_end", "<s>", "</s>"})
COLUMNS = ["onset", "offset", "word"]


def _check_file(path: Path, key: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{key}: word-timing file not found")
    check_text_size(path, key, "word-timing file")
    if path.stat().st_size < 4096:
        pointer = pointer_text(path.read_bytes()[:1024])
        if pointer is not None:
            raise DatasetError(f"{key}: is a git-annex/LFS pointer, not word timings; fetch the file's content "
                               "(e.g. `datalad get`) or point the config at the real file")


def _finish(table: pd.DataFrame, key: str, offset: float, what: str = "words",
            bad_rows: str = "error") -> pd.DataFrame:
    """Validate, shift by `offset`, sort; the shared last step of every reader.

    A row whose onset/offset is not a finite number, or that ends before it starts, is an
    error naming the file and the row; with ``bad_rows="drop"`` such rows are dropped and
    counted in ``attrs["n_bad_rows"]``.
    """
    if bad_rows not in ("error", "drop"):
        raise ValueError(f"'bad_rows' must be error or drop; got {bad_rows!r}")
    if table.empty:
        raise DatasetError(f"{key}: holds no {what}; check the file, its format and the tier/column/trial_type")
    table = table.reset_index(drop=True)
    bad = np.zeros(len(table), dtype=bool)
    problems = []
    for col in ("onset", "offset"):
        values = pd.to_numeric(table[col], errors="coerce").astype(float)
        nonfinite = ~np.isfinite(values.to_numpy()) | (np.abs(values.to_numpy()) > MAX_ABS_SECONDS)
        if nonfinite.any():
            row = int(np.argmax(nonfinite))
            problems.append(f"row {row} ({table['word'].iloc[row]!r}) has a {col} that is not a time in "
                            f"seconds ({table[col].iloc[row]!r})")
        bad |= nonfinite
        table[col] = values + float(offset)
    backwards = (table["offset"] < table["onset"] - 1e-9).to_numpy() & ~bad
    if backwards.any():
        row = int(np.argmax(backwards))
        problems.append(f"row {row} ({table['word'].iloc[row]!r}) ends at {table['offset'].iloc[row] - offset:.3f} s "
                        f"before it starts at {table['onset'].iloc[row] - offset:.3f} s")
    bad |= backwards
    if bad.any() and bad_rows == "error":
        raise DatasetError(f"{key}: {int(bad.sum())} bad {what} row(s): {'; '.join(problems)}. Fix the file, or "
                           "set 'dataset.word_timings.bad_rows: drop' to leave such rows out")
    table = table[~bad].sort_values("onset", kind="stable").reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"{key}: no {what} left once bad rows are dropped; fix the file")
    table.attrs["source"] = key
    table.attrs["n_bad_rows"] = int(bad.sum())
    return table


def _tier(tg, tier: str, path_key: str, setting: str) -> str:
    """The tier named `tier`, matched exactly, else ignoring case and a plural 's'."""
    names = list(tg.tierNames)
    if tier in names:
        return tier
    norm = {n.strip().lower().rstrip("s"): n for n in names}
    found = norm.get(tier.strip().lower().rstrip("s"))
    if found is None:
        raise DatasetError(f"{path_key}: no tier {tier!r}; it has {names}. Set '{setting}' to one of them")
    return found


def _open_textgrid(path: Path, key: str):
    from praatio import textgrid

    _check_file(path, key)
    try:
        return textgrid.openTextgrid(str(path), includeEmptyIntervals=False, reportingMode="silence")
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad input file
        raise DatasetError(f"{key}: not a readable Praat TextGrid ({err}); check the file") from err


def read_textgrid_words(path: str | Path, tier: str = "word", offset: float = 0.0, *,
                        key: str | None = None, bad_rows: str = "error") -> pd.DataFrame:
    """Read the word tier of a Praat TextGrid (praatio), dropping silence marks.

    Parameters
    ----------
    path : the .TextGrid file (long or short text format).
    tier : name of the word tier (``word`` also finds ``words``/``Word``).
    offset : seconds added to every time (stimulus clock -> run clock).
    key : the name used in error messages (the dataset key); default the path.

    Returns
    -------
    DataFrame with columns onset, offset, word; one row per spoken word, sorted by onset.
    """
    path = Path(path)
    key = key or str(path)
    tg = _open_textgrid(path, key)
    name = _tier(tg, tier, key, "dataset.word_timings.tier")
    rows = [(float(e.start), float(e.end), e.label.strip())
            for e in tg.getTier(name).entries if e.label.strip().lower() not in SILENCE_LABELS]
    if not rows:
        raise DatasetError(f"{key}: tier {name!r} holds no words; check the file and the tier name")
    return _finish(pd.DataFrame(rows, columns=COLUMNS), key, offset, bad_rows=bad_rows)


def read_textgrid_phones(path: str | Path, tier: str = "phone", offset: float = 0.0, *,
                         key: str | None = None, bad_rows: str = "error") -> pd.DataFrame:
    """The phone tier of a TextGrid: columns onset, offset, phone (silences dropped)."""
    path = Path(path)
    key = key or str(path)
    tg = _open_textgrid(path, key)
    name = _tier(tg, tier, key, "dataset.word_timings.phone_tier")
    rows = [(float(e.start), float(e.end), e.label.strip())
            for e in tg.getTier(name).entries if e.label.strip().lower() not in SILENCE_LABELS]
    table = pd.DataFrame(rows, columns=["onset", "offset", "word"])
    return _finish(table, key, offset, what="phones", bad_rows=bad_rows).rename(columns={"word": "phone"})


def read_gentle_words(path: str | Path, offset: float = 0.0, *, unaligned: str = "interpolate",
                      key: str | None = None, bad_rows: str = "error") -> pd.DataFrame:
    """Read a gentle ``align.json`` (``{"words": [{"word", "case", "start", "end"}, ...]}``).

    Words gentle could not find in the audio (``case != "success"``) have no times. With
    ``unaligned="interpolate"`` (default) those between two aligned words share the gap between
    them evenly (language models then still see every word of the transcript); unaligned words
    before the first or after the last aligned word are dropped. ``"drop"`` drops them all,
    ``"error"`` refuses the file. The count is in ``table.attrs["n_unaligned"]``.
    """
    if unaligned not in ("interpolate", "drop", "error"):
        raise ValueError(f"'unaligned' must be interpolate, drop or error; got {unaligned!r}")
    path = Path(path)
    key = key or str(path)
    _check_file(path, key)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        entries = doc["words"]
        if not isinstance(entries, list):
            raise TypeError("'words' is not a list")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as err:
        raise DatasetError(f"{key}: not a gentle align.json ({type(err).__name__}: {err}); expected "
                           '{"words": [{"word": ..., "case": "success", "start": s, "end": s}, ...]}') from err
    words, onsets, offsets = [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DatasetError(f"{key}: words[{i}] is a JSON {type(e).__name__}, not an object "
                               '{"word": ..., "start": s, "end": s}; fix the file')
        word = str(e.get("word", "")).strip()
        if word.lower() in SILENCE_LABELS:
            continue
        ok = e.get("case") == "success" and e.get("start") is not None and e.get("end") is not None
        words.append(word)
        onsets.append(_gentle_time(e["start"]) if ok else np.nan)
        offsets.append(_gentle_time(e["end"]) if ok else np.nan)
    onset, end = np.array(onsets, dtype=float), np.array(offsets, dtype=float)
    missing = np.isnan(onset)
    if missing.any() and unaligned == "error":
        first = int(np.argmax(missing))
        raise DatasetError(f"{key}: {int(missing.sum())} words were not aligned by gentle (first: {words[first]!r}); "
                           "set 'dataset.word_timings.unaligned' to interpolate or drop")
    keep = ~missing
    if missing.any() and unaligned == "interpolate":
        i = 0
        while i < len(words):
            if not missing[i]:
                i += 1
                continue
            j = i
            while j < len(words) and missing[j]:
                j += 1
            if i > 0 and j < len(words):  # a gap between aligned words i-1 and j
                lo, hi = end[i - 1], max(onset[j], end[i - 1])
                edges = np.linspace(lo, hi, j - i + 1)
                onset[i:j], end[i:j] = edges[:-1], edges[1:]
                keep[i:j] = True
            i = j
    table = pd.DataFrame({"onset": onset[keep], "offset": end[keep], "word": np.array(words, dtype=object)[keep]})
    table = _finish(table, key, offset, bad_rows=bad_rows)
    table.attrs["n_unaligned"] = int(missing.sum())
    table.attrs["n_dropped"] = int((~keep).sum())
    return table


def _gentle_time(value) -> float:
    """A gentle start/end as a float; anything that is not a JSON number becomes Inf (a bad row, never
    mistaken for an unaligned word and interpolated)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return np.inf
    try:
        return float(value)
    except OverflowError:
        return np.inf


def _pick_column(table: pd.DataFrame, given: str | None, candidates: tuple[str, ...], key: str,
                 what: str) -> str | None:
    if given is not None:
        if given not in table.columns:
            raise DatasetError(f"{key}: no column {given!r} for the {what}; it has {list(table.columns)}")
        return given
    lower = {str(c).strip().lower(): c for c in table.columns}
    return next((lower[c] for c in candidates if c in lower), None)


def read_words_tsv(path: str | Path, offset: float = 0.0, *, word_column: str | None = None,
                   onset_column: str | None = None, offset_column: str | None = None,
                   duration_column: str | None = None, index_column: str | None = "word_idx",
                   sep: str = "\t", key: str | None = None, bad_rows: str = "error") -> pd.DataFrame:
    """Read a table of timed words (TSV; ``sep=","`` for CSV).

    Columns are found by name unless given: the word in ``word``/``words``/``token``/``text``,
    the onset in ``onset``/``start``/``word onset``, the offset in ``offset``/``end``/``word offset``
    (or ``onset + duration``). Tables with one row per token (ds005574's ``transcript.tsv``
    repeats a word once per model token) keep the first row of each ``index_column`` value.
    Rows without a word or an onset are dropped (counted in ``attrs["n_dropped"]``).
    """
    path = Path(path)
    key = key or str(path)
    _check_file(path, key)
    check_table(path, key, "word table", sep=sep)
    try:
        table = pd.read_csv(path, sep=sep, encoding="utf-8-sig", na_values=["n/a", ""], keep_default_na=False,
                            dtype=str)
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable table ({err})") from err
    wcol = _pick_column(table, word_column, ("word", "words", "token", "text", "label"), key, "word")
    ocol = _pick_column(table, onset_column, ("onset", "start", "word onset", "start_time", "tmin"), key, "onset")
    ecol = _pick_column(table, offset_column, ("offset", "end", "word offset", "end_time", "tmax", "stop"),
                        key, "offset")
    dcol = _pick_column(table, duration_column, ("duration",), key, "duration") if ecol is None else None
    if wcol is None or ocol is None or (ecol is None and dcol is None):
        raise DatasetError(f"{key}: cannot find the word, onset and offset (or duration) columns in "
                           f"{list(table.columns)}; name them in 'dataset.word_timings' (word_column, ...)")
    if index_column is not None and index_column in table.columns:
        table = table.drop_duplicates(index_column, keep="first")
    n_before = len(table)
    table = table[table[wcol].notna() & table[ocol].notna()]
    onset = pd.to_numeric(table[ocol], errors="coerce")
    if ecol is not None:
        end = pd.to_numeric(table[ecol], errors="coerce")
    else:
        end = onset + pd.to_numeric(table[dcol], errors="coerce")
    out = pd.DataFrame({"onset": onset.to_numpy(), "offset": end.to_numpy(),
                        "word": table[wcol].astype(str).str.strip().to_numpy()})
    out = out[~out["word"].str.lower().isin(SILENCE_LABELS)]
    out = _finish(out.reset_index(drop=True), key, offset, bad_rows=bad_rows)
    out.attrs["n_dropped"] = n_before - len(out)
    return out


def read_events_words(path: str | Path, offset: float = 0.0, *, trial_type: str = "word",
                      word_column: str = "word", story_column: str | None = "story",
                      key: str | None = None, bad_rows: str = "error") -> pd.DataFrame:
    """Word rows of a BIDS ``events.tsv`` (onset and duration on the recording's clock).

    Rows whose ``trial_type`` is `trial_type` are words; the word is in `word_column`. A
    ``story`` column, when present, is kept. Word rows with no word (``n/a``) are dropped and
    counted in ``attrs["n_dropped"]``.
    """
    path = Path(path)
    key = key or str(path)
    _check_file(path, key)
    check_table(path, key, "events.tsv")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a", ""], keep_default_na=False, dtype=str)
    except Exception as err:  # noqa: BLE001
        raise DatasetError(f"{key}: unreadable events.tsv ({err})") from err
    missing = [c for c in ("onset", "duration", "trial_type", word_column) if c not in table.columns]
    if missing:
        raise DatasetError(f"{key}: events.tsv lacks columns {missing} (it has {list(table.columns)}); "
                           "these events hold no word timings: choose another 'dataset.word_timings.format'")
    rows = table[table["trial_type"] == trial_type]
    n_rows = len(rows)
    rows = rows[rows[word_column].notna() & (rows[word_column].str.strip() != "")]
    onset = pd.to_numeric(rows["onset"], errors="coerce")
    out = pd.DataFrame({"onset": onset.to_numpy(),
                        "offset": (onset + pd.to_numeric(rows["duration"], errors="coerce")).to_numpy(),
                        "word": rows[word_column].str.strip().to_numpy()})
    if story_column and story_column in rows.columns:
        out["story"] = rows[story_column].to_numpy()
    if out.empty:
        types = sorted(table["trial_type"].dropna().unique().tolist())[:10]
        raise DatasetError(f"{key}: no events of trial_type {trial_type!r} with a {word_column!r}; its trial types "
                           f"are {types}. Set 'dataset.word_timings.trial_type'")
    out = _finish(out, key, offset, bad_rows=bad_rows)
    out.attrs["n_dropped"] = n_rows - len(out)
    return out


READERS = {"textgrid": read_textgrid_words, "gentle": read_gentle_words, "words_tsv": read_words_tsv,
           "events": read_events_words}


def read_word_timings(path: str | Path, format: str, offset: float = 0.0, *, key: str | None = None,
                      **options) -> pd.DataFrame:
    """Dispatch on `format` (see the module table); `options` go to that reader."""
    reader = READERS.get(format)
    if reader is None:
        raise ValueError(f"unknown word-timing format {format!r}; valid: {', '.join(READERS)}")
    return reader(path, offset=offset, key=key, **options)
