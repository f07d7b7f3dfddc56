"""Lexical and sub-lexical features: phoneme rate, word frequency, surprisal.

* :func:`read_phones` / :func:`phoneme_rate_values`: one event per phone of a TextGrid phone
  tier (praatio), silences dropped; each phone gets the value 1, so Lanczos resampling gives
  a smoothed count of phones per TR (as word rate does for words).
* :func:`word_frequency_values`: Zipf frequency of each word (``log10`` of its frequency per
  billion words, 0 for a word the list does not know) from the ``wordfreq`` package's
  corpus-based lists (Speer, 2022; data up to 2021). Not from a model's tokenizer.
* :func:`word_surprisal`: ``-log2 P(word | preceding words)`` under a causal language model,
  summed over the word's tokens, with the same strided windows as
  :func:`pipelines.features.language_model.extract_word_features`: word ``i`` is predicted
  from ``causal_window_starts(...)[i] .. i - 1``. Every window starts with the model's BOS
  token (or its EOS token when it has no BOS, as GPT-2), so the story's first word is
  predicted too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipelines.errors import DatasetError, ModelError
from pipelines.features.language_model import (
    LoadedModel,
    load_language_model,
    strided_window_starts,
    word_token_counts,
)
from pipelines.features.lm_windows import (
    check_extraction_args,
    check_words,
    forward_batch,
    length_batches,
    strided_plan,
    tokens_per_batch,
)

__all__ = [
    "PHONE_SILENCE_LABELS",
    "read_phones",
    "phoneme_rate_values",
    "word_frequency_values",
    "word_surprisal",
    "surprisal_window_starts",
    "word_surprisal_per_word",
]

#: Labels of a phone tier that are not phones (silence, pauses, spoken noise).
PHONE_SILENCE_LABELS = frozenset({"", "sp", "sil", "spn", "{sl}", "{lg}", "{ns}", "<sil>", "#", "<unk>", "noise"})


def read_phones(path: str | Path, tier: str | None = None, offset: float = 0.0) -> pd.DataFrame:
    """Read the phone tier of a Praat TextGrid, dropping silences.

    Parameters
    ----------
    path : str or Path
        The ``.TextGrid`` file (Montreal Forced Aligner, Gentle/P2FA, Praat...).
    tier : str, optional
        Name of the phone tier; by default the only tier whose name contains "phone"
        (``phones`` in MFA output, ``phone`` elsewhere).
    offset : float
        Seconds added to every time (stimulus clock -> run clock).

    Returns
    -------
    pandas.DataFrame
        Columns ``onset``, ``offset``, ``phone``; one row per phone, sorted by onset.

    Raises
    ------
    DatasetError
        Unreadable file, no such tier (the message lists the tiers), or no phones in it.
    """
    from praatio import textgrid

    path = Path(path)
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad input file
        raise DatasetError(f"{path}: not a readable Praat TextGrid ({err}); check the file") from err
    names = list(tg.tierNames)
    if tier is None:
        found = [n for n in names if "phone" in n.lower()]
        if len(found) != 1:
            raise DatasetError(f"{path}: cannot tell the phone tier among {names}; set the feature's 'tier'")
        tier = found[0]
    if tier not in names:
        raise DatasetError(f"{path}: no tier {tier!r}; it has {names}. Set the feature's 'tier' to one of them")
    rows = [(float(e.start) + offset, float(e.end) + offset, e.label.strip())
            for e in tg.getTier(tier).entries if e.label.strip().lower() not in PHONE_SILENCE_LABELS]
    if not rows:
        raise DatasetError(f"{path}: tier {tier!r} holds no phones; check the file and the tier name")
    phones = pd.DataFrame(rows, columns=["onset", "offset", "phone"]).sort_values("onset", kind="stable")
    return phones.reset_index(drop=True)


def phoneme_rate_values(phones: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One event per phone, at its midpoint, with the value 1.

    Parameters
    ----------
    phones : pandas.DataFrame
        Columns ``onset``, ``offset`` (seconds), as :func:`read_phones` returns.

    Returns
    -------
    values : np.ndarray, shape (n_phones, 1), float32
        All ones.
    times : np.ndarray, shape (n_phones,)
        Phone midpoints, seconds, non-decreasing.
    """
    if len(phones) == 0:
        raise ValueError("phones is empty: give at least one phone")
    times = ((phones["onset"].to_numpy(np.float64) + phones["offset"].to_numpy(np.float64)) / 2.0)
    order = np.argsort(times, kind="stable")
    return np.ones((len(phones), 1), dtype=np.float32), times[order]


