"""Every feature ``kind``: its parameters (validated) and one function with a uniform signature.

A feature space of the config (``features: [{name, kind, ...}]``) is computed in three steps:

1. :func:`parse_feature` validates the mapping into the kind's spec (a frozen pydantic model
   that forbids unknown keys and suggests the closest valid one), e.g. :class:`SpeechModelFeature`.
2. :func:`compute_feature` ``(spec, stimulus, *, device="auto", models=None) -> FeatureResult``
   runs the kind's function on a :class:`Stimulus` (what one run heard: word timings, audio,
   a TextGrid with phones, events). Every kind's function has exactly this signature:

   ``fn(spec, stimulus: Stimulus, *, device: str = "auto", models: ModelCache | None = None)
   -> FeatureResult``

   ``models`` lets several feature spaces (and several stories) share a loaded model.
3. :func:`align_to_samples` puts a result on a run's sample times: Lanczos or TR averaging for
   fMRI, the response rate for MEG / ECoG (then :func:`pipelines.features.lags.trf_design`
   adds the TRF lags; :func:`pipelines.features.align.make_delays` the FIR delays of fMRI).

A :class:`FeatureResult` holds one array per *space*: ``"values"`` for a kind with one
output, or ``"layer{k}"`` for each layer of a layer sweep (``layer: [3, 6, 9]`` or
``layer: all``), all from one pass over the stimulus, all sharing ``times``. Rows are either
``"events"`` (one per word or phone, at its midpoint; Lanczos sums them) or ``"regular"``
samples at ``sfreq`` (frame centres).

:func:`pipelines.features.cache_keys.cache_key` hashes (stimulus content, the spec minus its name and batch sizes, model
folder contents, the kind's code version): runs of one story recorded twice (LeBel's repeated
test story) have the same stimulus hash and so share one extraction.

Importing this module imports neither torch nor transformers (DAG parsing stays light).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from pydantic import BaseModel, TypeAdapter, ValidationError

from pipelines.errors import ConfigError, DatasetError
from pipelines.features.specs import (EnvelopeFeature, EventsFeature, FeatureSpec, LanguageModelFeature,
                                      PhonemeRateFeature, SpectrogramFeature, SpeechModelFeature, SurprisalFeature,
                                      WordFrequencyFeature, WordRateFeature)

__all__ = [
    "Stimulus",
    "FeatureResult",
    "ModelCache",
    "FeatureKind",
    "KINDS",
    "FeatureSpec",
    "parse_feature",
    "compute_feature",
    "stream_feature",
    "align_to_samples",
    "model_runtime",
    "space_names",
]

_ADAPTER: TypeAdapter = TypeAdapter(FeatureSpec)


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Stimulus:
    """What one run heard, on the run's clock.

    Attributes
    ----------
    words : pandas.DataFrame, optional
        Columns ``onset``, ``offset``, ``word`` (seconds, already on the run clock, as
        :func:`pipelines.stimulus.read_textgrid_words` returns with its ``offset``).
    audio : str or Path, optional
        WAV file of the stimulus; its time 0 is at ``offset`` seconds on the run clock.
    textgrid : str or Path, optional
        TextGrid holding a phone tier; its times plus ``offset`` are on the run clock.
    events : pandas.DataFrame, str or Path, optional
        The run's ``events.tsv`` (or the table read), on the run clock.
    offset : float
        Seconds added to times read from ``audio`` and ``textgrid``.
    """

    words: Any = None
    audio: str | Path | None = None
    textgrid: str | Path | None = None
    events: Any = None
    offset: float = 0.0


@dataclass
class FeatureResult:
    """Feature values of one feature space on one stimulus.

    Attributes
    ----------
    values : dict[str, np.ndarray]
        Space name -> float32 array of shape (n_rows, n_dims): ``"values"``, or ``"layer{k}"``
        per layer of a sweep. All arrays share ``times``.
    times : np.ndarray, shape (n_rows,)
        Seconds on the run clock: word/phone midpoints, or frame centres.
    sampling : {"events", "regular"}
        One row per event (summed by Lanczos, stick function at a response rate), or regular
        samples at ``sfreq``.
    sfreq : float or None
        Rows per second when ``sampling == "regular"``.
    columns : list of str or None
        Name of each dimension when they have one (mel band centres, trial types).
    """

    values: dict[str, np.ndarray]
    times: np.ndarray
    sampling: str
    sfreq: float | None = None
    columns: list[str] | None = None

    def single(self) -> np.ndarray:
        """The only array (raises when the result holds several spaces)."""
        if len(self.values) != 1:
            raise ValueError(f"this result holds {len(self.values)} spaces ({', '.join(self.values)}): pick one")
        return next(iter(self.values.values()))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays for ``np.savez``: each space plus ``__times`` (and ``__sfreq``)."""
        out = {k: np.asarray(v, dtype=np.float32) for k, v in self.values.items()}
        out["__times"] = np.asarray(self.times, dtype=np.float64)
        out["__sampling"] = np.asarray(self.sampling)
        if self.sfreq is not None:
            out["__sfreq"] = np.asarray(self.sfreq, dtype=np.float64)
        if self.columns is not None:
            out["__columns"] = np.asarray(self.columns, dtype=str)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "FeatureResult":
        """Inverse of :meth:`to_arrays`."""
        values = {k: np.asarray(v) for k, v in arrays.items() if not k.startswith("__")}
        sfreq = float(arrays["__sfreq"]) if "__sfreq" in arrays else None
        columns = [str(c) for c in arrays["__columns"]] if "__columns" in arrays else None
        return cls(values=values, times=np.asarray(arrays["__times"]), sampling=str(arrays["__sampling"]),
                   sfreq=sfreq, columns=columns)


