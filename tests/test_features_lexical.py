"""Phoneme rate (TextGrid phone tiers), word frequency (wordfreq), surprisal (causal LM), events."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from pipelines.errors import DatasetError, ModelError
from pipelines.features.align import lanczos_resample
from pipelines.features.events import events_design, events_on_grid, read_events
from pipelines.features.language_model import LoadedModel, load_language_model
from pipelines.features.lexical import (
    phoneme_rate_values,
    read_phones,
    surprisal_window_starts,
    word_frequency_values,
    word_surprisal,
    word_surprisal_per_word,
)

STORY = (
    "alice was beginning to get very tired of sitting by her sister on the bank and of having "
    "nothing to do once or twice she had peeped into the book her sister was reading"
).split()


# --------------------------------------------------------------------------- phones


def _write_textgrid(path, tiers: dict[str, list[tuple[float, float, str]]], end: float) -> None:
    from praatio import textgrid

    tg = textgrid.Textgrid()
    for name, entries in tiers.items():
        tg.addTier(textgrid.IntervalTier(name, entries, 0.0, end))
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def test_read_phones_drops_silences_and_finds_the_tier(tmp_path):
    path = tmp_path / "story.TextGrid"
    phones = [(0.0, 0.5, "sil"), (0.5, 0.6, "AE1"), (0.6, 0.7, "L"), (0.7, 0.8, "sp"), (0.8, 0.95, "IH0"),
              (0.95, 1.0, "spn")]
    _write_textgrid(path, {"words": [(0.5, 0.95, "alice")], "phones": phones}, 1.0)
    table = read_phones(path, offset=10.0)
    assert table["phone"].tolist() == ["AE1", "L", "IH0"]
    np.testing.assert_allclose(table["onset"], [10.5, 10.6, 10.8])
    values, times = phoneme_rate_values(table)
    assert values.shape == (3, 1) and np.all(values == 1)
    np.testing.assert_allclose(times, [10.55, 10.65, 10.875])
    with pytest.raises(DatasetError, match=r"no tier 'phone'.*\['words', 'phones'\]"):
        read_phones(path, tier="phone")
    two = tmp_path / "two.TextGrid"
    _write_textgrid(two, {"phones": phones, "phone_ids": phones}, 1.0)
    with pytest.raises(DatasetError, match="cannot tell the phone tier"):
        read_phones(two)


def test_phoneme_rate_counts_phones_per_tr(tmp_path):
    rate = 12.0  # phones per second, regular
    starts = np.arange(0.0, 120.0, 1 / rate)
    path = tmp_path / "regular.TextGrid"
    _write_textgrid(path, {"phone": [(s, s + 0.9 / rate, "AH0") for s in starts]}, 121.0)
    values, times = phoneme_rate_values(read_phones(path))
    tr = 2.0
    out = lanczos_resample(values, times, np.arange(0.0, 120.0, tr))[:, 0]
    np.testing.assert_allclose(out[5:-5], rate * tr, rtol=0.02)


# --------------------------------------------------------------------------- word frequency


def test_word_frequency_orders_common_and_rare_words():
    pytest.importorskip("wordfreq")
    z = word_frequency_values(["the", "rabbit", "the", "xqzwvk"])
    assert z.shape == (4, 1) and z.dtype == np.float32
    assert z[0, 0] > 7 and 3 < z[1, 0] < 6 and z[3, 0] == 0.0 and z[0, 0] == z[2, 0]
    with pytest.raises(ModelError, match="language"):
        word_frequency_values(["the"], language="xx")
    with pytest.raises(ValueError, match="wordlist"):
        word_frequency_values(["the"], wordlist="huge")


# --------------------------------------------------------------------------- surprisal


@pytest.fixture(scope="module")
def lm_head(tiny_gpt2_dir, tmp_path_factory) -> LoadedModel:
    """The tiny GPT-2 with its language-modelling head (random weights, safetensors)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2-lm")
    for f in tiny_gpt2_dir.iterdir():
        if f.suffix == ".json" and f.name != "config.json":
            shutil.copy(f, path / f.name)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config.from_pretrained(tiny_gpt2_dir)).save_pretrained(path, safe_serialization=True)
    return load_language_model(str(path), head="causal_lm")


