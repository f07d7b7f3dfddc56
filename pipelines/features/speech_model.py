"""Hidden states of HuggingFace speech encoders on causal audio windows.

Supported encoders (``config.model_type``): wav2vec2, HuBERT, WavLM, data2vec-audio,
UniSpeech(-SAT), wav2vec2-conformer, SEW(-D), and Whisper's encoder. Loading follows the
language models' rules: safetensors weights only (pickled ``.bin`` weights are refused),
``trust_remote_code`` never set, configs asking for their own code (``auto_map``) refused.

**Causal windows.** The feature time series has one row every ``step_s`` seconds. Row ``k``
describes the chunk ``(t_k - step_s, t_k]``, ``t_k = (k + 1) * step_s``: the model reads the
window ``[max(0, t_k - window_s), t_k]`` (at most ``window_s`` seconds of audio ending at
``t_k``, nothing later) and the hidden states of the encoder frames ending inside the chunk
are pooled (mean, or the last frame). So no row depends on audio after its chunk ends, and
frames within a chunk see at most ``step_s`` of audio after themselves (the usual "16 s
windows every 0.1 s" scheme). Row times are chunk centres, ``t_k - step_s / 2``.

Windows shorter than ``window_s`` (the story's first seconds) run one at a time at their own
length; the full-length windows after them have equal lengths and run in batches without
padding, so batching never changes the numbers. Whisper's encoder only accepts its fixed
input (30 s for the released models): each window is zero padded to it by Whisper's own
feature extractor, as in Whisper itself (so all windows run in batches), and ``window_s``
may not exceed it.

Cost: one encoder pass per chunk over up to ``window_s`` seconds, i.e. each second of audio
goes through the model ``window_s / step_s`` times (160 for 16 s every 0.1 s): a GPU job for
real encoders; ``step_s`` is the lever.

Frame timing: a wav2vec2-style encoder frame ``j`` covers samples ``[j P, j P + R)`` of its
window (``P`` the product of the convolution strides, ``R`` the receptive field, 320 and 400
samples at 16 kHz for wav2vec2); a Whisper encoder frame ``j`` reads mel frames up to
``2 j + 2`` (hop 160, FFT 400), i.e. audio up to sample ``(2 j + 2) * 160 + 200``. A frame
belongs to the chunk its last sample falls in; a chunk with no frame ending in it (a step
shorter than a frame) takes the last frame ending before the chunk's end. (Self-attention,
wav2vec2-base's group norm and the feature extractors' per-window normalisation make every
frame depend on its whole window; the window ends with the chunk, so causality holds at the
chunk level.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines.errors import ModelError
from pipelines.features.model_source import safe_model_config
from pipelines.features.layer_files import LayerFiles
from pipelines.features.layer_taps import hidden_states_to
from pipelines.features.lm_windows import layer_indices
from pipelines.features.model_runtime import load_kwargs, place, resolve_runtime

__all__ = [
    "SPEECH_MODEL_TYPES",
    "LoadedSpeechModel",
    "load_speech_model",
    "load_audio",
    "chunk_ends",
    "extract_speech_features",
]

#: ``config.model_type`` values this module knows how to window.
SPEECH_MODEL_TYPES = frozenset({
    "wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat", "wav2vec2-conformer",
    "sew", "sew-d", "whisper",
})

_POOLINGS = ("mean", "last")


@dataclass
class LoadedSpeechModel:
    """A speech encoder and its feature extractor, ready for windowed extraction.

    Attributes
    ----------
    feature_extractor : transformers.FeatureExtractionMixin
        Turns raw audio into the encoder's input (normalised waveform or log-mel).
    model : torch.nn.Module
        The encoder in eval mode, in ``runtime.dtype``, on ``device``.
    model_type : str
        ``config.model_type`` (one of :data:`SPEECH_MODEL_TYPES`).
    n_layers : int
        Transformer layers; hidden states are indexed ``0..n_layers`` (0 = encoder input).
    hidden_size : int
        Width of each hidden state.
    sampling_rate : int
        Audio rate the model expects (Hz).
    name : str
        The ``model`` argument as given.
    device : str
        Torch device.
    max_window_s : float or None
        Longest window the encoder accepts (Whisper: its chunk length), else None.
    frame_stride : int
        Samples between encoder frames (wav2vec2-style) or per mel hop times 2 (Whisper).
    frame_span : int
        Samples from a frame's window start to its last sample, for frame 0.
    runtime : pipelines.features.model_runtime.ModelRuntime, optional
        dtype and device the encoder was loaded with.
    """

    feature_extractor: Any
    model: Any
    model_type: str
    n_layers: int
    hidden_size: int
    sampling_rate: int
    name: str
    device: str = "cpu"
    max_window_s: float | None = None
    frame_stride: int = 320
    frame_span: int = 400
    runtime: Any = None
    #: hooks that stop a pass at the deepest layer asked for (:mod:`pipelines.features.layer_taps`)
    layer_taps: Any = field(default=None, repr=False, compare=False)

    def frame_ends(self, n_frames: int) -> np.ndarray:
        """Last sample (exclusive) of each of ``n_frames`` encoder frames, relative to the window start."""
        return np.arange(n_frames, dtype=np.int64) * self.frame_stride + self.frame_span


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_speech_model(model: str, revision: str | None = None, *, device: str = "auto",
                      dtype: str = "auto") -> LoadedSpeechModel:
    """Load a speech encoder (safetensors only, no remote code) and its feature extractor.

    Parameters
    ----------
    model : str
        A local folder (``config.json``, ``preprocessor_config.json``, ``*.safetensors``) or a
        hub id already in the local cache.
    revision : str, optional
        Hub revision; ignored for local folders.
    device : str
        ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``...
    dtype : {"auto", "float32", "bfloat16", "float16"}
        What the encoder computes in (``"auto"``: see :mod:`pipelines.features.model_runtime`);
        its inputs are cast to it, its features come back as float32.

    Returns
    -------
    LoadedSpeechModel

    Raises
    ------
    ModelError
        Missing model, pickled weights only, remote code asked for, no feature extractor,
        or a model type that is not a supported speech encoder.
    """
    from transformers import AutoFeatureExtractor, AutoModel  # heavy: imported only when a model loads

    if not isinstance(model, str) or not model.strip():
        raise ModelError(f"speech model {model!r} is not a model name: give a local folder or a hub id")
    src, kwargs, config = safe_model_config(model, revision, "speech model")
    mtype = getattr(config, "model_type", "")
    if mtype not in SPEECH_MODEL_TYPES:
        raise ModelError(f"model {model!r} has model_type {mtype!r}, not a supported speech encoder: use one of "
                         f"{', '.join(sorted(SPEECH_MODEL_TYPES))}")
    if getattr(config, "add_adapter", False):
        raise ModelError(f"speech model {model!r} has an adapter (add_adapter) that changes its frame rate: "
                         "use the encoder without it")
    runtime = resolve_runtime(config, dtype=dtype, device=device, origin=f"speech model {model!r}")
    try:
        fe = AutoFeatureExtractor.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"feature extractor of speech model {model!r} cannot be loaded ({_first_line(exc)}): "
                         "save it next to the model (preprocessor_config.json)") from exc
    try:
        net = AutoModel.from_pretrained(src, use_safetensors=True, **load_kwargs(runtime), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"weights of speech model {model!r} cannot be loaded ({_first_line(exc)}): "
                         "safetensors weights are required") from exc
    if mtype == "whisper":
        net = net.get_encoder()
        n_layers = int(config.encoder_layers)
        hidden = int(config.d_model)
        stride = 2 * int(fe.hop_length)
        span = 2 * int(fe.hop_length) + int(fe.n_fft) // 2
        max_window = float(fe.n_samples) / float(fe.sampling_rate)
    else:
        n_layers = int(config.num_hidden_layers)
        hidden = int(config.hidden_size)
        stride, span = 1, 1
        for k, s in zip(config.conv_kernel, config.conv_stride):
            span += (int(k) - 1) * stride
            stride *= int(s)
        max_window = None
    net = place(net, runtime)
    return LoadedSpeechModel(feature_extractor=fe, model=net, model_type=mtype, n_layers=n_layers,
                             hidden_size=hidden, sampling_rate=int(fe.sampling_rate), name=model,
                             device=runtime.device, max_window_s=max_window, frame_stride=stride, frame_span=span,
                             runtime=runtime)


def load_audio(path: str | Path, sampling_rate: int) -> np.ndarray:
    """A WAV file as mono float32 at ``sampling_rate`` Hz (see :func:`pipelines.features.acoustic.read_wav`)."""
    from pipelines.features.acoustic import read_wav, resample_audio

    audio, sr = read_wav(path)
    return resample_audio(audio, sr, sampling_rate)


def chunk_ends(n_samples: int, sampling_rate: int, step_s: float) -> np.ndarray:
    """End sample (exclusive) of every chunk: ``round((k + 1) * step_s * sr)`` within the audio.

    The last partial chunk is dropped.
    """
    step = step_s * sampling_rate
    n = int(np.floor(n_samples / step + 1e-9))
    return np.round((np.arange(n) + 1) * step).astype(np.int64)


def _inputs(lm: LoadedSpeechModel, windows: list[np.ndarray]) -> Any:
    """The encoder's input for equal-length windows, on its device and in its dtype."""
    fe = lm.feature_extractor
    dtype = next(lm.model.parameters()).dtype
    if lm.model_type == "whisper":
        enc = fe(windows, sampling_rate=lm.sampling_rate, return_tensors="pt")
        return {"input_features": enc["input_features"].to(lm.device, dtype=dtype)}
    enc = fe(windows, sampling_rate=lm.sampling_rate, return_tensors="pt", padding=False)
    return {"input_values": enc["input_values"].to(lm.device, dtype=dtype)}


