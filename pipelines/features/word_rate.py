"""Word rate: how many words are heard around each TR.

The feature is built by giving every word the value 1 and Lanczos-resampling those ones at
the TR times (:func:`pipelines.features.align.lanczos_resample`). The Lanczos kernel is not
normalised, so the result is a smoothed count of words per TR (e.g. about 5 at 2.5 words/s
and TR = 2 s) and is 0 during silence. It is the usual low-level nuisance feature that
language features are compared against.
"""
from __future__ import annotations

import numpy as np

__all__ = ["word_rate_values"]


def word_rate_values(n_words: int) -> np.ndarray:
    """One value per word to resample into a word rate.

    Parameters
    ----------
    n_words : int
        Number of words in the story (>= 1).

    Returns
    -------
    np.ndarray, shape (n_words, 1), float32
        All ones.

    Raises
    ------
    ValueError
        ``n_words`` is not a positive integer.
    """
    if isinstance(n_words, bool) or not isinstance(n_words, (int, np.integer)) or n_words < 1:
        raise ValueError(f"n_words = {n_words!r} must be a positive integer (the story's word count)")
    return np.ones((int(n_words), 1), dtype=np.float32)
