"""The whole analysis in-process (:func:`pipelines.steps.run_analysis`), and its summary lines."""
from __future__ import annotations

from .steps import run_analysis

__all__ = ["run_analysis", "format_summary"]


def format_summary(metrics: dict[str, dict[str, dict]]) -> list[str]:
    """One line per subject and feature space: mean and max held-out r."""
    lines = [f"{'subject':<10} {'feature space':<16} {'mean r':>8} {'max r':>8} {'targets':>8}"]
    for sub in sorted(metrics):
        for feat, m in sorted(metrics[sub].items()):
            fmt = lambda v: f"{v:8.3f}" if v is not None else "     n/a"  # noqa: E731
            lines.append(f"sub-{sub:<6} {feat:<16} {fmt(m['mean_r'])} {fmt(m['max_r'])} {m['n_valid']:>8}")
    return lines