def word_frequency_values(words: Sequence[str], language: str = "en", wordlist: str = "best") -> np.ndarray:
    """Zipf frequency of each word from the ``wordfreq`` lists.

    Parameters
    ----------
    words : sequence of str
        The story's words.
    language : str
        Language code of the words (``"en"``, ``"fr"``, ``"nl"``...).
    wordlist : {"best", "large", "small"}
        Which wordfreq list to read (``"best"``: the largest available for the language).

    Returns
    -------
    np.ndarray, shape (n_words, 1), float32
        Zipf values: ``log10`` of the frequency per billion words (about 7.7 for "the",
        3 for a word seen once per million words); 0 when the list does not know the word.

    Raises
    ------
    ModelError
        ``wordfreq`` is not installed, or has no list for ``language``.
    """
    try:
        from wordfreq import available_languages, zipf_frequency
    except ImportError as err:
        raise ModelError("word_frequency needs the 'wordfreq' package: pip install wordfreq==3.1.1") from err
    if wordlist not in ("best", "large", "small"):
        raise ValueError(f"wordlist = {wordlist!r} is unknown: use 'best', 'large' or 'small'")
    langs = available_languages(wordlist)
    if language not in langs:
        raise ModelError(f"wordfreq has no {wordlist!r} list for language {language!r}; it has {sorted(langs)}")
    if isinstance(words, str):
        raise ValueError("words must be a sequence of words, not one string: split it first")
    words = list(words)
    if not words:
        raise ValueError("words is empty: give at least one word")
    cache: dict[str, float] = {}
    out = np.empty((len(words), 1), dtype=np.float32)
    for i, w in enumerate(words):
        if w not in cache:
            cache[w] = float(zipf_frequency(str(w), language, wordlist=wordlist))
        out[i, 0] = cache[w]
    return out


# --------------------------------------------------------------------------- surprisal


def _bos_id(lm) -> int:
    tok = lm.tokenizer
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ModelError(f"model {lm.name!r} has neither a BOS nor an EOS token to start a window with: "
                     "surprisal needs one to predict a window's first word")


def _load_causal_lm(model, revision):
    if isinstance(model, LoadedModel):
        if model.head != "causal_lm":
            raise ModelError(f"model {model.name!r} was loaded without its language-modelling head: load it with "
                             "load_language_model(..., head='causal_lm')")
        return model
    return load_language_model(model, revision=revision, head="causal_lm")


def _surprisal_windows(lm, words: list[str], windows: list[tuple[int, list[int]]], batch_size: int,
                       batch_tokens: int | None, n_rows: int, dest_rows: list[list[int]]) -> np.ndarray:
    """Surprisal (bits) of the target words of each window ``(start, targets)``.

    A window reads ``[BOS] + words[start .. max(targets)]``, left-truncated to the model's limit.
    """
    import torch  # heavy and optional: imported only when a model runs

    bos = _bos_id(lm)
    seqs: list[list[int]] = []
    wids_all: list[np.ndarray] = []
    for start, targets in windows:
        chunk = words[start : max(targets) + 1]
        enc = lm.tokenizer(chunk, is_split_into_words=True, add_special_tokens=False)
        ids = list(enc["input_ids"])
        wids = np.array([-1 if w is None else w + start for w in enc.word_ids()], dtype=np.int64)
        room = lm.max_tokens - 1
        if len(ids) > room:  # keep the most recent tokens
            ids, wids = ids[-room:], wids[-room:]
            if any(t not in wids for t in targets):
                raise ModelError(f"word {words[targets[0]]!r} alone exceeds the {lm.max_tokens} tokens model "
                                 f"{lm.name!r} accepts: split it")
        seqs.append([bos] + ids)
        wids_all.append(np.concatenate([[-1], wids]))
    out = np.zeros(n_rows, dtype=np.float64)
    for chunk_idx in length_batches([len(s) for s in seqs], batch_size, tokens_per_batch(lm, batch_tokens)):
        result = forward_batch(lm, [seqs[k] for k in chunk_idx])
        with torch.inference_mode():
            logp = torch.log_softmax(result.logits.float(), dim=-1)
            for row, k in enumerate(chunk_idx):
                seq = torch.tensor(seqs[k][1:], dtype=torch.long, device=logp.device)
                # token p (p >= 1) is predicted by the logits at p - 1
                tok_lp = logp[row, : len(seqs[k]) - 1].gather(1, seq[:, None])[:, 0].cpu().numpy()
                wids = wids_all[k][1:]
                for target, dest in zip(windows[k][1], dest_rows[k]):
                    out[dest] = -tok_lp[wids == target].sum() / np.log(2.0)
    return out


