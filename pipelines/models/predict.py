"""Predictions from a published encoding model: a new stimulus in, a time course and a map out.

:func:`load_models` reads the ``encoding_model`` artifacts of a manifest (S3 or a local output
folder; each verified against its sha256, cached by it); :func:`model_design` rebuilds a
stimulus' features exactly as the fit did (same feature spec and model, checked by its
fingerprint; same resampling, z-scoring and delays or lags); :func:`predict` runs it for every
feature space of a subject and writes, per space, the predicted time course of every target
(``_pred.npy``, and ``_pred.tsv`` up to :data:`TSV_MAX_TARGETS` targets) and a predicted map (the
mean predicted response over the stimulus: NIfTI, GIFTI per hemisphere or TSV, as the dataset's
targets).

Z-scoring (``zscore``): ``"own"`` standardises the stimulus' features on themselves, as the fit
did for every run, so a whole story held out gives back the published held-out r; ``"training"``
uses the training runs' statistics (sample-weighted means of their per-run means and sds), which
keeps the level of a short stimulus comparable across stimuli (in-silico experiments).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..cache import default_cache_dir
from ..consume import get_artifact
from ..errors import ConfigError, DatasetError
from ..features.align import make_delays
from ..features.lags import trf_design
from ..features.registry import KINDS, ModelCache, Stimulus, align_to_samples, compute_feature, parse_feature
from ..fit.splits import zscore_by_group
from ..manifest import printable, read_manifest
from ..storage import sha256_file
from .export import MODEL_KIND, read_model_bytes
from .weights import predict_rows

log = logging.getLogger("neuroflow")

__all__ = ["PublishedModel", "Prediction", "load_models", "words_from_text", "read_stimulus", "sample_times",
           "model_design", "predict_model", "predict", "write_prediction", "TSV_MAX_TARGETS"]

#: Time courses are written as TSV too (besides ``.npy``) up to this many targets.
TSV_MAX_TARGETS = 2000


@dataclass
class PublishedModel:
    """One published (subject, feature space) model: its arrays and its recipe."""

    manifest_uri: str
    subject: str
    feature_space: str
    recipe: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: str

    @property
    def valid(self) -> np.ndarray:
        return self.arrays["valid"].astype(bool)

    @property
    def n_targets(self) -> int:
        return int(self.arrays["intercept"].shape[0])


@dataclass
class Prediction:
    """A predicted response: ``values`` (n_samples, n_targets), float32, NaN for targets not fitted."""

    model: PublishedModel
    times: np.ndarray
    values: np.ndarray

    @property
    def map(self) -> np.ndarray:
        """The mean predicted response of each target over the stimulus' samples."""
        return np.where(self.model.valid, self.values.mean(axis=0), np.nan).astype(np.float32)


def load_models(manifest_uri: str, subject: str | None = None, feature_spaces: list[str] | None = None, *,
                cache_dir: str | Path | None = None) -> list[PublishedModel]:
    """The published models of one subject (every feature space, or those named).

    Raises
    ------
    DatasetError
        The manifest publishes no model (``publish.models: false``, or an older neuroflow), the
        subject or a feature space has none (the message lists those it has).
    IntegrityError
        An artifact does not match its sha256 or is not a readable model.
    """
    manifest = read_manifest(manifest_uri)
    entries = [a for a in manifest["artifacts"] if a["kind"] == MODEL_KIND]
    if not entries:
        raise DatasetError(f"{printable(manifest_uri)} publishes no encoding model (it was published with "
                           "'publish.models: false' or by an older neuroflow); re-run the analysis with models on")
    subjects = sorted({a["subject"] for a in entries})
    subject = subject[4:] if subject and subject.startswith("sub-") else subject
    if subject is None:
        if len(subjects) > 1:
            raise ConfigError(f"{printable(manifest_uri)} has models of {len(subjects)} subjects "
                              f"({', '.join(subjects[:10])}); choose one with --subject")
        subject = subjects[0]
    mine = [a for a in entries if a["subject"] == subject]
    if not mine:
        raise ConfigError(f"--subject {printable(subject)!r}: no model in {printable(manifest_uri)}; it has models of "
                          f"{', '.join(subjects[:20])}")
    have = sorted(a["feature_space"] for a in mine)
    if feature_spaces:
        missing = [f for f in feature_spaces if f not in have]
        if missing:
            raise ConfigError(f"feature space(s) {missing} have no model of sub-{subject} in "
                              f"{printable(manifest_uri)}; it has {have}")
        mine = [a for a in mine if a["feature_space"] in feature_spaces]
    folder = Path(cache_dir or default_cache_dir()) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for entry in sorted(mine, key=lambda a: a["feature_space"]):
        dest = folder / f"{entry['sha256']}.safetensors"
        if not (dest.is_file() and not dest.is_symlink() and sha256_file(dest) == entry["sha256"]):
            get_artifact(manifest_uri, entry["path"], dest, overwrite=True)  # verified against the manifest
        arrays, recipe = read_model_bytes(dest.read_bytes(), entry["path"])
        out.append(PublishedModel(manifest_uri, subject, entry["feature_space"], recipe, arrays, entry["path"]))
    return out