class ModelCache:
    """Loaded models shared between feature spaces: ``get(key, loader)`` loads once per key."""

    def __init__(self) -> None:
        self._models: dict[tuple, Any] = {}

    def get(self, key: tuple, loader: Callable[[], Any]) -> Any:
        if key not in self._models:
            self._models[key] = loader()
        return self._models[key]

    def clear(self) -> None:
        self._models.clear()


@dataclass(frozen=True)
class FeatureKind:
    """One ``kind``: its spec class, compute function, the stimulus parts it reads, its code version."""

    kind: str
    spec: type[BaseModel]
    compute: Callable[..., FeatureResult]
    needs: tuple[str, ...]
    version: str = "1"
    model_field: str | None = None
    batch_fields: tuple[str, ...] = field(default=())
    streams: bool = False  # compute accepts stream_to=folder: each space written there as computed


# ---------------------------------------------------------------------------- helpers


def _need(stimulus: Stimulus, part: str, kind: str) -> Any:
    value = getattr(stimulus, part)
    if value is None:
        raise DatasetError(f"feature kind {kind!r} needs the stimulus {part!r}, which this dataset/config does not "
                           "give: add it to the config or drop the feature")
    return value


def _words(stimulus: Stimulus, kind: str) -> tuple[list[str], np.ndarray]:
    table = _need(stimulus, "words", kind)
    words = [str(w) for w in table["word"]]
    times = ((table["onset"].to_numpy(np.float64) + table["offset"].to_numpy(np.float64)) / 2.0)
    return words, times


def _layer_list(layer: Any, n_layers: int) -> tuple[list[int], bool]:
    """(layers, is_sweep) from a spec's ``layer``: an int, a list, or "all"."""
    if layer == "all":
        return list(range(n_layers + 1)), True
    if isinstance(layer, list):
        return [int(x) for x in layer], True
    return [int(layer)], False


def _spaces(feats: dict[int, np.ndarray], layers: list[int], sweep: bool) -> dict[str, np.ndarray]:
    if not sweep:
        return {"values": np.asarray(feats[layers[0]], dtype=np.float32)}
    return {f"layer{k}": np.asarray(feats[k], dtype=np.float32) for k in layers}


def _space_of_layer(layers: list[int], sweep: bool) -> dict[int, str]:
    """The space each requested layer fills (as :func:`_spaces` names them)."""
    return {k: f"layer{k}" for k in layers} if sweep else {layers[0]: "values"}


