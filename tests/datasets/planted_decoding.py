"""Runs for semantic decoding whose responses are a language model's features (or pure noise):
shared by ``tests/test_semantic_decoding.py`` and ``bench/bench_semantic_decoding.py``."""
from __future__ import annotations

import numpy as np

from pipelines.features.align import lanczos_resample, make_delays
from pipelines.semantic_decoding import hypothesis_features

LAYER, CONTEXT, DELAYS, TR = 1, 3, [1, 2, 3], 1.0


def simulated_run(lm, rng, vocabulary, n_words: int, W: np.ndarray, noise: float, scale: float,
                  planted: bool = True) -> dict:
    """One run: random ``vocabulary`` words at jittered ~1 s onsets; responses are the words' layer
    :data:`LAYER` features (Lanczos to TRs, delays :data:`DELAYS`) times ``W`` over ``scale``, plus
    ``noise`` (without the features when ``planted`` is False)."""
    words = list(rng.choice(vocabulary, size=n_words))
    word_times = 2.0 + np.cumsum(rng.uniform(0.8, 1.2, n_words))
    tr_times = np.arange(0.0, word_times[-1] + 6.0, TR)
    F = lanczos_resample(hypothesis_features(lm, words, LAYER, CONTEXT), word_times, tr_times)
    signal = make_delays(F, [len(tr_times)], DELAYS) @ W / scale
    Y = (signal if planted else 0.0) + noise * rng.standard_normal((len(tr_times), W.shape[1]))
    return {"words": words, "word_times": word_times, "tr_times": tr_times, "features": F, "responses": Y}
