"""Windows of words for a transformer language model: input checks, tokens, batches, one forward pass.

Shared by :mod:`pipelines.features.language_model` (hidden-state features) and
:mod:`pipelines.features.lexical` (surprisal), and by :mod:`pipelines.features.speech_model`
for its layer indices. A *window* is a run of consecutive words given to the model together;
windows are tokenized as pre-split words (``is_split_into_words``), grouped by length under a
token budget, right-padded and run in one forward pass per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipelines.errors import ModelError

__all__ = [
    "POOLINGS",
    "LoadedModel",
    "Window",
    "check_words",
    "check_extraction_args",
    "layer_indices",
    "tokenize_window",
    "tokens_per_batch",
    "length_batches",
    "pad_token_id",
    "batch_inputs",
    "forward_batch",
    "strided_plan",
]

#: How a word's sub-tokens become one vector: its last sub-token, or their mean.
POOLINGS = ("last", "mean")


@dataclass
class LoadedModel:
    """A tokenizer and model ready for feature extraction.

    Attributes
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
        Fast tokenizer (needed for ``word_ids()``).
    model : torch.nn.Module
        Base model in eval mode, in ``runtime.dtype``, on ``device`` (or sharded).
    is_causal : bool
        True for decoder-only models (each token sees only earlier tokens).
    n_layers : int
        Number of transformer layers; hidden states are indexed ``0..n_layers``.
    hidden_size : int
        Width of each hidden state.
    name : str
        The ``model`` argument as given (folder or hub id).
    max_tokens : int
        Longest token sequence one window may hold.
    device : str
        Torch device a batch's inputs go to (the model's embeddings).
    head : {"base", "causal_lm"}
        ``"causal_lm"`` when the model also returns next-token logits (for surprisal).
    runtime : pipelines.features.model_runtime.ModelRuntime, optional
        dtype, quantization, device and sharding the model was loaded with.
    """

    tokenizer: Any
    model: Any
    is_causal: bool
    n_layers: int
    hidden_size: int
    name: str
    max_tokens: int = 512
    device: str = "cpu"
    head: str = "base"
    runtime: Any = None
    #: hooks that stop a pass at the deepest layer asked for (:mod:`pipelines.features.layer_taps`);
    #: None until the first batch, WholePasses when this model must be run whole
    layer_taps: Any = field(default=None, repr=False, compare=False)


def check_words(words: Sequence[str]) -> list[str]:
    """The words as a list, each a non-empty string, else ValueError.

    Parameters
    ----------
    words : sequence of str, length n_words

    Returns
    -------
    list of str, length n_words
    """
    if isinstance(words, str):
        raise ValueError("words must be a sequence of words, not one string: split it first")
    words = list(words)
    if not words:
        raise ValueError("words is empty: give at least one word")
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"words[{i}] = {w!r} is not a non-empty string: remove empty/silence entries")
    return words


def check_extraction_args(context_words: int, batch_size: int, pooling: str) -> None:
    """ValueError unless ``context_words >= 0``, ``batch_size >= 1`` (integers) and ``pooling`` is in POOLINGS."""
    if isinstance(context_words, bool) or not isinstance(context_words, (int, np.integer)) or context_words < 0:
        raise ValueError(f"context_words = {context_words!r} must be an integer >= 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be an integer >= 1")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is unknown: use one of {', '.join(POOLINGS)}")


def layer_indices(layers: Sequence[int], lm: LoadedModel) -> list[int]:
    """Map user layer indices to positions in ``hidden_states`` (0..n_layers).

    Parameters
    ----------
    layers : sequence of int, length n_requested
        0 = embeddings, 1..n_layers, or negative from the end.
    lm : LoadedModel

    Returns
    -------
    list of int, length n_requested
        Indices into ``hidden_states``, each in ``0..lm.n_layers``; ModelError for any out of range.
    """
    if isinstance(layers, (int, np.integer)):
        raise ModelError(f"layers = {layers!r} must be a list of layer indices, e.g. [{layers}]")
    layers = list(layers)
    if not layers:
        raise ModelError("layers is empty: give at least one layer index")
    n = lm.n_layers
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -(n + 1) <= layer <= n:
            raise ModelError(
                f"layer {layer!r} is out of range for model {lm.name!r}: valid layers are "
                f"0..{n} (0 = embeddings) or -{n + 1}..-1"
            )
        out.append(int(layer) % (n + 1))
    return out


@dataclass
class Window:
    """Words given to the model together, and the (local) word positions whose features it provides."""

    words: list[str]
    targets: list[int]  # local indices into ``words``
    dest: list[int]  # global word indices the targets fill
    start: int | None = None  # global index of ``words[0]`` (lets the story be tokenized once)


def tokenize_window(lm: LoadedModel, words: list[str]) -> tuple[list[int], list[int | None], bool]:
    """Token ids and word ids of one window, left-truncated to ``lm.max_tokens``.

    Returns
    -------
    ids : list of int, length n_tokens
    word_ids : list of int or None, length n_tokens
        The window's word each token belongs to (None for special tokens).
    truncated : bool
        Whether the oldest word tokens were dropped.
    """
    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    wids = list(enc.word_ids())
    if all(w is None for w in wids):
        raise ModelError(f"the tokenizer of model {lm.name!r} gives no tokens for the words {' '.join(words[:5])!r}: "
                         "its tokenizer files do not fit the tokenizer class transformers picks for its model_type; "
                         "save the tokenizer with the model's own tokenizer class")
    if len(ids) <= lm.max_tokens:
        return ids, wids, False
    word_pos = [k for k, w in enumerate(wids) if w is not None]
    if not word_pos:
        return ids[: lm.max_tokens], wids[: lm.max_tokens], True
    first, last = word_pos[0], word_pos[-1]
    head, body, tail = slice(0, first), slice(first, last + 1), slice(last + 1, None)
    keep = lm.max_tokens - (first + len(ids) - last - 1)
    if keep < 1:
        raise ModelError(f"model {lm.name!r} accepts only {lm.max_tokens} tokens: too few for its special tokens")
    body_ids, body_wids = ids[body][-keep:], wids[body][-keep:]
    return ids[head] + body_ids + ids[tail], wids[head] + body_wids + wids[tail], True


def tokens_per_batch(lm: LoadedModel, batch_tokens: int | None) -> int:
    """The padded-token budget of one forward pass: ``batch_tokens``, else 16384 on a GPU and 1024 on a CPU."""
    if batch_tokens is None:
        return 16384 if str(lm.device).startswith("cuda") else 1024
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, (int, np.integer)) or batch_tokens < 1:
        raise ValueError(f"batch_tokens = {batch_tokens!r} must be an integer >= 1 (tokens per forward pass)")
    return int(batch_tokens)


def length_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int,
                   max_padding: float = 0.25) -> list[list[int]]:
    """Group sequences of similar length: at most ``batch_size`` rows and ``batch_tokens`` padded tokens.

    A sequence longer than ``batch_tokens`` gets a batch of its own. A row that would make
    more than ``max_padding`` of the batch's padded tokens padding starts a new batch: a
    large model is compute-bound, and padding is computed like any token (two windows of
    4,096 and 1,300 tokens batched together cost 8,192).

    Parameters
    ----------
    lengths : sequence of int, length n_seqs

    Returns
    -------
    list of list of int
        Indices into ``lengths``, one list per batch; every index appears once.
    """
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for k in order:  # ascending length: the new row is the widest of its batch
        padded = (len(current) + 1) * lengths[k]
        if current and (len(current) >= batch_size or padded > batch_tokens
                        or padded - real - lengths[k] > max_padding * padded):
            batches.append(current)
            current, real = [], 0
        current.append(k)
        real += lengths[k]
    if current:
        batches.append(current)
    return batches


def pad_token_id(lm: LoadedModel) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS token, else 0."""
    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    return int(pad_id)


