"""The analysis configuration: one YAML file, strictly validated.

Unknown keys are an error that names the key and suggests the closest valid one;
every value is typed and range-checked here, where the input is first read, so
later stages can trust it. `resolved_yaml` is saved next to the published outputs
and `config_hash` (of the resolved config) is part of the analysis id.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from .config_yaml import MAX_CONFIG_BYTES, MAX_OVERRIDES, read_config_text, safe_yaml_load  # noqa: F401
from .errors import ConfigError
from .keys import check_relative_key
from .localstore import canonical_local_uri, is_local_uri
from .features.registry import KINDS, FeatureSpec, LanguageModelFeature, WordRateFeature  # noqa: F401

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(_Strict):
    """Cleaning of each run's responses, fitted within that run only, before z-scoring (``pipelines.preprocess``).

    In this order: a Savitzky-Golay trend (``savgol`` seconds, the Huth lab's 120 s; order
    ``savgol_order``) is subtracted; with ``high_pass_method: butterworth`` the runs are high-passed
    at ``high_pass`` Hz (5th-order, zero-phase); then one least-squares regression removes together
    a polynomial drift of order ``polynomial``, the DCT cosines below ``high_pass`` Hz (``cosine``,
    as SPM / nilearn) and the ``confounds``: columns of fMRIPrep's
    ``*_desc-confounds_timeseries.tsv`` beside each run, named or fnmatch patterns (``trans_*``,
    ``a_comp_cor_0[0-5]``). Confounds get the same Savitzky-Golay / Butterworth filtering as the data.
    """

    polynomial: int | None = Field(None, ge=0, le=10)
    savgol: float | None = Field(None, gt=0, le=3600)
    savgol_order: int = Field(2, ge=0, le=10)
    high_pass: float | None = Field(None, gt=0, le=1000)
    high_pass_method: Literal["cosine", "butterworth"] = "cosine"
    confounds: tuple[str, ...] = Field(default_factory=tuple)

    @field_validator("confounds")
    @classmethod
    def _patterns(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not p.strip() for p in v) or len(set(v)) != len(v):
            raise ValueError(f"'dataset.responses.preprocess.confounds' are column names or patterns, each once and "
                             f"none empty; got {list(v)}")
        return v

    @property
    def active(self) -> bool:
        """Whether anything is done to the runs."""
        return bool(self.polynomial is not None or self.savgol or self.high_pass or self.confounds)


class ResponsesConfig(_Strict):
    """Where a subject's responses live and how they are read (see ``pipelines.ingest``).

    Each subject's runs are looked up in the raw tree and in every folder listed in
    ``derivatives``: ``bold`` is ``sub-*/[ses-*/]func/*_task-<task>[_run-*]*_bold.nii.gz``
    (masked by a ``*_desc-brain_mask.nii.gz`` beside it, or by voxels that vary over time);
    ``timeseries`` is a table ``*_task-<task>*_timeseries.tsv`` (one column per ROI/parcel)
    with a JSON sidecar giving ``RepetitionTime`` and ``StartTime``; ``gifti`` are
    ``*_hemi-L/R_*.func.gii`` surfaces; ``hdf5`` are derivative arrays named by ``files``
    (LeBel's ``derivative/preprocessed_data/{subject}/{story}.hf5``); ``meg``, ``ieeg`` and
    ``eeg`` are read with MNE / mne-bids (filtered, optionally a high-gamma envelope,
    resampled to ``sfreq``, bad channels dropped). ``auto`` takes whichever a subject has.
    """

    kind: Literal["auto", "bold", "timeseries", "gifti", "hdf5", "meg", "ieeg", "eeg"] = "auto"
    derivatives: tuple[str, ...] = Field(default_factory=tuple)
    desc: str | None = None
    tasks: tuple[str, ...] | None = None
    sessions: tuple[str, ...] | None = None
    stories: tuple[str, ...] | None = None
    story_from: Literal["task", "events"] = "task"
    story_trial_type: str = "story"
    files: str | None = None
    hdf5_dataset: str | None = None
    repeats: Literal["mean", "first", "error"] = "mean"
    tr: float | None = Field(None, gt=0, le=60)
    start_time: float | None = None
    tr_counts: str | None = None
    tr_counts_trim: int = Field(0, ge=0, le=1000)
    hemi: tuple[Literal["L", "R"], ...] = Field(default_factory=lambda: ("L", "R"), min_length=1)
    space: str | None = None
    sfreq: float | None = Field(None, gt=0, le=10000)
    l_freq: float | None = Field(None, gt=0)
    h_freq: float | None = Field(None, gt=0)
    notch: float | None = Field(None, gt=0)
    high_gamma: tuple[float, float] | None = None
    bad_channels: tuple[str, ...] = Field(default_factory=tuple)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)

    @model_serializer(mode="wrap")
    def _without_default_preprocess(self, handler: Any) -> dict[str, Any]:
        # no preprocessing: left out, so the ids and response keys of such analyses stay as they were
        out = handler(self)
        if self.preprocess == PreprocessConfig():
            out.pop("preprocess", None)
        return out

    @field_validator("derivatives")
    @classmethod
    def _relative(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            check_relative_key(item, "dataset.responses.derivatives")
        return tuple(item.strip("/") for item in v)

    @field_validator("files", "tr_counts")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None:
            check_relative_key(v, "dataset.responses.files/tr_counts")
        return v

    @field_validator("high_gamma")
    @classmethod
    def _band(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (0 < v[0] < v[1]):
            raise ValueError(f"'dataset.responses.high_gamma' is a band [low, high] in Hz with 0 < low < high; got {list(v)}")
        return v


class WordTimingsConfig(_Strict):
    """Word timings of each story, relative to the run's clock.

    ``files`` maps a story (or task) to its file; ``pattern`` builds the key of any story
    (``derivative/TextGrids/{story}.TextGrid``); ``format: events`` takes the word rows of
    each run's own events.tsv (MEG-MASC).
    """

    format: Literal["textgrid", "gentle", "words_tsv", "events"] = "textgrid"
    files: dict[str, str] = Field(default_factory=dict)
    pattern: str | None = None
    tier: str = "word"
    offset: float = 0.0
    onset_from_events: bool = False
    trial_type: str = "word"
    word_column: str | None = None
    onset_column: str | None = None
    offset_column: str | None = None
    unaligned: Literal["interpolate", "drop", "error"] = "interpolate"
    bad_rows: Literal["error", "drop"] = "error"

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v.values():
            check_relative_key(key, "dataset.word_timings.files")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            check_relative_key(v.replace("{", "").replace("}", ""), "dataset.word_timings.pattern")
        return v

    @model_validator(mode="after")
    def _somewhere(self) -> "WordTimingsConfig":
        if self.format != "events" and not self.files and not self.pattern:
            raise ValueError("'dataset.word_timings' needs 'files' (story -> file) or a 'pattern' such as "
                             "'derivative/TextGrids/{story}.TextGrid' (or 'format: events')")
        return self


class DatasetConfig(_Strict):
    source: str
    version: str
    task: str
    subjects: list[str] = Field(min_length=1)
    tasks: list[str] | None = None
    responses: ResponsesConfig = ResponsesConfig()
    word_timings: WordTimingsConfig
    checksums: str | dict[str, str] | None = None

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if "\x00" in v:
            raise ValueError("'dataset.source' contains a NUL character")
        if v.startswith("s3://"):
            bucket, _, prefix = v[5:].partition("/")
            if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"'dataset.source' has an invalid bucket name; got {v!r}")
            check_relative_key(prefix or "x", "dataset.source")
        elif "://" in v:
            raise ValueError(f"'dataset.source' must be s3://bucket/prefix or a local folder; got {v!r}")
        elif not v.strip() or not v.strip("/"):
            # "" would become the working directory and "/" the whole file system: neither is a dataset
            raise ValueError(f"'dataset.source' must name the dataset's folder (or s3://bucket/prefix); got {v!r}")
        elif any(ord(c) < 32 for c in v):
            raise ValueError(f"'dataset.source' contains a control character; got {v!r}")
        last = v.rstrip("/").rsplit("/", 1)[-1]
        if last.strip(".") == "" or last.startswith("~"):
            # the last part is the dataset id in the published layout ({output}/{dataset_id}/...)
            raise ValueError(f"'dataset.source' must end in the dataset's own folder name, e.g. /data/ds002322 "
                             f"or s3://bucket/ds002322; got {v!r}")
        return v.rstrip("/")

    @field_validator("checksums")
    @classmethod
    def _checksums(cls, v: str | dict[str, str] | None) -> str | dict[str, str] | None:
        if isinstance(v, str):
            check_relative_key(v, "dataset.checksums")
            if not v or v.endswith("/") or any(p in (".", "") for p in v.split("/")):
                raise ValueError(f"'dataset.checksums' has an empty or '.' path segment; got {v!r}. Name a file "
                                 "of the dataset as a plain relative path (e.g. code/checksums.tsv)")
        return v

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, v: list[str]) -> list[str]:
        out = [s[4:] if s.startswith("sub-") else s for s in v]
        for s in out:
            if not _LABEL.match(s):
                raise ValueError(f"'dataset.subjects' labels are letters and digits only; got {s!r}")
        if len(set(out)) != len(out):
            raise ValueError(f"'dataset.subjects' lists a subject twice; got {v}")
        return out

    @field_validator("task", "version")
    @classmethod
    def _token(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]*", v) or ".." in v:
            raise ValueError(f"must be letters, digits, '.', '_' or '-'; got {v!r}")
        return v

    @property
    def dataset_id(self) -> str:
        """The dataset's short id: the last part of its source (e.g. ``ds002322``)."""
        return self.source.rstrip("/").rsplit("/", 1)[-1]


FeatureConfig = FeatureSpec  # every kind of pipelines.features.registry, validated there


class ModelConfig(_Strict):
    kind: Literal["ridge", "banded_ridge"] = "ridge"  # banded: every feature space a band, fitted jointly
    n_iter: int = Field(20, ge=1, le=1000)  # banded ridge: random-search draws of the band weights
    test_stories: list[str] | None = None  # held out for the scores (e.g. LeBel's repeated story); needs
    #                                         leave_one_run_out: alphas are chosen on the other runs only
    alphas: list[float] = Field(default_factory=lambda: [10.0 ** k for k in range(-1, 6)], min_length=1)
    delays: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1)
    cv: Literal["leave_one_run_out", "contiguous_blocks"] = "leave_one_run_out"
    n_folds: int = Field(5, ge=3, le=100)
    resample: Literal["lanczos", "average"] = "lanczos"
    lanczos_window: int = Field(3, ge=1, le=10)
    tmin: float = Field(0.0, ge=-2.0, le=2.0)  # MEG/ECoG: TRF lags from tmin to tmax seconds
    tmax: float = Field(0.5, ge=-2.0, le=2.0)
    permutations: int = Field(0, ge=0, le=100_000)  # 0: no permutation p-values
    # null of the permutation test: blocks of this many samples, "run" (held-out runs paired with other runs'
    # predictions) or "auto" (whole runs where they give >= 'permutations' pairs, else blocks sized from the
    # autocorrelation of the held-out data and predictions: pipelines.stats.auto_block_length)
    permutation_block: int | Literal["auto", "run"] = "auto"

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if any(not (a > 0) or a == float("inf") for a in v):
            raise ValueError(f"'model.alphas' must be positive and finite; got {v}")
        return sorted(set(v))

    @field_validator("delays")
    @classmethod
    def _delays(cls, v: list[int]) -> list[int]:
        if any(abs(d) > 50 for d in v):
            raise ValueError(f"'model.delays' are in samples (TRs) and must lie within ±50; got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"'model.delays' lists a delay twice; got {v}")
        return v

    @model_validator(mode="after")
    def _test_stories(self) -> "ModelConfig":
        if self.test_stories is not None and self.cv != "leave_one_run_out":
            raise ValueError("'model.test_stories' holds out whole runs: it needs 'model.cv: leave_one_run_out'")
        return self

    @model_serializer(mode="wrap")
    def _without_unused_block(self, handler: Any) -> dict[str, Any]:
        # no permutation test: the null is unused, left out so the ids and fit keys of such analyses stay as they were
        out = handler(self)
        if self.permutations == 0 and self.permutation_block == "auto":
            out.pop("permutation_block", None)
        return out

    @field_validator("permutation_block", mode="before")
    @classmethod
    def _block(cls, v: Any) -> Any:
        if v in ("auto", "run"):
            return v
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100_000:
            raise ValueError("'model.permutation_block' must be 'auto', 'run' or a number of samples from 1 to "
                             f"100000; got {v!r}")
        return v

    @model_validator(mode="after")
    def _permutation_block(self) -> "ModelConfig":
        if self.permutation_block == "run" and self.cv != "leave_one_run_out":
            raise ValueError("'model.permutation_block: run' pairs whole held-out runs: it needs "
                             "'model.cv: leave_one_run_out' (or set it to 'auto' or a number of samples)")
        return self

    @model_validator(mode="after")
    def _lags(self) -> "ModelConfig":
        if self.tmin > self.tmax:
            raise ValueError(f"'model.tmin' ({self.tmin}) must not exceed 'model.tmax' ({self.tmax})")
        return self


class DecodingConfig(_Strict):
    """Decoders the other way round: from the responses (at ``delays`` samples later) to each
    feature space, scored per feature by held-out r and by identification of held-out segments
    of ``segment_length`` samples (top-1 / top-5 against chance)."""

    enabled: bool = False
    delays: list[int] = Field(default_factory=lambda: [1, 2, 3, 4], min_length=1)
    segment_length: int = Field(10, ge=1, le=1000)
    max_targets: int = Field(5000, ge=1, le=1_000_000)  # responses read by the decoder (best by encoding r)

    @field_validator("delays")
    @classmethod
    def _delays(cls, v: list[int]) -> list[int]:
        if any(abs(d) > 50 for d in v) or len(set(v)) != len(v):
            raise ValueError(f"'decoding.delays' are distinct samples within ±50; got {v}")
        return v


class ComputeConfig(_Strict):
    backend: Literal["auto", "numpy", "torch", "torch_cuda"] = "auto"
    dask: str = "local"
    n_workers: int = Field(1, ge=1, le=256)

    @field_validator("dask")
    @classmethod
    def _dask(cls, v: str) -> str:
        if v not in ("local", "none") and not re.fullmatch(r"(tcp|tls)://[A-Za-z0-9.\-]+:\d{1,5}", v):
            raise ValueError(f"'compute.dask' must be 'local', 'none' or tcp://host:port; got {v!r}")
        return v


_PYCORTEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")


class PycortexConfig(_Strict):
    """A pycortex flatmap of each voxel map, drawn on the subject's surfaces from the dataset.

    The dataset holds a pycortex database (one folder per pycortex subject, as LeBel's
    ``derivative/pycortex-db/UTS01/``: ``surfaces/{flat,pia,wm}_{lh,rh}.gii`` and
    ``transforms/<transform>/{matrices.xfm,reference.nii.gz,mask_<mask>.nii.gz}``). ``subject``
    and ``transform`` name them for each dataset subject (``{subject}`` is its label). HDF5
    responses must be the voxels of ``mask``, in pycortex's order; bold volumes must be on the
    transform's reference grid.
    """

    database: str = "derivative/pycortex-db"
    subject: str = "{subject}"
    transform: str = "{subject}_auto"
    mask: str = "thick"

    @field_validator("database")
    @classmethod
    def _database(cls, v: str) -> str:
        check_relative_key(v, "maps.pycortex.database")
        return v.strip("/")

    @field_validator("subject", "transform")
    @classmethod
    def _template(cls, v: str) -> str:
        name = v.replace("{subject}", "S1")
        if not _PYCORTEX_NAME.match(name) or ".." in name:
            raise ValueError("a pycortex name of letters, digits, '.', '_' or '-', with '{subject}' standing for "
                             f"the dataset subject's label; got {v!r}")
        return v

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_]+", v):
            raise ValueError(f"a pycortex mask type such as 'thick', 'thin' or 'cortical'; got {v!r}")
        return v

    def names(self, subject: str) -> tuple[str, str]:
        """(pycortex subject, transform) of one dataset subject."""
        return self.subject.replace("{subject}", subject), self.transform.replace("{subject}", subject)


class ViewersConfig(_Strict):
    """Interactive viewers (nilearn's) of each volume and surface r map: one self-contained page each,
    linked from the report (``pipelines.viewers``); |value| below ``threshold`` is not shown."""

    enabled: bool = True
    threshold: float = Field(0.1, ge=0.0, lt=1.0)


class MapsConfig(_Strict):
    """Optional pictures beyond the default ones (``pycortex``: flatmaps; needs pycortex installed;
    ``viewers``: the interactive viewers, on by default)."""

    pycortex: PycortexConfig | None = None
    viewers: ViewersConfig = ViewersConfig()


class SrmConfig(_Strict):
    """Cross-subject encoding through a shared response model (``group.srm``; brainiak's SRM, Chen et al. 2015)."""

    features: int = Field(50, ge=1, le=100_000)  # the shared space's dimension k (at most every subject's targets)
    iterations: int = Field(10, ge=1, le=1_000)  # brainiak's EM iterations
    seed: int = Field(0, ge=0)  # brainiak's rand_seed (its initial maps)


class GroupConfig(_Strict):
    """The group level (``sub-group/``): subjects' maps in a common space, tests across subjects, ROI tables.

    Files (``atlas``, ``atlas_labels``, ``transform``, ``reference``) are keys inside the dataset,
    ``s3://`` URIs or absolute local paths; nothing is fetched from anywhere else. ``{subject}``
    in ``transform`` and ``{hemi}`` (``L``/``R``) in a GIFTI ``atlas`` stand for the subject's
    label and the hemisphere.
    """

    permutations: int = Field(10_000, ge=1, le=1_000_000)  # sign patterns (all 2**n when fewer)
    correction: Literal["fdr", "maxstat"] = "fdr"  # Benjamini-Hochberg, or max-statistic (family-wise)
    q: float = Field(0.05, gt=0, lt=1)
    min_subjects: int = Field(3, ge=2, le=100_000)
    atlas: str | None = None  # label NIfTI / GIFTI in the common space, or a TSV (target -> roi) for named targets
    atlas_labels: str | None = None  # TSV with columns index, name
    transform: str | None = None  # per subject: world-to-template affine (4x4 text) of subject-space volumes
    reference: str | None = None  # NIfTI whose grid transformed volumes are resampled to (default: the first's)
    isc_ceiling: bool = True  # inter-subject ceilings where the data have no repeats
    reliability: float = Field(0.05, gt=0, lt=1)  # circular-shift level that keeps an inter-subject ceiling
    srm: SrmConfig | None = None  # cross-subject encoding in a shared space; None: not computed

    @field_validator("atlas", "atlas_labels", "transform", "reference")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is None or v.startswith("s3://") or v.startswith("/") or v.startswith("file://"):
            return v
        check_relative_key(v.replace("{subject}", "S").replace("{hemi}", "L"), "group file")
        return v


class PublishConfig(_Strict):
    """What is published beside the maps (``models``: the fitted encoding models, see ``pipelines.models``)."""

    models: bool = True  # weights, intercepts and the feature recipe per subject and feature space
    models_dtype: Literal["float32", "float16"] = "float32"  # float16 halves the weights' size


class AnalysisConfig(_Strict):
    name: str = "encoding"
    dataset: DatasetConfig
    features: list[FeatureConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    decoding: DecodingConfig = DecodingConfig()
    compute: ComputeConfig = ComputeConfig()
    maps: MapsConfig = MapsConfig()
    group: GroupConfig | None = None  # None: no group level
    publish: PublishConfig = PublishConfig()
    output: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9\-]{0,40}", v):
            raise ValueError(f"'name' is a slug of lowercase letters, digits and '-'; got {v!r}")
        return v

    @field_validator("output")
    @classmethod
    def _output(cls, v: str) -> str:
        if is_local_uri(v):  # a folder on this machine: one canonical form, file:///abs/path
            return canonical_local_uri(v)
        if not v.startswith("s3://") or not v[5:].split("/", 1)[0]:
            raise ValueError(f"'output' must be s3://bucket[/prefix], file:///abs/path or /abs/path; got {v!r}")
        bucket, _, prefix = v[5:].partition("/")
        if prefix:
            check_relative_key(prefix, "output")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _features(self) -> "AnalysisConfig":
        names = [f.name for f in self.features]
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"'features[].name' must be a short identifier; got {n!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"'features' names must be unique; got {names}")
        for f in self.features:
            if getattr(f, "pca", None) is not None and not self.model.test_stories:
                raise ValueError(
                    f"'features[{f.name}].pca' is fitted on the training stories only, so it needs "
                    "'model.test_stories' (with leave-one-run-out over every run, each story is held out once "
                    "and would be in the PCA of its own fold): set 'model.test_stories' or drop 'pca'")
        wt = self.dataset.word_timings
        if wt.format != "events" and not wt.pattern and not wt.files:
            raise ValueError("'dataset.word_timings' names no file: add 'files' or 'pattern'")
        return self

    # --- derived values -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if self.maps == MapsConfig():  # no optional maps: left out, so the ids of such analyses stay as they were
            out.pop("maps")
        elif self.maps.viewers == ViewersConfig():  # default viewers: left out, as above
            out["maps"].pop("viewers")
        if self.group is None:  # no group level: left out, so the ids of such analyses stay as they were
            out.pop("group")
        if self.publish == PublishConfig():  # the defaults: left out, so analysis ids stay as they were
            out.pop("publish")
        return out

    @property
    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the resolved config (first 12 hex digits)."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:12]

    @property
    def analysis_id(self) -> str:
        """Readable slug plus config hash: the same config always lands on the same prefix."""
        return f"{self.name}-{self.config_hash}"

    @property
    def publish_prefix(self) -> str:
        return f"{self.output}/{self.dataset.dataset_id}/{self.dataset.version}/{self.analysis_id}"

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- loading ------------------------------------------------------------------------

def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` inside `model` (best effort, for suggestions)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", {})
        if part in fields:
            ann = fields[part].annotation
            current = _first_model(ann)
        else:
            # discriminated union member names appear as loc parts
            current = KINDS[part].spec if part in KINDS else current
    return list(getattr(current, "model_fields", {}) or [])


def _first_model(ann: Any) -> Any:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc if p not in KINDS)
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _valid_keys(AnalysisConfig, loc)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
        return f"{origin}: unknown key {path!r}.{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{origin}: {path or 'config'}: {msg}"


def as_config(config: "dict[str, Any] | AnalysisConfig") -> AnalysisConfig:
    """`config` validated (a dict, e.g. a DAG's params) or as it is (an AnalysisConfig)."""
    return config if isinstance(config, AnalysisConfig) else parse_config(config, origin="config")


def parse_config(data: dict[str, Any], origin: str = "config") -> AnalysisConfig:
    """Validate a config dict; raise ConfigError naming `origin` and the offending key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the config must be a mapping of keys to values")
    try:
        return AnalysisConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from err


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a config dict."""
    if len(overrides) > MAX_OVERRIDES:
        raise ConfigError(f"--set is given {len(overrides)} times; at most {MAX_OVERRIDES} overrides are accepted")
    out = json.loads(json.dumps(data, default=_json_value))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        if len(item.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
            raise ConfigError(f"--set {key!r}: the value is over {MAX_CONFIG_BYTES // 1024} KiB; "
                              "put large values in the config file")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping or list index")
        last = parts[-1]
        value = json.loads(json.dumps(safe_yaml_load(raw, f"--set {key}"), default=_json_value)) if raw else ""
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: cannot set {last!r} here")
    return out


def _json_value(value: Any) -> Any:
    """YAML values that JSON lacks: dates as ISO text (``version: 2024-01-31``); anything else refused."""
    import datetime

    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    raise ConfigError(f"config: a value of type {type(value).__name__} ({str(value)[:60]!r}) is not a config value; "
                      "use text, numbers, lists and mappings")


def load_config(path: str | Path, overrides: list[str] | None = None) -> AnalysisConfig:
    """Read, override and validate a YAML config file."""
    path = Path(path)
    data = safe_yaml_load(read_config_text(path), str(path))
    data = apply_overrides(data or {}, overrides or [])
    return parse_config(data, origin=str(path))
