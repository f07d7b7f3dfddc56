"""The batched strided extractor: windows assembled from tokens computed once, target positions
found at once, and the stride that fills the model's window (issue 17, item 5).

Each fast path is compared with the plain computation it replaces: the tokenizer run on each
window, a scan per target word, and the per-word reference with the same visible words.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.errors import ConfigError
from pipelines.features.language_model import (
    causal_window_starts,
    extract_word_features,
    extract_word_features_per_word,
    load_language_model,
    word_token_counts,
)
from pipelines.features.lm_batches import story_word_tokens, target_positions, tokenize_windows
from pipelines.features.lm_windows import LoadedModel, Window, strided_plan, tokenize_window
from pipelines.features.registry import parse_feature

STORY = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having "
         "nothing to do: once or twice she had peeped into the book her sister was reading, but it had "
         "no pictures or conversations in it, 'and what is the use of a book,' thought Alice "
         "'without pictures or conversations?' So she was considering in her own mind").split()


def _bpe_gpt2(path):
    """Byte-level BPE with a prefix space on every word (GPT-2's)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator([" ".join(STORY)] * 4, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                      unk_token="<|endoftext|>", add_prefix_space=True).save_pretrained(path)


def _metaspace(path, scheme: str):
    """A SentencePiece-style BPE (Metaspace, LLaMA's) with a BOS token, prepended space ``scheme``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.train_from_iterator([" ".join(STORY)] * 4, trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(path)


def _wordpiece(path):
    """BERT's WordPiece with [CLS] .. [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([" ".join(STORY)] * 4, trainer=trainers.WordPieceTrainer(
        vocab_size=150, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(path)


TOKENIZERS = {"gpt2_bpe": _bpe_gpt2, "metaspace_first": lambda p: _metaspace(p, "first"),
              "metaspace_always": lambda p: _metaspace(p, "always"), "wordpiece": _wordpiece}


def _loaded(path, max_tokens: int = 64) -> LoadedModel:
    from transformers import AutoTokenizer

    return LoadedModel(tokenizer=AutoTokenizer.from_pretrained(path), model=None, is_causal=True, n_layers=1,
                       hidden_size=1, name=str(path), max_tokens=max_tokens)


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("context", [0, 3, 11])
def test_windows_from_tokens_once_equal_the_tokenizer_on_each_window(tmp_path, kind, context):
    TOKENIZERS[kind](tmp_path)
    lm = _loaded(tmp_path)
    words = STORY * 3
    counts, n_special = word_token_counts(words, lm)
    plan = strided_plan(len(words), context, counts, lm.max_tokens - n_special)
    strided = [Window(words=words[s:e], targets=list(range(f - s, e - s)), dest=list(range(f, e)), start=s)
               for s, f, e in plan]
    per_word = [Window(words=words[max(0, i - context): i + 1], targets=[min(i, context)], dest=[i],
                       start=max(0, i - context)) for i in range(len(words))]
    for windows in (strided, per_word):
        expected = [tokenize_window(lm, w.words) for w in windows]
        assert tokenize_windows(lm, words, windows) == expected


class _FirstWordMarked:
    """A tokenizer whose tokens of a word depend on its place: the first word of every call is marked."""

    def __init__(self, inner, mark: bool = True):
        self.inner = inner
        self.mark = mark
        self.calls = 0

    def __getattr__(self, name):  # pad/eos ids and the rest: the wrapped tokenizer's
        return getattr(self.inner, name)

    def __call__(self, words, **kwargs):
        self.calls += 1
        enc = self.inner(words, **kwargs)
        wids = enc.word_ids()
        ids = [t + 1000 if self.mark and w == 0 else t for t, w in zip(enc["input_ids"], wids)]

        class _Enc(dict):
            def word_ids(self):
                return wids

        return _Enc(input_ids=ids)


def test_a_tokenizer_whose_words_depend_on_their_place_falls_back_to_each_window(tmp_path):
    """A window assembled from the story's tokens is checked against the tokenizer: where a word's
    tokens depend on where it sits, every window goes to the tokenizer."""
    _bpe_gpt2(tmp_path)
    lm = _loaded(tmp_path, max_tokens=512)
    words = STORY
    windows = [Window(words=words[s: s + 8], targets=[7], dest=[s + 7], start=s) for s in range(1, 40, 5)]
    plain = tokenize_windows(lm, words, windows)
    lm.tokenizer = _FirstWordMarked(lm.tokenizer)
    expected = [tokenize_window(lm, w.words) for w in windows]
    assert expected != plain  # the marked first word differs
    lm.tokenizer.calls = 0
    assert tokenize_windows(lm, words, windows) == expected
    assert lm.tokenizer.calls > len(windows)  # the check failed, and every window went to the tokenizer
    # a window whose start is unknown is tokenized on its own
    odd = [Window(words=w.words, targets=w.targets, dest=w.dest) for w in windows]
    assert tokenize_windows(lm, words, odd) == expected


def test_story_tokenized_once_for_plan_and_windows(tmp_path):
    """Windows built from tokens the caller has (the plan's) ask the tokenizer only for the special
    tokens' template and three checked windows; the whole extraction tokenizes the story once."""
    _bpe_gpt2(tmp_path)
    lm = _loaded(tmp_path, max_tokens=512)
    lm.tokenizer = _FirstWordMarked(lm.tokenizer, mark=False)
    words = STORY * 5  # two tokenizer calls of 256 words
    tokens = story_word_tokens(lm, words)
    assert lm.tokenizer.calls == 2
    windows = [Window(words=words[s: s + 8], targets=[7], dest=[s + 7], start=s) for s in range(0, 300, 5)]
    lm.tokenizer.calls = 0
    tokenize_windows(lm, words, windows, tokens)
    assert lm.tokenizer.calls == 4  # the special tokens' template and three checked windows


def test_the_extractor_tokenizes_a_story_once(tiny_gpt2):
    lm = load_language_model(tiny_gpt2, device="cpu")
    lm.tokenizer = _FirstWordMarked(lm.tokenizer, mark=False)
    words = STORY * 5  # two chunks of 256 words
    extract_word_features(words, lm, [1], 4, stride_words="fill")
    # the story (2 chunks), the special-token count, the template and three checked windows
    assert lm.tokenizer.calls == 2 + 1 + 1 + 3


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_target_positions_equal_a_scan_per_word(pooling):
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_words = int(rng.integers(1, 30))
        per_word = rng.integers(1, 4, n_words)
        wids: list[int | None] = [None] * int(rng.integers(0, 3))
        for w, k in enumerate(per_word):
            wids.extend([w] * int(k))
        wids.extend([None] * int(rng.integers(0, 2)))
        targets = sorted(rng.choice(n_words, int(rng.integers(1, n_words + 1)), replace=False).tolist())
        pos, slots = target_positions(wids, targets, pooling)
        arr = np.array([-1 if w is None else w for w in wids])
        exp_pos, exp_slots = [], []
        for slot, t in enumerate(targets):  # the scan it replaces
            where = np.flatnonzero(arr == t)
            where = where[-1:] if pooling == "last" else where
            exp_pos.extend(where.tolist())
            exp_slots.extend([slot] * where.size)
        assert pos.tolist() == exp_pos and slots.tolist() == exp_slots


def test_target_without_tokens_names_the_target():
    with pytest.raises(ValueError) as err:
        target_positions([None, 0, 0, 2, None], [0, 1, 2], "last")
    assert err.value.args[0] == 1


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2Model

    path = tmp_path_factory.mktemp("tiny-gpt2-bpe")
    _bpe_gpt2(path)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=48)).save_pretrained(
        path, safe_serialization=True)
    return str(path)


