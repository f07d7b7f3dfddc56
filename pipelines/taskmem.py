"""Each task's own peak resident memory, measured by the task itself (Linux ``VmHWM``).

A task calls :func:`reset_peak` when it starts and :func:`peak_rss_bytes` when it ends. The
reset writes ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), which sets the process' peak
RSS back to its current RSS, so the peak read at the end is the largest resident size reached
*while the task ran*, also when several tasks run one after another in one process (Airflow's
``dag.test()``); under a real executor each task is its own process and the reset is harmless.
Light: no import beyond the standard library (the DAG file imports it at parse time).
"""
from __future__ import annotations

import logging
import re

__all__ = ["peak_rss_bytes", "reset_peak"]

log = logging.getLogger("neuroflow")

_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


def reset_peak() -> bool:
    """Set this process' peak RSS back to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """This process' peak resident set size (``VmHWM``) in bytes since start or the last reset;
    None where ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            match = _HWM.search(fh.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
