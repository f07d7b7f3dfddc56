"""Word-level features from the hidden states of a transformer language model.

A story is a sequence of words. Each word gets, for every requested layer, the hidden
state of its tokens when the model reads the word together with the words just before it
(its *context*). Two extraction schemes:

* **Per word** (:func:`extract_word_features_per_word`): one model window per word,
  ``words[start_i .. i]`` with ``start_i = max(0, i - context_words)``. Exact, but every token
  passes through the model ``context_words + 1`` times. Used for masked (bidirectional)
  models, whose features would otherwise see future words, and as the reference.
* **Strided** (causal models, inside :func:`extract_word_features`): overlapping windows
  of ``context_words + stride`` words, ``stride = max(context_words, 1)``, starting every
  ``stride`` words; features are kept only for the last ``stride`` words of each window (the
  first window keeps all its words). A causal model never looks ahead, so word ``i`` sees
  exactly the words ``start .. i`` of its window: between ``context_words`` and
  ``context_words + stride - 1`` (i.e. ``2 * context_words - 1``) preceding words, or all words
  from the story start when fewer exist. Each token passes through the model about twice.
  :func:`strided_window_starts` gives the visible start of every word, so the per-word
  reference can reproduce the strided features exactly.

Windows longer than the model accepts (``max_position_embeddings`` / the tokenizer's
``model_max_length``) are truncated from the left: the oldest word tokens are dropped, the
special tokens the tokenizer adds ([CLS], [SEP], BOS) are kept. In the strided scheme a window
that would need truncation is replaced by per-word windows for the words it was to provide.

All requested layers come from one forward pass per window batch. Hidden state index 0 is
the embedding output, 1..n_layers the transformer layers; negative indices count from the end.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.errors import ModelError

__all__ = [
    "LoadedModel",
    "load_language_model",
    "extract_word_features",
    "extract_word_features_per_word",
    "strided_window_starts",
]

#: ``config.model_type`` values of decoder-only (causal) language models.
CAUSAL_MODEL_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral", "opt",
    "bloom", "falcon", "phi", "phi3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "olmo", "olmo2", "stablelm", "codegen", "ctrl", "xglm", "mpt", "openai-gpt", "pythia",
    "transfo-xl", "xlnet", "smollm3", "granite",
})

_POOLINGS = ("last", "mean")


@dataclass
class LoadedModel:
    """A tokenizer and model ready for feature extraction.

    Attributes
    ----------
    tokenizer : transformers.PreTrainedTokenizerFast
        Fast tokenizer (needed for ``word_ids()``).
    model : torch.nn.Module
        Base model in eval mode, float32, on ``device``.
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
        Torch device the model lives on.
    """

    tokenizer: Any
    model: Any
    is_causal: bool
    n_layers: int
    hidden_size: int
    name: str
    max_tokens: int = 512
    device: str = "cpu"


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a filesystem path (hub ids are ``name`` or ``org/name``)."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).exists()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _is_causal(config: Any) -> bool:
    if getattr(config, "is_decoder", False):
        return True
    for arch in getattr(config, "architectures", None) or []:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return True
    return getattr(config, "model_type", "") in CAUSAL_MODEL_TYPES


def _byte_level_without_prefix_space(tokenizer: Any) -> bool:
    """True for a byte-level pre-tokenizer (GPT-2 style) that does not add a space before words."""
    try:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    except (AttributeError, ValueError, TypeError):
        return False

    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel" and not node.get("add_prefix_space", False):
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(pre)


def _max_tokens(config: Any, tokenizer: Any) -> int:
    limits = []
    for value in (getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None)):
        if isinstance(value, int) and value > 0:
            limits.append(value)
    if getattr(config, "model_type", "") in {"roberta", "xlm-roberta", "camembert"} and limits:
        limits = [v - 2 for v in limits]  # positions are offset by padding_idx + 1
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else 512


def load_language_model(model: str, revision: str | None = None, *, device: str = "auto") -> LoadedModel:
    """Load a tokenizer and base model for feature extraction, safetensors weights only.

    Parameters
    ----------
    model : str
        A local folder (``config.json``, tokenizer files, ``*.safetensors``) or a hub id
        already in the local cache (the hub is never contacted when ``HF_HUB_OFFLINE=1``).
    revision : str, optional
        Hub revision (branch, tag or commit); ignored for local folders.
    device : str
        ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns
    -------
    LoadedModel
        Model in eval mode, float32, with ``output_hidden_states`` on.

    Raises
    ------
    ModelError
        Unknown or missing model, no safetensors weights, no fast tokenizer,
        or an encoder-decoder model.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"model {model!r} is not a model name: give a local folder or a hub id")
    name = model
    path = Path(os.path.expanduser(model))
    local = path.is_dir()
    if not local and _looks_like_path(model):
        raise ModelError(f"model {model!r} not found: give a local folder or a hub id available offline")
    if local:
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {model!r} has no config.json: give a folder written by save_pretrained")
        if not any(path.glob("*.safetensors")):
            raise ModelError(
                f"model folder {model!r} has no *.safetensors weights (pickled .bin files are refused): "
                "convert it with save_pretrained(folder, safe_serialization=True) on a trusted machine"
            )
    src = str(path) if local else model
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision is not None and not local:
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"model {model!r} cannot be loaded ({_first_line(exc)}): "
            "give a local folder or a hub id available offline"
        ) from None
    if getattr(config, "auto_map", None):
        raise ModelError(
            f"model {model!r} asks for its own code (auto_map in config.json); neuroflow never runs "
            "remote code (trust_remote_code): use a model whose architecture transformers ships"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"model {model!r} is an encoder-decoder model: give an encoder (BERT-like) or a causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"tokenizer of model {model!r} cannot be loaded ({_first_line(exc)}): "
                         "give a folder with tokenizer files") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model {model!r} has no fast tokenizer (tokenizer.json): save one with the tokenizers library")
    # Byte-level BPE tokenizers (GPT-2, RoBERTa...) encode a word differently with and without
    # a leading space; pre-split words must be encoded as in running text (" word").
    if _byte_level_without_prefix_space(tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(src, add_prefix_space=True, **kwargs)
    try:
        net = AutoModel.from_pretrained(src, use_safetensors=True, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"weights of model {model!r} cannot be loaded ({_first_line(exc)}): "
            "safetensors weights are required, give a local folder or a hub id available offline"
        ) from None
    net.config.output_hidden_states = True
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    net = net.to(device=device, dtype=torch.float32).eval()
    return LoadedModel(
        tokenizer=tokenizer,
        model=net,
        is_causal=_is_causal(config),
        n_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        name=name,
        max_tokens=_max_tokens(config, tokenizer),
        device=str(device),
    )


# ---------------------------------------------------------------------------- helpers


def _resolve_model(model: str | LoadedModel, revision: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_language_model(model, revision=revision)


def _check_words(words: Sequence[str]) -> list[str]:
    if isinstance(words, str):
        raise ValueError("words must be a sequence of words, not one string: split it first")
    words = list(words)
    if not words:
        raise ValueError("words is empty: give at least one word")
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"words[{i}] = {w!r} is not a non-empty string: remove empty/silence entries")
    return words


def _check_args(context_words: int, batch_size: int, pooling: str) -> None:
    if isinstance(context_words, bool) or not isinstance(context_words, (int, np.integer)) or context_words < 0:
        raise ValueError(f"context_words = {context_words!r} must be an integer >= 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be an integer >= 1")
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is unknown: use one of {', '.join(_POOLINGS)}")


def _layer_indices(layers: Sequence[int], lm: LoadedModel) -> list[int]:
    """Map user layer indices to positions in ``hidden_states`` (0..n_layers)."""
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
class _Window:
    """Words given to the model together, and the (local) word positions whose features it provides."""

    words: list[str]
    targets: list[int]  # local indices into ``words``
    dest: list[int]  # global word indices the targets fill


def _tokenize(lm: LoadedModel, words: list[str]) -> tuple[list[int], list[int | None], bool]:
    """Token ids and word ids of one window, left-truncated to ``lm.max_tokens``.

    Returns ids, word ids, and whether truncation happened.
    """
    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=True)
    ids = list(enc["input_ids"])
    wids = list(enc.word_ids())
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


