"""Language-model families and dtypes on tiny random models saved to disk (nothing downloaded).

Each family gets the special tokens its released tokenizers add (LLaMA's BOS, OPT's ``</s>``
BOS, none for GPT-NeoX / Qwen2, [CLS]/[SEP] for BERT, ``<s> .. </s>`` for RoBERTa, a final
``</s>`` for T5), so that word/token bookkeeping is exercised the way real checkpoints need.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import ConfigError, ModelError
from pipelines.features.language_model import (
    causal_window_starts,
    extract_word_features,
    extract_word_features_per_word,
    load_language_model,
)
from pipelines.features.model_runtime import approx_parameters, resolve_runtime
from pipelines.features.cache_keys import cache_key
from pipelines.features.registry import model_runtime, parse_feature

STORY = (
    "alice was beginning to get very tired of sitting by her sister on the bank and of having "
    "nothing to do once or twice she had peeped into the book her sister was reading but it had "
    "no pictures or conversations in it"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]
TEMPLATES = {  # what each family's tokenizer adds around a sequence
    "bos": ("<s> $A", ["<s>"]), "opt_bos": ("</s> $A", ["</s>"]), "none": (None, []),
    "cls": ("[CLS] $A [SEP]", ["[CLS]", "[SEP]"]), "roberta": ("<s> $A </s>", ["<s>", "</s>"]),
    "eos": ("$A </s>", ["</s>"]),
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save_tokenizer(path, template: str) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(STORY)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single, specials = TEMPLATES[template]
    if single is not None:
        tok.post_processor = processors.TemplateProcessing(single=single,
                                                           special_tokens=[(s, vocab[s]) for s in specials])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return len(vocab)


def _save_byte_level_bpe(path) -> int:
    """A byte-level BPE trained on the story, as Qwen2's tokenizer class rebuilds it (vocab + merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(STORY)] * 3, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(path)
    return tok.get_vocab_size()


def _model(family: str, vocab: int):
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "gpt2":
        return tf.GPT2Model(tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids))
    if family == "gpt_neox":
        return tf.GPTNeoXModel(tf.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=256, **SMALL, **ids))
    if family == "opt":
        return tf.OPTModel(tf.OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=256, **ids))
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": (tf.LlamaConfig, tf.LlamaModel), "mistral": (tf.MistralConfig, tf.MistralModel),
               "qwen2": (tf.Qwen2Config, tf.Qwen2Model)}[family]
        return cls[1](cls[0](vocab_size=vocab, num_key_value_heads=1, max_position_embeddings=256, **SMALL, **ids))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=vocab, max_position_embeddings=256, **SMALL, pad_token_id=0))
    if family == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(vocab_size=vocab, max_position_embeddings=258, **SMALL, **ids))
    if family == "t5":  # saved whole, as released T5 checkpoints are; only its encoder is loaded
        return tf.T5Model(tf.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                      num_decoder_layers=1, num_heads=2, decoder_start_token_id=0, **ids))
    raise ValueError(family)


# family -> (tokenizer template, causal); Qwen2's tokenizer class only takes a byte-level BPE
FAMILIES = {"gpt2": ("none", True), "gpt_neox": ("none", True), "opt": ("opt_bos", True), "llama": ("bos", True),
            "mistral": ("bos", True), "qwen2": ("byte_bpe", True), "bert": ("cls", False),
            "roberta": ("roberta", False), "t5": ("eos", False)}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    import torch

    out = {}
    for family, (template, _) in FAMILIES.items():
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        vocab = _save_byte_level_bpe(path) if template == "byte_bpe" else _save_tokenizer(path, template)
        torch.manual_seed(0)
        _model(family, vocab).save_pretrained(path, safe_serialization=True)
        out[family] = path
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_and_no_word_sees_a_later_word(family_dirs, family):
    lm = load_language_model(str(family_dirs[family]), device="cpu")
    assert (lm.n_layers, lm.hidden_size, lm.is_causal) == (2, 32, FAMILIES[family][1])
    assert lm.runtime.dtype == "float32" and lm.runtime.device == "cpu"
    base = extract_word_features(STORY, lm, [0, 1, 2], 4, batch_size=5)
    for layer in (0, 1, 2):
        assert base[layer].shape == (len(STORY), 32) and base[layer].dtype == np.float32
        assert np.isfinite(base[layer]).all()
    assert not np.allclose(base[1], base[2])
    j = 20
    other = extract_word_features(STORY[:j] + ["rabbit"] + STORY[j + 1:], lm, [2], 4, batch_size=5)[2]
    np.testing.assert_allclose(other[:j], base[2][:j], atol=1e-5)  # earlier words never see word j
    assert not np.allclose(other[j], base[2][j])


