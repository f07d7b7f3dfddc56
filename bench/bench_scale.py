"""A LeBel deep subject end to end: `neuroflow run` against a minimal script doing the same work.

Builds a ds003020-shaped local dataset (the real metadata from ../shared/realdata, the first
26 stories of ``respdict.json`` with their real TR counts: 8,820 TRs; per-story HDF5 responses
in float64 as the real files, TextGrids; planted word-rate voxels), then times, each in its own
process, with its peak resident memory (VmHWM):

- ``neuroflow run`` (word rate, 4 delays, one alpha per voxel, leave-one-story-out, publish to a
  local S3 server: maps, report, manifest);
- the minimal script: the HDF5 files read into one array, z-scored per run, word rate ->
  Lanczos -> 4 delays, ``fit_encoding`` (the same fit, nothing published).

    .venv/bin/python bench/bench_scale.py                       # 8,820 TRs x 80,000 voxels (issue 16 (a))
    .venv/bin/python bench/bench_scale.py --voxels 2000 --out /tmp/scale.md   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.datasets import metadata_files, planted, synthetic_words, textgrid_bytes, word_rate  # noqa: E402

START, TR, TRIM, DELAYS = 10.0, 2.0, 20, [1, 2, 3, 4]
ALPHAS = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
META = "ds003020_lebel_meta"

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

MINIMAL = r'''
"""The minimal script: what a person would write for the same fit."""
import json, sys
from pathlib import Path
import h5py
import numpy as np
from pipelines.features.align import lanczos_resample, make_delays
from pipelines.fit import fit_encoding
from pipelines.wordtimings import read_textgrid_words

root, stories = Path(sys.argv[1]), json.loads(sys.argv[2])
START, TR, DELAYS, ALPHAS = 10.0, 2.0, [1, 2, 3, 4], [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
lengths = []
for story in stories:
    with h5py.File(root / f"derivative/preprocessed_data/UTS01/{story}.hf5", "r") as h5:
        lengths.append(h5["data"].shape[0])
n_voxels = h5py.File(root / f"derivative/preprocessed_data/UTS01/{stories[0]}.hf5", "r")["data"].shape[1]
Y = np.empty((sum(lengths), n_voxels), np.float32)
X, groups, start = [], [], 0
for i, (story, n) in enumerate(zip(stories, lengths)):
    with h5py.File(root / f"derivative/preprocessed_data/UTS01/{story}.hf5", "r") as h5:
        block = h5["data"][:].astype(np.float32)
    Y[start:start + n] = (block - block.mean(0)) / np.where(block.std(0) > 0, block.std(0), 1)
    words = read_textgrid_words(root / f"derivative/TextGrids/{story}.TextGrid")
    mid = ((words["onset"] + words["offset"]) / 2).to_numpy(float)
    rate = lanczos_resample(np.ones((len(words), 1), np.float32), mid, START + TR * np.arange(n))
    X.append(make_delays(rate, [n], DELAYS))
    groups.append(np.full(n, i))
    start += n
res = fit_encoding(np.concatenate(X).astype(np.float32), Y, np.concatenate(groups), ALPHAS, backend="auto")
print(json.dumps({"mean_r": float(np.nanmean(res.r)), "planted_r": float(np.nanmean(res.r[:50]))}))
'''


def build_dataset(dest: Path, n_stories: int, n_voxels: int, seed: int = 3020) -> list[str]:
    """The real metadata plus synthetic responses and TextGrids for the first `n_stories` stories."""
    rng = np.random.default_rng(seed)
    for key, path in metadata_files(META).items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / key)
    respdict = json.loads((dest / "derivative/respdict.json").read_text())
    stories = sorted(respdict)[:n_stories]
    import h5py

    for story in stories:
        n = respdict[story] - TRIM
        words = synthetic_words(rng, 1.0, START + TR * n - 3.0)
        tg = dest / f"derivative/TextGrids/{story}.TextGrid"
        tg.parent.mkdir(parents=True, exist_ok=True)
        tg.write_bytes(textgrid_bytes(words, START + TR * n + 8))
        data = planted(rng, word_rate(words, START + TR * np.arange(n)), n_voxels, np.arange(50), snr=1.0,
                       scale=10.0, base=100.0)
        h5path = dest / f"derivative/preprocessed_data/UTS01/{story}.hf5"
        h5path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(h5path, "w") as h5:
            h5.create_dataset("data", data=data)  # float64, as ds003020's files
        del data
    return stories


def measure(cmd: list[str], env: dict, workdir: Path) -> dict:
    """Wall seconds and peak resident memory (GB) of one command, run in its own process."""
    peak_file = workdir / "peak"
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *cmd], capture_output=True, text=True,
                          env={**env, "BENCH_PEAK_FILE": str(peak_file)}, cwd=workdir)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall": wall, "peak_gb": int(peak_file.read_text()) * 1024 / 1e9, "stdout": proc.stdout}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stories", type=int, default=26)
    parser.add_argument("--voxels", type=int, default=80000)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.md"))
    parser.add_argument("--workdir", default=None, help="where the dataset is built (default: a temporary folder)")
    args = parser.parse_args()

    from pipelines.devserver import aws_env, start_s3_server, stop

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="neuroflow-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ds = workdir / "ds003020"
    t0 = time.perf_counter()
    stories = build_dataset(ds, args.stories, args.voxels)
    built = time.perf_counter() - t0
    n_trs = sum(json.loads((ds / "derivative/respdict.json").read_text())[s] - TRIM for s in stories)
    y_gb = n_trs * args.voxels * 4 / 1e9
    url, server = start_s3_server()
    env = {**os.environ, **aws_env(url), "PYTHONPATH": str(REPO), "NEUROFLOW_CACHE": str(workdir / "cache"),
           "HF_HUB_OFFLINE": "1"}
    try:
        os.environ.update(aws_env(url))
        from pipelines.s3 import s3_client

        s3_client("scale-results").create_bucket(Bucket="scale-results")
        config = {
            "name": "scale",
            "dataset": {"source": str(ds), "version": "3.1.0", "task": "stories", "subjects": ["UTS01"],
                        "responses": {"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5",
                                      "start_time": START, "tr_counts": "derivative/respdict.json",
                                      "tr_counts_trim": TRIM},
                        "word_timings": {"format": "textgrid", "pattern": "derivative/TextGrids/{story}.TextGrid",
                                         "tier": "word"}},
            "features": [{"name": "wordrate", "kind": "word_rate"}],
            "model": {"alphas": ALPHAS, "delays": DELAYS},
            "compute": {"backend": "auto", "dask": "none"},
            "output": "s3://scale-results",
        }
        (workdir / "scale.yaml").write_text(json.dumps(config))
        minimal_py = workdir / "minimal.py"
        minimal_py.write_text(MINIMAL)
        nf = measure(["pipelines.cli", "run", str(workdir / "scale.yaml")], env, workdir)
        mini = measure([str(minimal_py), str(ds), json.dumps(stories)], env, workdir)
    finally:
        stop(server)
    manifest_uri = nf["stdout"].strip().splitlines()[-1]
    science = json.loads(mini["stdout"].strip().splitlines()[-1])
    lines = [
        f"# A LeBel deep subject end to end: {n_trs:,} TRs ({len(stories)} stories) x {args.voxels:,} voxels",
        "",
        f"Written by `bench/bench_scale.py` on {time.strftime('%Y-%m-%d %H:%M')} ({platform.node()}): "
        f"{os.cpu_count()} CPU cores, {platform.machine()}; load average {os.getloadavg()[0]:.1f}. "
        f"Response matrix Y: {y_gb:.2f} GB float32 (the HDF5 files hold float64, as ds003020's). "
        f"Dataset built in {built:.0f} s (not timed below). Word rate, 4 delays, {len(ALPHAS)} alphas, one per "
        "voxel, leave-one-story-out; neuroflow also publishes maps, report and manifest to a local S3 server.",
        "",
        "| run | wall (s) | vs minimal script | peak RSS (GB) | peak over Y |",
        "|---|---:|---:|---:|---:|",
        f"| `neuroflow run` | {nf['wall']:.1f} | {nf['wall'] / mini['wall']:.2f}x | {nf['peak_gb']:.2f} | "
        f"{nf['peak_gb'] / y_gb:.2f}x |",
        f"| minimal script (read, z-score, word rate, fit) | {mini['wall']:.1f} | 1.00x | {mini['peak_gb']:.2f} | "
        f"{mini['peak_gb'] / y_gb:.2f}x |",
        "",
        f"Minimal script's mean r over the 50 planted voxels: {science['planted_r']:.3f} (all voxels "
        f"{science['mean_r']:.3f}). neuroflow's manifest: `{manifest_uri}` (on the bench's own server, gone "
        "with it). Goals of issue 16 at this size: wall <= 1.5x the minimal script, peak <= 2x Y.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
