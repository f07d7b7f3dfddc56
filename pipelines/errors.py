"""The project's own exception types.

Every error a user can cause ends in one of these, with a message that names the
input (file, key, parameter) and says how to fix it. The command line prints the
message on one line and exits non-zero; Airflow marks the task failed.
"""
from __future__ import annotations


class NeuroflowError(Exception):
    """Base class: a problem neuroflow can explain in one line."""


class ConfigError(NeuroflowError, ValueError):
    """The configuration (YAML file, --set override or DAG params) is invalid."""


class DatasetError(NeuroflowError):
    """The dataset is missing, incomplete, misread or does not match its pinned version."""


class IntegrityError(NeuroflowError):
    """A file or object failed a size or checksum verification."""


class ModelError(NeuroflowError):
    """A feature model cannot be loaded (unknown model, unknown layer, unsafe weights)."""


class FitError(NeuroflowError):
    """The encoding model cannot be fitted on the data given (shapes, folds, constant targets)."""


class TransientIOError(NeuroflowError):
    """A storage operation failed in a way worth retrying (network, throttling, 5xx)."""


class PublishConflictError(NeuroflowError):
    """Publishing would replace or damage a result that must stand (a complete manifest, a better
    partial one) or write into a place that is not this analysis' own."""
