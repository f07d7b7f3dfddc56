"""Failpoints: named places where the reliability tests inject a crash.

Off unless ``NEUROFLOW_FAILPOINTS`` is set, e.g. ``publish.upload=3:kill`` (SIGKILL this process
at the 3rd time the point is reached) or ``fit.chunk=1:exit`` (hard-exit the process there).
With ``NEUROFLOW_FAILPOINTS_ONCE=<file>`` a point fires only if that file does not exist yet
(it is created when firing), so a retried task or a restarted worker runs through.

Points: ``publish.upload`` (before each artifact upload), ``publish.commit`` (every artifact
uploaded, before the manifest is written), ``publish.gallery`` (manifest committed, before the
index at the output root is updated).
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def _spec() -> dict[str, tuple[int, str]]:
    out = {}
    for item in filter(None, os.environ.get("NEUROFLOW_FAILPOINTS", "").split(",")):
        name, _, rule = item.partition("=")
        count, _, action = rule.partition(":")
        out[name.strip()] = (int(count or 1), action or "kill")
    return out


def failpoint(name: str) -> None:
    """Crash here if the environment asks for it; a no-op otherwise."""
    if "NEUROFLOW_FAILPOINTS" not in os.environ:
        return
    rule = _spec().get(name)
    if rule is None:
        return
    _hits[name] += 1
    count, action = rule
    if _hits[name] != count:
        return
    once = os.environ.get("NEUROFLOW_FAILPOINTS_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
        except FileExistsError:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(13)
    else:
        raise RuntimeError(f"failpoint {name} fired")
