"""The index of published analyses at the output root: ``index.json`` and ``index.html``.

``update_index(output)`` lists every ``{output}/<dataset>/<version>/<analysis>/manifest.json``,
reads each (validated against the manifest schema; an invalid one is reported in
``problems`` and left out, never trusted) and writes

- ``{output}/index.json``: one entry per analysis (dataset, version, analysis id, status,
  subjects, feature spaces, best mean r, finished, relative links to manifest and report);
- ``{output}/index.html``: a static, self-contained gallery page linking every report.

Each object is written with one PUT, which S3 makes visible whole or not at all, so a reader
never sees half an index. ``index.json`` is written with a conditional put (``If-Match`` on
the ETag read at the start, ``If-None-Match: *`` when there was none): a writer whose view
is stale loses, lists again and retries, so two concurrent updates never drop an analysis.
An unchanged set of analyses writes nothing.
"""
from __future__ import annotations

import html
import json
import logging
from datetime import datetime, timezone
from typing import Any

from .compare.comparison import update_comparisons
from .errors import DatasetError
from .manifest import read_manifest
from .localstore import canonical_local_uri, is_local_uri
from .s3 import split_s3_uri
from .resultstore import Store, open_store

log = logging.getLogger("neuroflow")

INDEX_JSON = "index.json"
INDEX_HTML = "index.html"
INDEX_SCHEMA_VERSION = 1
ATTEMPTS = 8


def output_of(manifest_uri: str) -> str:
    """``s3://bucket/prefix/<ds>/<version>/<analysis>/manifest.json`` -> ``s3://bucket/prefix``
    (``file:///folder/<ds>/<version>/<analysis>/manifest.json`` -> ``file:///folder``)."""
    if is_local_uri(manifest_uri):
        parts = canonical_local_uri(manifest_uri, "the manifest URI")[len("file://"):].split("/")
        if len(parts) < 6 or parts[-1] != "manifest.json":
            raise DatasetError(f"{manifest_uri}: not a published manifest URI "
                               "({output}/<dataset>/<version>/<analysis>/manifest.json)")
        return "file://" + "/".join(parts[:-4])
    bucket, key = split_s3_uri(manifest_uri)
    parts = key.split("/")
    if len(parts) < 4 or parts[-1] != "manifest.json":
        raise DatasetError(f"{manifest_uri}: not a published manifest URI "
                           "({output}/<dataset>/<version>/<analysis>/manifest.json)")
    return f"s3://{bucket}" + ("/" + "/".join(parts[:-4]) if parts[:-4] else "")


def _manifest_keys(store: Store) -> dict[str, str]:
    """{relative key: ETag} of every published manifest (exactly <ds>/<version>/<analysis>/manifest.json)."""
    out = {}
    for obj in store.list():
        parts = obj.key.split("/")
        if len(parts) == 4 and parts[-1] == "manifest.json" and not parts[0].startswith("_"):
            out[obj.key] = obj.etag
    return out


def _entry(rel: str, etag: str, manifest: dict[str, Any]) -> dict[str, Any]:
    base = rel.rsplit("/", 1)[0]
    means = [v["mean_r"] for s in manifest["metrics"].values() for v in s.values() if v.get("mean_r") is not None]
    simulated = sorted(s for s, info in manifest.get("subject_info", {}).items() if info.get("simulated"))
    has_report = any(a["path"] == "report.html" for a in manifest["artifacts"])
    return {
        "dataset": manifest["dataset"]["id"], "version": manifest["dataset"]["version"],
        "source": manifest["dataset"]["source"], "analysis_id": manifest["analysis_id"],
        "status": manifest["status"], "subjects": manifest["subjects"], "simulated_subjects": simulated,
        "feature_spaces": [f["name"] for f in manifest["feature_spaces"]],
        "best_mean_r": max(means) if means else None,
        "finished": manifest["provenance"].get("finished"),
        "manifest": rel, "report": f"{base}/report.html" if has_report else None, "manifest_etag": etag,
    }


