"""Windows to features with little work between forward passes: tokens, target positions, pipelined copies.

The strided extractor runs many windows whose words overlap. Three things used to cost more
than the model itself on a GPU (``bench/results/features-gpu.md``: strided 4-7x one pass for
GPT-2-small, where the windows hold each token about twice):

* **Tokens.** Each window was tokenized on its own, so every word was tokenized twice.
  :func:`tokenize_windows` tokenizes the story's words once and assembles each window from
  them (with the tokenizer's own special tokens), after checking on sample windows that the
  result is exactly what the tokenizer gives; where it is not (a tokenizer whose tokens of a
  word depend on its place in the window), every window is tokenized as before.
* **Target positions.** The tokens of each target word were found with one array scan per
  word; :func:`target_positions` finds all of a window's at once.
* **Copies.** Each batch's features were copied to the host before the next batch started,
  so the GPU waited for the copy and for Python. :func:`run_windows` queues the next batch
  first, then copies the previous one's features on a stream of their own, into a pinned
  buffer kept between batches, and writes them while the GPU computes. (Profiled on an H200
  for one layer of a 7B model over 4,000 words: the copy into pageable memory took 24 ms of
  the 50 ms by which the extractor trailed one pass.)

The features are the same numbers as before (``tests/test_lm_batches.py`` compares them).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.errors import ModelError
from pipelines.features.layer_taps import hidden_states_to
from pipelines.features.lm_windows import LoadedModel, Window, batch_inputs, length_batches, tokenize_window

__all__ = ["story_word_tokens", "tokenize_windows", "target_positions", "run_windows"]

#: Words per tokenizer call (keeps each call under the tokenizer's length warning).
_CHUNK = 256
#: Words of a window compared with the tokenizer's own tokens before the story's tokens are trusted.
_PROBE = 64


def story_word_tokens(lm: LoadedModel, words: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each word, as the extractor's pre-split tokenization gives them (no special tokens).

    Returns
    -------
    flat : np.ndarray of int64
        Every word's tokens, one word after the other.
    offsets : np.ndarray of int64, shape (n_words + 1,)
        Word ``i``'s tokens are ``flat[offsets[i]:offsets[i + 1]]``.
    """
    flat, counts = [], np.zeros(len(words), dtype=np.int64)
    for lo in range(0, len(words), _CHUNK):
        enc = lm.tokenizer(list(words[lo : lo + _CHUNK]), is_split_into_words=True, add_special_tokens=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        wids = np.array([-1 if w is None else w for w in enc.word_ids()], dtype=np.int64)
        keep = wids >= 0
        order = np.argsort(wids[keep], kind="stable")  # words in order (they are), each word's tokens in order
        flat.append(ids[keep][order])
        counts[lo : lo + _CHUNK] = np.bincount(wids[keep], minlength=min(_CHUNK, len(words) - lo))
    return (np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))


def _template(lm: LoadedModel, words: list[str]) -> tuple[list[int], list[int]] | None:
    """The special tokens before and after a window's words, from the tokenizer itself."""
    ids, wids, _ = tokenize_window(lm, words[:2])
    pos = [k for k, w in enumerate(wids) if w is not None]
    if not pos:
        return None
    return ids[: pos[0]], ids[pos[-1] + 1 :]


def _assemble(win: Window, start: int, tokens: tuple[np.ndarray, np.ndarray], head: list[int], tail: list[int]
              ) -> tuple[list[int], list[int | None]]:
    flat, offsets = tokens
    n = len(win.words)
    body = flat[offsets[start] : offsets[start + n]]
    wids = np.repeat(np.arange(n), np.diff(offsets[start : start + n + 1]))
    return head + body.tolist() + tail, [None] * len(head) + wids.tolist() + [None] * len(tail)


