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
  When a window of ``context_words + stride`` words would exceed the tokens the model accepts,
  its stride is shortened (fewer new words, same ``context_words`` of context) so it fits.
  :func:`causal_window_starts` gives the visible start of every word, so the per-word
  reference can reproduce the strided features exactly.

Windows longer than the model accepts (``max_position_embeddings`` / the tokenizer's
``model_max_length``) are truncated from the left: the oldest word tokens are dropped, the
special tokens the tokenizer adds ([CLS], [SEP], BOS) are kept. This happens only when
``context_words + 1`` words alone exceed the limit (the strided scheme then degrades to one
left-truncated window per word).

All requested layers come from one forward pass per window batch. Hidden state index 0 is
the embedding output, 1..n_layers the transformer layers; negative indices count from the end.
Windows are batched by length under a token budget (``batch_tokens``): on a CPU, batches of
about a thousand tokens run fastest (larger ones spill out of the caches).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.errors import ModelError
from pipelines.features.layer_files import LayerFiles
from pipelines.features.lm_batches import run_windows, story_word_tokens, tokenize_windows
from pipelines.features.model_source import first_line as _first_line, safe_model_config
from pipelines.features.model_runtime import input_device, load_kwargs, place, resolve_runtime
from pipelines.features.lm_windows import (
    LoadedModel,
    Window,
    check_extraction_args,
    check_words,
    layer_indices,
    strided_plan,
    tokens_per_batch,
)

__all__ = [
    "LoadedModel",
    "load_language_model",
    "extract_word_features",
    "extract_word_features_per_word",
    "stream_word_features",
    "strided_window_starts",
    "causal_window_starts",
    "word_token_counts",
]

#: ``config.model_type`` values of decoder-only (causal) language models.
CAUSAL_MODEL_TYPES = frozenset({
    "gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "llama", "mistral", "mixtral", "opt",
    "bloom", "falcon", "phi", "phi3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "olmo", "olmo2", "stablelm", "codegen", "ctrl", "xglm", "mpt", "openai-gpt", "pythia",
    "transfo-xl", "xlnet", "smollm3", "granite",
})


#: Encoder-decoder ``model_type`` values whose encoder alone gives features, and its class.
ENCODER_OF_ENCODER_DECODER = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


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