def batch_inputs(lm: LoadedModel, seqs: list[list[int]]) -> dict[str, Any]:
    """Right-padded ``input_ids`` (and an ``attention_mask`` when rows differ in length) on the model's device.

    Parameters
    ----------
    seqs : list of n_seqs lists of token ids
        Padded to ``(n_seqs, max length)``.
    """
    import torch  # heavy and optional: imported only when a model runs

    width = max(len(seq) for seq in seqs)
    ids = torch.full((len(seqs), width), pad_token_id(lm), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    # no padding, no mask: the model then takes its plain (flash) attention path, as one pass does
    unpadded = all(len(seq) == width for seq in seqs)
    return {"input_ids": ids.to(lm.device), "attention_mask": None if unpadded else mask.to(lm.device)}


def forward_batch(lm: LoadedModel, seqs: list[list[int]]) -> Any:
    """One forward pass on right-padded sequences (:func:`batch_inputs`); returns the model output (hidden states on)."""
    import torch  # heavy and optional: imported only when a model runs

    with torch.inference_mode():
        return lm.model(**batch_inputs(lm, seqs), output_hidden_states=True)


def strided_plan(n_words: int, context_words: int, word_tokens: np.ndarray | None = None,
                 max_tokens: int | None = None, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows of the strided scheme as ``(start, first_target, end)``: words ``start .. end - 1``
    are read, words ``first_target .. end - 1`` get their features from this window.

    Without a token limit every window after the first reads ``context_words + stride`` words.
    With ``word_tokens``/``max_tokens`` the stride of a window is shortened so that its words
    fit in ``max_tokens`` (never below one new word).

    Parameters
    ----------
    word_tokens : array of int, shape (n_words,), optional
        Tokens per word (:func:`pipelines.features.language_model.word_token_counts`).
    """
    c = int(context_words)
    stride = max(c, 1) if stride is None else int(stride)
    cum = None
    if word_tokens is not None and max_tokens is not None:
        cum = np.concatenate([[0], np.cumsum(np.asarray(word_tokens, dtype=np.int64))])
    plan = []
    first = 0
    while first < n_words:
        start = max(0, first - c)
        end = min(n_words, start + c + stride) if first < c + stride else min(n_words, first + stride)
        if cum is not None:
            # largest end such that words start .. end - 1 fit in max_tokens (at least first + 1)
            fit = int(np.searchsorted(cum, cum[start] + max_tokens, side="right")) - 1
            end = max(first + 1, min(end, fit))
        plan.append((start, first, end))
        first = end
    return plan
