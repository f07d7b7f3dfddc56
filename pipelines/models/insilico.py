"""In-silico experiments on a published encoding model: contrasts of sentence sets, and sentence selection.

Each sentence is presented alone to the model: its words on an even clock (the rate the training
stories were read at, or ``words_per_second``), the features rebuilt as the fit built them and
standardised with the training runs' statistics (``zscore="training"``: a sentence is too short
to be z-scored on itself), and its *predicted response* is the mean prediction over the samples
from its first word (plus the shortest delay) to its last word (plus the longest delay).

- :func:`contrast`: the predicted response to sentences A minus that to sentences B, per target
  (with Welch's t over sentences), written as a map in the dataset's kind;
- :func:`select_sentences`: the candidates predicted to drive or suppress a target set (named
  targets, a NIfTI mask, or the ``top`` best-predicted targets by published held-out r), ranked by
  their mean predicted response over the set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, DatasetError
from ..features.registry import ModelCache, Stimulus
from ..manifest import printable
from .predict import (PublishedModel, feature_params, load_models, model_design, predict_model, target_names,
                      word_rate_of, words_from_text, write_map)

__all__ = ["read_sentences", "sentence_responses", "contrast", "select_sentences", "target_set",
           "ContrastResult", "Selection"]

#: At most this many sentences per call (each is one forward pass of the feature's model).
MAX_SENTENCES = 10_000


def read_sentences(path: str | Path) -> list[str]:
    """One sentence per line of a UTF-8 text file; blank lines and lines starting with ``#`` skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{printable(path)}: no such sentences file (one sentence per line)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    sentences = [ln for ln in lines if ln and not ln.startswith("#")]
    if not sentences:
        raise ConfigError(f"{printable(path)}: holds no sentence (one per line; '#' starts a comment)")
    if len(sentences) > MAX_SENTENCES:
        raise ConfigError(f"{printable(path)}: {len(sentences)} sentences; at most {MAX_SENTENCES} per call")
    return sentences


def _one_model(manifest_uri: str, subject: str | None, feature_space: str | None,
               cache_dir: str | Path | None) -> PublishedModel:
    models = load_models(manifest_uri, subject, [feature_space] if feature_space else None, cache_dir=cache_dir)
    if len(models) > 1:
        raise ConfigError(f"sub-{models[0].subject} has models of {len(models)} feature spaces "
                          f"({', '.join(m.feature_space for m in models)}); choose one with --feature-space")
    return models[0]


def sentence_responses(model: PublishedModel, sentences: list[str], *, words_per_second: float | None = None,
                       model_dir: str | Path | None = None) -> np.ndarray:
    """Each sentence's predicted response per target (see the module docstring).

    Returns
    -------
    array of shape (n_sentences, n_targets), float32; NaN for targets the fit skipped.
    """
    if not sentences:
        raise ConfigError("no sentences given")
    rate = word_rate_of(model, words_per_second)
    params = feature_params(model, model_dir)
    sampling, design = model.recipe["sampling"], model.recipe["design"]
    step = 1.0 / sampling["sfreq"] if "sfreq" in sampling else float(sampling["tr"])
    if design["kind"] == "fir_delays":
        first_lag, last_lag = min(design["delays"]) * step, max(design["delays"]) * step
    else:
        first_lag, last_lag = design["tmin"], design["tmax"]
    lead = 2 * step  # silence before the sentence: the resampling window starts in it
    cache = ModelCache()
    out = np.empty((len(sentences), model.n_targets), dtype=np.float32)
    for i, sentence in enumerate(sentences):
        try:
            words = words_from_text(sentence, lead, rate)
        except DatasetError as err:
            raise ConfigError(f"sentence {i + 1} ({printable(sentence, 60)!r}): {err}") from err
        start, end = float(words["onset"].iloc[0]), float(words["offset"].iloc[-1])
        times = step * np.arange(int(np.ceil((end + max(last_lag, 0.0) + lead) / step)) + 1)
        X = model_design(model, Stimulus(words=words), times, zscore="training", models=cache, params=params)
        pred = predict_model(model, X)
        rows = (times >= start + first_lag) & (times <= end + last_lag)
        if not rows.any():
            rows = np.argmin(np.abs(times - (start + end) / 2 - (first_lag + last_lag) / 2)) == np.arange(times.size)
        out[i] = pred[rows].mean(axis=0)
    return out