def _run_windows(
    lm: LoadedModel,
    windows: list[_Window],
    tokenized: list[tuple[list[int], list[int | None]]],
    hs_index: list[int],
    out: np.ndarray,
    batch_size: int,
    pooling: str,
) -> None:
    """Run the model on windows (right-padded batches) and write pooled features into ``out``.

    ``out`` has shape (n_layers_requested, n_words, hidden_size).
    """
    import torch

    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    # Sort by length so batches hold windows of similar length (less padding).
    order = sorted(range(len(windows)), key=lambda k: len(tokenized[k][0]))
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        width = max(len(tokenized[k][0]) for k in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, k in enumerate(chunk):
            seq = tokenized[k][0]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            result = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                              output_hidden_states=True)
            hidden = torch.stack([result.hidden_states[h] for h in hs_index])  # (L, B, T, H)
            hidden = hidden.float().cpu().numpy()
        for row, k in enumerate(chunk):
            wids = np.array([-1 if w is None else w for w in tokenized[k][1]])
            win = windows[k]
            for local, dest in zip(win.targets, win.dest):
                pos = np.flatnonzero(wids == local)
                if pos.size == 0:
                    raise ModelError(f"word {win.words[local]!r} has no tokens in model {lm.name!r}: "
                                     "check the word list for empty entries")
                if pooling == "last":
                    out[:, dest, :] = hidden[:, row, pos[-1], :]
                else:
                    out[:, dest, :] = hidden[:, row, pos, :].mean(axis=1)