def word_surprisal(
    words: Sequence[str],
    model,
    context_words: int,
    *,
    revision: str | None = None,
    batch_size: int = 32,
    batch_tokens: int | None = None,
) -> np.ndarray:
    """Surprisal of each word given its preceding words under a causal LM, in bits.

    Uses the strided windows of :func:`pipelines.features.language_model.extract_word_features`
    (each token through the model about twice); word ``i`` is predicted from words
    ``causal_window_starts(words, model, context_words)[i] .. i - 1``, after a BOS token.

    Parameters
    ----------
    words : sequence of str, length n_words
    model : str or LoadedModel
        Folder or hub id of a causal LM with its head, or a model loaded with
        ``load_language_model(..., head="causal_lm")``.
    context_words : int
        Minimum number of preceding words each word is predicted from.
    revision : str, optional
    batch_size : int
        Most windows per forward pass.
    batch_tokens : int, optional
        Most padded tokens per forward pass (default 1024 on a CPU, 16384 on a GPU).

    Returns
    -------
    np.ndarray, shape (n_words, 1), float32
        ``-log2 P(word_i | context)``, the sum over the word's tokens.

    Raises
    ------
    ValueError
        Bad words or arguments.
    ModelError
        Not a causal LM, no BOS/EOS token, or a model that cannot be loaded.
    """
    words = check_words(words)
    check_extraction_args(context_words, batch_size, "last")
    lm = _load_causal_lm(model, revision)
    counts, _ = word_token_counts(words, lm)
    plan = strided_plan(len(words), int(context_words), counts, lm.max_tokens - 1)
    windows = [(s, list(range(f, e))) for s, f, e in plan]
    values = _surprisal_windows(lm, words, windows, batch_size, batch_tokens, len(words), [w[1] for w in windows])
    return values[:, None].astype(np.float32)


def surprisal_window_starts(words: Sequence[str], model, context_words: int, *,
                            revision: str | None = None) -> np.ndarray:
    """First word each word is predicted from in :func:`word_surprisal` (one BOS token less room)."""
    words = check_words(words)
    lm = _load_causal_lm(model, revision)
    counts, _ = word_token_counts(words, lm)
    return strided_window_starts(len(words), int(context_words), word_tokens=counts, max_tokens=lm.max_tokens - 1)


def word_surprisal_per_word(
    words: Sequence[str],
    model,
    window_starts: Sequence[int] | np.ndarray,
    *,
    revision: str | None = None,
    batch_size: int = 32,
    batch_tokens: int | None = None,
) -> np.ndarray:
    """Reference surprisal: one window ``[BOS] + words[window_starts[i] .. i]`` per word.

    Returns
    -------
    np.ndarray, shape (n_words, 1), float32
    """
    words = check_words(words)
    starts = np.asarray(window_starts)
    n = len(words)
    if starts.shape != (n,) or np.any(starts < 0) or np.any(starts > np.arange(n)):
        raise ValueError("window_starts must hold one start per word with 0 <= window_starts[i] <= i")
    lm = _load_causal_lm(model, revision)
    windows = [(int(starts[i]), [i]) for i in range(n)]
    values = _surprisal_windows(lm, words, windows, batch_size, batch_tokens, n, [[i] for i in range(n)])
    return values[:, None].astype(np.float32)
