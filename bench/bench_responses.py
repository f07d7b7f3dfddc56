"""Peak memory of assembling a subject's response matrix: neuroflow against the plain recipe.

Each row runs in its own process and reports its VmHWM (peak resident memory since exec) minus
the memory held before the step (the runs as read), over the size of the response matrix Y.
The plain recipe is what a short script does (and what neuroflow did until now): concatenate
the runs, cast, zero NaN/Inf into a new array, z-score into another. neuroflow copies each run
into one preallocated float32 matrix, releases the run, and z-scores in place. Both give the same
numbers bit for bit (tests/test_stack_responses.py).

    .venv/bin/python bench/bench_responses.py                      # LeBel-shaped, 8,820 TRs x 20,000 targets
    .venv/bin/python bench/bench_responses.py --targets 80000      # the real voxel count (2.8 GB of Y)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np
from pipelines.ingest import Run
from pipelines.steps.response_matrix import stack_responses  # imported by both rows: not counted in the step

def hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("VmHWM:")))

def rss_kb():
    with open("/proc/self/status") as f:
        return int(next(l.split()[1] for l in f if l.startswith("VmRSS:")))

def plain_zscore_by_group(A, groups):  # the plain recipe's z-score: a float64 copy of the whole matrix
    A2 = A.astype(np.float64, copy=False).reshape(A.shape[0], -1)
    Z = np.empty(A2.shape, dtype=np.float32)
    for label in np.unique(groups):
        rows = groups == label
        block = A2[rows]
        varies = np.ptp(block, axis=0) > 0
        scale = np.where(varies, block.std(axis=0), np.inf)
        Z[rows] = (block - block.mean(axis=0)) / scale
    return Z.reshape(A.shape)

which, n_runs, n_samples, n_targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
per = n_samples // n_runs
runs = [Run(label=str(i), data=rng.standard_normal((per, n_targets), dtype=np.float32), times=np.arange(per) * 2.0,
            tr=2.0, key=f"run-{i}") for i in range(n_runs)]
held = rss_kb()  # the runs as read: held by both recipes before the step
t0 = time.perf_counter()
if which == "neuroflow":
    Y, finite, constant = stack_responses(runs)
else:
    lengths = [len(r.times) for r in runs]
    Y = np.concatenate([r.data for r in runs]).astype(np.float32)
    run_ids = np.repeat(np.arange(len(lengths)), lengths)
    finite = np.isfinite(Y).all(axis=0)
    Y = np.where(np.isfinite(Y), Y, 0.0).astype(np.float32)
    Y = plain_zscore_by_group(Y, run_ids)
    constant = finite & ~(np.abs(Y).sum(axis=0) > 0)
    Y[:, ~finite] = np.nan
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_kb": hwm_kb(), "held_kb": held, "y_bytes": Y.nbytes}))
"""

def run_row(which: str, n_runs: int, n_samples: int, n_targets: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, "neuroflow" if which == "neuroflow" else "plain",
                          str(n_runs), str(n_samples), str(n_targets)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=26, help="runs (stories); LeBel: 26 in (a), ~82 in (b)")
    parser.add_argument("--samples", type=int, default=8820, help="TRs in all")
    parser.add_argument("--targets", type=int, default=20000, help="voxels")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "responses.md"))
    args = parser.parse_args()
    rows = [(which, run_row(which, args.runs, args.samples, args.targets)) for which in ("plain recipe", "neuroflow")]
    y_gb = rows[0][1]["y_bytes"] / 1e9
    lines = [f"# Response matrix assembly: {args.samples:,} TRs in {args.runs} runs x {args.targets:,} targets "
             f"(Y = {y_gb:.2f} GB float32)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; "
             f"{time.strftime('%Y-%m-%d')}. Peak over Y = (VmHWM - memory held by the runs as read) / size of Y.", "",
             "| recipe | seconds | peak above the runs (GB) | peak over Y |", "|---|---:|---:|---:|"]
    for which, r in rows:
        extra = (r["peak_kb"] - r["held_kb"]) * 1024
        lines.append(f"| {which} | {r['seconds']:.2f} | {extra / 1e9:.2f} | {extra / r['y_bytes']:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
