"""Wall time and peak resident memory of one command, each in its own process (shared by the benches)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

__all__ = ["PEAK", "measure"]

# Each measured command reports its own peak resident memory: VmHWM restarts at exec (a child's
# ru_maxrss would start at the RSS of the process it was forked from).
PEAK = """
import os, runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else \\
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status:
        peak_kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as fh:
        fh.write(peak_kb)
"""


def measure(cmd: list[str], env: dict, workdir: Path) -> dict:
    """Wall seconds and peak resident memory (GB) of one command, run in its own process."""
    peak_file = workdir / "peak"
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True,
                          env={**env, "BENCH_PEAK_FILE": str(peak_file)}, cwd=workdir)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"wall": wall, "peak_gb": int(peak_file.read_text()) * 1024 / 1e9, "stdout": proc.stdout}