# ---------------------------------------------------------------------------- stimulus


def words_from_text(text: str, start: float, words_per_second: float) -> pd.DataFrame:
    """Words of plain text on an even clock: word ``k`` from ``start + k / rate`` for ``1 / rate`` s.

    Words are runs of letters, digits and apostrophes (punctuation dropped, case kept).
    """
    words = re.findall(r"[\w']+", text)
    if not words:
        raise DatasetError("the text holds no words")
    step = 1.0 / float(words_per_second)
    onset = start + step * np.arange(len(words))
    return pd.DataFrame({"onset": onset, "offset": onset + step, "word": words})


def word_rate_of(model: PublishedModel, words_per_second: float | None) -> float:
    rate = words_per_second or model.recipe["word_timings"].get("words_per_second")
    if not rate or not math.isfinite(rate) or rate <= 0:
        raise ConfigError("the model records no word rate for plain text; give one with --words-per-second")
    return float(rate)


def read_stimulus(model: PublishedModel, *, text: str | Path | None = None, textgrid: str | Path | None = None,
                  audio: str | Path | None = None, words: pd.DataFrame | None = None,
                  words_per_second: float | None = None, offset: float | None = None,
                  start_time: float | None = None) -> tuple[Stimulus, float]:
    """The stimulus a model's feature needs, and the time its last word (or its sound) ends.

    ``text`` is a file of plain text (words put on an even clock, see :func:`words_from_text`);
    ``textgrid`` a Praat TextGrid read with the recorded tier and offset (``offset`` overrides it);
    ``audio`` a WAV file starting at ``offset``; ``words`` a table (onset, offset, word) already timed.
    """
    from ..wordtimings import read_word_timings

    kind = KINDS[model.recipe["feature"]["kind"]]
    wt = model.recipe["word_timings"]
    shift = float(wt["offset"] if offset is None else offset)
    start = float(model.recipe["sampling"]["start_time"] if start_time is None else start_time)
    table, end = words, None
    if textgrid is not None:
        table = read_word_timings(Path(textgrid), "textgrid", shift, key=str(textgrid), tier=wt.get("tier", "word"),
                                  bad_rows=wt.get("bad_rows", "error"))
    elif text is not None:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"--text {printable(text)}: no such file")
        table = words_from_text(path.read_text(encoding="utf-8", errors="replace"), start,
                                word_rate_of(model, words_per_second))
    if table is not None:
        end = float(table["offset"].max())
    if audio is not None:
        from ..features.speech_model import load_audio

        path = Path(audio)
        if not path.is_file():
            raise ConfigError(f"--audio {printable(audio)}: no such file")
        end = max(end or 0.0, shift + load_audio(path, 16000).size / 16000.0)
    needs = set(kind.needs)
    if "words" in needs and table is None:
        raise ConfigError(f"feature space {model.feature_space!r} ({kind.kind}) reads words: give --text or --textgrid")
    if "audio" in needs and audio is None:
        raise ConfigError(f"feature space {model.feature_space!r} ({kind.kind}) reads sound: give --audio (a WAV file)")
    if "textgrid" in needs and textgrid is None:
        raise ConfigError(f"feature space {model.feature_space!r} ({kind.kind}) reads phones: give --textgrid")
    if "events" in needs:
        raise ConfigError(f"feature space {model.feature_space!r} (events) cannot be predicted from a new stimulus")
    return Stimulus(words=table, audio=audio, textgrid=textgrid, offset=shift), float(end if end is not None else start)


def sample_times(model: PublishedModel, end: float, *, n_samples: int | None = None, start_time: float | None = None,
                 like_story: str | None = None) -> np.ndarray:
    """The samples to predict: the recorded run of ``like_story``, or from ``start_time`` (default the
    training runs') every TR (or 1 / sfreq) until the stimulus ends plus the longest delay or lag."""
    recipe = model.recipe
    sampling = recipe["sampling"]
    if like_story is not None:
        runs = [r for r in recipe["runs"] if r["story"] == like_story]
        if not runs:
            raise ConfigError(f"--like-story {printable(like_story)!r}: no run of that story in the model's recipe; "
                              f"it has {sorted({r['story'] for r in recipe['runs']})}")
        run = runs[0]
        return run["start_time"] + run["tr"] * np.arange(run["n_samples"])
    step = 1.0 / sampling["sfreq"] if "sfreq" in sampling else float(sampling["tr"])
    start = float(sampling["start_time"] if start_time is None else start_time)
    if n_samples is None:
        design = recipe["design"]
        tail = (max(design["delays"]) * step if design["kind"] == "fir_delays" else max(design["tmax"], 0.0))
        n_samples = int(math.floor((end - start + tail) / step)) + 1
    if n_samples < 1:
        raise ConfigError(f"the stimulus ends ({end:.2f} s) before the first sample ({start:.2f} s); "
                          "set --start-time or --n-samples")
    return start + step * np.arange(int(n_samples))