@pytest.mark.parametrize("family", [f for f, (_, causal) in FAMILIES.items() if causal])
def test_causal_family_strided_matches_per_word_reference(family_dirs, family):
    """Special tokens (BOS or none) are handled the same in strided and per-word windows."""
    lm = load_language_model(str(family_dirs[family]), device="cpu")
    strided = extract_word_features(STORY, lm, [1, 2], 3, batch_size=4)
    reference = extract_word_features_per_word(STORY, lm, [1, 2], 3, window_starts=causal_window_starts(STORY, lm, 3))
    for layer in (1, 2):
        np.testing.assert_allclose(strided[layer], reference[layer], atol=1e-4)


def test_tokenizer_that_gives_no_tokens_is_refused(family_dirs, tmp_path):
    """A word-level tokenizer saved beside a Qwen2 model is rebuilt as (empty) BPE by transformers."""
    import shutil

    folder = tmp_path / "qwen2-wrong-tokenizer"
    shutil.copytree(family_dirs["qwen2"], folder)
    for f in folder.glob("*token*"):
        f.unlink()
    _save_tokenizer(folder, "none")
    lm = load_language_model(str(folder), device="cpu")
    with pytest.raises(ModelError, match="gives no tokens.*tokenizer class"):
        extract_word_features(STORY, lm, [1], 2)


def test_t5_loads_its_encoder_only(family_dirs):
    lm = load_language_model(str(family_dirs["t5"]), device="cpu")
    assert type(lm.model).__name__ == "T5EncoderModel"
    with pytest.raises(ModelError, match="encoder-decoder"):
        load_language_model(str(family_dirs["t5"]), device="cpu", head="causal_lm")


# --------------------------------------------------------------------------- dtypes


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_features_are_float32_and_close(family_dirs, family, dtype):
    import torch

    full = load_language_model(str(family_dirs[family]), device="cpu", dtype="float32")
    half = load_language_model(str(family_dirs[family]), device="cpu", dtype=dtype)
    assert half.runtime.dtype == dtype and next(half.model.parameters()).dtype == getattr(torch, dtype)
    a = extract_word_features(STORY, full, [1, 2], 4)
    b = extract_word_features(STORY, half, [1, 2], 4)
    for layer in (1, 2):
        assert b[layer].dtype == np.float32
        assert not np.array_equal(a[layer], b[layer])  # it did compute in half precision
        assert _relative_error(b[layer], a[layer]) < (0.05 if dtype == "bfloat16" else 0.01)


def test_device_map_auto_gives_the_same_features(family_dirs):
    """device_map: auto (accelerate) on a machine without a GPU keeps the model on the CPU, same numbers."""
    one = load_language_model(str(family_dirs["llama"]), device="cpu")
    sharded = load_language_model(str(family_dirs["llama"]), dtype="float32", device_map="auto")
    assert sharded.runtime.device == "auto" and sharded.runtime.device_map == "auto"
    a = extract_word_features(STORY, one, [1, 2], 4)
    b = extract_word_features(STORY, sharded, [1, 2], 4)
    for layer in (1, 2):
        np.testing.assert_allclose(a[layer], b[layer], atol=1e-5)