def tokenize_windows(lm: LoadedModel, words: list[str], windows: list[Window],
                     tokens: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> list[tuple[list[int], list[int | None], bool]]:
    """``tokenize_window`` of every window, assembled from the story's words tokenized once.

    Parameters
    ----------
    windows : list of Window
        Each window's words are ``words[win.start : win.start + len(win.words)]`` (a window
        without ``start`` sends every window to the tokenizer).
    tokens : (flat, offsets), optional
        :func:`story_word_tokens` of ``words`` when the caller has them already (the window
        plan is made from them), so the story is tokenized once.

    Returns
    -------
    list of (ids, word_ids, truncated), one per window
        Identical to :func:`~pipelines.features.lm_windows.tokenize_window` on each window:
        checked on the first words of the first, second and last window (any window that
        would be truncated is tokenized by the tokenizer); if the check fails, every window is.
    """
    if not windows:
        return []
    template = _template(lm, words)
    if template is not None and all(win.start is not None for win in windows):
        word_tokens = tokens if tokens is not None else story_word_tokens(lm, words)
        head, tail = template
        fast = []
        for win in windows:
            ids, wids = _assemble(win, int(win.start), word_tokens, head, tail)
            fast.append(None if len(ids) > lm.max_tokens else (ids, wids, False))
        # checked on the first words of three windows (where a word's place in the window could matter)
        for k in sorted({0, min(1, len(windows) - 1), len(windows) - 1}):
            win = windows[k]
            part = Window(words=win.words[:_PROBE], targets=[], dest=[], start=win.start)
            if _assemble(part, int(win.start), word_tokens, head, tail) != tokenize_window(lm, part.words)[:2]:
                break
        else:
            return [tokenize_window(lm, win.words) if got is None else got for got, win in zip(fast, windows)]
    return [tokenize_window(lm, win.words) for win in windows]


def target_positions(wids: Sequence[int | None], targets: Sequence[int], pooling: str
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of a window's target words, and which target each belongs to.

    Parameters
    ----------
    wids : sequence of int or None, length n_tokens
        The window's word of each token (None for special tokens).
    targets : sequence of int, length n_targets
        Local word indices whose features the window gives.
    pooling : {"last", "mean"}
        ``last``: one position per target (its last token); ``mean``: all its tokens.

    Returns
    -------
    positions, slots : np.ndarray of int
        ``slots[k]`` is the index into ``targets`` of the word at token ``positions[k]``.
        ValueError (a word without tokens) names the first target with none.
    """
    w = np.fromiter((-1 if x is None else x for x in wids), dtype=np.int64, count=len(wids))
    tg = np.asarray(targets, dtype=np.int64)
    slot_of = np.full(int(max(w.max(initial=-1), tg.max(initial=-1))) + 2, -1, dtype=np.int64)
    slot_of[tg] = np.arange(tg.size)
    slots_all = slot_of[w]  # -1 (index -1 of slot_of) for special tokens and non-targets
    keep = slots_all >= 0
    if pooling == "last":
        nxt = np.append(w[1:], -2)
        keep &= w != nxt
    positions = np.flatnonzero(keep)
    slots = slots_all[positions]
    order = np.argsort(slots, kind="stable")  # targets in the order given, each word's tokens in order
    positions, slots = positions[order], slots[order]
    if np.unique(slots).size != tg.size:
        missing = np.setdiff1d(np.arange(tg.size), slots)[0]
        raise ValueError(int(missing))
    return positions, slots


def run_windows(
    lm: LoadedModel,
    windows: list[Window],
    tokenized: list[tuple[list[int], list[int | None]]],
    hs_index: list[int],
    write: Callable[[np.ndarray, list[int]], None],
    batch_size: int,
    pooling: str,
    batch_tokens: int,
) -> None:
    """Run the model on windows (right-padded batches) and hand on the pooled features.

    ``write(values, dests)`` receives each batch's float32 features, shape
    (len(hs_index), len(dests), hidden_size), for the word rows ``dests``. Only the target
    words' tokens are gathered (and mean-pooled) on the model's device and copied to the
    host, in one transfer per batch: context tokens never leave the GPU. On a GPU the copy
    of a batch runs while the next batch is computed.
    """
    import torch  # heavy and optional: imported only when a model runs

    plans = []
    for win, (ids, wids) in zip(windows, tokenized):
        try:
            pos, slots = target_positions(wids, win.targets, pooling)
        except ValueError as err:
            word = win.words[win.targets[int(err.args[0])]]
            raise ModelError(f"word {word!r} has no tokens in model {lm.name!r}: "
                             "check the word list for empty entries") from None
        plans.append((pos, slots))
    copier = torch.cuda.Stream() if str(lm.device).startswith("cuda") else None
    pending: tuple[Any, Any, list[int]] | None = None
    for chunk in length_batches([len(t[0]) for t in tokenized], batch_size, batch_tokens):
        hidden = hidden_states_to(lm, batch_inputs(lm, [tokenized[k][0] for k in chunk]), hs_index)
        rows, pos, slots, dests = [], [], [], []
        for row, k in enumerate(chunk):
            p, s = plans[k]
            rows.append(np.full(p.size, row))
            pos.append(p)
            slots.append(s + len(dests))
            dests.extend(windows[k].dest)
        picked = _gather(torch, hidden, np.concatenate(rows), np.concatenate(pos),
                         np.concatenate(slots), len(dests), pooling)
        del hidden
        event = None
        if copier is not None:
            event = torch.cuda.Event()
            event.record()
        if pending is not None:  # the previous batch leaves the GPU while this one is computed
            _deliver(torch, pending, copier, write)
        pending = (picked, event, dests)
    if pending is not None:
        _deliver(torch, pending, copier, write)


def _gather(torch: Any, hidden: list[Any], r_np: np.ndarray, p_np: np.ndarray,
            s_np: np.ndarray, n_dest: int, pooling: str) -> Any:
    """The batch's target features, float32 on the first hidden state's device, shape (len(hidden), n_dest, width)."""
    device = hidden[0].device
    idx = {}  # per device: a sharded model (device_map) leaves its layers on several GPUs
    for hs in hidden:
        if hs.device not in idx:
            idx[hs.device] = (torch.from_numpy(r_np).to(hs.device), torch.from_numpy(p_np).to(hs.device))
    with torch.inference_mode():
        # (L, n_tok, H), float32 whatever the model computes in
        picked = torch.stack([hs[idx[hs.device]].to(device).float() for hs in hidden])
        if pooling == "mean":
            s_idx = torch.from_numpy(s_np).to(device)
            counts = torch.bincount(s_idx, minlength=n_dest).to(picked.dtype)
            summed = picked.new_zeros((picked.shape[0], n_dest, picked.shape[2])).index_add_(1, s_idx, picked)
            picked = summed / counts[None, :, None]
        return picked


#: A pinned host buffer kept between batches and stories (a copy from the GPU into pageable memory
#: runs at a few GB/s and blocks; into pinned memory it runs at the bus's speed). Grown to the
#: largest batch up to this many bytes; a larger batch gets a pinned buffer of its own.
PINNED_MAX_BYTES = 2 * 1024**3
_PINNED = threading.local()  # one buffer per thread: two threads extracting at once never share one


def _pinned(torch: Any, n: int) -> Any:
    buf = getattr(_PINNED, "buf", None)
    if buf is not None and buf.numel() >= n:
        return buf[:n]
    fresh = torch.empty(n, dtype=torch.float32, pin_memory=True)
    if n * 4 <= PINNED_MAX_BYTES:
        _PINNED.buf = fresh
    return fresh


def _deliver(torch: Any, pending: tuple[Any, Any, list[int]], copier: Any,
             write: Callable[[np.ndarray, list[int]], None]) -> None:
    """Copy a batch's features to the host (on the copy stream, after its gather) and write them."""
    picked, event, dests = pending
    if copier is None:
        write(picked.numpy(), dests)
        return
    host = _pinned(torch, picked.numel()).view(picked.shape)
    with torch.cuda.stream(copier):
        copier.wait_event(event)
        host.copy_(picked, non_blocking=True)
        done = torch.cuda.Event()
        done.record(copier)
    picked.record_stream(copier)
    done.synchronize()  # this thread waits for the copy; the compute stream runs the next batch
    write(host.numpy(), dests)  # written out (copied) before the buffer serves the next batch