@dataclass
class ContrastResult:
    """A minus B: ``difference`` and Welch's ``t`` per target, and every sentence's response."""

    model: PublishedModel
    difference: np.ndarray
    t: np.ndarray
    responses_a: np.ndarray
    responses_b: np.ndarray
    files: list[Path] = field(default_factory=list)


def _welch_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = a.shape[0], b.shape[0]
    if na < 2 or nb < 2:
        return np.full(a.shape[1], np.nan, dtype=np.float32)
    se = np.sqrt(a.var(axis=0, ddof=1) / na + b.var(axis=0, ddof=1) / nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, (a.mean(axis=0) - b.mean(axis=0)) / se, np.nan).astype(np.float32)


def contrast(manifest_uri: str, sentences_a: list[str] | str | Path, sentences_b: list[str] | str | Path, *,
             subject: str | None = None, feature_space: str | None = None, out: str | Path | None = None,
             words_per_second: float | None = None, model_dir: str | Path | None = None,
             cache_dir: str | Path | None = None) -> ContrastResult:
    """The predicted response to sentences A minus that to sentences B, per target (``neuroflow insilico contrast``).

    ``sentences_a`` / ``sentences_b`` are lists of sentences or files of one sentence per line. With
    ``out``, writes ``sub-<s>_desc-<space>_contrast`` and ``..._contrast-t`` maps (NIfTI / GIFTI / TSV)
    and ``..._contrast.json`` (the sentences and the mean difference).
    """
    a = read_sentences(sentences_a) if isinstance(sentences_a, (str, Path)) else list(sentences_a)
    b = read_sentences(sentences_b) if isinstance(sentences_b, (str, Path)) else list(sentences_b)
    model = _one_model(manifest_uri, subject, feature_space, cache_dir)
    ra = sentence_responses(model, a, words_per_second=words_per_second, model_dir=model_dir)
    rb = sentence_responses(model, b, words_per_second=words_per_second, model_dir=model_dir)
    diff = np.where(model.valid, ra.mean(axis=0) - rb.mean(axis=0), np.nan).astype(np.float32)
    result = ContrastResult(model, diff, np.where(model.valid, _welch_t(ra, rb), np.nan), ra, rb)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"sub-{model.subject}_desc-{_desc(model.feature_space)}"
        result.files += write_map(model, result.difference, folder / f"{stem}_contrast")
        result.files += write_map(model, result.t, folder / f"{stem}_contrast-t")
        summary = folder / f"{stem}_contrast.json"
        summary.write_text(json.dumps({"manifest": manifest_uri, "subject": model.subject,
                                       "feature_space": model.feature_space, "sentences_a": a, "sentences_b": b,
                                       "mean_difference": _finite_mean(diff)}, indent=2))
        result.files.append(summary)
    return result


def _desc(name: str) -> str:
    return "".join(ch for ch in name if ch.isalnum())


def _finite_mean(values: np.ndarray) -> float | None:
    good = values[np.isfinite(values)]
    return round(float(good.mean()), 6) if good.size else None


