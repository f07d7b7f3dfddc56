"""The feature registry (kinds, validation, cache keys, alignment) and MEG/ECoG lags."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.io import wavfile

from pipelines.errors import ConfigError, DatasetError
from pipelines.features.align import average_within_tr, lanczos_resample
from pipelines.features.lags import lag_samples, make_lags, to_sample_times, trf_design
from pipelines.features.language_model import extract_word_features
from pipelines.features.cache_keys import cache_key
from pipelines.features.registry import (
    KINDS,
    FeatureResult,
    ModelCache,
    Stimulus,
    align_to_samples,
    compute_feature,
    parse_feature,
    space_names,
)

STORY = (
    "alice was beginning to get very tired of sitting by her sister on the bank and of having "
    "nothing to do once or twice she had peeped into the book her sister was reading"
).split()


def _words_table(words=STORY, start=3.0, step=0.35) -> pd.DataFrame:
    onsets = start + step * np.arange(len(words))
    return pd.DataFrame({"onset": onsets, "offset": onsets + 0.3, "word": words})


# --------------------------------------------------------------------------- validation


def test_every_kind_parses_with_defaults():
    minimal = {"language_model": {"model": "m"}, "speech_model": {"model": "m"}, "surprisal": {"model": "m"}}
    for kind in KINDS:
        spec = parse_feature({"name": f"f_{kind}", "kind": kind, **minimal.get(kind, {})})
        assert spec.kind == kind
    assert set(KINDS) == {"word_rate", "language_model", "speech_model", "spectrogram", "envelope",
                          "phoneme_rate", "word_frequency", "surprisal", "events"}


def test_the_configs_own_feature_models_are_accepted():
    from pipelines.config import LanguageModelFeature as ConfigLM

    spec = parse_feature(ConfigLM(name="lm", kind="language_model", model="m", layer=3))
    from pipelines.features import registry

    assert type(spec) is registry.LanguageModelFeature and spec.layer == 3 and spec.batch_tokens is None


@pytest.mark.parametrize("params, message", [
    ({"name": "a", "kind": "spectogram"}, "Did you mean 'spectrogram'"),
    ({"name": "a", "kind": "speech_model", "model": "m", "windw_s": 8}, "Did you mean 'window_s'"),
    ({"name": "a", "kind": "speech_model", "model": "m", "window_s": 1, "step_s": 2}, "step_s"),
    ({"name": "a", "kind": "spectrogram", "n_mels": 0}, "n_mels"),
    ({"name": "a", "kind": "spectrogram", "fmin": 500, "fmax": 100}, "fmax"),
    ({"name": "a", "kind": "language_model", "model": "m", "layer": "last"}, "layer"),
    ({"name": "a", "kind": "events", "mode": "ramp"}, "mode"),
    ({"name": "1bad", "kind": "word_rate"}, "name"),
])
def test_invalid_parameters_are_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_feature(params, origin="features[0]")


# --------------------------------------------------------------------------- cache keys


def test_cache_key_changes_with_parameters_only(tiny_gpt2_dir, tmp_path):
    base = {"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "layer": 2, "context_words": 8}
    key = cache_key(base, "sha-story")
    assert cache_key(dict(base), "sha-story") == key  # unchanged: reused
    assert cache_key({**base, "name": "other", "batch_size": 3, "batch_tokens": 64}, "sha-story") == key
    for change in ({"layer": 1}, {"context_words": 9}, {"pooling": "mean"}, {"layer": [1, 2]}):
        assert cache_key({**base, **change}, "sha-story") != key, change
    assert cache_key(base, "sha-other-story") != key
    copy = tmp_path / "copy"
    shutil.copytree(tiny_gpt2_dir, copy)
    assert cache_key({**base, "model": str(copy)}, "sha-story") == key  # same files, same key
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert cache_key({**base, "model": str(copy)}, "sha-story") != key  # model content changed
    spec = {"name": "sp", "kind": "spectrogram"}
    assert cache_key(spec, "s") != cache_key({**spec, "n_mels": 32}, "s")
    assert cache_key(spec, "s") != cache_key({"name": "sp", "kind": "envelope"}, "s")


# --------------------------------------------------------------------------- computing


def test_layer_sweep_through_the_registry(tiny_gpt2_dir):
    stim = Stimulus(words=_words_table())
    models = ModelCache()
    loads = []
    original = models.get

    def counting_get(key, loader):
        if key not in models._models:
            loads.append(key)
        return original(key, loader)

    models.get = counting_get
    spec = {"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "context_words": 4}
    sweep = compute_feature({**spec, "layer": "all"}, stim, device="cpu", models=models)
    names = space_names(parse_feature({**spec, "layer": "all"}), n_layers=2)
    assert list(sweep.values) == ["layer0", "layer1", "layer2"] == names
    assert sweep.sampling == "events" and sweep.times.shape == (len(STORY),)
    for layer in (0, 1, 2):
        single = compute_feature({**spec, "layer": layer}, stim, device="cpu", models=models)
        np.testing.assert_allclose(sweep.values[f"layer{layer}"], single.single(), atol=1e-5)
    assert len(loads) == 1  # one model load for all four feature spaces
    direct = extract_word_features(STORY, models._models[loads[0]], [1], 4)[1]
    sweep1 = compute_feature({**spec, "layer": [1]}, stim, device="cpu", models=models)
    np.testing.assert_allclose(sweep1.values["layer1"], direct, atol=1e-5)


def test_word_level_kinds_and_missing_inputs(tiny_gpt2_dir):
    stim = Stimulus(words=_words_table())
    rate = compute_feature({"name": "wr", "kind": "word_rate"}, stim)
    np.testing.assert_array_equal(rate.single(), np.ones((len(STORY), 1)))
    np.testing.assert_allclose(rate.times[0], 3.15)
    with pytest.raises(DatasetError, match="'audio'"):
        compute_feature({"name": "sp", "kind": "spectrogram"}, stim)
    with pytest.raises(DatasetError, match="'events'"):
        compute_feature({"name": "ev", "kind": "events"}, stim)


def test_audio_kinds_through_the_registry(tmp_path):
    sr = 16000
    t = np.arange(3 * sr) / sr
    wavfile.write(tmp_path / "story.wav", sr, (0.3 * np.sin(2 * np.pi * 700 * t) * 32767).astype(np.int16))
    stim = Stimulus(audio=tmp_path / "story.wav", offset=20.0)
    spec = compute_feature({"name": "sp", "kind": "spectrogram", "n_mels": 16, "sample_rate": 8000}, stim)
    assert spec.sampling == "regular" and spec.sfreq == pytest.approx(100.0)
    assert spec.single().shape == (301, 16) and len(spec.columns) == 16
    assert spec.times[0] == pytest.approx(20.0)
    env = compute_feature({"name": "env", "kind": "envelope", "sfreq": 50}, stim)
    assert env.single().shape == (150, 1) and env.times[-1] == pytest.approx(20.0 + 149 / 50)
    np.testing.assert_allclose(env.single()[10:-10, 0], 0.3, atol=0.01)


def test_events_kind_and_result_round_trip(tmp_path):
    path = tmp_path / "events.tsv"
    path.write_text("onset\tduration\ttrial_type\n0\t10\tspeech\n12\t4\tmusic\n")
    res = compute_feature({"name": "ev", "kind": "events", "trial_types": ["speech", "music", "silence"]},
                          Stimulus(events=path))
    assert res.columns == ["speech", "music", "silence"] and res.sfreq == 10.0
    tr_grid = np.arange(1.0, 16.0, 2.0)  # TRs [0, 2), [2, 4), ... [14, 16)
    on_tr = align_to_samples(res, tr_grid, method="average")  # fraction of each TR covered
    np.testing.assert_allclose(on_tr[:, 0], [1, 1, 1, 1, 1, 0, 0, 0], atol=0.03)
    np.testing.assert_allclose(on_tr[:, 1], [0, 0, 0, 0, 0, 0, 1, 1], atol=0.03)
    np.testing.assert_array_equal(on_tr[:, 2], 0)
    back = FeatureResult.from_arrays(res.to_arrays())
    assert back.columns == res.columns and back.sampling == "regular" and back.sfreq == 10.0
    np.testing.assert_array_equal(back.single(), res.single())


def test_align_to_samples_methods(rng):
    times = np.sort(rng.uniform(0, 100, 300))
    res = FeatureResult({"values": rng.normal(size=(300, 2)).astype(np.float32)}, times, "events")
    grid = np.arange(0.0, 100.0, 2.0)
    np.testing.assert_allclose(align_to_samples(res, grid), lanczos_resample(res.single(), times, grid))
    np.testing.assert_allclose(align_to_samples(res, grid, method="average"),
                               average_within_tr(res.single(), times, grid, 2.0))
    fine = np.arange(0.0, 100.0, 0.01)
    assert align_to_samples(res, fine, method="samples").sum() == pytest.approx(res.single().sum(), rel=1e-5)
    with pytest.raises(ValueError, match="method"):
        align_to_samples(res, grid, method="cubic")


# --------------------------------------------------------------------------- MEG / ECoG lags


def test_lag_samples_and_trf_design():
    np.testing.assert_array_equal(lag_samples(-0.1, 0.3, 100), np.arange(-10, 31))
    X = np.arange(1.0, 11.0)[:, None]
    design, lag_times = trf_design(X, [6, 4], sfreq=10.0, tmin=-0.1, tmax=0.2)
    np.testing.assert_allclose(lag_times, [-0.1, 0.0, 0.1, 0.2])
    expected = np.array([
        # lag -1       0    +1   +2
        [2, 1, 0, 0], [3, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2], [6, 5, 4, 3], [0, 6, 5, 4],  # run 1
        [8, 7, 0, 0], [9, 8, 7, 0], [10, 9, 8, 7], [0, 10, 9, 8],  # run 2: nothing from run 1
    ])
    np.testing.assert_array_equal(design, expected)
    with pytest.raises(ConfigError, match="tmin"):
        lag_samples(0.3, 0.1, 100)
    with pytest.raises(ConfigError, match="run 1 has only 4"):
        trf_design(X, [6, 4], sfreq=10.0, tmin=0.0, tmax=0.4)


def test_lags_are_zero_across_run_boundaries(rng):
    X = rng.normal(size=(50, 3))
    runs = [20, 18, 12]
    lags = list(range(-3, 6))
    out = make_lags(X, runs, lags)
    starts = np.cumsum([0] + runs[:-1])
    for k, d in enumerate(lags):
        block = out[:, 3 * k : 3 * (k + 1)]
        for s, r in zip(starts, runs):
            if d > 0:
                assert np.all(block[s : s + d] == 0)
                np.testing.assert_array_equal(block[s + d : s + r], X[s : s + r - d])
            elif d < 0:
                assert np.all(block[s + r + d : s + r] == 0)
                np.testing.assert_array_equal(block[s : s + r + d], X[s - d : s + r])


def test_events_become_a_stick_function():
    times = np.array([0.004, 0.5, 0.5, 2.0, 9.0])
    values = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    out = to_sample_times(values, times, np.arange(0.0, 3.0, 0.01), sampling="events")
    assert out.shape == (300, 1) and out.sum() == pytest.approx(10.0)  # the event at 9 s is outside
    assert out[0, 0] == 1.0 and out[50, 0] == 5.0 and out[200, 0] == 4.0


def test_regular_series_are_resampled_without_aliasing():
    src = np.arange(0.0, 20.0, 0.01)  # 100 Hz
    slow, fast = np.sin(2 * np.pi * 2 * src), np.sin(2 * np.pi * 40 * src)
    values = np.stack([slow, fast], axis=1)
    up = np.arange(0.0, 20.0, 0.004)  # 250 Hz
    out_up = to_sample_times(values, src, up, sampling="regular")
    inner = (up > 1) & (up < 19)
    np.testing.assert_allclose(out_up[inner, 0], np.sin(2 * np.pi * 2 * up[inner]), atol=0.01)
    down = np.arange(0.0, 20.0, 0.02)  # 50 Hz: 40 Hz is above the new Nyquist frequency
    out_down = to_sample_times(values, src, down, sampling="regular")
    inner = (down > 1) & (down < 19)
    np.testing.assert_allclose(out_down[inner, 0], np.sin(2 * np.pi * 2 * down[inner]), atol=0.01)
    assert np.abs(out_down[inner, 1]).max() < 0.05  # filtered out, not folded to 10 Hz
    late = np.arange(25.0, 30.0, 0.01)
    assert np.all(to_sample_times(values, src, late, sampling="regular") == 0)
    with pytest.raises(ValueError, match="sampling"):
        to_sample_times(values, src, up, sampling="irregular")
