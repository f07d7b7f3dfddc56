"""Audio features: WAV reading, spectrograms, envelope, and speech encoders on causal windows.

The speech encoders are tiny random wav2vec2 / HuBERT / WavLM / Whisper models saved with
safetensors by the fixtures below; the audio is generated (tones, chirps, noise).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from scipy.io import wavfile

from pipelines.errors import DatasetError, ModelError
from pipelines.features.acoustic import envelope, hz_to_mel, mel_filterbank, read_wav, resample_audio, spectrogram
from pipelines.features.speech_model import (
    LoadedSpeechModel,
    chunk_ends,
    extract_speech_features,
    load_speech_model,
)

SR = 16000


def _chirp(duration: float, sr: int = SR, f0: float = 200.0, f1: float = 3000.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(duration * sr)) / sr
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * duration))
    noise = np.random.default_rng(seed).normal(scale=0.05, size=t.size)
    return (0.5 * np.sin(phase) + noise).astype(np.float32)


# --------------------------------------------------------------------------- tiny speech models


def _wav2vec2_like(kind: str):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                  vocab_size=8)
    classes = {"wav2vec2": (Wav2Vec2Config, Wav2Vec2Model), "hubert": (HubertConfig, HubertModel),
               "wavlm": (WavLMConfig, WavLMModel)}
    config_cls, model_cls = classes[kind]
    return model_cls(config_cls(**common))


def _save_speech_model(kind: str, path) -> None:
    import torch
    from transformers import Wav2Vec2FeatureExtractor, WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    if kind == "whisper":
        cfg = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, decoder_layers=1,
                            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                            max_source_positions=250, max_target_positions=16, vocab_size=64, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None,
                            suppress_tokens=None)
        WhisperModel(cfg).save_pretrained(path, safe_serialization=True)
        WhisperFeatureExtractor(feature_size=80, chunk_length=5).save_pretrained(path)  # 5 s = 250 positions
    else:
        _wav2vec2_like(kind).save_pretrained(path, safe_serialization=True)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=False).save_pretrained(path)


@pytest.fixture(scope="module")
def speech_dirs(tmp_path_factory):
    out = {}
    for kind in ("wav2vec2", "hubert", "wavlm", "whisper"):
        path = tmp_path_factory.mktemp(f"tiny-{kind}")
        _save_speech_model(kind, path)
        out[kind] = path
    return out


@pytest.fixture(scope="module")
def w2v(speech_dirs) -> LoadedSpeechModel:
    return load_speech_model(str(speech_dirs["wav2vec2"]), device="cpu")


def _direct(sm: LoadedSpeechModel, audio: np.ndarray, end: int, win: int, chunk: int, layers) -> np.ndarray:
    """Features of one chunk the obvious way: its window alone through the model, then the frames
    whose last sample lies in the chunk (frame geometry computed here from the conv layers)."""
    import torch

    window = audio[max(0, end - win) : end]
    fe = sm.feature_extractor
    with torch.inference_mode():
        if sm.model_type == "whisper":
            inputs = {"input_features": fe([window], sampling_rate=SR, return_tensors="pt")["input_features"]}
            first_end = 2 * fe.hop_length + fe.n_fft // 2
            stride = 2 * fe.hop_length
        else:
            inputs = {"input_values": fe([window], sampling_rate=SR, return_tensors="pt")["input_values"]}
            first_end, stride = 400, 320  # wav2vec2 conv stack: receptive field 400, hop 320 samples
        hs = sm.model(**inputs, output_hidden_states=True).hidden_states
    n = window.size
    out = []
    for layer in layers:
        h = hs[layer][0].numpy()
        ends = first_end + stride * np.arange(h.shape[0])
        sel = (ends > n - chunk) & (ends <= n)
        out.append(h[sel].mean(axis=0))
    return np.stack(out)


# --------------------------------------------------------------------------- reading audio


def test_read_wav_scales_and_mixes_channels(tmp_path):
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 8000)).astype(np.float32)
    wavfile.write(tmp_path / "i16.wav", 8000, (x * 32767).astype(np.int16))
    wavfile.write(tmp_path / "f32.wav", 8000, x)
    wavfile.write(tmp_path / "stereo.wav", 8000, np.stack([x, np.zeros_like(x)], axis=1))
    a, sr = read_wav(tmp_path / "i16.wav")
    assert sr == 8000 and a.dtype == np.float32
    np.testing.assert_allclose(a, x, atol=1e-4)
    np.testing.assert_allclose(read_wav(tmp_path / "f32.wav")[0], x)
    np.testing.assert_allclose(read_wav(tmp_path / "stereo.wav")[0], x / 2, atol=1e-6)
    with pytest.raises(DatasetError, match="not found"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(DatasetError, match="WAV"):
        read_wav(tmp_path / "bad.wav")


def test_resample_keeps_the_frequency():
    sr_in, sr_out, f = 44100, 16000, 440.0
    x = np.sin(2 * np.pi * f * np.arange(sr_in) / sr_in)
    y = resample_audio(x, sr_in, sr_out)
    assert y.size == sr_out
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.fft.rfftfreq(y.size, 1 / sr_out)[spectrum.argmax()] - f) <= 1.0
    np.testing.assert_allclose(np.sqrt(np.mean(y[1000:-1000] ** 2)), np.sqrt(0.5), rtol=1e-3)


# --------------------------------------------------------------------------- spectrogram


def test_mel_filterbank_shape_and_scale():
    assert abs(float(hz_to_mel(1000.0)) - 1000.0) < 0.1  # HTK: 1000 Hz is 1000 mel
    weights, centers = mel_filterbank(SR, 512, 40)
    assert weights.shape == (40, 257) and np.all(np.diff(centers) > 0)
    freqs = np.fft.rfftfreq(512, 1 / SR)
    peaks = freqs[weights.argmax(axis=1)]
    np.testing.assert_allclose(peaks, centers, atol=freqs[1])  # each filter peaks at its centre
    area = weights.sum(axis=1) * freqs[1]
    np.testing.assert_allclose(area[10:-1], 1.0, rtol=0.05)  # unit area (slaney) once wider than a bin


def test_spectrogram_of_a_tone_and_frame_times():
    x = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)
    values, times, freqs = spectrogram(x, SR, n_mels=40)
    assert values.shape == (1 + SR // 160, 40) and values.dtype == np.float32
    np.testing.assert_allclose(times[:3], [0.0, 0.01, 0.02])
    mid = values[10:-10]
    assert np.all(np.abs(freqs[mid.argmax(axis=1)] - 1000) <= np.abs(freqs - 1000).min() + 1e-9)
    lin, _, lfreqs = spectrogram(x, SR, scale="linear", log=False, fmin=500, fmax=1500)
    assert lfreqs.min() >= 500 and lfreqs.max() <= 1500
    assert abs(lfreqs[lin[10:-10].mean(axis=0).argmax()] - 1000) <= lfreqs[1] - lfreqs[0]


def test_log_mel_of_white_noise_is_flat(rng):
    x = rng.normal(scale=0.1, size=4 * SR)
    values, _, _ = spectrogram(x, SR, n_mels=24, fmin=300, fmax=7000)
    profile = values[5:-5].mean(axis=0)
    assert profile.std() < 1.0  # dB: unit-area filters make white noise flat across bands
    lin, _, _ = spectrogram(x, SR, scale="linear", log=False)
    np.testing.assert_allclose(lin[5:-5, 5:-5].mean(), 0.01, rtol=0.05)  # mean power per bin = variance


def test_spectrogram_follows_a_chirp():
    values, _, freqs = spectrogram(_chirp(3.0), SR, n_mels=32)
    peak = freqs[values[5:-5].argmax(axis=1)]
    smooth = np.convolve(peak, np.ones(9) / 9, mode="valid")
    assert np.all(np.diff(smooth) >= -50) and smooth[-1] > 2000 > 400 > smooth[0]
    with pytest.raises(ValueError, match="scale"):
        spectrogram(np.ones(100), SR, scale="bark")
    with pytest.raises(ValueError, match="hop_s"):
        spectrogram(np.ones(100), SR, hop_s=0.1, win_s=0.02)


# --------------------------------------------------------------------------- envelope


def test_amplitude_envelope_of_an_am_tone():
    t = np.arange(4 * SR) / SR
    modulation = 1 + 0.5 * np.sin(2 * np.pi * 3 * t)
    x = 0.3 * modulation * np.sin(2 * np.pi * 800 * t)
    values, times = envelope(x, SR, sfreq=100)
    assert values.shape == (times.size, 1) and times[1] == pytest.approx(0.01)
    inner = slice(20, -20)
    expected = 0.3 * (1 + 0.5 * np.sin(2 * np.pi * 3 * times[inner]))
    np.testing.assert_allclose(values[inner, 0], expected, atol=0.01)


def test_sound_power_in_db():
    amp = 0.2
    x = amp * np.sin(2 * np.pi * 500 * np.arange(2 * SR) / SR)
    values, _ = envelope(x, SR, sfreq=50, measure="power_db")
    np.testing.assert_allclose(values[5:-5, 0], 10 * np.log10(amp**2 / 2), atol=0.1)
    silent, _ = envelope(np.zeros(SR), SR, measure="power_db")
    assert np.all(silent == pytest.approx(-100.0))
    with pytest.raises(ValueError, match="sfreq"):
        envelope(x, SR, sfreq=SR)
    with pytest.raises(ValueError, match="measure"):
        envelope(x, SR, measure="loudness")


# --------------------------------------------------------------------------- speech models


def test_chunk_ends():
    np.testing.assert_array_equal(chunk_ends(16000, SR, 0.25), [4000, 8000, 12000, 16000])
    np.testing.assert_array_equal(chunk_ends(15999, SR, 0.25), [4000, 8000, 12000])


def test_load_speech_model_geometry(speech_dirs, w2v):
    assert (w2v.n_layers, w2v.hidden_size, w2v.sampling_rate) == (2, 32, SR)
    assert (w2v.frame_stride, w2v.frame_span) == (320, 400)  # wav2vec2's conv stack at 16 kHz
    assert not w2v.model.training and w2v.max_window_s is None
    wh = load_speech_model(str(speech_dirs["whisper"]), device="cpu")
    assert (wh.model_type, wh.n_layers, wh.hidden_size, wh.max_window_s) == ("whisper", 2, 32, 5.0)
    assert (wh.frame_stride, wh.frame_span) == (320, 520)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "whisper"])
def test_windows_match_direct_computation(speech_dirs, kind):
    sm = load_speech_model(str(speech_dirs[kind]), device="cpu")
    audio = _chirp(2.5)
    window_s, step_s = 1.0, 0.25
    times, feats = extract_speech_features(audio, SR, sm, [0, 1, 2], window_s=window_s, step_s=step_s,
                                           batch_size=3)
    np.testing.assert_allclose(times, np.arange(10) * 0.25 + 0.125)
    assert all(f.shape == (10, 32) and f.dtype == np.float32 for f in feats.values())
    for k in (0, 2, 3, 4, 9):  # short windows (first second) and full ones
        end = int(round((k + 1) * step_s * SR))
        ref = _direct(sm, audio, end, int(window_s * SR), int(step_s * SR), [0, 1, 2])
        got = np.stack([feats[layer][k] for layer in (0, 1, 2)])
        np.testing.assert_allclose(got, ref, atol=2e-5)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "whisper"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_speech_features_on_chunked_audio(speech_dirs, kind, dtype):
    """Short windows (run alone) and full ones (batched) in half precision: float32 out, close to float32."""
    import torch

    full = load_speech_model(str(speech_dirs[kind]), device="cpu", dtype="float32")
    half = load_speech_model(str(speech_dirs[kind]), device="cpu", dtype=dtype)
    assert half.runtime.dtype == dtype and next(half.model.parameters()).dtype == getattr(torch, dtype)
    audio = _chirp(2.5)
    _, a = extract_speech_features(audio, SR, full, [1, 2], window_s=1.0, step_s=0.25, batch_size=3)
    _, b = extract_speech_features(audio, SR, half, [1, 2], window_s=1.0, step_s=0.25, batch_size=3)
    for layer in (1, 2):
        assert b[layer].shape == (10, 32) and b[layer].dtype == np.float32
        assert not np.array_equal(a[layer], b[layer])  # computed in half precision
        err = np.abs(a[layer] - b[layer]).max() / np.abs(a[layer]).max()
        assert err < (0.05 if dtype == "bfloat16" else 0.01), err


def test_speech_layer_sweep_equals_single_layers(w2v):
    audio = _chirp(2.0)
    _, sweep = extract_speech_features(audio, SR, w2v, [0, 1, 2, -1], window_s=1.0, step_s=0.2)
    for layer in (0, 1, 2):
        _, single = extract_speech_features(audio, SR, w2v, [layer], window_s=1.0, step_s=0.2)
        np.testing.assert_array_equal(sweep[layer], single[layer])
    np.testing.assert_array_equal(sweep[-1], sweep[2])
    with pytest.raises(ModelError, match=r"layer 3 .*0\.\.2"):
        extract_speech_features(audio, SR, w2v, [3], window_s=1.0, step_s=0.2)


def test_speech_features_are_causal(w2v, rng):
    audio = _chirp(3.0)
    changed = audio.copy()
    cut = int(1.8 * SR)
    changed[cut:] = rng.normal(scale=0.3, size=audio.size - cut).astype(np.float32)
    times, a = extract_speech_features(audio, SR, w2v, [2], window_s=1.0, step_s=0.1)
    _, b = extract_speech_features(changed, SR, w2v, [2], window_s=1.0, step_s=0.1)
    before = times + 0.05 <= 1.8 + 1e-9  # chunks ending before the change
    np.testing.assert_allclose(a[2][before], b[2][before], atol=1e-6)
    assert not np.allclose(a[2][~before], b[2][~before], atol=1e-3)


def test_speech_pooling_and_resampling(w2v):
    audio = _chirp(1.5)
    _, last = extract_speech_features(audio, SR, w2v, [1], window_s=1.0, step_s=0.1, pooling="last")
    _, mean = extract_speech_features(audio, SR, w2v, [1], window_s=1.0, step_s=0.1, pooling="mean")
    assert not np.allclose(last[1], mean[1])
    audio22 = resample_audio(audio, SR, 22050)
    times, feats = extract_speech_features(audio22, 22050, w2v, [1], window_s=1.0, step_s=0.1)
    assert feats[1].shape == (15, 32) and np.all(np.isfinite(feats[1]))
    with pytest.raises(ValueError, match="step_s"):
        extract_speech_features(audio, SR, w2v, [1], window_s=0.1, step_s=0.2)


def test_whisper_window_longer_than_its_input_is_refused(speech_dirs):
    with pytest.raises(ModelError, match="window_s"):
        extract_speech_features(_chirp(1.0), SR, str(speech_dirs["whisper"]), [1], window_s=16.0, step_s=0.1)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {os.environ['NF_SPEECH_SENTINEL']}",))


def test_frame_geometry_matches_the_conv_stack(tmp_path):
    """Frame j of a wav2vec2 conv stack reads exactly samples [320 j, 320 j + 400) (per-frame norm)."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                 feat_extract_norm="layer", vocab_size=8)).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(do_normalize=False).save_pretrained(tmp_path)
    sm = load_speech_model(str(tmp_path), device="cpu")
    x = np.random.default_rng(0).normal(scale=0.1, size=8000).astype(np.float32)

    def frames(signal):
        with torch.inference_mode():
            return sm.model.feature_extractor(torch.tensor(signal)[None])[0].T.numpy()

    base = frames(x)
    for j in (0, 4, 17):
        end = int(sm.frame_ends(j + 1)[-1])
        for p, inside in ((end - sm.frame_span, True), (end - 1, True), (end - sm.frame_span - 1, False),
                          (end, False)):
            if p < 0:
                continue
            y = x.copy()
            y[p] += 1.0
            assert (not np.allclose(frames(y)[j], base[j], atol=1e-7)) == inside, (j, p)