def test_auto_dtype_follows_device_and_size():
    from transformers import LlamaConfig

    seven_b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          vocab_size=32000)
    tiny = LlamaConfig(vocab_size=64, num_key_value_heads=1, **SMALL)
    assert 6.4e9 < approx_parameters(seven_b) < 7.0e9  # LLaMA-7B: 6.7e9
    assert resolve_runtime(seven_b, device="cuda").dtype == "bfloat16"
    assert resolve_runtime(seven_b, device="cpu").dtype == "float32"
    assert resolve_runtime(tiny, device="cuda").dtype == "float32"
    assert resolve_runtime(seven_b, device="cuda:1", dtype="float16").dtype == "float16"


def test_bad_dtype_and_quantization_without_gpu_are_refused(family_dirs):
    spec = {"name": "lm", "kind": "language_model", "model": str(family_dirs["gpt2"])}
    with pytest.raises(ConfigError, match="dtype"):
        parse_feature({**spec, "dtype": "fp8"})
    with pytest.raises(ConfigError, match="quantization"):
        parse_feature({**spec, "quantization": "3bit"})
    with pytest.raises(ConfigError, match="device_map"):
        parse_feature({**spec, "device_map": "balanced_low_0"})
    with pytest.raises(ConfigError, match=r"features\[lm\]\.quantization: '8bit' .*CUDA GPU.*remove 'quantization'"):
        model_runtime({**spec, "quantization": "8bit"}, device="cpu")
    with pytest.raises(ConfigError, match="quantization"):
        load_language_model(str(family_dirs["gpt2"]), device="cpu", quantization="4bit")
    with pytest.raises(ConfigError, match="dtype"):
        load_language_model(str(family_dirs["gpt2"]), device="cpu", dtype="float64")


def test_cache_key_follows_the_resolved_dtype_and_device(family_dirs):
    spec = {"name": "lm", "kind": "language_model", "model": str(family_dirs["gpt2"]), "layer": 1}
    auto_cpu = model_runtime(spec, device="cpu")
    assert auto_cpu["dtype"] == "float32" and auto_cpu["device"] == "cpu"
    bf16 = model_runtime({**spec, "dtype": "bfloat16"}, device="cpu")
    key = cache_key(spec, "sha-story", runtime=auto_cpu)
    assert cache_key(spec, "sha-story", runtime=dict(auto_cpu)) == key
    assert cache_key(spec, "sha-story", runtime={**auto_cpu, "dtype": "bfloat16"}) != key
    assert cache_key(spec, "sha-story", runtime={**auto_cpu, "device": "cuda"}) != key
    assert cache_key(spec, "sha-story", runtime={**auto_cpu, "device": "cuda:1"}) == cache_key(
        spec, "sha-story", runtime={**auto_cpu, "device": "cuda"})  # which GPU does not matter
    assert cache_key({**spec, "dtype": "bfloat16"}, "sha-story", runtime=bf16) != key
    assert model_runtime({"name": "wr", "kind": "word_rate"}) is None


# ------------------------------------------------------------------- passes stopped at the layer asked for

def _count_calls(module) -> tuple[list, object]:
    calls: list = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_layer_runs_the_model_only_to_that_layer(family_dirs, family):
    """Layers below the last come from passes stopped there, equal to the model's own hidden states."""
    from pipelines.features.layer_taps import LayerTaps, layer_stack

    lm = load_language_model(str(family_dirs[family]), device="cpu")
    stack = layer_stack(lm.model, lm.n_layers)
    calls, handle = _count_calls(stack[-1])
    whole = extract_word_features(STORY, lm, [0, 1, 2], 4, batch_size=5)  # the last layer: whole passes
    assert len(calls) > 0 and lm.layer_taps is None
    for layer, checks in ((0, 1), (1, 0), (0, 0)):
        calls.clear()
        single = extract_word_features(STORY, lm, [layer], 4, batch_size=5)[layer]
        # the last block ran only for the one-row check of the hooks against a whole pass, the first time
        assert len(calls) == checks, f"the last block ran for layer {layer}"
        np.testing.assert_allclose(single, whole[layer], rtol=1e-5, atol=1e-6)
    assert isinstance(lm.layer_taps, LayerTaps)
    calls.clear()
    again = extract_word_features(STORY, lm, [1, 2], 4, batch_size=5)  # the hooks stay out of whole passes
    assert len(calls) > 0
    np.testing.assert_array_equal(again[2], whole[2])
    handle.remove()


