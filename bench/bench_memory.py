"""Where the memory of a LeBel-shaped `neuroflow run` goes at its peak, before and after a change (memray).

Runs `neuroflow run` on the a-hf5 dataset of bench_scale.py (26 stories, 8,820 TRs, fewer voxels
by default so that it runs in minutes) under memray, once with the code of a git revision
("before", checked out in a temporary worktree) and once with this working tree ("after"), and
writes, for each, the heap's high-water mark and what was held at that moment, grouped by the
innermost neuroflow function that allocated it.

    .venv/bin/python bench/bench_memory.py --before 83c580b --voxels 20000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_scale import TRIM, _stories, analysis_config, build_dataset  # noqa: E402


def held_at_peak(capture: Path, top: int) -> tuple[float, list[tuple[str, float]]]:
    """The heap's high-water mark (GB) and the GB held then, by innermost neuroflow frame."""
    from memray import FileReader

    reader = FileReader(str(capture))
    sites: dict[str, float] = defaultdict(float)
    for record in reader.get_high_watermark_allocation_records(merge_threads=True):
        where = "outside neuroflow (interpreter, imports, libraries)"
        for function, filename, lineno in record.stack_trace():
            if "/pipelines/" in filename:
                where = f"`{filename.split('/pipelines/', 1)[1]}:{lineno}` {function}"
                break
        sites[where] += record.size / 1e9
    ranked = sorted(sites.items(), key=lambda kv: -kv[1])
    return reader.metadata.peak_memory / 1e9, ranked[:top]


def profile(code: Path, config: Path, workdir: Path, label: str, env: dict) -> Path:
    capture = workdir / f"{label}.bin"
    capture.unlink(missing_ok=True)
    run_env = {**env, "PYTHONPATH": str(code), "NEUROFLOW_CACHE": str(workdir / f"cache-{label}")}
    proc = subprocess.run([sys.executable, "-m", "memray", "run", "--quiet", "-o", str(capture), "-m",
                           "pipelines.cli", "run", str(config)], cwd=code, env=run_env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: neuroflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="83c580b", help="git revision of the 'before' code")
    parser.add_argument("--voxels", type=int, default=20000)
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "memory.md"))
    args = parser.parse_args()

    from pipelines.devserver import aws_env, start_s3_server, stop
    from pipelines.s3 import s3_client

    workdir = Path(tempfile.mkdtemp(prefix="neuroflow-memory-"))
    before_tree = workdir / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(before_tree), args.before],
                   check=True)
    ds = workdir / "ds"
    build_dataset(ds, 26, args.voxels, "hf5")
    stories, respdict = _stories(26)
    y_gb = sum(respdict[s] - TRIM for s in stories) * args.voxels * 4 / 1e9
    url, server = start_s3_server()
    env = {**os.environ, **aws_env(url), "HF_HUB_OFFLINE": "1"}
    rows = {}
    try:
        os.environ.update(aws_env(url))
        for label, code in (("before", before_tree), ("after", REPO)):
            s3_client(f"memory-{label}").create_bucket(Bucket=f"memory-{label}")
            config = workdir / f"{label}.json"
            config.write_text(json.dumps(analysis_config(ds, "hf5", "wordrate", stories, f"s3://memory-{label}")))
            rows[label] = held_at_peak(profile(code, config, workdir, label, env), args.top)
    finally:
        stop(server)
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)], check=False)
    lines = [f"# Where a run's memory goes at its peak (memray), 8,820 TRs x {args.voxels:,} voxels",
             "", f"Written by `bench/bench_memory.py` on {time.strftime('%Y-%m-%d %H:%M')}: `neuroflow run` on the "
             f"a-hf5 dataset of `bench_scale.py` (Y = {y_gb:.2f} GB float32), under memray 1.20. \"before\": "
             f"revision `{args.before}`; \"after\": this tree. Heap high-water mark, and what was held at that "
             "moment by the innermost neuroflow line that allocated it. memray counts an allocation in full when "
             "it is made: the stacked matrix's `np.empty` pages become resident only as each run is copied in and "
             "the run's own array released, so resident memory (VmHWM, `bench_scale.py`) stays near Y plus one "
             "run at this moment.", ""]
    for label, (peak, ranked) in rows.items():
        lines += [f"## {label}: heap peak {peak:.2f} GB = {peak / y_gb:.2f}x Y", "",
                  "| allocated by | GB held at the peak | x Y |", "|---|---:|---:|"]
        lines += [f"| {where} | {gb:.2f} | {gb / y_gb:.2f} |" for where, gb in ranked]
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
