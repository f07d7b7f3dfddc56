"""Acoustic features of the stimulus audio: spectrograms and the sound envelope (numpy/scipy).

* :func:`read_wav` / :func:`resample_audio`: a mono float32 signal from a WAV file
  (``scipy.io.wavfile``), resampled with ``scipy.signal.resample_poly`` (anti-aliased).
* :func:`spectrogram`: short-time power spectrum (Hann window, frames centred every ``hop_s``),
  on a mel scale (triangular filters, HTK mel formula ``2595 log10(1 + f / 700)``, each filter
  normalised to unit area as librosa's ``norm="slaney"`` so white noise is flat across bands)
  or on the linear FFT frequencies; log power in dB (``10 log10(power + 1e-10)``) by default.
* :func:`envelope`: the broadband amplitude envelope (magnitude of the analytic signal,
  low-passed and resampled to ``sfreq``) or the sound power in dB (Hann-weighted mean of
  ``x**2`` in windows centred on each output sample).

Every function returns its values with the time of each row in seconds from the start of the
audio (frame centres), so the registry can align them to any response clock.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from pipelines.errors import DatasetError

__all__ = ["read_wav", "resample_audio", "mel_filterbank", "hz_to_mel", "mel_to_hz", "spectrogram", "envelope"]

_AMIN = 1e-10  # power floor before the log (-100 dB)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV file as a mono float32 signal in [-1, 1].

    Parameters
    ----------
    path : str or Path
        A PCM (8/16/24/32-bit integer) or IEEE float WAV file; channels are averaged.

    Returns
    -------
    audio : np.ndarray, shape (n_samples,), float32
    sampling_rate : int
        Samples per second.

    Raises
    ------
    DatasetError
        Missing, unreadable or empty file.
    """
    from scipy.io import wavfile

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: audio file not found; check the stimulus audio path")
    try:
        sr, data = wavfile.read(str(path), mmap=False)
    except (ValueError, OSError) as err:
        raise DatasetError(f"{path}: not a readable WAV file ({err}); convert it to PCM WAV") from err
    data = np.asarray(data)
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        x = data.astype(np.float32) / float(-np.iinfo(data.dtype).min)
    else:
        x = data.astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.size == 0:
        raise DatasetError(f"{path}: the WAV file holds no samples")
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{path}: the WAV file holds NaN or Inf samples")
    return x, int(sr)


def _ratio(sr_in: float, sr_out: float) -> tuple[int, int]:
    frac = Fraction(sr_out / sr_in).limit_denominator(10000)
    return frac.numerator, frac.denominator