def _surprisal_by_hand(lm: LoadedModel, words: list[str]) -> np.ndarray:
    """One pass over [BOS] + the whole story; sum -log2 p over each word's tokens."""
    import torch

    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    ids = [lm.tokenizer.eos_token_id] + list(enc["input_ids"])
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, dim=-1).numpy()
    wids = enc.word_ids()
    out = np.zeros(len(words))
    for p, w in enumerate(wids):
        out[w] -= logp[p, ids[p + 1]] / np.log(2)
    return out


def test_surprisal_with_full_context_matches_one_pass(lm_head):
    s = word_surprisal(STORY, lm_head, context_words=len(STORY))
    assert s.shape == (len(STORY), 1) and s.dtype == np.float32 and np.all(s > 0)
    np.testing.assert_allclose(s[:, 0], _surprisal_by_hand(lm_head, STORY), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("context_words", [0, 1, 4])
def test_strided_surprisal_matches_per_word_reference(lm_head, context_words):
    strided = word_surprisal(STORY, lm_head, context_words, batch_size=3)
    starts = surprisal_window_starts(STORY, lm_head, context_words)
    reference = word_surprisal_per_word(STORY, lm_head, starts)
    np.testing.assert_allclose(strided, reference, atol=1e-4)
    if context_words:
        assert not np.allclose(strided, word_surprisal(STORY, lm_head, 0), atol=1e-3)  # context matters


def test_surprisal_within_the_token_limit(lm_head):
    lm_head.max_tokens = 7  # BOS + 6 words
    try:
        starts = surprisal_window_starts(STORY, lm_head, 4)
        assert np.all(np.arange(len(STORY)) - starts <= 5)
        limited = word_surprisal(STORY, lm_head, 4)
        reference = word_surprisal_per_word(STORY, lm_head, starts)
    finally:
        lm_head.max_tokens = 1024
    np.testing.assert_allclose(limited, reference, atol=1e-4)


def test_surprisal_needs_a_causal_lm_head(tiny_bert_dir, tiny_gpt2_dir):
    with pytest.raises(ModelError, match="not a causal language model"):
        word_surprisal(STORY[:4], str(tiny_bert_dir), 2)
    base = load_language_model(str(tiny_gpt2_dir))
    with pytest.raises(ModelError, match="head='causal_lm'"):
        word_surprisal(STORY[:4], base, 2)


# --------------------------------------------------------------------------- events


def test_events_boxcar_hand_checked():
    events = pd.DataFrame({"onset": [2.0, 10.0, 3.0], "duration": [4.0, 0.0, 1.0],
                           "trial_type": ["story", "tone", "other"]})
    grid = np.arange(0.0, 12.0, 2.0)  # bins [-1,1) [1,3) [3,5) [5,7) [7,9) [9,11)
    values, columns = events_design(events, grid, trial_types=["story", "tone"])
    assert columns == ["story", "tone"] and values.shape == (6, 2)
    np.testing.assert_allclose(values[:, 0], [0, 0.5, 1, 0.5, 0, 0])  # the block [2, 6)
    np.testing.assert_allclose(values[:, 1], [0, 0, 0, 0, 0, 1])  # an impulse at 10 s
    impulses, columns = events_design(events, grid, mode="impulse")
    assert columns == ["other", "story", "tone"]
    np.testing.assert_allclose(impulses.sum(axis=0), [1, 1, 1])
    np.testing.assert_allclose(impulses[1], [0, 1, 0])


def test_events_read_from_tsv_and_fine_grid(tmp_path):
    path = tmp_path / "sub-01_task-x_run-1_events.tsv"
    path.write_text("onset\tduration\ttrial_type\n0.5\t3.0\tspeech\n5.0\t2.0\tn/a\n6.0\t2.0\tmusic\n")
    events = read_events(path)
    assert events["trial_type"].tolist() == ["speech", "music"]
    values, times, columns = events_on_grid(events, 10.0)
    assert columns == ["music", "speech"] and times[1] == pytest.approx(0.1)
    np.testing.assert_allclose(values[:, 1].sum() / 10.0, 3.0, atol=0.1)  # 3 s of speech
    np.testing.assert_allclose(values[:, 0].sum() / 10.0, 2.0, atol=0.1)
    (tmp_path / "bad.tsv").write_text("onset\tduration\n1\t2\n")
    with pytest.raises(DatasetError, match="trial_type"):
        read_events(tmp_path / "bad.tsv")
    with pytest.raises(ValueError, match="mode"):
        events_design(events, times, mode="ramp")
