"""Running the command line the way a careless user or an attacker would, and checking after.

:func:`run_cli` runs ``neuroflow`` in a child process inside a sandbox: a working directory and
a home holding a user's files that the run must never touch (``NEUROFLOW_CACHE`` points into
the sandbox's cache folder, which the run may use). Afterwards it counts, into the ledger scope:
- ``tracebacks``: a Python traceback printed to the user (every error must be one clear line);
- ``touched``: files of the user's (the sandbox's home and working directory, outside the cache
  and the folders the test says the run may write) created, changed or deleted.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

USER_FILES = {
    "notes.txt": "my lab notes\n",
    "analysis/config-old.yaml": "dataset: {}\n",
    "data/sub-01_bold.nii.gz": "not really a NIfTI, but mine\n",
    ".hidden/keep": "keep me\n",
}


@dataclass
class Sandbox:
    """A user's working directory and home, seeded with files that belong to the user."""

    root: Path
    allowed: list[Path] = field(default_factory=list)  # folders the run may write (cache, outputs)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cwd(self) -> Path:
        return self.root / "work"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def seed(self) -> "Sandbox":
        for base in (self.home, self.cwd):
            for rel, text in USER_FILES.items():
                path = base / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        self.cache.mkdir(parents=True, exist_ok=True)
        return self

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file under the sandbox, outside the cache and the allowed folders."""
        skip = [self.cache.resolve(), *(p.resolve() for p in self.allowed)]
        out = {}
        for path in sorted(self.root.rglob("*")):
            resolved = path.resolve() if not path.is_symlink() else path
            if any(resolved == s or s in resolved.parents for s in skip):
                continue
            if path.is_file() and not path.is_symlink():
                out[str(path.relative_to(self.root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_symlink():
                out[str(path.relative_to(self.root))] = "link:" + os.readlink(path)
        return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Paths created, changed or deleted between two snapshots."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


# The CLI, run so that it reports its own peak memory: VmHWM of /proc/self/status, which starts
# afresh at exec. (RUSAGE_CHILDREN gives the largest child of the whole session, and a child's own
# ru_maxrss starts at the RSS of the parent it was forked from: a large test process's.)
_PEAK_WRAPPER = """
import os, runpy, sys
sys.argv = ["neuroflow", *sys.argv[1:]]
try:
    runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["NEUROFLOW_TEST_PEAK_FILE"], "w") as fh:
        fh.write(peak_kb)
"""


def run_cli(scope, sandbox: Sandbox, *args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``neuroflow ARGS`` in the sandbox; adds tracebacks and touched files to the ledger scope.

    The result also carries ``touched`` (the user's files changed) and ``peak_rss_kb`` (the
    command's own peak resident memory, KB; None when it was killed before reporting it)."""
    before = sandbox.snapshot()
    peak_file = sandbox.cache / f".peak-{os.getpid()}-{len(before)}"
    peak_file.unlink(missing_ok=True)
    full_env = {**os.environ, "HOME": str(sandbox.home), "NEUROFLOW_CACHE": str(sandbox.cache),
                "PYTHONPATH": str(REPO), "NEUROFLOW_TEST_PEAK_FILE": str(peak_file), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(cwd or sandbox.cwd))
    proc.peak_rss_kb = int(peak_file.read_text()) if peak_file.exists() else None  # type: ignore[attr-defined]
    peak_file.unlink(missing_ok=True)
    after = sandbox.snapshot()
    touched = changed(before, after)
    scope.touched += len(touched)
    scope.tracebacks += int("Traceback (most recent call last)" in proc.stderr + proc.stdout)
    proc.touched = touched  # type: ignore[attr-defined]
    return proc


def assert_one_clear_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    """The run ended with exit `code` and exactly one ``neuroflow: error:`` line naming `fragments`."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("neuroflow: error: ")]
    assert len(errors) == 1, lines[-10:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
