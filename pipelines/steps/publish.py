"""Step 4, publish: render maps and the report, upload them verified, write the manifest last.

Reads the subjects' results from ``{output}/_work/``; writes under the analysis' prefix (see
:mod:`pipelines.publish` for the commit rules: manifest last, nothing a user owns replaced).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..cache import default_cache_dir
from ..config import AnalysisConfig, as_config
from ..localstore import is_local_uri
from ..publish import publish
from .results import FeatureSet, Prepared, Published, SubjectFit


def publish_from_config(config: dict[str, Any] | AnalysisConfig, prepared: Prepared, features: list[FeatureSet],
                        fits: list[SubjectFit], *, cache_dir: str | Path | None = None,
                        local_dir: str | Path | None = None, started: str | None = None,
                        airflow_run_id: str | None = None, group: dict | None = None) -> Published:
    """Render maps and report, upload them verified, write the manifest last.

    ``local_dir`` (default ``<cache>/published/<analysis_id>``; none for a local ``output``, whose
    folder is on disk already) keeps a copy of the published files; ``started`` is the run's start
    time for the manifest's provenance; ``group`` the group step's record (rendered under ``sub-group/``).
    """
    cfg = as_config(config)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    local = Path(local_dir) if local_dir else None  # a local output is on disk already: no default copy
    if local is None and not is_local_uri(cfg.output):
        local = cache / "published" / cfg.analysis_id
    return publish(cfg, prepared, features, fits, local_dir=local, started=started, airflow_run_id=airflow_run_id,
                   cache_dir=cache, group=group)