def load_language_model(model: str, revision: str | None = None, *, device: str = "auto",
                        head: str = "base", dtype: str = "auto", quantization: str | None = None,
                        device_map: str | None = None) -> LoadedModel:
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
    head : {"base", "causal_lm"}
        ``"base"``: the bare model (hidden states). ``"causal_lm"``: the model with its
        language-modelling head (next-token logits, for surprisal); causal models only.
    dtype : {"auto", "float32", "bfloat16", "float16"}
        What the model computes in; ``"auto"``: bfloat16 on a GPU above about 1B parameters,
        else float32 (see :mod:`pipelines.features.model_runtime`). Features are float32 anyway.
    quantization : {"8bit", "4bit"}, optional
        bitsandbytes weights (a CUDA GPU only).
    device_map : {"auto"}, optional
        Shard the model over the visible GPUs (and the CPU) with accelerate.

    Returns
    -------
    LoadedModel
        Model in eval mode with ``output_hidden_states`` on; ``runtime`` says how it is held.

    Raises
    ------
    ModelError
        Unknown or missing model, no safetensors weights, no fast tokenizer,
        or an encoder-decoder model other than T5 (whose encoder is loaded alone).
    ConfigError
        Unknown ``dtype``/``quantization``/``device_map``, or quantization without a GPU.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # heavy: imported only when a model loads

    if head not in ("base", "causal_lm"):
        raise ValueError(f"head = {head!r} is unknown: use 'base' or 'causal_lm'")
    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"model {model!r} is not a model name: give a local folder or a hub id")
    name = model
    src, kwargs, config = safe_model_config(model, revision, "model")
    encoder_only = ENCODER_OF_ENCODER_DECODER.get(getattr(config, "model_type", ""))
    if getattr(config, "is_encoder_decoder", False) and (encoder_only is None or head != "base"):
        raise ModelError(f"model {model!r} is an encoder-decoder model: give an encoder (BERT-like), a T5 "
                         "(its encoder is used) or a causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"tokenizer of model {model!r} cannot be loaded ({_first_line(exc)}): "
                         "give a folder with tokenizer files") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model {model!r} has no fast tokenizer (tokenizer.json): save one with the tokenizers library")
    # Byte-level BPE tokenizers (GPT-2, RoBERTa...) encode a word differently with and without
    # a leading space; pre-split words must be encoded as in running text (" word").
    if _byte_level_without_prefix_space(tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(src, add_prefix_space=True, **kwargs)
    if head == "causal_lm" and not _is_causal(config):
        raise ModelError(f"model {model!r} is not a causal language model: surprisal needs one (GPT-2, Llama...)")
    runtime = resolve_runtime(config, dtype=dtype, quantization=quantization, device_map=device_map, device=device,
                              origin=f"model {model!r}")
    if encoder_only is not None:
        import transformers

        auto = getattr(transformers, encoder_only)
    else:
        auto = AutoModelForCausalLM if head == "causal_lm" else AutoModel
    try:
        net = auto.from_pretrained(src, use_safetensors=True, **load_kwargs(runtime), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"weights of model {model!r} cannot be loaded ({_first_line(exc)}): "
            "safetensors weights are required, give a local folder or a hub id available offline"
        ) from exc
    net.config.output_hidden_states = True
    if hasattr(net.config, "use_cache"):
        net.config.use_cache = False  # windows are independent: no key/value cache to build
    net = place(net, runtime)
    return LoadedModel(
        tokenizer=tokenizer,
        model=net,
        is_causal=_is_causal(config),
        n_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        name=name,
        max_tokens=_max_tokens(config, tokenizer),
        device=input_device(net, runtime),
        head=head,
        runtime=runtime,
    )


# ---------------------------------------------------------------------------- helpers


def _resolve_model(model: str | LoadedModel, revision: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    return load_language_model(model, revision=revision)


def _per_word_windows(words: list[str], starts: np.ndarray, indices: Sequence[int]) -> list[Window]:
    return [Window(words=words[int(starts[i]) : i + 1], targets=[i - int(starts[i])], dest=[i], start=int(starts[i]))
            for i in indices]


def _tokenize_windows(lm: LoadedModel, words: list[str], windows: list[Window],
                      starts_for_fallback: np.ndarray | None, tokens: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[list[Window], list[tuple[list[int], list]]]:
    """Tokenize every window; a truncated multi-word window is split into per-word windows."""
    tokenized: list[tuple[list[int], list[int | None]]] = []
    kept: list[Window] = []
    fallback: list[int] = []
    for win, (ids, wids, truncated) in zip(windows, tokenize_windows(lm, words, windows, tokens)):
        if truncated and starts_for_fallback is not None and len(win.targets) > 1:
            fallback.extend(win.dest)  # strided window too long: do its words one by one
            continue
        if truncated and any(t not in wids for t in win.targets):
            raise ModelError(f"word {win.words[win.targets[0]]!r} alone exceeds the {lm.max_tokens} tokens "
                             f"model {lm.name!r} accepts: split it")
        kept.append(win)
        tokenized.append((ids, wids))
    if fallback:
        singles = _per_word_windows(words, starts_for_fallback, fallback)
        for win, (ids, wids, _) in zip(singles, tokenize_windows(lm, words, singles, tokens)):
            if win.targets[0] not in wids:
                raise ModelError(f"word {win.words[-1]!r} alone exceeds the {lm.max_tokens} tokens "
                                 f"model {lm.name!r} accepts: split it")
            kept.append(win)
            tokenized.append((ids, wids))
    return kept, tokenized


def _extract(
    lm: LoadedModel,
    words: list[str],
    layers: Sequence[int],
    windows: list[Window],
    starts_for_fallback: np.ndarray | None,
    batch_size: int,
    pooling: str,
    batch_tokens: int | None = None,
    n_rows: int | None = None,
    sink: tuple[LayerFiles, Mapping[int, str]] | None = None,
    tokens: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Features of ``layers`` from ``windows``: in memory, or written to ``sink`` (files, {layer: space})."""
    hs_index = layer_indices(layers, lm)
    uniq = sorted(set(hs_index))
    kept, tokenized = _tokenize_windows(lm, words, windows, starts_for_fallback, tokens)
    budget = tokens_per_batch(lm, batch_tokens)
    if sink is not None:  # each layer straight to its file: no all-layers array
        files, spaces = sink
        targets = [[spaces[layer] for layer, h2 in zip(layers, hs_index) if h2 == h] for h in uniq]

        def to_files(values: np.ndarray, dests: list[int]) -> None:
            for i, names in enumerate(targets):
                for name in names:
                    files.write(name, np.asarray(dests), values[i])

        run_windows(lm, kept, tokenized, uniq, to_files, batch_size, pooling, budget)
        return {}
    n = len(words) if n_rows is None else n_rows
    outs = [np.zeros((n, lm.hidden_size), dtype=np.float32) for _ in uniq]  # pages are touched as rows arrive

    def to_memory(values: np.ndarray, dests: list[int]) -> None:
        lo = dests[0]
        contiguous = dests[-1] - lo == len(dests) - 1 and all(b - a == 1 for a, b in zip(dests, dests[1:]))
        for out, rows in zip(outs, values):
            if contiguous:  # the strided windows' targets: one block copy, no scatter
                out[lo : lo + len(dests)] = rows
            else:
                out[dests] = rows

    run_windows(lm, kept, tokenized, uniq, to_memory, batch_size, pooling, budget)
    feats: dict[int, np.ndarray] = {}
    handed: set[int] = set()
    for layer, h in zip(layers, hs_index):  # a layer asked for twice (e.g. 12 and -1) gets its own copy
        feats[layer] = outs[uniq.index(h)].copy() if h in handed else outs[uniq.index(h)]
        handed.add(h)
    return feats


# ---------------------------------------------------------------------------- window plans


def word_token_counts(words: Sequence[str], lm: LoadedModel) -> tuple[np.ndarray, int]:
    """Tokens of each word as the extractor tokenizes it, and the special tokens of a window.

    Words are pre-split (``is_split_into_words``), so a word's tokens do not depend on its
    neighbours: a window of words ``a .. b`` holds ``counts[a:b + 1].sum() + n_special`` tokens.

    Returns
    -------
    counts : np.ndarray of int, shape (n_words,)
    n_special : int
        Tokens the tokenizer adds around every window ([CLS]/[SEP], BOS...).
    """
    words = check_words(words)
    return _counts_and_specials(lm, words, story_word_tokens(lm, words))


def _counts_and_specials(lm: LoadedModel, words: list[str], tokens: tuple[np.ndarray, np.ndarray]
                         ) -> tuple[np.ndarray, int]:
    counts = np.diff(tokens[1])
    probe = lm.tokenizer(words[:1], is_split_into_words=True, add_special_tokens=True)
    n_special = len(probe["input_ids"]) - int(counts[0])
    return counts, max(n_special, 0)


def strided_window_starts(n_words: int, context_words: int, *, word_tokens: Sequence[int] | None = None,
                          max_tokens: int | None = None, stride_words: int | str | None = None) -> np.ndarray:
    """Index of the first word each word sees in the strided (causal) extractor.

    Parameters
    ----------
    n_words : int
        Number of words in the story.
    context_words : int
        Minimum number of preceding words each word sees.
    word_tokens : sequence of int, shape (n_words,), optional
        Tokens per word (:func:`word_token_counts`); with ``max_tokens``, windows are shortened
        to fit the model as the extractor does.
    max_tokens : int, optional
        Word tokens one window may hold (the model's limit minus its special tokens).
    stride_words : int or "fill", optional
        New words per window (default ``max(context_words, 1)``); ``"fill"``: as many as fit in
        ``max_tokens`` (:func:`extract_word_features`).

    Returns
    -------
    np.ndarray
        Integer array of shape (n_words,): word ``i`` sees words ``starts[i] .. i``, where
        ``i - starts[i]`` is between ``context_words`` and ``2 * context_words - 1``
        (``i`` itself when ``i < 2 * context_words``; 0 preceding words when ``context_words == 0``).
        With a token limit the upper bound shrinks; the lower bound holds whenever
        ``context_words + 1`` words fit in ``max_tokens``.
    """
    if n_words < 1:
        raise ValueError(f"n_words = {n_words!r} must be >= 1")
    if context_words < 0:
        raise ValueError(f"context_words = {context_words!r} must be an integer >= 0")
    wt = None if word_tokens is None else np.asarray(word_tokens)
    if wt is not None and wt.shape != (n_words,):
        raise ValueError(f"word_tokens must hold {n_words} counts (one per word), got shape {wt.shape}")
    starts = np.zeros(n_words, dtype=np.int64)
    for start, first, end in strided_plan(n_words, context_words, wt, max_tokens,
                                          _stride(stride_words, n_words)):
        starts[first:end] = start
    return starts


def causal_window_starts(words: Sequence[str], model: str | LoadedModel, context_words: int, *,
                         revision: str | None = None, stride_words: int | str | None = None) -> np.ndarray:
    """The exact first visible word of every word in :func:`extract_word_features` for a causal model.

    Takes the model's token limit into account (see :func:`strided_window_starts`). Pass the
    result as ``window_starts`` to :func:`extract_word_features_per_word` to reproduce the
    strided features one word at a time.

    Returns
    -------
    np.ndarray of int, shape (n_words,)
    """
    words = check_words(words)
    lm = _resolve_model(model, revision)
    counts, n_special = word_token_counts(words, lm)
    return strided_window_starts(len(words), int(context_words), word_tokens=counts,
                                 max_tokens=lm.max_tokens - n_special, stride_words=stride_words)


def _strided_windows(words: list[str], plan: list[tuple[int, int, int]]) -> list[Window]:
    return [Window(words=words[s:e], targets=list(range(f - s, e - s)), dest=list(range(f, e)), start=s)
            for s, f, e in plan]


# ---------------------------------------------------------------------------- public API


def extract_word_features_per_word(
    words: Sequence[str],
    model: str | LoadedModel,
    layers: Sequence[int],
    context_words: int,
    *,
    window_starts: Sequence[int] | np.ndarray | None = None,
    indices: Sequence[int] | None = None,
    revision: str | None = None,
    batch_size: int = 32,
    pooling: str = "last",
    batch_tokens: int | None = None,
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
        (e.g. :func:`causal_window_starts` to reproduce the strided extractor).
    indices : sequence of int, optional
        Compute only these words (e.g. a sample, to time or check the extractor); the
        arrays then have one row per index, in the order given.
    revision : str, optional
        Hub revision when ``model`` is a name.
    batch_size : int
        Most windows per forward pass.
    pooling : {"last", "mean"}
        Last sub-token of the word, or the mean of its sub-tokens.
    batch_tokens : int, optional
        Most (padded) tokens per forward pass; default 1024 on a CPU, 16384 on a GPU.
        Does not change the features.

    Returns
    -------
    dict[int, np.ndarray]
        ``{layer: float32 array (n_words, hidden_size)}`` (``(len(indices), hidden_size)`` with
        ``indices``) keyed by the layers as given.

    Raises
    ------
    ValueError
        Empty ``words``, bad ``context_words``/``batch_size``/``pooling``/``window_starts``/``indices``.
    ModelError
        Model cannot be loaded or a layer is out of range.
    """
    words = check_words(words)
    check_extraction_args(context_words, batch_size, pooling)
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
    if indices is None:
        return _extract(lm, words, layers, _per_word_windows(words, starts, range(n)), None, batch_size, pooling,
                        batch_tokens)
    idx = [int(i) for i in indices]
    if not idx or any(not 0 <= i < n for i in idx):
        raise ValueError(f"indices must be a non-empty list of word positions in 0..{n - 1}")
    windows = [Window(words=w.words, targets=w.targets, dest=[k], start=w.start) for k, w in
               enumerate(_per_word_windows(words, starts, idx))]
    return _extract(lm, words, layers, windows, None, batch_size, pooling, batch_tokens, n_rows=len(idx))


def extract_word_features(
    words: Sequence[str],
    model: str | LoadedModel,
    layers: Sequence[int],
    context_words: int,
    *,
    revision: str | None = None,
    batch_size: int = 32,
    pooling: str = "last",
    batch_tokens: int | None = None,
    stride_words: int | str | None = None,
) -> dict[int, np.ndarray]:
    """Hidden-state features of each word given its preceding words, all layers in one pass.

    Masked (bidirectional) models: one window per word, ``words[max(0, i - context_words) .. i]``,
    special tokens included, so no word sees a later word. Causal models: the strided scheme
    described in the module docstring, in which word ``i`` sees between ``context_words`` and
    ``2 * context_words - 1`` preceding words (all words from the story start when fewer);
    :func:`causal_window_starts` gives the exact start per word.

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
        Most windows per forward pass.
    pooling : {"last", "mean"}
        Last sub-token of the word, or the mean of its sub-tokens.
    batch_tokens : int, optional
        Most (padded) tokens per forward pass; default 1024 on a CPU, 16384 on a GPU.
        Does not change the features.
    stride_words : int or "fill", optional
        Causal models: new words per window, default ``max(context_words, 1)`` (each token
        through the model about twice). ``"fill"``: as many as fit in the model's token limit,
        so each token goes through the model about ``1 + context / limit`` times; word ``i``
        then sees at least ``context_words`` preceding words, and up to the limit. A larger
        stride gives more context to some words: the features change, not their minimum context.

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
    words = check_words(words)
    check_extraction_args(context_words, batch_size, pooling)
    lm = _resolve_model(model, revision)
    windows, starts, tokens = _windows(lm, words, int(context_words), stride_words)
    return _extract(lm, words, layers, windows, starts, batch_size, pooling, batch_tokens, tokens=tokens)


def stream_word_features(
    words: Sequence[str],
    model: str | LoadedModel,
    layers: Sequence[int],
    context_words: int,
    files: LayerFiles,
    spaces: Mapping[int, str],
    *,
    revision: str | None = None,
    batch_size: int = 32,
    pooling: str = "last",
    batch_tokens: int | None = None,
    stride_words: int | str | None = None,
) -> None:
    """:func:`extract_word_features`, each layer written to its file as the batches are computed.

    Same windows and numbers as :func:`extract_word_features`; no array of every layer is
    ever held (a layer sweep of a large model over a long story stays at one batch in memory).

    Parameters
    ----------
    files : LayerFiles
        Preallocated files of shape (n_words, hidden_size), one per space.
    spaces : mapping of int to str
        The space (file) of each requested layer, e.g. ``{1: "layer1", -1: "layer12"}``.
    """
    words = check_words(words)
    check_extraction_args(context_words, batch_size, pooling)
    lm = _resolve_model(model, revision)
    if (files.n_rows, files.n_dims) != (len(words), lm.hidden_size):
        raise ValueError(f"files hold ({files.n_rows}, {files.n_dims}) rows, the story needs "
                         f"({len(words)}, {lm.hidden_size})")
    windows, starts, tokens = _windows(lm, words, int(context_words), stride_words)
    _extract(lm, words, layers, windows, starts, batch_size, pooling, batch_tokens, sink=(files, spaces), tokens=tokens)


def _stride(stride_words: int | str | None, n_words: int) -> int | None:
    """``stride_words`` as ``strided_plan`` takes it: None (default), a count, or every word ("fill")."""
    if stride_words is None:
        return None
    if stride_words == "fill":
        return max(n_words, 1)
    if isinstance(stride_words, bool) or not isinstance(stride_words, (int, np.integer)) or stride_words < 1:
        raise ValueError(f"stride_words = {stride_words!r} must be an integer >= 1 or 'fill'")
    return int(stride_words)


def _windows(lm: LoadedModel, words: list[str], context_words: int, stride_words: int | str | None = None
             ) -> tuple[list[Window], np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """The windows of a story: per word for a masked model, strided for a causal one (with the
    first visible word of each word, for the per-word fallback of windows too long to fit, and the
    story's tokens the plan was made from, so that the windows are built from them)."""
    if not lm.is_causal:
        starts = np.maximum(np.arange(len(words)) - context_words, 0)
        return _per_word_windows(words, starts, range(len(words))), None, None
    tokens = story_word_tokens(lm, words)
    counts, n_special = _counts_and_specials(lm, words, tokens)
    plan = strided_plan(len(words), context_words, counts, lm.max_tokens - n_special,
                        _stride(stride_words, len(words)))
    starts = np.zeros(len(words), dtype=np.int64)
    for s, f, e in plan:
        starts[f:e] = s
    return _strided_windows(words, plan), starts, tokens