# ---------------------------------------------------------------------------- features -> prediction


def feature_params(model: PublishedModel, model_dir: str | Path | None) -> dict[str, Any]:
    """The recorded feature spec, its model folder checked against the recorded fingerprint."""
    from ..features.cache_keys import model_fingerprint

    params = dict(model.recipe["feature"])
    record = model.recipe.get("model")
    if record is None:
        return params
    field = KINDS[params["kind"]].model_field
    if model_dir is not None:
        params[field] = str(model_dir)
    folder = Path(str(params[field])).expanduser()
    recorded = record["fingerprint"]
    if recorded.startswith("dir:"):
        if not folder.is_dir():
            raise ConfigError(f"the model of feature space {model.feature_space!r} was the folder {record['id']}, "
                              f"not on this machine ({folder}); give a copy with --model-dir (its files: "
                              f"{', '.join(sorted(record.get('files', {}))[:8])})")
        found = model_fingerprint(str(folder), params.get("revision"))
        if found != recorded:
            raise ConfigError(f"--model-dir {folder}: its files differ from those the published model was fitted "
                              f"with (fingerprint {found[:16]}... vs {recorded[:16]}...); use the same model files "
                              "(the manifest's recipe lists each file's sha256)")
    return params


def model_design(model: PublishedModel, stimulus: Stimulus, times: np.ndarray, *, zscore: str = "own",
                 model_dir: str | Path | None = None, models: ModelCache | None = None,
                 params: dict[str, Any] | None = None) -> np.ndarray:
    """The design of a stimulus as the fit built it: features, resampled, z-scored, delayed or lagged.

    ``params`` is the feature spec to run (default: the recorded one, see :func:`feature_params`).

    Returns
    -------
    array of shape (n_samples, n_features), float32
    """
    if zscore not in ("own", "training"):
        raise ConfigError(f"'zscore' must be 'own' or 'training'; got {zscore!r}")
    recipe = model.recipe
    params = params if params is not None else feature_params(model, model_dir)
    result = compute_feature(parse_feature(params, origin=f"model {model.feature_space}"), stimulus, models=models)
    res = recipe["resampling"]
    A = align_to_samples(result, times, method=res["method"], window=res["lanczos_window"],
                         tr=float(recipe["sampling"]["tr"]), space=recipe["space"])
    if zscore == "own":
        A = zscore_by_group(A.astype(np.float32), np.zeros(A.shape[0], dtype=np.int64))
    else:
        n = np.asarray([r["n_samples"] for r in recipe["runs"] if r["label"] in recipe["trained_on"]], dtype=float)
        rows = [i for i, r in enumerate(recipe["runs"]) if r["label"] in recipe["trained_on"]]
        mean = np.average(model.arrays["feature_mean"][rows].astype(np.float64), axis=0, weights=n)
        sd = np.average(model.arrays["feature_std"][rows].astype(np.float64), axis=0, weights=n)
        A = np.where(sd > 0, (A - mean) / np.where(sd > 0, sd, 1.0), 0.0).astype(np.float32)
    design = recipe["design"]
    if design["kind"] == "fir_delays":
        X = make_delays(A, [A.shape[0]], design["delays"])
    else:
        X, _ = trf_design(A, [A.shape[0]], design["sfreq"], design["tmin"], design["tmax"])
    X = np.asarray(X, dtype=np.float32)
    if X.shape[1] != model.arrays["weights"].shape[0]:
        raise DatasetError(f"{model.path}: the rebuilt features have {X.shape[1]} columns, the weights "
                           f"{model.arrays['weights'].shape[0]} rows; the model's recipe does not match its weights")
    return X


def predict_model(model: PublishedModel, X: np.ndarray) -> np.ndarray:
    """The predicted response (n_samples, n_targets), float32; NaN for targets the fit skipped."""
    pred = predict_rows(X, model.arrays["weights"], model.arrays["intercept"])
    pred[:, ~model.valid] = np.nan
    return pred