def target_set(model: PublishedModel, *, targets: list[str] | None = None, mask: str | Path | None = None,
               top: int | None = None) -> np.ndarray:
    """Indices of the targets of an experiment: named ``targets``, the voxels of a NIfTI ``mask`` (on the
    model's grid), or the ``top`` valid targets of highest published held-out r (default 10)."""
    given = sum(x is not None for x in (targets, mask, top))
    if given > 1:
        raise ConfigError("choose the target set one way: --targets, --roi-mask or --top")
    valid = model.valid
    if targets is not None:
        names = target_names(model)
        where = {n: i for i, n in enumerate(names)}
        missing = [t for t in targets if t not in where]
        if missing:
            raise ConfigError(f"--targets {missing}: not targets of sub-{model.subject}; it has "
                              f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
        idx = np.asarray([where[t] for t in targets], dtype=np.int64)
    elif mask is not None:
        idx = _mask_targets(model, Path(mask))
    else:
        n = 10 if top is None else int(top)
        if n < 1:
            raise ConfigError(f"--top must be at least 1; got {n}")
        r = np.where(valid, model.arrays["r"], -np.inf) if "r" in model.arrays else None
        if r is None:
            raise DatasetError(f"{model.path}: the model records no held-out r; choose --targets or --roi-mask")
        idx = np.argsort(-r, kind="stable")[:min(n, int(valid.sum()))]
    idx = idx[valid[idx]]
    if idx.size == 0:
        raise ConfigError("the target set holds no fitted target")
    return np.sort(idx)


def _mask_targets(model: PublishedModel, path: Path) -> np.ndarray:
    import nibabel as nib  # volumes only; heavy to import

    if "mask" not in model.arrays:
        raise ConfigError(f"--roi-mask {printable(path)}: sub-{model.subject}'s targets are not voxels "
                          f"({model.recipe['targets']['kind']}); name them with --targets")
    if not path.is_file():
        raise ConfigError(f"--roi-mask {printable(path)}: no such file")
    try:
        roi = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as err:  # noqa: BLE001 - any unreadable image is the same user error
        raise ConfigError(f"--roi-mask {printable(path)}: not a readable NIfTI image ({err})") from err
    brain = model.arrays["mask"] != 0
    roi = roi[..., 0] if roi.ndim == 4 and roi.shape[3] == 1 else roi
    if roi.shape != brain.shape:
        raise ConfigError(f"--roi-mask {printable(path)}: shape {roi.shape} is not the model's grid {brain.shape}; "
                          "resample the ROI to the analysis' mask first")
    return np.flatnonzero(np.nan_to_num(roi[brain]) != 0)


@dataclass
class Selection:
    """Candidates ranked by their predicted response over the target set (``table``: sentence, score, rank)."""

    model: PublishedModel
    targets: np.ndarray
    table: pd.DataFrame
    drive: list[str]
    suppress: list[str]
    files: list[Path] = field(default_factory=list)


def select_sentences(manifest_uri: str, candidates: list[str] | str | Path, *, n: int = 5,
                     targets: list[str] | None = None, mask: str | Path | None = None, top: int | None = None,
                     subject: str | None = None, feature_space: str | None = None, out: str | Path | None = None,
                     words_per_second: float | None = None, model_dir: str | Path | None = None,
                     cache_dir: str | Path | None = None) -> Selection:
    """The ``n`` candidates predicted to drive the target set most and the ``n`` to suppress it most
    (``neuroflow insilico select``). With ``out``, writes ``..._selection.tsv`` (every candidate, ranked)
    and ``..._selection.json`` (the target set, the driving and suppressing sentences)."""
    sentences = read_sentences(candidates) if isinstance(candidates, (str, Path)) else list(candidates)
    if n < 1:
        raise ConfigError(f"-n must be at least 1; got {n}")
    model = _one_model(manifest_uri, subject, feature_space, cache_dir)
    idx = target_set(model, targets=targets, mask=mask, top=top)
    responses = sentence_responses(model, sentences, words_per_second=words_per_second, model_dir=model_dir)
    score = responses[:, idx].mean(axis=1)
    order = np.argsort(-score, kind="stable")
    table = pd.DataFrame({"sentence": [sentences[i] for i in order], "score": score[order],
                          "rank": np.arange(1, len(order) + 1)})
    k = min(n, len(sentences))
    drive = [sentences[i] for i in order[:k]]
    suppress = [sentences[i] for i in order[::-1][:k]]
    result = Selection(model, idx, table, drive, suppress)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"sub-{model.subject}_desc-{_desc(model.feature_space)}_selection"
        table.to_csv(stem.with_suffix(".tsv"), sep="\t", index=False, float_format="%.6g")
        names = target_names(model)
        stem.with_suffix(".json").write_text(json.dumps(
            {"manifest": manifest_uri, "subject": model.subject, "feature_space": model.feature_space,
             "targets": [names[i] for i in idx] if len(idx) <= 1000 else [int(i) for i in idx],
             "n_targets": int(idx.size), "drive": drive, "suppress": suppress}, indent=2))
        result.files += [stem.with_suffix(".tsv"), stem.with_suffix(".json")]
    return result


def summary(result: Any) -> dict[str, Any]:
    """A small JSON-able summary of a contrast or a selection (what the consumer DAG returns)."""
    if isinstance(result, Selection):
        return {"subject": result.model.subject, "feature_space": result.model.feature_space,
                "n_targets": int(result.targets.size), "drive": result.drive, "suppress": result.suppress}
    return {"subject": result.model.subject, "feature_space": result.model.feature_space,
            "mean_difference": _finite_mean(result.difference)}
