"""Comparison of the analyses published for one dataset version: models x layers x subjects.

Beside the gallery (:mod:`pipelines.gallery`), for each ``{output}/<dataset>/<version>/`` that holds
published analyses, :func:`update_comparisons` writes

- ``comparison.json``: every (analysis, feature space, control, layer, subject) score the
  manifests record, as flat ``rows`` and as ``curves`` (one per analysis, feature and control:
  mean r per layer and subject, and their mean over subjects);
- ``comparison.html``: the same as a page (one table per curve, layers as columns).

Everything comes from the manifests' ``metrics`` (validated; an invalid manifest is left out and
named in ``problems``), so nothing but manifests is read. A version whose manifests are unchanged
(same keys and ETags as the ``analyses`` the current file records) is not written again; writes
are conditional on the ETag read, as the index's are.
"""
from __future__ import annotations

import html
import json
import logging
from typing import Any

import numpy as np

from ..manifest import read_manifest
from ..resultstore import Store, open_store
from .layer_curve import split_space

log = logging.getLogger("neuroflow")

__all__ = ["COMPARISON_SCHEMA", "COMPARISON_JSON", "COMPARISON_HTML", "comparison_rows", "build_comparison",
           "render_comparison_html", "update_comparisons"]

COMPARISON_SCHEMA = 1
COMPARISON_JSON = "comparison.json"
COMPARISON_HTML = "comparison.html"
ATTEMPTS = 4


def _number(value: Any) -> float | None:
    """A finite number as it is, anything else (absent, null, text in a manifest written by others) None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
        return value
    return None


def comparison_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (subject, fitted space) of a manifest: which feature, model, control and layer, and its scores.

    ``baseline`` is None for the model itself, else ``untrained``, ``shuffled`` or ``random_embedding``;
    ``layer`` is None for a space without layers. Spaces of no feature (``banded``) are left out.
    """
    specs = {f["name"]: f for f in manifest["feature_spaces"]}
    rows = []
    for subject, spaces in sorted(manifest["metrics"].items()):
        for name, m in sorted(spaces.items()):
            sp = split_space(name, list(specs))
            if sp is None:
                continue
            spec = specs[sp.feature]
            rows.append({"analysis_id": manifest["analysis_id"], "feature": sp.feature, "kind": spec.get("kind"),
                         "model": spec.get("model"), "baseline": sp.baseline, "layer": sp.layer, "space": name,
                         "subject": subject, "mean_r": _number(m.get("mean_r")),
                         "mean_r_normalised": _number(m.get("mean_r_normalised")), "n_valid": m.get("n_valid")})
    return rows