def _per_word_windows(words: list[str], starts: np.ndarray, indices: Sequence[int]) -> list[_Window]:
    return [_Window(words=words[int(starts[i]) : i + 1], targets=[i - int(starts[i])], dest=[i]) for i in indices]


def _extract(
    lm: LoadedModel,
    words: list[str],
    layers: Sequence[int],
    windows: list[_Window],
    starts_for_fallback: np.ndarray | None,
    batch_size: int,
    pooling: str,
) -> dict[int, np.ndarray]:
    hs_index = _layer_indices(layers, lm)
    uniq = sorted(set(hs_index))
    tokenized: list[tuple[list[int], list[int | None]]] = []
    kept: list[_Window] = []
    fallback: list[int] = []
    for win in windows:
        ids, wids, truncated = _tokenize(lm, win.words)
        if truncated and starts_for_fallback is not None:
            fallback.extend(win.dest)  # strided window too long: do its words one by one
            continue
        if truncated and any(t not in wids for t in win.targets):
            raise ModelError(f"word {win.words[win.targets[0]]!r} alone exceeds the {lm.max_tokens} tokens "
                             f"model {lm.name!r} accepts: split it")
        kept.append(win)
        tokenized.append((ids, wids))
    if fallback:
        for win in _per_word_windows(words, starts_for_fallback, fallback):
            ids, wids, _ = _tokenize(lm, win.words)
            if win.targets[0] not in wids:
                raise ModelError(f"word {win.words[-1]!r} alone exceeds the {lm.max_tokens} tokens "
                                 f"model {lm.name!r} accepts: split it")
            kept.append(win)
            tokenized.append((ids, wids))
    out = np.zeros((len(uniq), len(words), lm.hidden_size), dtype=np.float32)
    _run_windows(lm, kept, tokenized, uniq, out, batch_size, pooling)
    return {layer: out[uniq.index(h)].copy() for layer, h in zip(layers, hs_index)}


# ---------------------------------------------------------------------------- public API


def strided_window_starts(n_words: int, context_words: int) -> np.ndarray:
    """Index of the first word each word sees in the strided (causal) extractor.

    Parameters
    ----------
    n_words : int
        Number of words in the story.
    context_words : int
        Minimum number of preceding words each word sees.

    Returns
    -------
    np.ndarray
        Integer array of shape (n_words,): word ``i`` sees words ``starts[i] .. i``, where
        ``i - starts[i]`` is between ``context_words`` and ``2 * context_words - 1``
        (``i`` itself when ``i < 2 * context_words``; 0 preceding words when ``context_words == 0``).
    """
    if n_words < 1:
        raise ValueError(f"n_words = {n_words!r} must be >= 1")
    if context_words < 0:
        raise ValueError(f"context_words = {context_words!r} must be an integer >= 0")
    stride = max(int(context_words), 1)
    starts = np.zeros(n_words, dtype=np.int64)
    first_len = context_words + stride
    for s in range(stride, n_words, stride):
        lo = s + context_words
        if lo >= n_words:
            break
        starts[lo : min(lo + stride, n_words)] = s
    starts[: min(first_len, n_words)] = 0
    return starts


def _strided_windows(words: list[str], context_words: int) -> list[_Window]:
    n = len(words)
    stride = max(int(context_words), 1)
    first = min(context_words + stride, n)
    windows = [_Window(words=words[:first], targets=list(range(first)), dest=list(range(first)))]
    s = stride
    while s + context_words < n:
        end = min(s + context_words + stride, n)
        dest = list(range(s + context_words, end))
        windows.append(_Window(words=words[s:end], targets=[d - s for d in dest], dest=dest))
        s += stride
    return windows