def resample_audio(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a signal with a polyphase anti-aliasing filter (``scipy.signal.resample_poly``).

    Parameters
    ----------
    audio : np.ndarray, shape (n_samples,) or (n_samples, n_channels)
    sr_in, sr_out : int
        Sampling rates in Hz (> 0).

    Returns
    -------
    np.ndarray, float32, about ``n_samples * sr_out / sr_in`` rows.
    """
    from scipy.signal import resample_poly

    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sampling rates must be positive; got {sr_in} -> {sr_out}")
    x = np.asarray(audio, dtype=np.float32)
    if int(sr_in) == int(sr_out):
        return x
    up, down = _ratio(sr_in, sr_out)
    return resample_poly(x, up, down, axis=0).astype(np.float32)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
                   norm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Triangular mel filters over the ``n_fft // 2 + 1`` FFT frequencies.

    Parameters
    ----------
    sr : int
        Sampling rate (Hz).
    n_fft : int
        FFT length.
    n_mels : int
        Number of bands (>= 1).
    fmin, fmax : float
        Lowest and highest edge (Hz); ``fmax`` defaults to ``sr / 2``.
    norm : bool
        Scale each filter to unit area in Hz (``2 / (f_high - f_low)``), as librosa's "slaney".

    Returns
    -------
    weights : np.ndarray, shape (n_mels, n_fft // 2 + 1)
    centers : np.ndarray, shape (n_mels,)
        Centre frequency of each band (Hz).
    """
    fmax = sr / 2.0 if fmax is None else float(fmax)
    if not 0 <= fmin < fmax <= sr / 2.0 + 1e-9:
        raise ValueError(f"need 0 <= fmin < fmax <= sr / 2 = {sr / 2}; got fmin={fmin}, fmax={fmax}")
    if n_mels < 1:
        raise ValueError(f"n_mels = {n_mels!r} must be >= 1")
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    weights = np.maximum(0.0, np.minimum(up, down))
    if norm:
        weights *= 2.0 / (hi - lo)
    return weights, edges[1:-1]


def _frames(x: np.ndarray, n_fft: int, hop: int, center: bool = True):
    """Frames of length ``n_fft`` every ``hop`` samples, centred at ``k * hop`` (zero padded)."""
    from numpy.lib.stride_tricks import sliding_window_view

    if center:
        x = np.pad(x, (n_fft // 2, n_fft // 2))
    if x.size < n_fft:
        x = np.pad(x, (0, n_fft - x.size))
    return sliding_window_view(x, n_fft)[::hop]


def _check_audio(audio: np.ndarray, sr: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"audio must be a non-empty 1-D signal (mono), got shape {x.shape}")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise ValueError(f"sr = {sr!r} must be a positive integer (Hz)")
    return x


def spectrogram(
    audio: np.ndarray,
    sr: int,
    *,
    scale: str = "mel",
    n_mels: int = 64,
    win_s: float = 0.025,
    hop_s: float = 0.010,
    fmin: float = 0.0,
    fmax: float | None = None,
    log: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Short-time power spectrum of a signal, on mel bands or FFT frequencies.

    Frame ``k`` is centred at ``k * hop`` samples (the signal is zero padded by half a window
    at both ends), windowed by a Hann window of ``win_s`` seconds and zero padded to the next
    power of two. Power is ``|FFT|**2 / sum(window**2)``.

    Parameters
    ----------
    audio : np.ndarray, shape (n_samples,)
        Mono signal.
    sr : int
        Sampling rate (Hz).
    scale : {"mel", "linear"}
        Mel bands (``n_mels`` of them) or every FFT frequency between ``fmin`` and ``fmax``.
    n_mels : int
        Number of mel bands.
    win_s, hop_s : float
        Window length and hop in seconds (``hop_s <= win_s``).
    fmin, fmax : float
        Frequency range in Hz (``fmax`` defaults to ``sr / 2``).
    log : bool
        Log power in dB (``10 log10(power + 1e-10)``) instead of power.

    Returns
    -------
    values : np.ndarray, shape (n_frames, n_bands), float32
    times : np.ndarray, shape (n_frames,)
        Frame centres in seconds.
    freqs : np.ndarray, shape (n_bands,)
        Centre frequency of each band (Hz).
    """
    x = _check_audio(audio, sr)
    if scale not in ("mel", "linear"):
        raise ValueError(f"scale = {scale!r} is unknown: use 'mel' or 'linear'")
    if not (0 < hop_s <= win_s) or not np.isfinite(win_s):
        raise ValueError(f"need 0 < hop_s <= win_s; got hop_s={hop_s}, win_s={win_s}")
    win = max(2, int(round(win_s * sr)))
    hop = max(1, int(round(hop_s * sr)))
    n_fft = 1 << (win - 1).bit_length()
    window = np.zeros(n_fft)
    off = (n_fft - win) // 2
    window[off : off + win] = np.hanning(win + 2)[1:-1]  # no zero end points
    frames = _frames(x, n_fft, hop)
    freqs_fft = np.fft.rfftfreq(n_fft, 1.0 / sr)
    fmax_ = sr / 2.0 if fmax is None else float(fmax)
    if scale == "mel":
        weights, freqs = mel_filterbank(sr, n_fft, n_mels, fmin, fmax_)
    else:
        if not 0 <= fmin < fmax_ <= sr / 2.0 + 1e-9:
            raise ValueError(f"need 0 <= fmin < fmax <= sr / 2 = {sr / 2}; got fmin={fmin}, fmax={fmax_}")
        keep = (freqs_fft >= fmin) & (freqs_fft <= fmax_)
        weights, freqs = None, freqs_fft[keep]
    norm = float(np.sum(window**2))
    out = np.empty((frames.shape[0], freqs.size), dtype=np.float32)
    step = 4096
    for lo in range(0, frames.shape[0], step):
        power = np.abs(np.fft.rfft(frames[lo : lo + step] * window, axis=1)) ** 2 / norm
        band = power @ weights.T if weights is not None else power[:, keep]
        out[lo : lo + step] = 10.0 * np.log10(band + _AMIN) if log else band
    times = np.arange(frames.shape[0]) * hop / sr
    return out, times, freqs


def envelope(
    audio: np.ndarray,
    sr: int,
    *,
    sfreq: float = 100.0,
    measure: str = "amplitude",
    win_s: float = 0.025,
) -> tuple[np.ndarray, np.ndarray]:
    """Broadband envelope of a signal at ``sfreq`` samples per second.

    Parameters
    ----------
    audio : np.ndarray, shape (n_samples,)
    sr : int
        Sampling rate (Hz).
    sfreq : float
        Output rate (Hz), below ``sr / 2``.
    measure : {"amplitude", "power_db"}
        ``"amplitude"``: magnitude of the analytic signal (``scipy.signal.hilbert``),
        resampled to ``sfreq`` with an anti-aliasing filter. ``"power_db"``: sound power,
        ``10 log10`` of the Hann-weighted mean of ``x**2`` over ``win_s`` around each output
        sample.
    win_s : float
        Window for ``"power_db"`` (seconds).

    Returns
    -------
    values : np.ndarray, shape (n_out, 1), float32
    times : np.ndarray, shape (n_out,)
        ``k / sfreq`` seconds.
    """
    from scipy.signal import hilbert, resample_poly

    x = _check_audio(audio, sr)
    if not (0 < sfreq < sr / 2):
        raise ValueError(f"sfreq = {sfreq!r} must be positive and below half the sampling rate ({sr / 2} Hz)")
    n_out = int(np.floor((x.size - 1) * sfreq / sr)) + 1
    times = np.arange(n_out) / sfreq
    if measure == "amplitude":
        n_fft = 1 << (x.size - 1).bit_length()  # fast FFT length; the padding is cut off again
        amp = np.abs(hilbert(x, N=n_fft))[: x.size]
        up, down = _ratio(sr, sfreq)
        env = resample_poly(amp, up, down)
        env = np.maximum(env, 0.0)  # the anti-aliasing filter can ring below zero
        values = np.zeros(n_out)
        # resample_poly's output k sits at k * down / (up * sr) seconds = k / sfreq when exact
        values[: min(n_out, env.size)] = env[:n_out]
    elif measure == "power_db":
        if not win_s > 0:
            raise ValueError(f"win_s = {win_s!r} must be positive (seconds)")
        win = max(2, int(round(win_s * sr)))
        window = np.hanning(win + 2)[1:-1]
        window /= window.sum()
        xp = np.pad(x**2, (win // 2, win - win // 2))
        centres = np.round(times * sr).astype(np.int64)
        values = np.empty(n_out)
        step = 8192
        for lo in range(0, n_out, step):
            idx = centres[lo : lo + step, None] + np.arange(win)[None, :]
            values[lo : lo + step] = xp[idx] @ window
        values = 10.0 * np.log10(values + _AMIN)
    else:
        raise ValueError(f"measure = {measure!r} is unknown: use 'amplitude' or 'power_db'")
    return values[:, None].astype(np.float32), times