def test_speech_loading_refuses_unsafe_or_wrong_models(speech_dirs, tiny_bert_dir, tmp_path, monkeypatch):
    import pickle

    pickled = tmp_path / "pickled"
    shutil.copytree(speech_dirs["wav2vec2"], pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    sentinel = tmp_path / "SENTINEL"
    monkeypatch.setenv("NF_SPEECH_SENTINEL", str(sentinel))
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ModelError, match="pickled"):
        load_speech_model(str(pickled))
    assert not sentinel.exists()
    remote = tmp_path / "remote"
    shutil.copytree(speech_dirs["wav2vec2"], remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_speech_model(str(remote))
    with pytest.raises(ModelError, match="not a supported speech encoder"):
        load_speech_model(str(tiny_bert_dir))
    with pytest.raises(ModelError, match="not found"):
        load_speech_model(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm", "whisper"])
def test_one_speech_layer_stops_the_encoder_there(speech_dirs, kind):
    """A layer below the last comes from encoder passes stopped after it (the last block never runs)."""
    from pipelines.features.layer_taps import LayerTaps, layer_stack

    sm = load_speech_model(str(speech_dirs[kind]), device="cpu")
    audio = _chirp(2.0)
    _, whole = extract_speech_features(audio, SR, sm, [0, 1, 2], window_s=1.0, step_s=0.25, batch_size=3)
    calls: list = []
    handle = layer_stack(sm.model, sm.n_layers)[-1].register_forward_hook(lambda *args: calls.append(1))
    for layer, checks in ((1, 1), (0, 0), (1, 0)):  # one whole pass on one window checks the hooks, once
        calls.clear()
        _, single = extract_speech_features(audio, SR, sm, [layer], window_s=1.0, step_s=0.25, batch_size=3)
        assert len(calls) == checks
        np.testing.assert_allclose(single[layer], whole[layer], rtol=1e-5, atol=1e-6)
    handle.remove()
    assert isinstance(sm.layer_taps, LayerTaps)
