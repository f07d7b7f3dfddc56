"""A LeBel deep subject end to end: `neuroflow run` against a minimal script doing the same work.

Builds ds003020-shaped local datasets (the real metadata from ../shared/realdata, the first
N stories of ``respdict.json`` with their real TR counts, TextGrids, planted word-rate voxels)
and times, each in its own process, with its peak resident memory (VmHWM):

- ``neuroflow run`` (4 delays, one alpha per voxel, the last story held out as LeBel's analyses
  do, publish to a local S3 server: maps, report, manifest);
- the DAG's steps (prepare, features, fit_subject, publish), each in its own process as an
  Airflow worker runs its task's callable: the peak of each task;
- the minimal script: the responses read into one array, z-scored per run, the feature ->
  Lanczos -> 4 delays, ``fit_encoding`` (the same fit, nothing published).

Rows (``--rows``): ``a-hf5`` (26 stories: 8,820 TRs, per-story HDF5 in float64 as the real
files), ``a-nifti`` (the same as 4-D NIfTI runs with a brain mask), ``a-lm`` (HDF5, a language
model's layer instead of word rate: the packaged MiniLM), ``b-hf5`` (82 stories: 27,608 TRs,
the deep subjects' size).

    .venv/bin/python bench/bench_scale.py                                  # every row at 80,000 voxels
    .venv/bin/python bench/bench_scale.py --rows a-hf5 --voxels 2000 --out /tmp/scale.md   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.datasets import metadata_files, planted, synthetic_words, textgrid_bytes, word_rate  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from measure import measure  # noqa: E402

START, TR, TRIM, DELAYS = 10.0, 2.0, 20, [1, 2, 3, 4]
ALPHAS = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
META = "ds003020_lebel_meta"
LM_LAYER, LM_CONTEXT = 4, 16
ROWS = {"a-hf5": (26, "hf5", "wordrate"), "a-nifti": (26, "nifti", "wordrate"), "a-lm": (26, "hf5", "lm"),
        "b-hf5": (82, "hf5", "wordrate")}
STEP_ROWS = ("a-hf5", "b-hf5")
GRID = (50, 50, 40)  # NIfTI runs: 100,000 voxels, the first n_voxels of them in the brain mask

# One step of the DAG, as its Airflow task calls it, reading and writing its inputs and outputs as
# JSON (Airflow's XComs): prepare | features NAME | fit SUBJECT | publish.
STEP = r'''
import json, sys
from pathlib import Path
from pipelines import steps

config, state, what = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), sys.argv[3:]
if what[0] == "prepare":
    out = steps.prepare(config)
elif what[0] == "features":
    out = steps.extract_features(config, what[1])
elif what[0] == "fit":
    out = steps.fit_subject(config, what[1], json.loads((state / "features.json").read_text()))
else:
    prepared = json.loads((state / "prepare.json").read_text())
    features = json.loads((state / "features.json").read_text())
    fits = steps.collect_fits(config, prepared["subjects"], [json.loads((state / "fit.json").read_text())])
    out = steps.publish_from_config(config, prepared, features, fits)
    print(out["manifest_uri"])
(state / f"{what[0]}.json").write_text(json.dumps(out if what[0] != "features" else [out], default=str))
'''

MINIMAL = r'''
"""The minimal script: what a person would write for the same fit."""
import json, sys
from pathlib import Path
import numpy as np
from pipelines.features.align import lanczos_resample, make_delays
from pipelines.fit import fit_encoding
from pipelines.wordtimings import read_textgrid_words

root, stories, variant, feature, model_dir = Path(sys.argv[1]), json.loads(sys.argv[2]), *sys.argv[3:6]
START, TR, DELAYS, ALPHAS = 10.0, 2.0, [1, 2, 3, 4], [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]
if variant == "hf5":
    import h5py
    def path(story): return root / f"derivative/preprocessed_data/UTS01/{story}.hf5"
    def n_rows(story):
        with h5py.File(path(story), "r") as h5:
            return h5["data"].shape
    def read(story):
        with h5py.File(path(story), "r") as h5:
            return h5["data"][:].astype(np.float32)
else:
    import nibabel as nib
    mask = np.asarray(nib.load(root / "sub-UTS01/func/sub-UTS01_desc-brain_mask.nii.gz").dataobj) > 0
    def path(story): return root / f"sub-UTS01/func/sub-UTS01_task-{story}_bold.nii.gz"
    def n_rows(story): return nib.load(path(story)).shape[3], int(mask.sum())
    def read(story): return np.asarray(nib.load(path(story)).dataobj, dtype=np.float32)[mask].T
shapes = [n_rows(s) for s in stories]
lengths = [s[0] for s in shapes]
Y = np.empty((sum(lengths), shapes[0][1]), np.float32)
X, groups, start = [], [], 0
if feature == "lm":
    from pipelines.features.language_model import extract_word_features
for i, (story, n) in enumerate(zip(stories, lengths)):
    block = read(story)
    sd = block.std(0)
    Y[start:start + n] = (block - block.mean(0)) / np.where(sd > 0, sd, 1)
    del block
    words = read_textgrid_words(root / f"derivative/TextGrids/{story}.TextGrid")
    mid = ((words["onset"] + words["offset"]) / 2).to_numpy(float)
    if feature == "lm":
        values = extract_word_features(list(words["word"]), model_dir, [int(sys.argv[6])], int(sys.argv[7]))
        values = values[int(sys.argv[6])]
    else:
        values = np.ones((len(words), 1), np.float32)
    F = lanczos_resample(values.astype(np.float32), mid, START + TR * np.arange(n))
    F = (F - F.mean(0)) / np.where(F.std(0) > 0, F.std(0), 1)
    X.append(make_delays(F.astype(np.float32), [n], DELAYS))
    groups.append(np.full(n, i))
    start += n
res = fit_encoding(np.concatenate(X).astype(np.float32), Y, np.concatenate(groups), ALPHAS, backend="auto",
                   test_groups=[len(stories) - 1], return_predictions=False)
print(json.dumps({"mean_r": float(np.nanmean(res.r)), "planted_r": float(np.nanmean(res.r[:50]))}))
'''


def _stories(n_stories: int) -> tuple[list[str], dict]:
    respdict = json.loads(metadata_files(META)["derivative/respdict.json"].read_text())
    return sorted(respdict)[:n_stories], respdict


def build_dataset(dest: Path, n_stories: int, n_voxels: int, variant: str, seed: int = 3020) -> list[str]:
    """The real metadata plus synthetic responses and TextGrids for the first `n_stories` stories."""
    rng = np.random.default_rng(seed)
    stories, respdict = _stories(n_stories)
    if variant == "hf5":
        for key, path in metadata_files(META).items():
            (dest / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / key)
    else:
        import nibabel as nib

        func = dest / "sub-UTS01/func"
        func.mkdir(parents=True, exist_ok=True)
        (dest / "dataset_description.json").write_text(json.dumps({"Name": "LeBel-shaped", "BIDSVersion": "1.8.0"}))
        flat = np.zeros(int(np.prod(GRID)), dtype=np.uint8)
        flat[:n_voxels] = 1  # the first voxels in numpy's (C) order: the order of vol[mask], as both readers take it
        in_mask = np.flatnonzero(flat)
        mask = flat.reshape(GRID)
        nib.save(nib.Nifti1Image(mask, np.diag([3.0, 3.0, 3.0, 1.0])), func / "sub-UTS01_desc-brain_mask.nii.gz")
    import h5py

    for story in stories:
        n = respdict[story] - TRIM
        words = synthetic_words(rng, 1.0, START + TR * n - 3.0)
        tg = dest / f"derivative/TextGrids/{story}.TextGrid"
        tg.parent.mkdir(parents=True, exist_ok=True)
        tg.write_bytes(textgrid_bytes(words, START + TR * n + 8))
        data = planted(rng, word_rate(words, START + TR * np.arange(n)), n_voxels, np.arange(50), snr=1.0,
                       scale=10.0, base=100.0)
        if variant == "hf5":
            h5path = dest / f"derivative/preprocessed_data/UTS01/{story}.hf5"
            h5path.parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(h5path, "w") as h5:
                h5.create_dataset("data", data=data)  # float64, as ds003020's files
        else:
            vol = np.zeros((int(np.prod(GRID)), n), dtype=np.float32)
            vol[in_mask] = data.T  # column j of the data is the j-th voxel of vol[mask]
            img = nib.Nifti1Image(vol.reshape(*GRID, n), np.diag([3.0, 3.0, 3.0, 1.0]))
            img.header.set_xyzt_units("mm", "sec")
            img.header["pixdim"][4] = TR
            nib.save(img, func / f"sub-UTS01_task-{story}_bold.nii.gz")
            (func / f"sub-UTS01_task-{story}_bold.json").write_text(json.dumps({"RepetitionTime": TR}))
            del vol, img
        del data
    return stories


def analysis_config(ds: Path, variant: str, feature: str, stories: list[str], output: str) -> dict:
    from pipelines.demo import packaged_model_dir

    if variant == "hf5":
        responses = {"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5",
                     "start_time": START, "tr_counts": "derivative/respdict.json", "tr_counts_trim": TRIM}
    else:
        responses = {"kind": "bold", "tasks": ["*"], "start_time": START}
    features = ([{"name": "wordrate", "kind": "word_rate"}] if feature == "wordrate" else
                [{"name": "minilm", "kind": "language_model", "model": str(packaged_model_dir()),
                  "layer": LM_LAYER, "context_words": LM_CONTEXT}])
    return {
        "name": f"scale-{variant}-{feature}",
        "dataset": {"source": str(ds), "version": "3.1.0", "task": "stories", "subjects": ["UTS01"],
                    "responses": responses,
                    "word_timings": {"format": "textgrid", "pattern": "derivative/TextGrids/{story}.TextGrid",
                                     "tier": "word"}},
        "features": features,
        "model": {"alphas": ALPHAS, "delays": DELAYS, "test_stories": [stories[-1]]},
        "compute": {"backend": "auto", "dask": "none"},
        "output": output,
    }


def run_row(name: str, workdir: Path, n_voxels: int, env: dict, stories_override: int | None = None) -> dict:
    n_stories, variant, feature = ROWS[name]
    n_stories = stories_override or n_stories
    ds = workdir / f"ds-{variant}-{n_stories}"
    t0 = time.perf_counter()
    if not ds.exists():
        build_dataset(ds, n_stories, n_voxels, variant)
    built = time.perf_counter() - t0
    stories, respdict = _stories(n_stories)
    n_trs = sum(respdict[s] - TRIM for s in stories)
    from pipelines.demo import packaged_model_dir
    from pipelines.s3 import s3_client

    bucket = f"scale-{name}"
    s3_client(bucket).create_bucket(Bucket=bucket)
    config = analysis_config(ds, variant, feature, stories, f"s3://{bucket}")
    (workdir / f"{name}.json").write_text(json.dumps(config))
    (workdir / "minimal.py").write_text(MINIMAL)
    (workdir / "step.py").write_text(STEP)
    row_env = {**env, "NEUROFLOW_CACHE": str(workdir / f"cache-{name}")}
    out = {"name": name, "n_trs": n_trs, "n_stories": n_stories, "variant": variant, "feature": feature,
           "y_gb": n_trs * n_voxels * 4 / 1e9, "built": built}
    out["neuroflow"] = measure(["pipelines.cli", "run", str(workdir / f"{name}.json")], row_env, workdir)
    out["minimal"] = measure([str(workdir / "minimal.py"), str(ds), json.dumps(stories), variant, feature,
                              str(packaged_model_dir()), str(LM_LAYER), str(LM_CONTEXT)], row_env, workdir)
    if name in STEP_ROWS:  # the DAG's tasks, each in its own process, into a fresh output and cache
        s3_client(bucket + "-dag").create_bucket(Bucket=bucket + "-dag")
        config["output"] = f"s3://{bucket}-dag"
        (workdir / f"{name}-dag.json").write_text(json.dumps(config))
        state = workdir / f"state-{name}"
        state.mkdir(exist_ok=True)
        dag_env = {**env, "NEUROFLOW_CACHE": str(workdir / f"cache-{name}-dag")}
        base = [str(workdir / "step.py"), str(workdir / f"{name}-dag.json"), str(state)]
        feature_name = config["features"][0]["name"]
        out["steps"] = {label: measure(base + args, dag_env, workdir) for label, args in (
            ("prepare", ["prepare"]), ("extract_features", ["features", feature_name]),
            ("fit_subject", ["fit", "UTS01"]), ("publish", ["publish"]))}
    return out


def table(results: list[dict], n_voxels: int) -> list[str]:
    lines = [
        f"# A LeBel deep subject end to end, {n_voxels:,} voxels",
        "",
        f"Written by `bench/bench_scale.py` on {time.strftime('%Y-%m-%d %H:%M')} ({platform.node()}): "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB of memory; load average "
        f"{os.getloadavg()[0]:.1f} at the end. Datasets are built first (not timed): ds003020's real metadata, the "
        "first stories of `respdict.json` with their real TR counts, TextGrids, 50 planted word-rate voxels. "
        "4 delays, 6 alphas, one per voxel, the last story held out (alphas by leave-one-story-out within the "
        "others); neuroflow also publishes maps, report and manifest to a local S3 server. Y is the float32 "
        "response matrix; peaks are each process's VmHWM. `NEUROFLOW_MEMORY_BUDGET` unset: responses over "
        "half the memory budget (half the available memory) are fitted out of core.",
        "",
        "| row | responses | TRs x voxels | Y (GB) | feature | run | wall (s) | vs minimal | peak RSS (GB) "
        "| peak over Y |",
        "|---|---|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        shape = f"{r['n_trs']:,} x {n_voxels:,} ({r['n_stories']} stories)"
        mini = r["minimal"]
        runs = [("`neuroflow run`", r["neuroflow"])]
        runs += [(f"DAG task `{k}`", v) for k, v in r.get("steps", {}).items()]
        runs += [("minimal script", mini)]
        for label, m in runs:
            lines.append(f"| {r['name']} | {r['variant']} | {shape} | {r['y_gb']:.2f} | {r['feature']} | {label} | "
                         f"{m['wall']:.1f} | {m['wall'] / mini['wall']:.2f}x | {m['peak_gb']:.2f} | "
                         f"{m['peak_gb'] / r['y_gb']:.2f}x |")
    lines += ["", "Planted voxels' mean held-out r (minimal script): " + ", ".join(
        f"{r['name']} {json.loads(r['minimal']['stdout'].strip().splitlines()[-1])['planted_r']:.3f}"
        for r in results) + ".",
        "Goals of issue 16: at 8,820 TRs wall <= 1.5x the minimal script and peak <= 2x Y; at ~27,000 TRs a "
        "peak under 12 GB (a 16 GB worker). DAG task rows: wall and peak of each task's callable in its own "
        "process (the ratio column compares it with the whole minimal script)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    parser.add_argument("--voxels", type=int, default=80000)
    parser.add_argument("--stories", type=int, default=None, help="stories of every row (a quick look; default: the row's)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.md"))
    parser.add_argument("--workdir", default=None, help="where the datasets are built (default: a temporary folder)")
    args = parser.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose among {list(ROWS)}")

    from pipelines.devserver import aws_env, start_s3_server, stop

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="neuroflow-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url, server = start_s3_server()
    env = {**os.environ, **aws_env(url), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    results = []
    try:
        os.environ.update(aws_env(url))
        for name in rows:
            results.append(run_row(name, workdir, args.voxels, env, args.stories))
            print("\n".join(table(results, args.voxels)), flush=True)
            for built in workdir.glob("cache-*"):  # the caches of a finished row are not needed again
                shutil.rmtree(built, ignore_errors=True)
    finally:
        stop(server)
    lines = table(results, args.voxels)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
