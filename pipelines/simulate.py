"""Simulated voxelwise subjects with a known ground truth, for demos and recovery tests.

Responses are generated from real stimulus-derived drivers (e.g. word rate, language-model
features on the TR grid) convolved with SPM's canonical HRF, in a known set of "planted"
voxels, plus AR(1) noise everywhere. The files carry ``"Simulated": true`` in their sidecar.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SimulatedRun:
    data: np.ndarray  # (n_trs, n_voxels) float32
    planted: np.ndarray  # (n_voxels,) bool
    signal_weights: np.ndarray  # (n_drivers, n_voxels)


def canonical_hrf(tr: float, length_s: float = 32.0) -> np.ndarray:
    """SPM's canonical HRF sampled every `tr` seconds (nilearn's implementation), unit peak."""
    from nilearn.glm.first_level.hemodynamic_models import spm_hrf

    oversampling = 16
    hrf = spm_hrf(tr, oversampling=oversampling, time_length=length_s)[::oversampling]
    return (hrf / hrf.max()).astype(np.float64)


def simulate_run(drivers: np.ndarray, planted: np.ndarray, tr: float, *, snr: float = 1.0,
                 ar: float = 0.3, seed: int = 0) -> SimulatedRun:
    """Simulate one run.

    Parameters
    ----------
    drivers : array of shape (n_trs, n_drivers), stimulus features on the TR grid.
    planted : bool array of shape (n_voxels,), voxels that receive signal.
    tr : repetition time in seconds.
    snr : standard deviation of signal over that of noise in planted voxels.
    ar : AR(1) coefficient of the noise.
    seed : random seed; the same seed gives the same data.
    """
    rng = np.random.default_rng(seed)
    drivers = np.asarray(drivers, dtype=np.float64)
    n_trs, n_drivers = drivers.shape
    n_vox = planted.size
    z = (drivers - drivers.mean(0)) / np.where(drivers.std(0) > 0, drivers.std(0), 1)
    hrf = canonical_hrf(tr)
    conv = np.stack([np.convolve(z[:, j], hrf)[:n_trs] for j in range(n_drivers)], axis=1)
    weights = np.zeros((n_drivers, n_vox))
    weights[:, planted] = rng.standard_normal((n_drivers, int(planted.sum())))
    signal = conv @ weights
    sd = signal[:, planted].std(0)
    signal[:, planted] /= np.where(sd > 0, sd, 1)
    innov = rng.standard_normal((n_trs, n_vox))
    noise = np.empty_like(innov)
    noise[0] = innov[0]
    for t in range(1, n_trs):
        noise[t] = ar * noise[t - 1] + np.sqrt(1 - ar ** 2) * innov[t]
    data = 100.0 + snr * signal + noise
    return SimulatedRun(data=data.astype(np.float32), planted=planted.copy(), signal_weights=weights)


def sphere_mask(mask_img, center_mm: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """In-mask voxels (in mask order) within `radius_mm` of a world coordinate."""
    import nibabel as nib

    mask = np.asarray(mask_img.dataobj) > 0
    ijk = np.argwhere(mask)
    xyz = nib.affines.apply_affine(mask_img.affine, ijk)
    return np.linalg.norm(xyz - np.asarray(center_mm), axis=1) <= radius_mm


def demo_mask(resolution_mm: float = 8.0):
    """nilearn's bundled MNI152 brain mask resampled to `resolution_mm` (no download)."""
    from nilearn import datasets, image

    mask = datasets.load_mni152_brain_mask(resolution=2)
    return image.resample_img(mask, target_affine=np.diag([resolution_mm] * 3), interpolation="nearest",
                              force_resample=True, copy_header=True)


def ar1_noise(rng: np.random.Generator, n_samples: int, n_columns: int, phi: float) -> np.ndarray:
    """AR(1) noise of unit variance, correlation ``phi`` at lag 1, shape (n_samples, n_columns)."""
    innov = rng.standard_normal((n_samples, n_columns))
    out = np.empty_like(innov)
    out[0] = innov[0]
    scale = np.sqrt(1.0 - phi ** 2)
    for t in range(1, n_samples):
        out[t] = phi * out[t - 1] + scale * innov[t]
    return out


def slow_word_features(rng: np.random.Generator, n_trs: int, tr: float = 2.0, n_features: int = 4,
                       words_per_s: float = 2.5) -> np.ndarray:
    """Slow word-level features of one run on its TR grid, Lanczos-resampled like real ones.

    Words fall at a rate that drifts over about 10 s (speech and pauses, ``words_per_s`` on
    average); the first feature is the word rate, the others word values drifting from word to
    word (AR(1) 0.95 over words, like a language model's slowly varying dimensions).

    Returns
    -------
    array of shape (n_trs, n_features), float32
    """
    from .features.align import lanczos_resample  # features import the registry: not needed by the demo

    step = 0.05
    grid = np.arange(0.0, n_trs * tr, step)
    drift = ar1_noise(rng, grid.size, 1, 0.995)[:, 0]  # time constant 10 s
    rate = np.clip(words_per_s * (1.0 + 0.8 * drift), 0.0, None)
    words = grid[rng.random(grid.size) < rate * step]
    values = np.concatenate([np.ones((words.size, 1)), ar1_noise(rng, words.size, n_features - 1, 0.95)], axis=1)
    return lanczos_resample(values, words, np.arange(n_trs) * tr)
