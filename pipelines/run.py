"""The whole analysis in-process, with the same stage functions the DAG runs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .config import AnalysisConfig
from .localdir import check_local_dir
from .publish import _now, local_sources, publish
from .stages import as_subject_error, default_cache_dir, extract_features, failed_fit, fit_subject, prepare

log = logging.getLogger("neuroflow")


def run_analysis(cfg: AnalysisConfig, *, cache_dir: str | Path | None = None,
                 local_dir: str | Path | None = None, progress=None) -> dict[str, Any]:
    """prepare -> features -> fits -> publish; returns publish()'s result.

    `progress` is an optional callable(stage: str, done: int, total: int).
    """
    started = _now()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    local_dir = Path(local_dir) if local_dir else cache_dir / "published" / cfg.analysis_id
    # before any work: a local folder holding anyone else's files is refused, never emptied
    check_local_dir(local_dir, cfg.analysis_id, cache_dir=cache_dir, protected=local_sources(cfg))
    step = progress or (lambda *a: None)
    prepared = prepare(cfg, cache_dir=cache_dir)  # errors here are the user's: one line, no progress before it
    total = len(cfg.features) + len(prepared["subjects"]) + 1
    done = 0
    features = []
    for spec in cfg.features:
        step(f"features {spec.name}", done, total)
        features.append(extract_features(cfg, spec.name, cache_dir=cache_dir))
        done += 1
    fits = []
    errors: list[Exception] = []
    for subject in prepared["subjects"]:
        step(f"fit sub-{subject}", done, total)
        try:
            fits.append(fit_subject(cfg, subject, features, cache_dir=cache_dir))
        except Exception as err:  # noqa: BLE001
            # one bad subject must not sink the others: it is recorded as failed in the manifest
            err = as_subject_error(subject, err)
            log.info("sub-%s failed: %s", subject, err)
            fits.append(failed_fit(subject, err))
            errors.append(err)
        done += 1
    if len(errors) == len(fits):
        raise errors[0]
    step("publish", done, total)
    result = publish(cfg, prepared, features, fits, local_dir=local_dir, started=started, cache_dir=cache_dir)
    step("done", total, total)
    result["features"] = features
    result["fits"] = fits
    return result


def format_summary(metrics: dict[str, dict[str, dict]]) -> list[str]:
    """One line per subject and feature space: mean and max held-out r."""
    lines = [f"{'subject':<10} {'feature space':<16} {'mean r':>8} {'max r':>8} {'targets':>8}"]
    for sub in sorted(metrics):
        for feat, m in sorted(metrics[sub].items()):
            fmt = lambda v: f"{v:8.3f}" if v is not None else "     n/a"  # noqa: E731
            lines.append(f"sub-{sub:<6} {feat:<16} {fmt(m['mean_r'])} {fmt(m['max_r'])} {m['n_valid']:>8}")
    return lines
