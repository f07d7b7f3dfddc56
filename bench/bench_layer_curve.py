"""A layer curve with its controls on real data: the Alice ROI time courses (`make bench`).

The bundled demo dataset's real subjects (ds002322: sub-18, 22, 23; 6 language ROIs of Brennan
et al. 2016, 362 TRs) through ``neuroflow``'s own stages (the analysis published to a temporary
local folder): every hidden state of the packaged pretrained MiniLM (``all-MiniLM-L6-v2``, 6
layers), 16 words of context, with the three controls of ``features[].baselines`` (untrained
weights, shuffled words, random embeddings); a cubic detrend per run, FIR delays 1-4, 5
contiguous folds. The table is the published ``layer_curves.json``: mean held-out r over the 6
ROIs per layer (each subject, then their mean), the best layer, and the model's curve per ROI.

Usage::

    python bench/bench_layer_curve.py --out bench/results/layer-curve.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SUBJECTS = ["18", "22", "23"]


def config(model: str, output: str) -> dict:
    return {
        "name": "alice-layers",
        "dataset": {"source": str(REPO / "data" / "ds002322-demo"), "version": "1.0.4", "task": "alice",
                    "subjects": SUBJECTS,
                    "responses": {"derivatives": ["derivatives/brennan2016roi"], "preprocess": {"polynomial": 3}},
                    "word_timings": {"format": "textgrid", "tier": "word",
                                     "files": {"alice": "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"}}},
        "features": [{"name": "minilm", "kind": "language_model", "model": model, "layer": "all",
                      "context_words": 16, "baselines": ["untrained", "shuffled", "random_embedding"]}],
        "model": {"alphas": [1, 10, 100, 1000, 10000, 100000, 1000000], "delays": [1, 2, 3, 4],
                  "cv": "contiguous_blocks", "n_folds": 5},
        "compute": {"backend": "numpy", "dask": "none"},
        "output": output,
    }


def fmt(values) -> str:
    return " | ".join("" if v is None else f"{v:.3f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "layer-curve.md")
    args = ap.parse_args()
    from pipelines.config import parse_config
    from pipelines.demo import packaged_model_dir
    from pipelines.manifest import read_manifest
    from pipelines.steps.flow import run_analysis

    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(config(str(packaged_model_dir()), str(Path(tmp) / "out")))
        t0 = time.perf_counter()
        result = run_analysis(cfg, cache_dir=Path(tmp) / "cache")
        wall = time.perf_counter() - t0
        folder = Path(result["local_dir"])
        curves = json.loads((folder / "layer_curves.json").read_text())["features"]["minilm"]
        manifest = read_manifest(result["manifest_uri"])
        subj_curves = {s: json.loads((folder / f"sub-{s}" / f"sub-{s}_task-alice_desc-minilm_layercurve.json")
                                     .read_text()) for s in SUBJECTS}
    layers = curves["layers"]
    head = "| | " + " | ".join(f"layer {k}" for k in layers) + " | best |"
    rule = "|---|" + "---:|" * (len(layers) + 1)
    lines = [
        "# Layer curve with controls on the real Alice ROI time courses",
        "",
        f"`bench/bench_layer_curve.py`, {time.strftime('%Y-%m-%d')}, {platform.node()} "
        f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}); the whole analysis took {wall:.0f} s.",
        "",
        "ds002322 sub-18, 22, 23 (real; 6 ROIs, 362 TRs, cubic detrend per run), all-MiniLM-L6-v2 hidden states "
        "0-6 (16 words of context), FIR delays 1-4, 5 contiguous folds, alphas 1-1e6. Mean held-out r over the 6 "
        "ROIs; `mean` is the mean over the 3 subjects. Controls (`features[].baselines`): `untrained` = the same "
        "architecture with random weights, `shuffled` = words permuted before extraction, `random_embedding` = a "
        "fixed random vector per word type (no layers).",
        "",
        head, rule,
    ]
    for name in ["model", *sorted(k for k in curves["mean_over_subjects"] if k != "model")]:
        for s in SUBJECTS:
            c = subj_curves[s]["model"] if name == "model" else subj_curves[s]["baselines"][name]
            vals = c["sets"]["all"]["mean_r"]
            best = c.get("best_layer")
            lines.append(f"| {name} sub-{s} | {fmt(vals)} | {'' if best is None else best} |")
        lines.append(f"| **{name} mean** | {fmt(curves['mean_over_subjects'][name]['all'])} | |")
    lines += ["", "The model per ROI (mean over subjects):", "", head, rule]
    rois = sorted(k for k in subj_curves[SUBJECTS[0]]["model"]["sets"] if k.startswith("label:"))
    for roi in rois:
        rows = [subj_curves[s]["model"]["sets"][roi]["mean_r"] for s in SUBJECTS]
        mean = [sum(v[i] for v in rows) / len(rows) for i in range(len(layers))]
        best = layers[max(range(len(layers)), key=lambda i: mean[i])]
        lines.append(f"| {roi[6:]} | {fmt(mean)} | {best} |")
    warnings = manifest.get("warnings", [])
    lines += ["", f"Alpha-grid warnings: {len(warnings)}" + ("" if not warnings else ":"),
              *[f"- {w}" for w in warnings], ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
