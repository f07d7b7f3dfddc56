"""Layer sweeps that stream: every layer written to its file as computed, the same numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.cache import load_npz
from pipelines.features.language_model import extract_word_features, load_language_model, stream_word_features
from pipelines.features.layer_files import LayerFiles, all_finite, write_npz
from pipelines.features.registry import FeatureResult, Stimulus, compute_feature, parse_feature
from pipelines.resultstore import ResultStore
from pipelines.steps.features import read_feature_cache, stimulus_features

STORY = ("alice was beginning to get very tired of sitting by her sister on the bank and of having nothing to do "
         "once or twice she had peeped into the book her sister was reading").split()


def test_layer_files_write_rows_in_any_order(tmp_path, rng):
    expected = rng.normal(size=(50, 6)).astype(np.float32)
    with LayerFiles(tmp_path, ["a", "b"], 50, 6) as files:
        order = rng.permutation(50)
        for chunk in np.array_split(order, 7):  # scattered rows, some runs of consecutive ones
            files.write("a", chunk, expected[chunk])
        files.write("b", np.arange(10, 20), expected[10:20] * 2)
    np.testing.assert_array_equal(np.load(files.paths["a"]), expected)
    b = np.load(files.paths["b"])
    np.testing.assert_array_equal(b[10:20], expected[10:20] * 2)
    assert not b[:10].any() and all_finite(files.paths["b"])
    entry = write_npz(tmp_path / "entry.npz", files.paths, {"__times": np.arange(50.0)})
    with np.load(entry) as npz:
        assert sorted(npz.files) == ["__times", "a", "b"]
        np.testing.assert_array_equal(npz["a"], expected)
    (tmp_path / "other").mkdir()
    with LayerFiles(tmp_path / "other", ["c"], 5, 6) as other, pytest.raises(ValueError, match="rows must have shape"):
        other.write("c", np.arange(2), expected[:3])


def test_non_finite_values_are_found(tmp_path):
    with LayerFiles(tmp_path, ["x"], 4, 3) as files:
        files.write("x", np.array([2]), np.array([[1.0, np.nan, 0.0]], dtype=np.float32))
    assert not all_finite(files.paths["x"])


@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_streamed_sweep_equals_the_in_memory_one(tiny_gpt2_dir, tiny_bert_dir, tmp_path, which):
    lm = load_language_model(str(tiny_gpt2_dir if which == "gpt2" else tiny_bert_dir), device="cpu")
    layers = [0, 1, 2, -1]
    ref = extract_word_features(STORY, lm, layers, 4, batch_size=3)
    spaces = {0: "layer0", 1: "layer1", 2: "layer2", -1: "last"}
    with LayerFiles(tmp_path, list(spaces.values()), len(STORY), lm.hidden_size) as files:
        stream_word_features(STORY, lm, layers, 4, files, spaces, batch_size=3)
    for layer, name in spaces.items():
        np.testing.assert_array_equal(np.load(files.paths[name]), ref[layer])


def test_the_features_step_streams_a_sweep_into_the_cache_the_fit_reads(tiny_gpt2_dir, results_bucket, tmp_path):
    store = ResultStore(results_bucket)
    words = pd.DataFrame({"word": STORY, "onset": np.arange(len(STORY)) * 0.4,
                          "offset": np.arange(len(STORY)) * 0.4 + 0.3})
    stim = Stimulus(words=words)
    spec = parse_feature({"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "layer": "all",
                          "context_words": 3})
    spaces, computed, rel = stimulus_features(store, spec, stim, "sha-story", workdir=tmp_path)
    assert computed and spaces == ["layer0", "layer1", "layer2"]
    expected = compute_feature(spec, stim)
    got = read_feature_cache(store, rel, "lm")  # what the fit reads
    np.testing.assert_allclose(got.times, expected.times)
    assert got.sampling == "events"
    for space in spaces:
        np.testing.assert_array_equal(got.values[space], expected.values[space])
    assert stimulus_features(store, spec, stim, "sha-story", workdir=tmp_path) == (spaces, False, rel)
    # a corrupt entry is recomputed, not trusted
    arrays = load_npz(store.get_bytes(rel))
    arrays["layer1"] = arrays["layer1"][:3]
    from pipelines.cache import save_npz

    store.put_bytes(save_npz(arrays), rel)
    assert stimulus_features(store, spec, stim, "sha-story", workdir=tmp_path) == (spaces, True, rel)
    assert FeatureResult.from_arrays(load_npz(store.get_bytes(rel))).values["layer1"].shape == (len(STORY), 32)
    assert not list(tmp_path.iterdir())  # the layer files are gone once uploaded


def test_streamed_speech_sweep_equals_the_in_memory_one(tmp_path):
    """A speech-model layer sweep through stream_feature: the same rows as compute_feature."""
    import torch
    from scipy.io import wavfile
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from pipelines.features.registry import stream_feature

    folder = tmp_path / "w2v"
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                 vocab_size=8)).save_pretrained(folder, safe_serialization=True)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    t = np.arange(int(2.2 * 16000)) / 16000
    wav = tmp_path / "story.wav"
    wavfile.write(wav, 16000, (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) * 32767).astype(np.int16))
    stim = Stimulus(audio=wav, offset=1.5)
    spec = {"name": "w2v", "kind": "speech_model", "model": str(folder), "layer": [0, 2, -1], "window_s": 1.0,
            "step_s": 0.2, "batch_size": 3}
    expected = compute_feature(spec, stim)
    (tmp_path / "spaces").mkdir()
    meta, files = stream_feature(spec, stim, tmp_path / "spaces")
    assert sorted(files) == ["layer-1", "layer0", "layer2"] and meta.sampling == "regular" and meta.sfreq == 5.0
    np.testing.assert_allclose(meta.times, expected.times)
    for space, path in files.items():
        np.testing.assert_array_equal(np.load(path), expected.values[space])
    assert stream_feature({"name": "wr", "kind": "word_rate"}, stim, tmp_path) is None