def predict(manifest_uri: str, *, text: str | Path | None = None, textgrid: str | Path | None = None,
            audio: str | Path | None = None, subject: str | None = None, feature_spaces: list[str] | None = None,
            out: str | Path | None = None, n_samples: int | None = None, start_time: float | None = None,
            like_story: str | None = None, offset: float | None = None, words_per_second: float | None = None,
            model_dir: str | Path | None = None, zscore: str = "own",
            cache_dir: str | Path | None = None) -> list[Prediction]:
    """Predict every target's response to a new stimulus from a published analysis (``neuroflow predict``).

    Parameters
    ----------
    manifest_uri : ``s3://.../manifest.json`` or a local manifest path / ``file://`` URI.
    text, textgrid, audio : the stimulus (at least one; see :func:`read_stimulus`).
    subject : whose models (needed when the analysis has several subjects).
    feature_spaces : which models (default: every one of the subject).
    out : a folder to write the time courses and maps into (see :func:`write_prediction`).
    n_samples, start_time, like_story : the samples predicted (see :func:`sample_times`).
    offset, words_per_second : the stimulus clock (TextGrid / WAV shift; plain text's word rate).
    model_dir : a local copy of the feature's transformers model (checked against the recorded files).
    zscore : ``"own"`` (as the fit: reproduces held-out scores) or ``"training"``.

    Returns
    -------
    list of Prediction, one per feature space.
    """
    if text is None and textgrid is None and audio is None:
        raise ConfigError("give the stimulus: --text FILE, --textgrid FILE or --audio FILE")
    models = load_models(manifest_uri, subject, feature_spaces, cache_dir=cache_dir)
    shared = ModelCache()
    out_list = []
    for model in models:
        stim, end = read_stimulus(model, text=text, textgrid=textgrid, audio=audio, offset=offset,
                                  words_per_second=words_per_second, start_time=start_time)
        times = sample_times(model, end, n_samples=n_samples, start_time=start_time, like_story=like_story)
        X = model_design(model, stim, times, zscore=zscore, model_dir=model_dir, models=shared)
        pred = Prediction(model, times, predict_model(model, X))
        if out is not None:
            write_prediction(pred, Path(out))
        out_list.append(pred)
    return out_list


# ---------------------------------------------------------------------------- writing


def target_names(model: PublishedModel) -> list[str]:
    names = model.recipe["targets"].get("target_names")
    return [str(n) for n in names] if names else [f"target{j}" for j in range(model.n_targets)]


def write_map(model: PublishedModel, values: np.ndarray, stem: Path) -> list[Path]:
    """One value per target as a map in the dataset's kind: NIfTI (volumes), GIFTI per hemisphere, else TSV."""
    # maps imports matplotlib and nilearn (heavy): loaded only when writing
    from ..maps import FSAVERAGE_VERTICES, write_surface_map, write_target_table, write_volume_map

    targets = model.recipe["targets"]
    if "mask" in model.arrays:
        import nibabel as nib

        mask = nib.Nifti1Image(model.arrays["mask"].astype(np.uint8), np.asarray(targets["affine"], dtype=float))
        return [write_volume_map(values, mask, stem.with_name(stem.name + ".nii.gz"))]
    if "vertex" in model.arrays and "hemi" in model.arrays:
        vertex = model.arrays["vertex"].astype(np.int64)
        hemi = model.arrays["hemi"]
        n_vertices = FSAVERAGE_VERTICES.get(targets.get("space") or "", int(vertex.max()) + 1)
        paths = []
        for code, h in ((0, "L"), (1, "R")):
            rows = hemi == code
            if rows.any():
                name = stem.name.replace(f"sub-{model.subject}_", f"sub-{model.subject}_hemi-{h}_", 1)
                paths.append(write_surface_map(values[rows], vertex[rows], n_vertices,
                                               stem.with_name(name + ".func.gii")))
        return paths
    return [write_target_table({"predicted": values}, target_names(model), stem.with_name(stem.name + ".tsv"))]


def write_prediction(pred: Prediction, folder: Path, label: str = "pred") -> list[Path]:
    """Write one prediction into ``folder``: ``<stem>_pred.npy`` (samples x targets), ``<stem>_pred.tsv``
    (a ``time`` column then one per target, up to :data:`TSV_MAX_TARGETS` targets) and the map
    ``<stem>_predmap.{nii.gz|func.gii|tsv}``; ``<stem>`` is ``sub-<s>_desc-<space>``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = pred.model
    desc = "".join(ch for ch in model.feature_space if ch.isalnum())
    stem = folder / f"sub-{model.subject}_desc-{desc}_{label}"
    np.save(stem.with_name(stem.name + ".npy"), pred.values)
    paths = [stem.with_name(stem.name + ".npy")]
    if model.n_targets <= TSV_MAX_TARGETS:
        table = pd.DataFrame(pred.values, columns=target_names(model))
        table.insert(0, "time", pred.times)
        table.to_csv(stem.with_name(stem.name + ".tsv"), sep="\t", index=False, float_format="%.6g", na_rep="n/a")
        paths.append(stem.with_name(stem.name + ".tsv"))
    paths += write_map(model, pred.map, folder / f"sub-{model.subject}_desc-{desc}_{label}map")
    return paths

