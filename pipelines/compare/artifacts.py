"""What a published analysis adds for model comparison: layer curves, best-layer and alpha-edge maps.

Called by :mod:`pipelines.publish` for each fitted subject (:func:`subject_comparison`) and once
for the analysis (:func:`analysis_layer_curves`). Files (relative to the analysis folder):

- ``sub-<s>/sub-<s>_task-<t>_desc-<feature>_layercurve.json`` (kind ``layer_curve_json``): the
  subject's curve of each layer sweep and its controls (see :mod:`pipelines.compare.layer_curve`);
- ``sub-<s>/figures/..._desc-<feature>_layercurve.png``: the curve drawn (in the report);
- ``..._desc-<feature>_stat-bestlayer_statmap.*``: per target, the layer that predicts it best;
- ``..._desc-<space>_stat-alphaedge_statmap.*`` for a fit whose predicted targets sit at the
  edge of ``model.alphas`` (see :mod:`pipelines.compare.alpha_edge`), with a warning;
- ``layer_curves.json`` (kind ``layer_curve_json``, no subject): every subject's curves and their
  mean over subjects.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import AnalysisConfig
from .alpha_edge import alpha_edge_map, alpha_edges, edge_warning
from .layer_curve import subject_layer_curves

log = logging.getLogger("neuroflow")

__all__ = ["LAYER_CURVE_SCHEMA", "subject_comparison", "analysis_layer_curves", "write_target_map",
           "render_layer_curve_png"]

LAYER_CURVE_SCHEMA = 1


def _desc(name: str) -> str:
    return "".join(ch for ch in name if ch.isalnum())


def write_target_map(fit: dict, arrays: dict[str, np.ndarray], mask_img, values: np.ndarray, desc: str, stat: str,
                     sub_dir: Path, feature_space: str) -> list[dict]:
    """One value per target as the subject's maps are written: a NIfTI volume, a GIFTI per
    hemisphere, or a TSV of targets; returns the artifact records."""
    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from ..maps import FSAVERAGE_VERTICES, bids_map_name, write_surface_map, write_target_table, write_volume_map

    sub, task, space = fit["subject"], fit["task"], fit.get("space")
    record = {"subject": sub, "feature_space": feature_space, "stat": stat}
    values = np.asarray(values, dtype=np.float32)
    if fit["kind"] == "bold":
        path = write_volume_map(values, mask_img, sub_dir / bids_map_name(sub, task, space, desc, stat, ".nii.gz"))
        return [{"file": path, "kind": "statmap_nifti", **record}]
    if fit["kind"] == "gifti" and "info__hemi" in arrays:
        hemi = arrays["info__hemi"].astype(str)
        vertex = arrays["info__vertex"].astype(np.int64)
        n_vertices = FSAVERAGE_VERTICES.get(space or "", int(vertex.max()) + 1)
        out = []
        for h in sorted(set(hemi)):
            rows = hemi == h
            name = bids_map_name(sub, task, space, desc, stat, ".func.gii").replace(
                f"sub-{sub}_task-{task}_", f"sub-{sub}_task-{task}_hemi-{h}_")
            out.append({"file": write_surface_map(values[rows], vertex[rows], n_vertices, sub_dir / name),
                        "kind": "statmap_gifti", **record})
        return out
    names = [str(n) for n in arrays["target_names"]]
    path = write_target_table({stat: values}, names, sub_dir / bids_map_name(sub, task, space, desc, stat, ".tsv"))
    return [{"file": path, "kind": "statmap_tsv", **record}]


def render_layer_curve_png(feature: str, curves: dict[str, Any], path: Path, title: str) -> Path:
    """The layer curve of one sweep and its controls: mean r over all targets, over the best ones,
    and the ceiling-normalised mean where there is a ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = curves["layers"]
    panels = [("all", "mean_r", "all valid targets"), ("top", "mean_r", "best-predicted targets")]
    if curves["model"]["sets"]["all"]["mean_r_normalised"] is not None:
        panels.append(("all", "mean_r_normalised", "ceiling-normalised, all"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    styles = {None: ("k", "-o"), "untrained": ("tab:red", "--s"), "shuffled": ("tab:blue", "--^"),
              "random_embedding": ("tab:gray", ":")}
    for ax, (key, metric, label) in zip(axes[0], panels):
        for name, curve in [(None, curves["model"]), *sorted(curves["baselines"].items())]:
            ys = curve["sets"][key][metric]
            if ys is None:
                continue
            color, style = styles.get(name, ("tab:green", "--"))
            ax.plot(layers, [np.nan if y is None else y for y in ys], style, color=color,
                    label=feature if name is None else name)
        n = curves["model"]["sets"][key]["n_targets"]
        ax.set_title(f"{label} (n={n})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(layers)
        ax.axhline(0, color="#bbb", lw=0.8)
    axes[0][0].set_ylabel("held-out r")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _json_curves(feat: dict[str, Any]) -> dict[str, Any]:
    """A sweep's curves without the per-target arrays (what the JSON carries)."""
    return {"layers": feat["layers"], "spaces": feat["spaces"], "model": feat["model"],
            "baselines": feat["baselines"]}


def subject_comparison(cfg: AnalysisConfig, fit: dict, arrays: dict[str, np.ndarray], mask_img, out_dir: Path,
                       entries: list[dict], *, labels: Sequence[Any] | np.ndarray | None = None
                       ) -> tuple[list[dict], dict[str, Any], list[str]]:
    """One subject's comparison outputs: alpha-edge counts (into ``fit["metrics"]``), maps, layer curves.

    Parameters
    ----------
    cfg, fit, arrays, mask_img, out_dir
        As :func:`pipelines.publish.render_subject` gets them.
    entries : list of dict
        The subject's report entries; the curve figures are appended to the sweep's first layer.
    labels : optional
        A label per target (ROIs); default: the targets' own names when they are ROI time series.

    Returns
    -------
    artifacts, curves, warnings
        Artifact records (``file``, ``kind``...), ``{feature: curves}`` (JSON-ready) and warnings.
    """
    sub = fit["subject"]
    fit = {**fit, "task": cfg.dataset.task}
    sub_dir = out_dir / f"sub-{sub}"
    artifacts: list[dict] = []
    notes: list[str] = []
    for name in sorted(fit["metrics"]):
        if f"{name}__alpha" not in arrays:
            continue
        valid = arrays[f"{name}__valid"].astype(bool)
        counts = alpha_edges(arrays[f"{name}__alpha"], cfg.model.alphas, valid, arrays[f"{name}__r"],
                             int(fit.get("n_samples") or 0), arrays.get(f"{name}__significant"))
        warn = counts.pop("warn")
        fit["metrics"][name]["alpha_edge"] = counts
        if warn:
            notes.append(edge_warning(sub, name, counts))
            log.warning("%s", notes[-1])
            artifacts += write_target_map(fit, arrays, mask_img, alpha_edge_map(arrays[f"{name}__alpha"],
                                                                                cfg.model.alphas, valid),
                                          _desc(name), "alphaedge", sub_dir, name)
    if labels is None and fit.get("kind") == "timeseries":
        labels = [str(n) for n in arrays["target_names"]]
    sweeps = subject_layer_curves(arrays, list(fit["metrics"]), [f.name for f in cfg.features], labels=labels)
    curves: dict[str, Any] = {}
    for feat, found in sweeps.items():
        desc = _desc(feat)
        stem = f"sub-{sub}_task-{cfg.dataset.task}_desc-{desc}_layercurve"
        body = {"schema_version": LAYER_CURVE_SCHEMA, "subject": sub, "feature": feat, **_json_curves(found)}
        jpath = sub_dir / f"{stem}.json"
        jpath.write_text(json.dumps(body, indent=2, sort_keys=True))
        artifacts.append({"file": jpath, "kind": "layer_curve_json", "subject": sub, "feature_space": feat})
        png = render_layer_curve_png(feat, found, sub_dir / "figures" / f"{stem}.png",
                                     f"sub-{sub} {feat}: held-out r by layer")
        artifacts.append({"file": png, "kind": "figure_png", "subject": sub, "feature_space": feat})
        artifacts += write_target_map(fit, arrays, mask_img, found["best_layer_map"], desc, "bestlayer", sub_dir,
                                      feat)
        best = found["model"]["best_layer"]
        caption = (f"{feat}: mean held-out r by layer (best layer {best})"
                   + (f", beside {', '.join(sorted(found['baselines']))}" if found["baselines"] else ""))
        first = found["spaces"][str(found["layers"][0])]
        entry = next((e for e in entries if e["name"] == first), entries[0] if entries else None)
        if entry is not None:
            entry["images"].append({"path": str(png), "caption": caption})
        curves[feat] = _json_curves(found)
    return artifacts, curves, notes


def _mean_curve(curves: list[dict[str, Any]], key: str) -> list[float | None]:
    """Mean r per layer over subjects' curves (None where no subject has a value)."""
    rows = np.asarray([[np.nan if v is None else v for v in c["sets"][key]["mean_r"]] for c in curves], dtype=float)
    if rows.size == 0:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer no subject has: NaN, written None
        mean = np.nanmean(rows, axis=0)
    return [None if not np.isfinite(m) else round(float(m), 6) for m in mean]


def analysis_layer_curves(cfg: AnalysisConfig, by_subject: dict[str, dict[str, Any]], out_dir: Path) -> list[dict]:
    """``layer_curves.json`` at the analysis' root: every subject's curves and their mean over subjects
    (``mean_over_subjects``: mean r per layer over all targets and over the best ones, model and controls)."""
    features: dict[str, Any] = {}
    for sub, curves in sorted(by_subject.items()):
        for feat, c in curves.items():
            entry = features.setdefault(feat, {"layers": c["layers"], "subjects": {}})
            entry["subjects"][sub] = {"model": c["model"]["sets"], "best_layer": c["model"]["best_layer"],
                                      "baselines": {b: v["sets"] for b, v in c["baselines"].items()}}
    if not features:
        return []
    for feat, entry in features.items():
        curves = [by_subject[s][feat] for s in entry["subjects"]]
        names = sorted({b for c in curves for b in c["baselines"]})
        entry["mean_over_subjects"] = {
            "model": {key: _mean_curve([c["model"] for c in curves], key) for key in ("all", "top")},
            **{name: {key: _mean_curve([c["baselines"][name] for c in curves if name in c["baselines"]], key)
                      for key in ("all", "top")} for name in names}}
        spec = next((f for f in cfg.features if f.name == feat), None)
        entry["model"] = getattr(spec, "model", None)
        entry["kind"] = getattr(spec, "kind", None)
    path = out_dir / "layer_curves.json"
    path.write_text(json.dumps({"schema_version": LAYER_CURVE_SCHEMA, "analysis_id": cfg.analysis_id,
                                "dataset": {"id": cfg.dataset.dataset_id, "version": cfg.dataset.version},
                                "features": features}, indent=2, sort_keys=True))
    return [{"file": path, "kind": "layer_curve_json"}]
