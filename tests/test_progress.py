"""Progress in logs (Airflow task logs, pipes): first and last step, then at a steady rate."""
from __future__ import annotations

import logging

from pipelines.progress import Progress


def test_logs_first_and_last_step_and_at_most_every_interval(caplog):
    caplog.set_level(logging.INFO, logger="neuroflow")
    with Progress(50, "sub-01 fit", unit="chunks", every_s=3600) as p:
        for _ in range(50):
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("sub-01 fit: 1/50 chunks done") and lines[1].startswith("sub-01 fit: 50/50 chunks done")


def test_a_zero_interval_logs_every_step(caplog):
    caplog.set_level(logging.INFO, logger="neuroflow")
    p = Progress(None, "stories", unit="stories", every_s=0)
    for _ in range(4):
        p.update(detail="x")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"stories: {i} stories done" for i in range(1, 5)]