def space_names(spec: BaseModel, n_layers: int | None = None) -> list[str]:
    """Names of the spaces a spec yields (``["values"]`` or ``["layer3", ...]``).

    ``layer: all`` needs the model's ``n_layers``.
    """
    layer = getattr(spec, "layer", None)
    if layer is None or isinstance(layer, int):
        return ["values"]
    if layer == "all":
        if n_layers is None:
            raise ValueError("layer: all needs the model's number of layers")
        return [f"layer{k}" for k in range(n_layers + 1)]
    return [f"layer{k}" for k in layer]


def _audio(stimulus: Stimulus, kind: str, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    from pipelines.features.acoustic import read_wav, resample_audio

    audio, sr = read_wav(_need(stimulus, "audio", kind))
    if sample_rate is not None and sample_rate != sr:
        audio, sr = resample_audio(audio, sr, sample_rate), int(sample_rate)
    return audio, sr


def _placement_kwargs(spec: BaseModel) -> dict[str, Any]:
    """The spec's ``dtype``, ``quantization`` and ``device_map`` (those it has)."""
    return {k: getattr(spec, k) for k in ("dtype", "quantization", "device_map") if k in type(spec).model_fields}


def _placement(spec: BaseModel) -> tuple:
    return tuple(_placement_kwargs(spec).values())


def model_runtime(params: Mapping[str, Any] | BaseModel, device: str = "auto") -> dict[str, Any] | None:
    """How this machine would hold the feature's model (dtype, quantization, device), without
    loading it (:func:`pipelines.features.model_runtime.runtime_of`); None for a kind that runs
    no model. Goes into the feature cache key (:func:`pipelines.features.cache_keys.cache_key`) and the manifest."""
    from pipelines.features.model_runtime import runtime_of

    spec = parse_feature(params)
    entry = KINDS[spec.kind]
    if entry.model_field is None:
        return None
    return runtime_of(getattr(spec, entry.model_field), getattr(spec, "revision", None), device=device,
                      origin=f"features[{spec.name}]", **_placement_kwargs(spec)).as_dict()


# ---------------------------------------------------------------------------- compute functions


def compute_word_rate(spec: WordRateFeature, stimulus: Stimulus, *, device: str = "auto",
                      models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.word_rate import word_rate_values

    words, times = _words(stimulus, spec.kind)
    return FeatureResult({"values": word_rate_values(len(words))}, times, "events")


def compute_language_model(spec: LanguageModelFeature, stimulus: Stimulus, *, device: str = "auto",
                           models: ModelCache | None = None, stream_to: Path | None = None) -> FeatureResult:
    from pipelines.features.language_model import extract_word_features, load_language_model, stream_word_features

    words, times = _words(stimulus, spec.kind)
    models = models or ModelCache()
    lm = models.get(("language_model", spec.model, spec.revision, device, "base", *_placement(spec)),
                    lambda: load_language_model(spec.model, spec.revision, device=device, **_placement_kwargs(spec)))
    layers, sweep = _layer_list(spec.layer, lm.n_layers)
    kwargs = {"batch_size": spec.batch_size, "pooling": spec.pooling, "batch_tokens": spec.batch_tokens,
              "stride_words": spec.stride_words}
    from pipelines.features.baselines import extraction_passes, random_embedding, untrained_model

    # the model's own pass, then one per layered baseline (features[].baselines): (words, model, {layer: space});
    # the untrained copy is built once and shared by the stories, as the model is
    untrained = lambda: models.get(("untrained", spec.model, spec.revision, device, *_placement(spec)),  # noqa: E731
                                   lambda: untrained_model(lm))
    runs = extraction_passes(spec.baselines, lm, list(words), _space_of_layer(layers, sweep), untrained=untrained)
    if stream_to is not None:  # each layer to stream_to/<space>.npy as computed (see stream_feature)
        from pipelines.features.layer_files import LayerFiles

        names = [sp for _, _, spaces in runs for sp in spaces.values()] + (
            ["random_embedding"] if "random_embedding" in spec.baselines else [])
        with LayerFiles(stream_to, list(dict.fromkeys(names)), len(words), lm.hidden_size) as files:
            for run_words, model, spaces in runs:
                stream_word_features(run_words, model(), list(spaces), spec.context_words, files, spaces, **kwargs)
            if "random_embedding" in spec.baselines:
                files.write("random_embedding", np.arange(len(words)), random_embedding(list(words), lm.hidden_size))
        return FeatureResult({}, times, "events")
    values: dict[str, np.ndarray] = {}
    for run_words, model, spaces in runs:
        feats = extract_word_features(run_words, model(), list(spaces), spec.context_words, **kwargs)
        values.update({sp: np.asarray(feats[k], dtype=np.float32) for k, sp in spaces.items()})
    if "random_embedding" in spec.baselines:
        values["random_embedding"] = random_embedding(list(words), lm.hidden_size)
    return FeatureResult(values, times, "events")


def compute_speech_model(spec: SpeechModelFeature, stimulus: Stimulus, *, device: str = "auto",
                         models: ModelCache | None = None, stream_to: Path | None = None) -> FeatureResult:
    from pipelines.features.speech_model import extract_speech_features, load_audio, load_speech_model

    models = models or ModelCache()
    sm = models.get(("speech_model", spec.model, spec.revision, device, spec.dtype),
                    lambda: load_speech_model(spec.model, spec.revision, device=device, dtype=spec.dtype))
    audio = load_audio(_need(stimulus, "audio", spec.kind), sm.sampling_rate)
    layers, sweep = _layer_list(spec.layer, sm.n_layers)
    stream = None if stream_to is None else (stream_to, _space_of_layer(layers, sweep))
    times, feats = extract_speech_features(audio, sm.sampling_rate, sm, layers, window_s=spec.window_s,
                                           step_s=spec.step_s, pooling=spec.pooling, batch_size=spec.batch_size,
                                           stream_to=stream)
    return FeatureResult(_spaces(feats, layers, sweep) if stream is None else {}, times + stimulus.offset, "regular",
                         sfreq=1.0 / spec.step_s)


def compute_spectrogram(spec: SpectrogramFeature, stimulus: Stimulus, *, device: str = "auto",
                        models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.acoustic import spectrogram

    audio, sr = _audio(stimulus, spec.kind, spec.sample_rate)
    values, times, freqs = spectrogram(audio, sr, scale=spec.scale, n_mels=spec.n_mels, win_s=spec.win_s,
                                       hop_s=spec.hop_s, fmin=spec.fmin, fmax=spec.fmax, log=spec.log)
    hop = max(1, int(round(spec.hop_s * sr))) / sr
    return FeatureResult({"values": values}, times + stimulus.offset, "regular", sfreq=1.0 / hop,
                         columns=[f"{f:.1f}Hz" for f in freqs])


def compute_envelope(spec: EnvelopeFeature, stimulus: Stimulus, *, device: str = "auto",
                     models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.acoustic import envelope

    audio, sr = _audio(stimulus, spec.kind)
    values, times = envelope(audio, sr, sfreq=spec.sfreq, measure=spec.measure, win_s=spec.win_s)
    return FeatureResult({"values": values}, times + stimulus.offset, "regular", sfreq=spec.sfreq,
                         columns=[spec.measure])


def compute_phoneme_rate(spec: PhonemeRateFeature, stimulus: Stimulus, *, device: str = "auto",
                         models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.lexical import phoneme_rate_values, read_phones

    phones = read_phones(_need(stimulus, "textgrid", spec.kind), tier=spec.tier, offset=stimulus.offset)
    values, times = phoneme_rate_values(phones)
    return FeatureResult({"values": values}, times, "events")


def compute_word_frequency(spec: WordFrequencyFeature, stimulus: Stimulus, *, device: str = "auto",
                           models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.lexical import word_frequency_values

    words, times = _words(stimulus, spec.kind)
    return FeatureResult({"values": word_frequency_values(words, spec.language, spec.wordlist)}, times, "events",
                         columns=["zipf"])


def compute_surprisal(spec: SurprisalFeature, stimulus: Stimulus, *, device: str = "auto",
                      models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.language_model import load_language_model
    from pipelines.features.lexical import word_surprisal

    words, times = _words(stimulus, spec.kind)
    models = models or ModelCache()
    lm = models.get(("language_model", spec.model, spec.revision, device, "causal_lm", *_placement(spec)),
                    lambda: load_language_model(spec.model, spec.revision, device=device, head="causal_lm",
                                                **_placement_kwargs(spec)))
    values = word_surprisal(words, lm, spec.context_words, batch_size=spec.batch_size, batch_tokens=spec.batch_tokens)
    return FeatureResult({"values": values}, times, "events", columns=["bits"])


def compute_events(spec: EventsFeature, stimulus: Stimulus, *, device: str = "auto",
                   models: ModelCache | None = None) -> FeatureResult:
    from pipelines.features.events import events_on_grid, read_events

    events = read_events(_need(stimulus, "events", spec.kind), column=spec.column)
    values, times, columns = events_on_grid(events, spec.sfreq, trial_types=spec.trial_types, mode=spec.mode)
    return FeatureResult({"values": values}, times, "regular", sfreq=spec.sfreq, columns=columns)


KINDS: dict[str, FeatureKind] = {
    k.kind: k for k in [
        FeatureKind("word_rate", WordRateFeature, compute_word_rate, ("words",)),
        FeatureKind("language_model", LanguageModelFeature, compute_language_model, ("words",), version="2",
                    model_field="model", batch_fields=("batch_size", "batch_tokens"), streams=True),
        FeatureKind("speech_model", SpeechModelFeature, compute_speech_model, ("audio",), model_field="model",
                    batch_fields=("batch_size",), streams=True),
        FeatureKind("spectrogram", SpectrogramFeature, compute_spectrogram, ("audio",)),
        FeatureKind("envelope", EnvelopeFeature, compute_envelope, ("audio",)),
        FeatureKind("phoneme_rate", PhonemeRateFeature, compute_phoneme_rate, ("textgrid",)),
        FeatureKind("word_frequency", WordFrequencyFeature, compute_word_frequency, ("words",)),
        FeatureKind("surprisal", SurprisalFeature, compute_surprisal, ("words",), model_field="model",
                    batch_fields=("batch_size", "batch_tokens")),
        FeatureKind("events", EventsFeature, compute_events, ("events",)),
    ]
}


# ---------------------------------------------------------------------------- public API


def get_kind(kind: str) -> FeatureKind:
    """The registry entry of ``kind``; ``ValueError`` naming the valid kinds otherwise."""
    if not isinstance(kind, str) or kind not in KINDS:
        close = difflib.get_close_matches(str(kind), list(KINDS), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown feature kind {kind!r}.{hint} Valid kinds: {', '.join(KINDS)}")
    return KINDS[kind]


def parse_feature(params: Mapping[str, Any] | BaseModel, origin: str = "feature") -> BaseModel:
    """Validate one feature mapping (``{name, kind, ...}``) into its kind's spec.

    ``params`` may also be a spec already, or any pydantic model with the same fields (the
    config's feature entries), which is validated again here.

    Raises
    ------
    ConfigError
        Unknown kind or key (with the closest valid one), or a value out of range; the
        message names ``origin`` and the key.
    """
    if isinstance(params, tuple(k.spec for k in KINDS.values())):
        return params
    if isinstance(params, BaseModel):  # e.g. the config's own feature model: validate its fields here
        params = params.model_dump(mode="json")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{origin}: a feature must be a mapping with 'name' and 'kind'")
    kind = params.get("kind")
    try:
        entry = get_kind(kind)
    except ValueError as err:
        raise ConfigError(f"{origin}: {err}") from err
    try:
        return _ADAPTER.validate_python(dict(params))
    except ValidationError as err:
        first = err.errors()[0]
        loc = [p for p in first["loc"] if p != kind]
        # keep the field name and list indices, not pydantic's union-member tags ("int", "list[int]")
        parts = [str(loc[0])] + [str(p) for p in loc[1:] if isinstance(p, int)] if loc else []
        key = ".".join(parts)
        if first["type"] == "extra_forbidden":
            valid = list(entry.spec.model_fields)
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
            raise ConfigError(f"{origin}: unknown key {key!r} for kind {kind!r}.{hint}") from err
        msg = first["msg"].removeprefix("Value error, ")
        if loc and loc[0] == "layer":  # a union: pydantic's message names only one of its members
            msg = f"must be a layer index, a list of layer indices, or 'all'; got {params.get('layer')!r}"
        if loc and loc[0] == "pca":
            msg = (f"must be a number of components (an integer >= 1) or a fraction of the variance to keep "
                   f"(between 0 and 1); got {params.get('pca')!r}")
        raise ConfigError(f"{origin}: {key or kind}: {msg}") from err


def compute_feature(params: Mapping[str, Any] | BaseModel, stimulus: Stimulus, *, device: str = "auto",
                    models: ModelCache | None = None) -> FeatureResult:
    """Validate ``params`` and compute the feature on ``stimulus`` (see the module docstring).

    Raises
    ------
    ConfigError
        Invalid parameters.
    DatasetError
        The stimulus lacks what the kind reads (words, audio, phones, events), or its files are bad.
    ModelError
        A model cannot be loaded (missing, pickled weights, remote code, unknown layer).
    """
    spec = parse_feature(params)
    result = KINDS[spec.kind].compute(spec, stimulus, device=device, models=models)
    for key, arr in result.values.items():
        if arr.shape[0] != result.times.shape[0]:
            raise AssertionError(f"{spec.kind}: space {key} has {arr.shape[0]} rows for {result.times.size} times")
        if not np.all(np.isfinite(arr)):
            raise DatasetError(f"feature {spec.name!r} ({spec.kind}) produced NaN or Inf values")
    return result


def stream_feature(params: Mapping[str, Any] | BaseModel, stimulus: Stimulus, folder: str | Path, *,
                   device: str = "auto", models: ModelCache | None = None
                   ) -> tuple[FeatureResult, dict[str, Path]] | None:
    """:func:`compute_feature` written to ``folder`` space by space as it is computed, for the
    kinds that can (language- and speech-model layer sweeps); None for the others.

    Returns the result without its values (times, sampling...) and the float32 ``.npy`` file
    of each space, shape (n_rows, n_dims).

    Raises
    ------
    ConfigError, DatasetError, ModelError
        As :func:`compute_feature`.
    """
    from pipelines.features.layer_files import all_finite

    spec = parse_feature(params)
    if not KINDS[spec.kind].streams:
        return None
    meta = KINDS[spec.kind].compute(spec, stimulus, device=device, models=models, stream_to=Path(folder))
    files = {p.stem: p for p in sorted(Path(folder).glob("*.npy"))}
    for key, path in files.items():
        if not all_finite(path):
            raise DatasetError(f"feature {spec.name!r} ({spec.kind}) produced NaN or Inf values (space {key})")
    return meta, files


def align_to_samples(result: FeatureResult, sample_times: np.ndarray, *, method: str = "lanczos",
                     window: int = 3, tr: float | None = None, space: str | None = None) -> np.ndarray:
    """One space of a result on a run's sample times.

    Parameters
    ----------
    result : FeatureResult
    sample_times : np.ndarray, shape (n_samples,)
        The run's sample times (seconds, run clock), strictly increasing.
    method : {"lanczos", "average", "samples"}
        fMRI: Lanczos resampling (``window`` lobes) or the mean of the rows within each TR
        (``tr`` seconds, default the median spacing); MEG / ECoG: ``"samples"`` (stick function
        for events, anti-aliased resampling for regular series, see
        :func:`pipelines.features.lags.to_sample_times`).
    space : str, optional
        Which space (default: the only one).

    Returns
    -------
    np.ndarray, shape (n_samples, n_dims), float32
    """
    from pipelines.features.align import average_within_tr, lanczos_resample
    from pipelines.features.lags import to_sample_times

    values = result.single() if space is None else result.values[space]
    t = np.asarray(sample_times, dtype=np.float64)
    if method == "lanczos":
        return lanczos_resample(values, result.times, t, window=window)
    if method == "average":
        step = float(np.median(np.diff(t))) if tr is None else float(tr)
        return average_within_tr(values, result.times, t, step)
    if method == "samples":
        return to_sample_times(values, result.times, t, sampling=result.sampling)
    raise ValueError(f"method = {method!r} is unknown: use 'lanczos', 'average' or 'samples'")