@pytest.mark.parametrize("stride", [None, 1, 5, "fill"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_strides_match_the_per_word_reference(tiny_gpt2, stride, pooling):
    lm = load_language_model(tiny_gpt2, device="cpu")
    words = STORY * 2
    strided = extract_word_features(words, lm, [0, 1, 2], 4, batch_size=3, pooling=pooling, stride_words=stride)
    starts = causal_window_starts(words, lm, 4, stride_words=stride)
    assert np.all(np.arange(len(words)) - starts >= np.minimum(np.arange(len(words)), 4))  # context kept
    reference = extract_word_features_per_word(words, lm, [0, 1, 2], 4, window_starts=starts, pooling=pooling)
    for layer in (0, 1, 2):
        np.testing.assert_allclose(strided[layer], reference[layer], atol=1e-5)


def test_fill_passes_fewer_tokens_through_the_model(tiny_gpt2):
    """The default stride runs each token about twice; 'fill' about 1 + context / limit times."""
    lm = load_language_model(tiny_gpt2, device="cpu")
    words = STORY * 6
    counts, n_special = word_token_counts(words, lm)
    limit = lm.max_tokens - n_special

    def passes(stride):
        plan = strided_plan(len(words), 2, counts, limit, stride)
        return sum(int(counts[s:e].sum()) for s, _, e in plan) / counts.sum()

    default, fill = passes(None), passes(len(words))
    assert default > 1.6 and fill < default * 0.75


def test_stride_words_key_is_checked_and_left_out_of_ids_by_default(tiny_gpt2):
    base = {"name": "lm", "kind": "language_model", "model": tiny_gpt2}
    assert "stride_words" not in parse_feature(base).model_dump(mode="json")
    assert parse_feature({**base, "stride_words": "fill"}).model_dump(mode="json")["stride_words"] == "fill"
    for bad in (0, -3, "full", 2.5):
        with pytest.raises(ConfigError, match="stride_words"):
            parse_feature({**base, "stride_words": bad})
    lm = load_language_model(tiny_gpt2, device="cpu")
    with pytest.raises(ValueError, match="stride_words"):
        extract_word_features(STORY, lm, [1], 2, stride_words=0)


def test_length_batches_bound_rows_tokens_and_padding():
    from pipelines.features.lm_windows import length_batches

    rng = np.random.default_rng(1)
    for _ in range(100):
        lengths = rng.integers(1, 400, int(rng.integers(1, 60))).tolist()
        batches = length_batches(lengths, 8, 1000)
        assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
        for b in batches:
            width = max(lengths[k] for k in b)
            assert len(b) <= 8
            if len(b) > 1:
                assert len(b) * width <= 1000
                assert len(b) * width - sum(lengths[k] for k in b) <= 0.25 * len(b) * width
    # a long window and a short one are not padded to the same width
    assert length_batches([4096, 1300], 32, 16384) == [[1], [0]]
    assert length_batches([4096, 4000], 32, 16384) == [[1, 0]]