def _curves(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped into curves: per (analysis, feature, control), mean r per layer and subject."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["analysis_id"], row["feature"], row["baseline"] or ""), []).append(row)
    curves = []
    for (analysis_id, feature, baseline), members in sorted(groups.items()):
        layers = sorted({r["layer"] for r in members}, key=lambda k: (-1 if k is None else k))
        subjects = sorted({r["subject"] for r in members})
        table = {(r["subject"], r["layer"]): r for r in members}
        by_subject = {s: [table[(s, k)]["mean_r"] if (s, k) in table else None for k in layers] for s in subjects}
        norm = {s: [table[(s, k)]["mean_r_normalised"] if (s, k) in table else None for k in layers]
                for s in subjects}
        means = []
        for i in range(len(layers)):
            vals = [v[i] for v in by_subject.values() if v[i] is not None]
            means.append(round(float(np.mean(vals)), 6) if vals else None)
        best = max((m, k) for m, k in zip(means, layers) if m is not None)[1] if any(
            m is not None for m in means) else None
        curves.append({"analysis_id": analysis_id, "feature": feature, "kind": members[0]["kind"],
                       "model": members[0]["model"], "baseline": baseline or None, "layers": layers,
                       "mean_r": by_subject,
                       "mean_r_normalised": norm if any(v is not None for x in norm.values() for v in x) else None,
                       "mean_over_subjects": means, "best_layer": best})
    return curves


def build_comparison(dataset: str, version: str, manifests: list[tuple[str, str, dict[str, Any]]],
                     problems: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The comparison of one dataset version from its manifests ``[(relative key, ETag, manifest)]``."""
    rows = [row for _, _, m in manifests for row in comparison_rows(m)]
    return {
        "schema_version": COMPARISON_SCHEMA, "dataset": dataset, "version": version,
        "analyses": [{"analysis_id": m["analysis_id"], "manifest": rel, "manifest_etag": etag, "status": m["status"],
                      "subjects": m["subjects"], "finished": m["provenance"].get("finished")}
                     for rel, etag, m in sorted(manifests, key=lambda t: t[0])],
        "rows": rows, "curves": _curves(rows), "problems": list(problems or []),
    }


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


def render_comparison_html(comp: dict[str, Any]) -> str:
    """A static page: per curve (analysis, feature, control), mean r by layer for each subject and on average."""
    esc = html.escape
    blocks = []
    for c in comp["curves"]:
        layers = ["-" if k is None else str(k) for k in c["layers"]]
        head = "".join(f"<th>{esc(k)}</th>" for k in layers)
        body = "".join(f"<tr><td>sub-{esc(s)}</td>{''.join(f'<td class=num>{_fmt(v)}</td>' for v in vals)}</tr>"
                       for s, vals in sorted(c["mean_r"].items()))
        mean = "".join(f"<td class=num><b>{_fmt(v)}</b></td>" for v in c["mean_over_subjects"])
        what = esc(c["feature"]) + (f" <span class=ctl>{esc(c['baseline'])}</span>" if c["baseline"] else "")
        blocks.append(
            f"<h3>{esc(c['analysis_id'])}: {what}</h3><p class=meta>{esc(str(c['kind']))}"
            f"{' ' + esc(str(c['model'])) if c['model'] else ''} &middot; best layer "
            f"{esc(str(c['best_layer']))}</p><table><thead><tr><th>layer</th>{head}</tr></thead><tbody>{body}"
            f"<tr><td><b>mean</b></td>{mean}</tr></tbody></table>")
    n = len(comp["analyses"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>neuroflow: {esc(comp['dataset'])} {esc(comp['version'])}, models compared</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}
table{{border-collapse:collapse;margin-bottom:1rem}} th,td{{border-bottom:1px solid #ddd;padding:.3rem .6rem}}
th{{background:#f4f4f4}} td.num{{text-align:right;font-variant-numeric:tabular-nums}} .meta{{color:#555}}
.ctl{{background:#e5e7eb;border-radius:3px;padding:0 .3rem;font-size:.85em}}</style></head><body>
<h1>{esc(comp['dataset'])} {esc(comp['version'])}: held-out mean r by model, layer and subject</h1>
<p>{n} analys{'is' if n == 1 else 'es'}; the same numbers are in <a href="{COMPARISON_JSON}">{COMPARISON_JSON}</a>
(<code>rows</code>: one per analysis, feature, control, layer and subject). Controls (untrained weights, shuffled
words, random embeddings) are the feature's <code>baselines</code>.</p>
{''.join(blocks) or '<p>No scores published yet.</p>'}
</body></html>
"""


def _recorded(comp: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    if not isinstance(comp, dict) or comp.get("schema_version") != COMPARISON_SCHEMA:
        return None
    try:
        return sorted((a["manifest"], a["manifest_etag"]) for a in comp["analyses"])
    except (KeyError, TypeError):
        return None


def _update_one(store: Store, folder: str, dataset: str, version: str, entries: list[dict[str, Any]]) -> bool:
    """Write one version's comparison if its manifests changed; True when written."""
    rel_json, rel_html = f"{folder}/{COMPARISON_JSON}", f"{folder}/{COMPARISON_HTML}"
    wanted = sorted((e["manifest"], e["manifest_etag"]) for e in entries)
    for _ in range(ATTEMPTS):
        body, etag = store.get_with_etag(rel_json)
        try:
            current = json.loads(body) if body is not None else None
        except ValueError:
            current = None  # unreadable: replaced
        if _recorded(current) == wanted and store.exists(rel_html):
            return False
        manifests, problems = [], []
        for e in entries:
            try:
                manifests.append((e["manifest"], e["manifest_etag"], read_manifest(store.uri_of(e["manifest"]))))
            except Exception as err:  # noqa: BLE001 - one bad manifest must not hide the others
                problems.append({"manifest": e["manifest"], "error": f"{type(err).__name__}: {err}"[:500]})
        comp = build_comparison(dataset, version, manifests, problems)
        store.put_bytes(render_comparison_html(comp).encode(), rel_html, content_type="text/html; charset=utf-8")
        if store.put_if(rel_json, json.dumps(comp, indent=2, sort_keys=True).encode(), "application/json", etag):
            return True
    log.warning("comparison: %s kept changing while it was rebuilt; the next update tries again",
                store.uri_of(rel_json))
    return False


def update_comparisons(output_uri: str, index: dict[str, Any]) -> list[str]:
    """Rebuild ``comparison.json`` / ``.html`` of every dataset version in the gallery ``index``
    (:func:`pipelines.gallery.build_index`) whose manifests changed; returns the URIs written."""
    store = open_store(output_uri)
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in index.get("analyses", []):
        folder = e["manifest"].rsplit("/", 2)[0]  # <dataset>/<version>
        groups.setdefault((folder, e["dataset"], e["version"]), []).append(e)
    written = []
    for (folder, dataset, version), entries in sorted(groups.items()):
        if _update_one(store, folder, dataset, version, entries):
            written.append(store.uri_of(f"{folder}/{COMPARISON_JSON}"))
            log.info("comparison: wrote %s (%d analyses)", written[-1], len(entries))
    return written