def build_index(output_uri: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index of every analysis published under `output_uri` (entries of `previous` whose
    manifest ETag is unchanged are reused rather than read again)."""
    store = open_store(output_uri)
    known = {e["manifest"]: e for e in (previous or {}).get("analyses", [])}
    analyses, problems = [], []
    for rel, etag in sorted(_manifest_keys(store).items()):
        old = known.get(rel)
        if old is not None and old.get("manifest_etag") == etag:
            analyses.append(old)
            continue
        try:
            analyses.append(_entry(rel, etag, read_manifest(store.uri_of(rel))))
        except Exception as err:  # noqa: BLE001 - one bad manifest must not hide the others
            log.warning("gallery: %s left out: %s", store.uri_of(rel), err)
            problems.append({"manifest": rel, "error": f"{type(err).__name__}: {err}"[:500]})
    analyses.sort(key=lambda e: (e["dataset"], e["version"], e["analysis_id"]))
    return {"schema_version": INDEX_SCHEMA_VERSION, "output": store.uri, "analyses": analyses,
            "problems": problems}


def _comparison_links(index: dict[str, Any]) -> str:
    """Links to each dataset version's model comparison (``<dataset>/<version>/comparison.html``)."""
    esc = html.escape
    versions = sorted({(e["manifest"].rsplit("/", 2)[0], e["dataset"], e["version"]) for e in index["analyses"]})
    items = "".join(f'<li><a href="{esc(folder, quote=True)}/comparison.html">{esc(ds)} {esc(ver)}</a> '
                    f'(<a href="{esc(folder, quote=True)}/comparison.json">JSON</a>)</li>'
                    for folder, ds, ver in versions)
    return f'<h2>Models compared (layers x subjects)</h2><ul id="comparisons">{items}</ul>' if items else ""


def render_html(index: dict[str, Any]) -> str:
    """A static gallery page: one row per analysis, linking its report and manifest."""
    esc = html.escape
    rows = []
    for e in index["analyses"]:
        report = (f'<a href="{esc(e["report"], quote=True)}">{esc(e["analysis_id"])}</a>'
                  if e.get("report") else esc(e["analysis_id"]))
        badge = (f' <span class="sim" title="simulated subjects">simulated: '
                 f'{esc(", ".join("sub-" + s for s in e["simulated_subjects"]))}</span>'
                 if e.get("simulated_subjects") else "")
        best = "n/a" if e.get("best_mean_r") is None else f"{e['best_mean_r']:.3f}"
        rows.append(
            f"<tr><td>{esc(e['dataset'])}</td><td>{esc(e['version'])}</td><td>{report}{badge}</td>"
            f"<td class=\"{esc(e['status'])}\">{esc(e['status'])}</td>"
            f"<td>{esc(', '.join('sub-' + s for s in e['subjects']))}</td>"
            f"<td>{esc(', '.join(e['feature_spaces']))}</td><td class=\"num\">{best}</td>"
            f"<td>{esc(str(e.get('finished') or ''))}</td>"
            f"<td><a href=\"{esc(e['manifest'], quote=True)}\">manifest.json</a></td></tr>")
    problems = "".join(f"<li><code>{esc(p['manifest'])}</code>: {esc(p['error'])}</li>" for p in index["problems"])
    n = len(index["analyses"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>neuroflow: published analyses</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}
table{{border-collapse:collapse;width:100%}} th,td{{border-bottom:1px solid #ddd;padding:.4rem .6rem;text-align:left}}
th{{background:#f4f4f4}} td.num{{text-align:right;font-variant-numeric:tabular-nums}}
td.partial{{color:#a60}} .sim{{background:#fde68a;border-radius:3px;padding:0 .3rem;font-size:.8em}}
</style></head><body>
<h1>neuroflow: published analyses</h1>
<p>{n} analys{'is' if n == 1 else 'es'} under <code>{esc(index['output'])}</code>. Each row links the
analysis report; its <code>manifest.json</code> lists every artifact with its sha256.</p>
<table id="analyses"><thead><tr><th>dataset</th><th>version</th><th>analysis</th><th>status</th><th>subjects</th>
<th>feature spaces</th><th>best mean r</th><th>finished</th><th>manifest</th></tr></thead>
<tbody>
{chr(10).join(rows) or '<tr><td colspan="9">nothing published yet</td></tr>'}
</tbody></table>
{_comparison_links(index)}
{'<h2>Left out (invalid manifests)</h2><ul>' + problems + '</ul>' if problems else ''}
</body></html>
"""


def _comparisons(output_uri: str, index: dict[str, Any]) -> list[str]:
    """Each dataset version's model comparison (:mod:`pipelines.compare.comparison`), refreshed after the
    index; derived data, so a failure is logged and left to the next update."""
    try:
        return update_comparisons(output_uri, index)
    except Exception as err:  # noqa: BLE001 - derived data, rebuilt by the next update
        log.warning("gallery: the model comparisons at %s were not updated (%s)", output_uri, err)
        return []


def _read_index(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    body, etag = store.get_with_etag(INDEX_JSON)
    if body is None:
        return None, None
    try:
        return json.loads(body), etag
    except ValueError:
        return None, etag  # unreadable: replaced (conditionally) by a fresh one


def _put_conditional(store: Store, rel: str, body: bytes, content_type: str, etag: str | None) -> bool:
    return store.put_if(rel, body, content_type, etag)


def update_index(output_uri: str) -> dict[str, Any]:
    """Rebuild ``index.json`` and ``index.html`` at `output_uri`; returns where and how many."""
    store = open_store(output_uri)
    for _ in range(ATTEMPTS):
        previous, etag = _read_index(store)
        index = build_index(output_uri, previous)
        page = render_html(index).encode()
        same = (previous is not None and previous.get("analyses") == index["analyses"]
                and previous.get("problems") == index["problems"])
        result = {"index_uri": store.uri_of(INDEX_JSON), "html_uri": store.uri_of(INDEX_HTML),
                  "n_analyses": len(index["analyses"]), "n_problems": len(index["problems"]),
                  "analyses": [e["manifest"] for e in index["analyses"]], "changed": not same}
        if same:
            # the page is a pure function of the index: put it back if a stale writer replaced it
            if not store.exists(INDEX_HTML) or store.get_bytes(INDEX_HTML) != page:
                store.put_bytes(page, INDEX_HTML, content_type="text/html; charset=utf-8")
            log.info("gallery: %s is up to date (%d analyses)", result["index_uri"], result["n_analyses"])
            result["comparisons"] = _comparisons(output_uri, index)
            return result
        index["generation"] = int((previous or {}).get("generation", 0)) + 1
        index["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        store.put_bytes(page, INDEX_HTML, content_type="text/html; charset=utf-8")
        body = json.dumps(index, indent=2, sort_keys=True).encode()
        if _put_conditional(store, INDEX_JSON, body, "application/json", etag):
            log.info("gallery: wrote %s (%d analyses, generation %d)", result["index_uri"],
                     result["n_analyses"], index["generation"])
            result["comparisons"] = _comparisons(output_uri, index)
            return result
        log.info("gallery: %s changed while it was rebuilt; listing again", result["index_uri"])
    raise DatasetError(f"{store.uri_of(INDEX_JSON)}: other writers kept updating the index "
                       f"({ATTEMPTS} attempts); the next run of neuroflow_maps_consumer tries again")
