"""The group level's published files under ``sub-group/``: maps, ROI tables, a JSON record, a page.

Called by publish with the group step's record (:func:`pipelines.group.step.group_level`); every
file it writes is returned as an artifact (path, kind, subject ``group``) for the manifest.
"""
from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from ..cache import load_npz
from ..config import AnalysisConfig
from ..stats import normalise_by_ceiling
from .roi import ROI_COLUMNS
from .srm_step import SUMMARY_COLUMNS, render_srm, summary_rows

__all__ = ["GROUP", "group_line", "isc_ceilings", "manifest_record", "render_group", "with_isc_ceiling"]

GROUP = "group"  # the subject label of group results: sub-group/
STATS = ("mean_r", "t", "p", "q", "p_max", "significant")

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}td.num{text-align:right}
img{max-width:100%}.meta{color:#555}</style></head>
<body>
<h1>{{ title }}</h1>
<p class="meta"><a href="../report.html">&larr; the analysis</a></p>
{% if status != "ok" %}
<p><strong>No group map.</strong> {{ reason }}</p>
{% else %}
<p>{{ n_subjects }} subjects ({{ subjects|join(", ") }}) in a common space: {{ how }}.
Group r is the Fisher-z mean of the subjects' held-out r; p is a one-sided sign-flip permutation test across
subjects ({{ method }}); significant: {{ correction }}.</p>
<h2>Feature spaces</h2>
<table><thead><tr><th>Feature space</th><th>Mean group r</th><th>Max group r</th><th>Targets</th>
<th>Significant</th><th>Sign patterns</th></tr></thead><tbody>
{% for f in features %}<tr><td>{{ f.name }}</td><td class="num">{{ f.mean_r }}</td><td class="num">{{ f.max_r }}</td>
<td class="num">{{ f.n_targets }}</td><td class="num">{{ f.n_significant }}</td>
<td class="num">{{ f.n_permutations }}</td></tr>
{% endfor %}</tbody></table>
{% for im in images %}<figure><img src="{{ im.uri }}" alt="{{ im.caption }}">
<figcaption>{{ im.caption }}</figcaption></figure>
{% endfor %}
{% for v in viewers %}<p><a href="{{ v.href }}"><strong>Open the interactive viewer</strong></a>
&middot; {{ v.caption }}</p>
{% endfor %}
<h2>Inter-subject ceilings</h2>
<p>{{ isc_line }}</p>
<h2>Regions</h2>
{% if roi_rows %}
<p>Atlas: {{ roi_source }}. Subject rows: the mean r over the region's targets; group rows: the Fisher-z mean of
the subjects' values, sign-flip p across subjects, q (BH over regions), p_max (max-statistic).</p>
<table><thead><tr>{% for c in roi_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in roi_rows %}<tr>{% for v in row %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% else %}<p>{{ roi_reason }}</p>{% endif %}
{% endif %}
{% if srm_rows %}
<h2>Cross-subject encoding (shared response model)</h2>
<p>{{ srm_line }}</p>
<table><thead><tr>{% for c in srm_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead><tbody>
{% for row in srm_rows %}<tr>{% for v in row %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endif %}
</body></html>
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return "n/a" if v is None else str(v)


def group_line(group: dict) -> str:
    """One line about the group level for the analysis' report and logs."""
    if group.get("status") != "ok":
        return f"no group map: {group.get('reason', 'not computed')}"
    sig = ", ".join(f"{f}: {m['n_significant']} of {m['n_targets']} targets significant"
                    for f, m in sorted(group["metrics"].items()))
    return f"{group['n_subjects']} subjects, {group['how']}; {sig}"


def _srm_line(srm: dict) -> str:
    if srm.get("status") != "ok":
        return ""
    return (f"brainiak's SRM with {srm['features']} shared dimensions ({srm['iterations']} iterations), fitted for "
            f"each held-out subject and each of {srm['n_folds']} fold(s) on the other subjects' training runs only; "
            "the ridge model of the shared responses predicts the held-out runs through the subject's own map "
            "(fitted on its training runs). r_srm: that prediction's r per target; r_own: the subject's own "
            "model; diff: r_srm - r_own; r_shared: r in the shared space. Maps: each subject's desc-*SRM maps.")


def isc_ceilings(group: dict | None, arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Per subject: its inter-subject ceiling r_max in its own target order (empty when there is none)."""
    if not group or group.get("status") != "ok" or group.get("isc", {}).get("status") != "ok" or arrays is None:
        return {}
    return {k[len("isc_own__"):]: v for k, v in arrays.items() if k.startswith("isc_own__")}


def with_isc_ceiling(arrays: dict[str, np.ndarray], metrics: dict[str, dict], r_max: np.ndarray,
                     ) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """A subject's arrays and metrics with ``<space>__rnorm`` = r / inter-subject ceiling (where it
    has no ceiling of its own), as :func:`pipelines.steps.fit_subject` adds for repeats."""
    arrays, metrics = dict(arrays), {k: dict(v) for k, v in metrics.items()}
    arrays["noise_ceiling_r_max"] = r_max.astype(np.float32)
    for key in [k for k in arrays if k.endswith("__r")]:
        name = key[:-3]
        if f"{name}__rnorm" in arrays or name not in metrics:
            continue
        rnorm = normalise_by_ceiling(arrays[key], r_max).astype(np.float32)
        arrays[f"{name}__rnorm"] = rnorm
        finite = rnorm[np.isfinite(rnorm) & arrays[f"{name}__valid"].astype(bool)]
        metrics[name]["mean_r_normalised"] = round(float(finite.mean()), 6) if finite.size else None
        metrics[name]["n_with_ceiling"] = int(finite.size)
        metrics[name]["ceiling"] = "inter-subject"
    return arrays, metrics


def manifest_record(group: dict) -> dict:
    """The manifest's ``group`` entry: status, reason or space, subjects, metrics, ceilings, regions."""
    out = {k: group[k] for k in ("status", "reason", "kind", "space", "how", "subjects", "n_subjects",
                                 "n_targets", "metrics") if k in group}
    if "isc" in group:
        out["isc"] = {k: v for k, v in group["isc"].items()}
    if "roi" in group:
        out["roi"] = {k: v for k, v in group["roi"].items() if k != "table_rel"}
    if "srm" in group:
        out["srm"] = {k: v for k, v in group["srm"].items() if k not in ("result_rel", "fits")}
    return out


def _viewer(cfg: AnalysisConfig, group: dict, arrays: dict[str, np.ndarray], mask_img, feat: str, sub_dir: Path,
            artifacts: list[dict], viewers: list[dict]) -> None:
    """The interactive viewer of a feature space's group r (:mod:`pipelines.viewers`), linked from the page."""
    from ..maps import bids_map_name
    from ..viewers import VIEWER_KIND, feature_viewers, viewer_name

    if not cfg.maps.viewers.enabled:
        return
    desc = "".join(ch for ch in feat if ch.isalnum())
    name = viewer_name(bids_map_name(GROUP, cfg.dataset.task, group.get("space"), desc, "meanr", ".nii.gz"))
    path, caption = feature_viewers(group["kind"], arrays, mask_img, f"{feat}__mean_r", sub_dir / "viewers" / name,
                                    title=f"group {feat}: Fisher-z mean r", threshold=cfg.maps.viewers.threshold,
                                    space=group.get("space"), n_vertices=group.get("n_vertices"))
    if path is not None:
        artifacts.append({"file": path, "kind": VIEWER_KIND, "subject": GROUP, "feature_space": feat,
                          "stat": "mean_r"})
        viewers.append({"href": f"viewers/{path.name}", "caption": f"{feat}: {caption}"})


def _maps(cfg: AnalysisConfig, group: dict, arrays: dict[str, np.ndarray], mask_img, sub_dir: Path,
          fig_dir: Path, viewers: list[dict]) -> tuple[list[dict], list[dict]]:
    # maps imports matplotlib and nilearn (heavy): loaded only when drawing
    from ..maps import (bids_map_name, render_slices_png, render_surface_png, render_targets_png,
                        write_surface_map, write_target_table, write_volume_map)

    task, space, kind = cfg.dataset.task, group.get("space"), group["kind"]
    names = [str(n) for n in arrays["target_names"]]
    artifacts, images = [], []
    per_feature = {f: {s: arrays[f"{f}__{s}"] for s in STATS} for f in sorted(group["metrics"])}
    if "isc__r_max" in arrays:
        with warnings.catch_warnings():  # targets with no ceiling in any subject: NaN, as meant
            warnings.simplefilter("ignore", RuntimeWarning)
            per_feature["isc"] = {"rmax": np.nanmean(arrays["isc__r_max"], axis=0).astype(np.float32)}
    for feat, stats in per_feature.items():
        desc = "".join(ch for ch in feat if ch.isalnum())
        first = None
        if kind == "volume":
            for stat, values in stats.items():
                path = sub_dir / bids_map_name(GROUP, task, space, desc, stat.replace("_", ""), ".nii.gz")
                write_volume_map(values.astype(np.float32), mask_img, path)
                artifacts.append({"file": path, "kind": "statmap_nifti", "subject": GROUP, "feature_space": feat,
                                  "stat": stat})
                first = first or path
            png = fig_dir / Path(first.name.replace("_statmap.nii.gz", "_slices.png"))
            render_slices_png(first, png, f"group {feat}: {'Fisher-z mean r' if feat != 'isc' else 'ceiling'}")
        elif kind == "surface":
            hemi, vertex = arrays["info__hemi"].astype(str), arrays["info__vertex"].astype(np.int64)
            by_hemi = {}
            for h in sorted(set(hemi)):
                rows = hemi == h
                for stat, values in stats.items():
                    name = bids_map_name(GROUP, task, space, desc, stat.replace("_", ""), ".func.gii").replace(
                        f"sub-{GROUP}_task-{task}_", f"sub-{GROUP}_task-{task}_hemi-{h}_")
                    path = write_surface_map(values[rows].astype(np.float32), vertex[rows], group["n_vertices"][h]
                                             if "n_vertices" in group else int(vertex.max()) + 1, sub_dir / name)
                    artifacts.append({"file": path, "kind": "statmap_gifti", "subject": GROUP,
                                      "feature_space": feat, "stat": stat})
                full = np.full(group.get("n_vertices", {}).get(h, int(vertex.max()) + 1), np.nan, dtype=np.float32)
                full[vertex[rows]] = next(iter(stats.values()))[rows]
                by_hemi[h] = full
            png = render_surface_png(by_hemi, fig_dir / f"sub-{GROUP}_task-{task}_desc-{desc}_surface.png",
                                     f"group {feat}")
        else:
            path = sub_dir / bids_map_name(GROUP, task, space, desc, "r", ".tsv")
            columns = {s: v for s, v in stats.items()}
            if feat != "isc":
                for i, sub in enumerate(arrays["subjects"]):
                    columns[f"r_sub-{sub}"] = arrays[f"{feat}__subject_r"][i]
            else:
                for i, sub in enumerate(arrays["subjects"]):
                    columns[f"rmax_sub-{sub}"] = arrays["isc__r_max"][i]
            write_target_table(columns, names, path)
            artifacts.append({"file": path, "kind": "statmap_tsv", "subject": GROUP, "feature_space": feat,
                              "stat": ",".join(columns)})
            png = render_targets_png(names, next(iter(stats.values())), fig_dir / f"sub-{GROUP}_task-{task}_desc-"
                                     f"{desc}_bar.png", f"group {feat}")
        if feat != "isc":
            _viewer(cfg, group, arrays, mask_img, feat, sub_dir, artifacts, viewers)
        if png is not None:
            artifacts.append({"file": png, "kind": "figure_png", "subject": GROUP, "feature_space": feat})
            images.append({"path": png, "caption": f"{feat}: " + ("mean inter-subject ceiling" if feat == "isc"
                                                                  else "group r (Fisher-z mean across subjects)")})
    return artifacts, images


def render_group(cfg: AnalysisConfig, group: dict, store, out_dir: Path) -> tuple[list[dict], dict]:
    """Write ``sub-group/`` into `out_dir`; return (artifacts, the report's ``group`` entry)."""
    import nibabel as nib  # volumes' mask; nibabel is loaded by publish already

    sub_dir = out_dir / f"sub-{GROUP}"
    fig_dir = sub_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    artifacts: list[dict] = []
    images: list[dict] = []
    roi_rows: list[list[str]] = []
    viewers: list[dict] = []  # {"href", "caption"}: the interactive viewers' pages, beside this one
    if group["status"] == "ok":
        arrays = load_npz(store.get_bytes(group["result_rel"]))
        mask_img = None
        if group.get("mask_rel"):
            img = nib.load(str(store.download(group["mask_rel"], out_dir / ".work" / "group-mask.nii.gz")))
            mask_img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
        artifacts, images = _maps(cfg, group, arrays, mask_img, sub_dir, fig_dir, viewers)
        if group["roi"]["status"] == "ok":
            rows = json.loads(store.get_bytes(group["roi"]["table_rel"]))
            table = pd.DataFrame(rows, columns=ROI_COLUMNS)
            stem = sub_dir / f"sub-{GROUP}_task-{cfg.dataset.task}_desc-roi_summary"
            table.to_csv(f"{stem}.tsv", sep="\t", index=False, na_rep="n/a", float_format="%.6g")
            Path(f"{stem}.json").write_text(json.dumps({"atlas": group["roi"]["source"], "columns": ROI_COLUMNS,
                                                        "rows": rows}, indent=1, sort_keys=True))
            artifacts += [{"file": Path(f"{stem}.tsv"), "kind": "roi_tsv", "subject": GROUP},
                          {"file": Path(f"{stem}.json"), "kind": "roi_json", "subject": GROUP}]
            roi_rows = [[_fmt(v) for v in row] for row in table.itertuples(index=False)]
    srm = group.get("srm", {"status": "off"})
    artifacts += render_srm(cfg, srm, store, out_dir)
    record = sub_dir / "group.json"
    record.write_text(json.dumps(manifest_record(group), indent=1, sort_keys=True))
    artifacts.append({"file": record, "kind": "group_json", "subject": GROUP})
    isc = group.get("isc", {})
    isc_line = (f"Leave-one-subject-out, over {isc.get('n_samples')} samples of {', '.join(isc.get('stories', []))}; "
                f"kept where p <= {isc.get('reliability')} (circular shifts): {isc.get('n_with_ceiling')} of "
                f"{isc.get('n_tested')} subject-targets, mean r_max {_fmt(isc.get('mean_r_max'))} (raw LOSO r "
                f"{_fmt(isc.get('mean_r_loso'))}); each subject's rnorm maps use it."
                if isc.get("status") == "ok" else f"None: {isc.get('reason', 'not asked for (group.isc_ceiling)')}")
    page = sub_dir / "report.html"
    metrics = group.get("metrics", {})
    html = _ENV.from_string(_PAGE).render(
        title=f"neuroflow: {cfg.dataset.dataset_id} {cfg.dataset.version} — group level", status=group["status"],
        reason=group.get("reason", ""), n_subjects=group.get("n_subjects"), subjects=group.get("subjects", []),
        how=group.get("how", ""), method=(f"{next(iter(metrics.values()))['n_permutations']} sign patterns, "
                                          f"{'all of them' if next(iter(metrics.values()))['exact'] else 'drawn'}"
                                          if metrics else ""),
        correction=(f"BH-FDR q <= {cfg.group.q}" if cfg.group.correction == "fdr"
                    else f"max-statistic p <= {cfg.group.q}"),
        features=[{"name": f, **{k: _fmt(m.get(k)) for k in ("mean_r", "max_r", "n_targets", "n_significant",
                                                             "n_permutations")}} for f, m in sorted(metrics.items())],
        images=[{"uri": "data:image/png;base64," + base64.b64encode(Path(im["path"]).read_bytes()).decode(),
                 "caption": im["caption"]} for im in images],
        isc_line=isc_line, roi_rows=roi_rows, viewers=viewers, roi_columns=ROI_COLUMNS,
        srm_rows=[[_fmt(v) for v in row.values()] for row in summary_rows(srm)] if srm.get("status") == "ok" else [],
        srm_columns=SUMMARY_COLUMNS, srm_line=_srm_line(srm),
        roi_source=group.get("roi", {}).get("source", ""), roi_reason=group.get("roi", {}).get("reason", ""))
    page.write_text(html)
    artifacts.append({"file": page, "kind": "group_report_html", "subject": GROUP})
    return artifacts, {"page": f"sub-{GROUP}/report.html", "line": group_line(group)}
