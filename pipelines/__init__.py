"""neuroflow: encoding and decoding models from public brain recordings.

Every step is a plain function importable from this package; nothing here imports Airflow.
The names a notebook needs are importable from the package itself, loaded on first use so
that ``import pipelines`` stays light (DAG files import it when Airflow parses them)::

    from pipelines import load_config, run_analysis, PublishedAnalysis
    cfg = load_config("my.yaml")
    result = run_analysis(cfg)                      # prepare -> features -> fits -> publish
    maps = PublishedAnalysis(result["manifest_uri"])
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # the config
    "AnalysisConfig": "pipelines.config", "load_config": "pipelines.config", "parse_config": "pipelines.config",
    # the steps and the flow that runs them
    "prepare": "pipelines.steps", "extract_features": "pipelines.steps", "fit_subject": "pipelines.steps",
    "publish_from_config": "pipelines.steps", "run_analysis": "pipelines.steps",
    "group_level": "pipelines.group.step",
    # the models themselves, on arrays
    "fit_encoding": "pipelines.fit", "fit_banded_encoding": "pipelines.fit",
    # reading what was published
    "read_manifest": "pipelines.manifest", "list_analyses": "pipelines.consume", "get_artifact": "pipelines.consume",
    "PublishedAnalysis": "pipelines.consume",
    # predictions and in-silico experiments from published models
    "predict": "pipelines.models.predict", "contrast": "pipelines.models.insilico",
    "select_sentences": "pipelines.models.insilico",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules on first use (PEP 562)."""
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