def test_a_stack_that_disagrees_with_the_model_is_not_used(family_dirs, monkeypatch):
    """The hooks are checked against the model's own hidden states; a wrong stack means whole passes."""
    import torch

    from pipelines.features import layer_taps
    from pipelines.features.layer_taps import WholePasses

    lm = load_language_model(str(family_dirs["llama"]), device="cpu")
    whole = extract_word_features(STORY, lm, [1, 2], 4, batch_size=5)[1]
    blocks = list(lm.model.layers)
    before = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks]  # transformers' own
    monkeypatch.setattr(layer_taps, "layer_stack",
                        lambda model, n: torch.nn.ModuleList(list(model.layers)[::-1]))
    single = extract_word_features(STORY, lm, [1], 4, batch_size=5)[1]
    assert isinstance(lm.layer_taps, WholePasses)
    np.testing.assert_array_equal(single, whole)
    assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in blocks] == before  # ours taken off


def test_a_model_without_one_stack_of_blocks_runs_whole(family_dirs):
    from pipelines.features.layer_taps import WholePasses, layer_stack

    lm = load_language_model(str(family_dirs["gpt2"]), device="cpu")
    assert layer_stack(lm.model, 3) is None and layer_stack(lm.model, 0) is None
    lm.n_layers = 3  # as if the config counted blocks the model does not hold as one list
    feats = extract_word_features(STORY, lm, [1], 4, batch_size=5)[1]
    assert isinstance(lm.layer_taps, WholePasses) and np.isfinite(feats).all()


def test_threads_sharing_a_model_get_their_own_layers(family_dirs):
    """Two threads stopping one model at different layers, on different stories, at once."""
    from concurrent.futures import ThreadPoolExecutor

    lm = load_language_model(str(family_dirs["gpt_neox"]), device="cpu")
    other = STORY[::-1]
    jobs = [(STORY, 0), (other, 1), (STORY, 1), (other, 0)] * 3
    alone = {(id(words), layer): extract_word_features(words, lm, [layer], 3, batch_size=2)[layer]
             for words, layer in jobs[:4]}
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: extract_word_features(job[0], lm, [job[1]], 3, batch_size=2)[job[1]], jobs))
    for (words, layer), feats in zip(jobs, got):
        np.testing.assert_array_equal(feats, alone[(id(words), layer)])


def test_a_copied_model_gets_hooks_of_its_own(family_dirs):
    """An untrained copy (``dataclasses.replace`` of a model already stopped at a layer) is stopped
    through its own blocks, not the original's hooks."""
    from pipelines.features.baselines import untrained_model
    from pipelines.features.layer_taps import LayerTaps

    lm = load_language_model(str(family_dirs["qwen2"]), device="cpu")
    trained = extract_word_features(STORY, lm, [1], 4, batch_size=5)[1]
    fresh = untrained_model(lm)
    assert fresh.layer_taps is lm.layer_taps  # copied along with the rest
    single = extract_word_features(STORY, fresh, [1], 4, batch_size=5)[1]
    whole = extract_word_features(STORY, fresh, [1, 2], 4, batch_size=5)[1]
    assert isinstance(fresh.layer_taps, LayerTaps) and fresh.layer_taps.model is fresh.model
    np.testing.assert_allclose(single, whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(single, trained)
    np.testing.assert_array_equal(extract_word_features(STORY, lm, [1], 4, batch_size=5)[1], trained)