def extract_word_features_per_word(
    words: Sequence[str],
    model: str | LoadedModel,
    layers: Sequence[int],
    context_words: int,
    *,
    window_starts: Sequence[int] | np.ndarray | None = None,
    revision: str | None = None,
    batch_size: int = 32,
    pooling: str = "last",
) -> dict[int, np.ndarray]:
    """Hidden-state features of each word, one model window per word (the reference).

    Word ``i`` is given to the model as ``words[start_i .. i]`` (nothing after it), with
    ``start_i = max(0, i - context_words)`` unless ``window_starts`` is given.

    Parameters
    ----------
    words : sequence of str, length n_words
        The story's words in order (no silence markers, no empty strings).
    model : str or LoadedModel
        Folder, hub id, or an already loaded model.
    layers : sequence of int
        Hidden-state indices (0 = embeddings, 1..n_layers; negative from the end).
    context_words : int
        Number of preceding words each window holds (ignored when ``window_starts`` is given).
    window_starts : sequence of int, shape (n_words,), optional
        Exact first visible word of each word's window, ``0 <= window_starts[i] <= i``
        (e.g. :func:`strided_window_starts` to reproduce the strided extractor).
    revision : str, optional
        Hub revision when ``model`` is a name.
    batch_size : int
        Windows per forward pass.
    pooling : {"last", "mean"}
        Last sub-token of the word, or the mean of its sub-tokens.

    Returns
    -------
    dict[int, np.ndarray]
        ``{layer: float32 array (n_words, hidden_size)}`` keyed by the layers as given.

    Raises
    ------
    ValueError
        Empty ``words``, bad ``context_words``/``batch_size``/``pooling``/``window_starts``.
    ModelError
        Model cannot be loaded or a layer is out of range.
    """
    words = _check_words(words)
    _check_args(context_words, batch_size, pooling)
    n = len(words)
    if window_starts is None:
        starts = np.maximum(np.arange(n) - int(context_words), 0)
    else:
        starts = np.asarray(window_starts)
        if starts.shape != (n,) or not np.issubdtype(starts.dtype, np.integer):
            raise ValueError(f"window_starts must be {n} integers (one per word), got shape {starts.shape}")
        if np.any(starts < 0) or np.any(starts > np.arange(n)):
            raise ValueError("window_starts[i] must satisfy 0 <= window_starts[i] <= i for every word i")
    lm = _resolve_model(model, revision)
    windows = _per_word_windows(words, starts, range(n))
    return _extract(lm, words, layers, windows, None, batch_size, pooling)


def extract_word_features(
    words: Sequence[str],
    model: str | LoadedModel,
    layers: Sequence[int],
    context_words: int,
    *,
    revision: str | None = None,
    batch_size: int = 32,
    pooling: str = "last",
) -> dict[int, np.ndarray]:
    """Hidden-state features of each word given its preceding words, all layers in one pass.

    Masked (bidirectional) models: one window per word, ``words[max(0, i - context_words) .. i]``,
    special tokens included, so no word sees a later word. Causal models: the strided scheme
    described in the module docstring, in which word ``i`` sees between ``context_words`` and
    ``2 * context_words - 1`` preceding words (all words from the story start when fewer);
    :func:`strided_window_starts` gives the exact start per word.

    Parameters
    ----------
    words : sequence of str, length n_words
        The story's words in order (no silence markers, no empty strings).
    model : str or LoadedModel
        Folder, hub id, or an already loaded model (load once for several stories).
    layers : sequence of int
        Hidden-state indices (0 = embeddings, 1..n_layers; negative from the end).
    context_words : int
        Minimum number of preceding words each word sees (>= 0).
    revision : str, optional
        Hub revision when ``model`` is a name.
    batch_size : int
        Windows per forward pass.
    pooling : {"last", "mean"}
        Last sub-token of the word, or the mean of its sub-tokens.

    Returns
    -------
    dict[int, np.ndarray]
        ``{layer: float32 array (n_words, hidden_size)}`` keyed by the layers as given.

    Raises
    ------
    ValueError
        Empty ``words``, bad ``context_words``/``batch_size``/``pooling``.
    ModelError
        Model cannot be loaded or a layer is out of range.
    """
    words = _check_words(words)
    _check_args(context_words, batch_size, pooling)
    lm = _resolve_model(model, revision)
    if not lm.is_causal:
        return extract_word_features_per_word(words, lm, layers, context_words, batch_size=batch_size,
                                              pooling=pooling)
    starts = strided_window_starts(len(words), int(context_words))
    return _extract(lm, words, layers, _strided_windows(words, int(context_words)), starts, batch_size, pooling)
