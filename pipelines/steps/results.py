"""What each step returns: small JSON-able dicts (Airflow passes them between tasks as XCom),
typed here so that a step reads its inputs by name and a type checker can follow them."""
from __future__ import annotations

from typing import Any, TypedDict


class FileRead(TypedDict, total=False):
    """One dataset file read, as recorded in the manifest's ``inputs``."""

    key: str
    size: int
    etag: str
    sha256: str


class Prepared(TypedDict):
    """The result of :func:`pipelines.steps.prepare`."""

    analysis_id: str
    config_hash: str
    publish_uri: str
    subjects: list[str]
    feature_spaces: list[str]
    stories: dict[str, int]
    n_words: int
    subject_problems: dict[str, str]  # subject -> one line; that subject's fit reports it
    files_read: list[FileRead]


class FeatureSet(TypedDict):
    """The result of :func:`pipelines.steps.extract_features`: one feature space's cache entries."""

    feature: str
    kind: str
    key: str
    entries: dict[str, str]  # stimulus sha256 -> cache entry (relative to the output)
    runs: dict[str, str]  # "<subject>/<run label>" -> stimulus sha256
    problems: dict[str, str]  # "<subject>" or "<subject>/<run label>" -> why it has no features
    spaces: list[str]
    model_runtime: dict | None  # the model's dtype, quantization, device (None: the kind runs no model)
    pca: dict | None  # per space: n_components, explained, n_rows of the PCA (None: no `pca`)
    computed: bool
    n_computed: int
    n_stimuli: int
    files_read: list[FileRead]


class SubjectFit(TypedDict, total=False):
    """The result of :func:`pipelines.steps.fit_subject` (``status`` "ok"), or the record of a
    subject that failed (``status`` "failed", ``error``); both go into the manifest."""

    subject: str
    status: str
    error: str
    kind: str
    space: str | None
    simulated: bool
    n_samples: int
    n_runs: int
    stories: list[str]
    preprocess: dict[str, dict[str, Any]]  # per run label: what dataset.responses.preprocess did (empty: nothing)
    n_targets: int
    n_invalid_targets: int
    n_constant_targets: int
    result_rel: str
    mask_rel: str | None
    metrics: dict[str, Any]
    backend: str
    reused: bool
    computed_features: list[str]
    files_read: list[FileRead]
    folds: list[dict[str, Any]]  # per outer fold: the runs it trained and tested on
    models: list[dict[str, Any]]  # the exported models in the work area (pipelines.models.export)


class Published(TypedDict, total=False):
    """The result of :func:`pipelines.steps.publish_from_config` (and of the whole flow)."""

    manifest_uri: str
    report_path: str
    local_dir: str
    status: str
    metrics: dict[str, Any]
    failed_subjects: list[str]
    reused: bool
    features: list[FeatureSet]
    fits: list[SubjectFit]
    group: dict[str, Any]  # the group step's record (pipelines.group.step.group_level), when the config has one
