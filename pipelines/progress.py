"""How far a long stage is: a progress bar on a terminal, steady log lines elsewhere.

``neuroflow run`` on a terminal shows tqdm bars (stories, feature spaces, target chunks);
in Airflow task logs and pipes there is no terminal, so a stage logs ``what: done/total``
at most every ``NEUROFLOW_PROGRESS_EVERY_S`` seconds (default 10), plus its first and last
step, so a long fit shows a steady heartbeat rather than silence or a flood.
"""
from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("neuroflow.progress")  # `neuroflow run` shows it without -v


def _use_bar() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")


class Progress:
    """Counts the steps of one stage (``with Progress(total, "sub-01 fit", unit="chunks") as p: p.update()``)."""

    def __init__(self, total: int | None, what: str, *, unit: str = "steps", every_s: float | None = None):
        self.total, self.what, self.unit, self.done = total, what, unit, 0
        self.every_s = float(os.environ.get("NEUROFLOW_PROGRESS_EVERY_S", "10")) if every_s is None else every_s
        self._start = self._last = time.monotonic()
        self._bar = None
        if _use_bar():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=what, unit=unit, leave=False)

    def update(self, n: int = 1, detail: str = "") -> None:
        """Record `n` more steps done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if detail:
                self._bar.set_postfix_str(detail, refresh=False)
            return
        now = time.monotonic()
        last = self.total is not None and self.done >= self.total
        if self.done == n or last or now - self._last >= self.every_s:
            self._last = now
            of = f"/{self.total}" if self.total is not None else ""
            log.info("%s: %d%s %s done (%.0f s)%s", self.what, self.done, of, self.unit, now - self._start,
                     f" {detail}" if detail else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
