"""Control features beside a language model's own (``features[].baselines``), for honest comparisons.

A layer curve says little without the score a model gets for reasons other than what it learned.
Three controls, each computed on the same words, at the same times and (where it has layers) at
the same layers as the model itself:

* ``untrained``: the same architecture with random weights, built from the model's own config
  (its class called on ``config.json``, as ``AutoModel.from_config(AutoConfig.from_pretrained(path))``
  does) under the fixed seed :data:`UNTRAINED_SEED`; the model's own tokenizer.
* ``shuffled``: the trained model on the story's words permuted (fixed seed :data:`SHUFFLE_SEED`)
  before extraction; row ``i`` (at word ``i``'s time) holds the features of the word that the
  permutation put at position ``i``, so the features keep their statistics but lose their timing.
* ``random_embedding``: one fixed random vector per word type (lower-cased), of the model's hidden
  size, drawn from a generator seeded by the word's sha256 (the same word gets the same vector in
  every story and run); no layers.

Spaces are named ``<baseline>_layer<k>`` in a layer sweep, ``<baseline>`` for a single layer, and
``random_embedding`` always; the fit names them ``<feature>_<space>`` as it does any space.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pipelines.errors import ModelError
from pipelines.features.model_source import first_line

__all__ = ["BASELINES", "UNTRAINED_SEED", "SHUFFLE_SEED", "baseline_space", "untrained_model", "shuffled_words",
           "random_embedding", "baseline_spaces", "extraction_passes"]

#: The controls a language-model feature may ask for, in the order they are computed.
BASELINES = ("untrained", "shuffled", "random_embedding")
#: Seed of the untrained model's weights (fixed: the same control in every run and on every worker).
UNTRAINED_SEED = 1_2026_1130
#: Seed of the permutation of each story's words.
SHUFFLE_SEED = 2_2026_1130


def baseline_space(baseline: str, space: str) -> str:
    """The space a baseline fills for the model's ``space`` (``"layer3"`` -> ``"untrained_layer3"``,
    ``"values"`` -> ``"untrained"``; ``random_embedding`` has one space whatever the layers)."""
    if baseline == "random_embedding" or space == "values":
        return baseline
    return f"{baseline}_{space}"


def baseline_spaces(baselines: Sequence[str], spaces: Mapping[int, str]) -> dict[str, dict[int, str]]:
    """Per baseline, the space of each requested layer (``random_embedding``: ``{}``, one space)."""
    return {b: ({} if b == "random_embedding" else {k: baseline_space(b, s) for k, s in spaces.items()})
            for b in baselines}


def untrained_model(lm):
    """``lm`` (a :class:`pipelines.features.lm_windows.LoadedModel`) with its weights replaced by a random
    initialisation of the same architecture, seeded with :data:`UNTRAINED_SEED`.

    Raises
    ------
    ModelError
        The model's class cannot be built from its config.
    """
    import torch  # heavy: only when a baseline is computed

    net = lm.model
    config = net.config
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            fresh = type(net)(config)
    except Exception as exc:  # noqa: BLE001 - any failure of the library to build it: one clear error
        raise ModelError(f"model {lm.name!r}: its untrained copy cannot be built from its config "
                         f"({first_line(exc)}); drop 'untrained' from 'baselines'") from exc
    dtype = next(net.parameters()).dtype
    fresh = fresh.to(device=lm.device, dtype=dtype).eval()
    fresh.config.output_hidden_states = True
    if hasattr(fresh.config, "use_cache"):
        fresh.config.use_cache = False
    return dataclasses.replace(lm, model=fresh, name=f"{lm.name} (untrained)")


def shuffled_words(words: Sequence[str]) -> list[str]:
    """The words in a fixed random order (:data:`SHUFFLE_SEED`); the same story is always permuted alike."""
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(words))
    return [words[i] for i in order]


def random_embedding(words: Sequence[str], dim: int) -> np.ndarray:
    """One standard-normal vector of length ``dim`` per word type (lower-cased), float32 (n_words, dim)."""
    vectors: dict[str, np.ndarray] = {}
    out = np.empty((len(words), dim), dtype=np.float32)
    for i, word in enumerate(words):
        key = str(word).lower()
        if key not in vectors:
            seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
            vectors[key] = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
        out[i] = vectors[key]
    return out


def extraction_passes(baselines: Sequence[str], lm, words: list[str], spaces: Mapping[int, str], *,
                      untrained: Callable[[], Any] | None = None
                      ) -> list[tuple[list[str], Callable[[], Any], dict[int, str]]]:
    """The passes over a story that a language-model feature makes: the model's own on ``spaces``
    ({layer: space}), then each layered baseline (untrained weights, shuffled words), as
    (words, model factory, {layer: space}). ``random_embedding`` needs no pass. ``untrained``
    gives the untrained copy (e.g. from a cache shared by the stories; default: built here)."""
    passes: list[tuple[list[str], Callable[[], Any], dict[int, str]]] = [(words, lambda: lm, dict(spaces))]
    for baseline, layer_spaces in baseline_spaces(baselines, spaces).items():
        if baseline == "untrained":
            passes.append((words, untrained or (lambda: untrained_model(lm)), layer_spaces))
        elif baseline == "shuffled":
            passes.append((shuffled_words(words), lambda: lm, layer_spaces))
    return passes
