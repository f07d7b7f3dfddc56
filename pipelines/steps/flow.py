"""The whole analysis in one process: the same steps and the same failure policy the DAG runs.

``prepare -> extract_features (each feature space) -> fit_subject (each subject) -> group_level
-> publish`` (the group level only with a ``group`` section in the config);
the ``neuroflow_encoding`` DAG runs each step as a task (mapped over feature spaces and
subjects) and passes the same typed results between them as XCom.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from ..cache import default_cache_dir
from ..config import AnalysisConfig
from ..group.step import group_level
from ..localstore import is_local_uri
from ..manifest import utc_now
from ..publish import check_local_copy
from .features import extract_features
from .fit_subject import fit_subject
from .policy import check_publishable, fit_or_fail
from .prepare import prepare
from .publish import publish_from_config
from .results import Published

log = logging.getLogger("neuroflow")

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def run_analysis(cfg: AnalysisConfig, *, cache_dir: str | Path | None = None,
                 local_dir: str | Path | None = None, progress: Progress | None = None) -> Published:
    """prepare -> features -> fits -> publish; returns the published result (plus the steps' results
    under ``features`` and ``fits``).

    `progress` is an optional callable(stage: str, done: int, total: int).
    """
    started = utc_now()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if local_dir or not is_local_uri(cfg.output):  # a local output is on disk already: no default copy
        local_dir = Path(local_dir) if local_dir else cache_dir / "published" / cfg.analysis_id
        # before any work: a local folder holding anyone else's files is refused, never emptied
        check_local_copy(cfg, local_dir, cache_dir)
    step = progress or (lambda *a: None)
    prepared = prepare(cfg, cache_dir=cache_dir)  # errors here are the user's: one line, no progress before it
    total = len(cfg.features) + len(prepared["subjects"]) + 1 + (cfg.group is not None)
    done = 0
    features = []
    for spec in cfg.features:
        step(f"features {spec.name}", done, total)
        features.append(extract_features(cfg, spec.name, cache_dir=cache_dir))
        done += 1
    fits, errors = [], []
    for subject in prepared["subjects"]:
        step(f"fit sub-{subject}", done, total)
        fit, err = fit_or_fail(subject, lambda s=subject: fit_subject(cfg, s, features, cache_dir=cache_dir))
        fits.append(fit)
        errors += [err] if err is not None else []
        done += 1
    check_publishable(fits, errors)
    group = None
    if cfg.group is not None:
        step("group level", done, total)
        group = group_level(cfg, prepared, fits, cache_dir=cache_dir, features=features)
        done += 1
    step("publish", done, total)
    result = publish_from_config(cfg, prepared, features, fits, cache_dir=cache_dir, local_dir=local_dir,
                                 started=started, group=group)
    step("done", total, total)
    result["features"] = features
    result["fits"] = fits
    if group is not None:
        result["group"] = group
    return result
