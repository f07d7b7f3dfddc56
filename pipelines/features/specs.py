"""The parameters of every feature ``kind``: frozen pydantic models that forbid unknown keys.

:mod:`pipelines.features.registry` pairs each with the function that computes it.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer, model_validator

__all__ = ["FeatureSpec", "Layers", "Dtype", "Pca", "ModelRef", "WordRateFeature", "LanguageModelFeature", "SpeechModelFeature", "SpectrogramFeature", "EnvelopeFeature", "PhonemeRateFeature", "WordFrequencyFeature", "SurprisalFeature", "EventsFeature"]


_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"
Layers = Union[int, list[int], Literal["all"]]


def _model_reference(value: str) -> str:
    """A model is a hub id (``org/name``) or a local folder, never a URL: a URL in a trigger could
    reach private or loopback addresses (cloud metadata, internal services)."""
    if "://" in value or value.lower().startswith(("http:", "https:", "s3:", "file:", "ftp:")):
        raise ValueError(f"'model' must be a HuggingFace hub id (org/name) or a local folder; got the URL "
                         f"{value!r}: URLs are refused (they could reach private or loopback addresses)")
    if "\x00" in value or not value.isascii():
        raise ValueError(f"'model' must be plain ASCII; got {value!r}")
    return value


ModelRef = Annotated[str, Field(min_length=1), AfterValidator(_model_reference)]


# ---------------------------------------------------------------------------- specs


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_NAME)


class WordRateFeature(_Spec):
    """Words per TR: every word is a 1 at its midpoint."""

    kind: Literal["word_rate"]


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
#: ``pca``: a number of components, or the fraction of the training variance to keep.
Pca = Union[Annotated[int, Field(ge=1, le=100_000)], Annotated[float, Field(gt=0.0, lt=1.0)], None]


class _ModelSpec(_Spec):
    """A kind that runs a transformer: how it is held in memory (see ``model_runtime``)."""

    model: ModelRef
    revision: str | None = None
    dtype: Dtype = "auto"
    quantization: Literal["8bit", "4bit"] | None = None
    device_map: Literal["auto"] | None = None


class LanguageModelFeature(_ModelSpec):
    """Hidden states of a transformers language model, per word (see ``language_model``)."""

    kind: Literal["language_model"]
    pca: Pca = None
    layer: Layers = -1
    context_words: int = Field(32, ge=0, le=2048)
    pooling: Literal["last", "mean"] = "last"
    batch_size: int = Field(32, ge=1, le=4096)
    batch_tokens: int | None = Field(None, ge=1, le=1_000_000)
    #: causal models: new words per strided window (default ``context_words``); "fill": up to the model's limit
    stride_words: Union[Annotated[int, Field(ge=1, le=100_000)], Literal["fill"], None] = None
    # controls computed beside the model's own spaces (see pipelines.features.baselines)
    baselines: list[Literal["untrained", "shuffled", "random_embedding"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _baselines(self) -> "LanguageModelFeature":
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"'baselines' lists a baseline twice; got {self.baselines}")
        if "untrained" in self.baselines and (self.quantization or self.device_map):
            raise ValueError("'baselines: [untrained]' builds the model again with random weights in memory: it "
                             "cannot be used with 'quantization' or 'device_map'; drop one of them")
        return self

    @model_serializer(mode="wrap")
    def _without_defaults_of_new_keys(self, handler: Any) -> dict[str, Any]:
        # the default stride and no baselines are left out, so the ids and cache keys of earlier analyses stay
        out = handler(self)
        if self.stride_words is None:
            out.pop("stride_words", None)
        if not self.baselines:
            out.pop("baselines", None)
        return out


class SpeechModelFeature(_Spec):
    """Hidden states of a speech encoder on causal audio windows (see ``speech_model``)."""

    kind: Literal["speech_model"]
    model: ModelRef
    revision: str | None = None
    dtype: Dtype = "auto"
    pca: Pca = None
    layer: Layers = -1
    window_s: float = Field(16.0, gt=0, le=600)
    step_s: float = Field(0.1, gt=0, le=60)
    pooling: Literal["mean", "last"] = "mean"
    batch_size: int = Field(8, ge=1, le=1024)

    @model_validator(mode="after")
    def _steps(self) -> "SpeechModelFeature":
        if self.step_s > self.window_s:
            raise ValueError(f"'step_s' ({self.step_s}) must not exceed 'window_s' ({self.window_s})")
        return self


class SpectrogramFeature(_Spec):
    """Log-power (or power) spectrogram on mel bands or FFT frequencies (see ``acoustic``)."""

    kind: Literal["spectrogram"]
    scale: Literal["mel", "linear"] = "mel"
    n_mels: int = Field(64, ge=1, le=512)
    win_s: float = Field(0.025, gt=0, le=1.0)
    hop_s: float = Field(0.010, gt=0, le=1.0)
    fmin: float = Field(0.0, ge=0)
    fmax: float | None = Field(None, gt=0)
    log: bool = True
    sample_rate: int | None = Field(None, ge=1000, le=192000)

    @model_validator(mode="after")
    def _ranges(self) -> "SpectrogramFeature":
        if self.hop_s > self.win_s:
            raise ValueError(f"'hop_s' ({self.hop_s}) must not exceed 'win_s' ({self.win_s})")
        if self.fmax is not None and self.fmax <= self.fmin:
            raise ValueError(f"'fmax' ({self.fmax}) must be above 'fmin' ({self.fmin})")
        return self


class EnvelopeFeature(_Spec):
    """Broadband amplitude envelope or sound power in dB (see ``acoustic``)."""

    kind: Literal["envelope"]
    measure: Literal["amplitude", "power_db"] = "amplitude"
    sfreq: float = Field(100.0, gt=0, le=2000)
    win_s: float = Field(0.025, gt=0, le=1.0)


class PhonemeRateFeature(_Spec):
    """Phones per TR from a TextGrid phone tier (see ``lexical``)."""

    kind: Literal["phoneme_rate"]
    tier: str | None = None


class WordFrequencyFeature(_Spec):
    """Zipf word frequency from the wordfreq lists (see ``lexical``)."""

    kind: Literal["word_frequency"]
    language: str = Field("en", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$")
    wordlist: Literal["best", "large", "small"] = "best"


class SurprisalFeature(_ModelSpec):
    """Word surprisal in bits under a causal LM, strided windows (see ``lexical``)."""

    kind: Literal["surprisal"]
    context_words: int = Field(32, ge=0, le=2048)
    batch_size: int = Field(32, ge=1, le=4096)
    batch_tokens: int | None = Field(None, ge=1, le=1_000_000)


class EventsFeature(_Spec):
    """One-hot of an events.tsv column on a regular grid (see ``events``)."""

    kind: Literal["events"]
    column: str = "trial_type"
    trial_types: list[str] | None = Field(None, min_length=1)
    mode: Literal["boxcar", "impulse"] = "boxcar"
    sfreq: float = Field(10.0, gt=0, le=1000)


FeatureSpec = Annotated[
    Union[WordRateFeature, LanguageModelFeature, SpeechModelFeature, SpectrogramFeature, EnvelopeFeature,
          PhonemeRateFeature, WordFrequencyFeature, SurprisalFeature, EventsFeature],
    Field(discriminator="kind"),
]