def _run(lm: LoadedSpeechModel, windows: list[np.ndarray], hs_index: list[int]) -> np.ndarray:
    """Hidden states (L, B, T, H) of equal-length windows."""
    import torch

    with torch.inference_mode():  # run only as deep as the deepest layer asked for
        hidden = torch.stack(hidden_states_to(lm, _inputs(lm, windows), hs_index))
        return hidden.float().cpu().numpy()


def _pool(lm: LoadedSpeechModel, hidden: np.ndarray, n_samples: int, step: int, pooling: str) -> np.ndarray:
    """Pool the frames of one window (hidden: (L, T, H)) ending in its last chunk ``(n - step, n]``."""
    ends = lm.frame_ends(hidden.shape[1])
    inside = np.flatnonzero((ends > n_samples - step) & (ends <= n_samples))
    if inside.size == 0:
        before = np.flatnonzero(ends <= n_samples)
        if before.size == 0:
            raise ModelError(f"speech model {lm.name!r}: a window of {n_samples} samples holds no complete frame "
                             f"(a frame spans {lm.frame_span} samples): use a longer step_s")
        inside = before[-1:]
    if pooling == "last":
        return hidden[:, inside[-1], :]
    return hidden[:, inside, :].mean(axis=1)


def extract_speech_features(
    audio: np.ndarray,
    sampling_rate: int,
    model: str | LoadedSpeechModel,
    layers: Sequence[int],
    *,
    window_s: float = 16.0,
    step_s: float = 0.1,
    pooling: str = "mean",
    batch_size: int = 8,
    revision: str | None = None,
    stream_to: tuple[str | Path, Mapping[int, str]] | None = None,
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Speech-encoder features of an audio signal on causal windows, all layers in one pass.

    Parameters
    ----------
    audio : np.ndarray, shape (n_samples,)
        Mono signal; resampled to the model's rate when ``sampling_rate`` differs.
    sampling_rate : int
        Rate of ``audio`` (Hz).
    model : str or LoadedSpeechModel
        Folder, hub id or loaded model.
    layers : sequence of int
        Hidden-state indices (0 = encoder input, 1..n_layers; negative from the end).
    window_s : float
        Longest audio window the model reads (seconds), ending at each chunk's end.
    step_s : float
        Chunk length = time between rows (seconds), ``0 < step_s <= window_s``.
    pooling : {"mean", "last"}
        Mean of the frames ending in the chunk, or the last of them.
    batch_size : int
        Full-length windows per forward pass (does not change the numbers).
    revision : str, optional
        Hub revision when ``model`` is a name.
    stream_to : (folder, {layer: space}), optional
        Write each layer's rows to ``folder/<space>.npy`` as each batch is computed
        (:class:`~pipelines.features.layer_files.LayerFiles`) instead of returning them: a
        layer sweep never holds every layer. ``features`` is then empty.

    Returns
    -------
    times : np.ndarray, shape (n_chunks,)
        Chunk centres in seconds from the audio start.
    features : dict[int, np.ndarray]
        ``{layer: float32 array (n_chunks, hidden_size)}`` keyed by the layers as given.

    Raises
    ------
    ValueError
        Bad audio, ``window_s``, ``step_s``, ``pooling`` or ``batch_size``.
    ModelError
        Model cannot be loaded, a layer is out of range, or the window is longer than the
        encoder accepts.
    """
    from pipelines.features.acoustic import resample_audio

    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"audio must be a non-empty, finite 1-D signal (mono), got shape {x.shape}")
    if not (np.isfinite(window_s) and np.isfinite(step_s) and 0 < step_s <= window_s):
        raise ValueError(f"need 0 < step_s <= window_s; got step_s={step_s!r}, window_s={window_s!r}")
    if pooling not in _POOLINGS:
        raise ValueError(f"pooling = {pooling!r} is unknown: use one of {', '.join(_POOLINGS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be an integer >= 1")
    lm = model if isinstance(model, LoadedSpeechModel) else load_speech_model(model, revision)
    if lm.max_window_s is not None and window_s > lm.max_window_s + 1e-9:
        raise ModelError(f"window_s = {window_s} s is longer than the {lm.max_window_s:g} s speech model "
                         f"{lm.name!r} accepts: use window_s <= {lm.max_window_s:g}")
    hs_index = layer_indices(layers, lm)
    uniq = sorted(set(hs_index))
    sr = lm.sampling_rate
    x = resample_audio(x, int(sampling_rate), sr)
    ends = chunk_ends(x.size, sr, step_s)
    if ends.size == 0:
        raise ValueError(f"the audio ({x.size / sr:.3f} s) is shorter than one step ({step_s} s)")
    win = int(round(window_s * sr))
    chunk = np.diff(np.concatenate([[0], ends]))  # samples in each chunk (rounding may vary by one)
    starts = np.maximum(ends - win, 0)
    if lm.model_type == "whisper":  # every input is padded to the encoder's fixed length anyway
        groups = [np.arange(lo, min(lo + batch_size, ends.size)) for lo in range(0, ends.size, batch_size)]
    else:  # the first window_s seconds: each window has its own length and runs alone
        full = np.flatnonzero(ends >= win)
        groups = [np.array([k]) for k in np.flatnonzero(ends < win)]
        groups += [full[lo : lo + batch_size] for lo in range(0, full.size, batch_size)]
    times = ends / sr - step_s / 2.0
    if stream_to is not None:  # each layer straight to its file: no all-layers array
        folder, spaces = stream_to
        targets = [[spaces[layer] for layer, h2 in zip(layers, hs_index) if h2 == h] for h in uniq]
        with LayerFiles(folder, list(dict.fromkeys(spaces.values())), ends.size, lm.hidden_size) as files:
            for ks in groups:
                hidden = _run(lm, [x[starts[k] : ends[k]] for k in ks], uniq)
                rows = np.stack([_pool(lm, hidden[:, row], int(ends[k] - starts[k]), int(chunk[k]), pooling)
                                 for row, k in enumerate(ks)], axis=1)  # (L, len(ks), H)
                for i, names in enumerate(targets):
                    for name in names:
                        files.write(name, ks, rows[i])
        return times, {}
    out = np.zeros((len(uniq), ends.size, lm.hidden_size), dtype=np.float32)
    for ks in groups:
        hidden = _run(lm, [x[starts[k] : ends[k]] for k in ks], uniq)
        for row, k in enumerate(ks):
            out[:, k] = _pool(lm, hidden[:, row], int(ends[k] - starts[k]), int(chunk[k]), pooling)
    return times, {layer: out[uniq.index(h)].copy() for layer, h in zip(layers, hs_index)}
