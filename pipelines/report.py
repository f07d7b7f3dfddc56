"""The HTML report of an analysis: one self-contained page, or an index and one page per subject.

Each page embeds its pictures as base64 ``data:`` URIs and carries its own CSS, so it can be
opened from disk, mailed or served from any bucket without the files next to it. All text that
comes from users (dataset ids, labels, captions, config, provenance) is escaped by jinja2's
autoescaping.

Up to :data:`INDEX_ABOVE_SUBJECTS` subjects, :func:`render_report` writes the whole analysis on
one page. A cohort past that (Narratives: 345 subjects) gets :func:`render_report_pages`: an
index page (the cohort's summary and one row per subject, failed ones included, each linking
its page) and one page per subject holding only that subject's scores and pictures, so every
subject page's size is bounded whatever the cohort's size and no page is rendered with all the
cohort's pictures in memory.
"""
from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from pipelines.errors import IntegrityError, NeuroflowError

__all__ = ["INDEX_ABOVE_SUBJECTS", "render_report", "render_report_pages"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_METRIC_KEYS = ("mean_r", "median_r", "max_r", "n_targets", "n_valid")
INDEX_ABOVE_SUBJECTS = 20  # more subjects than this: an index page and one page per subject
_PAGE_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*\.html")

_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; background: #b35900; color: #fff; border-radius: 3px;
         padding: 0 0.4em; font-size: 0.8em; font-weight: bold; text-transform: uppercase; }
figure { margin: 0.5em 0 1.5em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
a { color: #0550ae; }
td.err { color: #8a1c1c; max-width: 30em; }
p.warn { background: #fff4e5; border-left: 4px solid #b35900; padding: 0.3em 0.6em; }
p.viewer a { font-weight: bold; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
</style>
</head>
"""

#: The end of every page with a config: the config as resolved and the provenance table.
_FOOT = """<h2>Configuration</h2>
<pre>{{ config_yaml }}</pre>

<h2>Provenance</h2>
<table>
<tbody>
{% for key, value in provenance %}
<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}
</tbody>
</table>
</body>
</html>
"""

#: The dataset line, and the notices of an analysis (simulated subjects, warnings, its group level),
#: the same on the one-page report and on the cohort's index.
_META = """<p class="meta">
Dataset <strong>{{ dataset.id }}</strong> version <strong>{{ dataset.version }}</strong>
{%- if dataset.source %} (source: {{ dataset.source }}){% endif %}
&middot; analysis <strong>{{ analysis_id }}</strong>
</p>
"""

_NOTICES = """{% if any_simulated %}
<p><span class="badge">simulated</span> Subjects marked simulated carry synthetic data, not recordings.</p>
{% endif %}
{% for w in warnings %}
<p class="warn">Warning: {{ w }}</p>
{% endfor %}

{% if group %}
<p class="meta"><strong>Group level</strong>: {% if group.page %}<a href="{{ group.page }}">sub-group</a> &middot; {% endif %}{{ group.line }}</p>
{% endif %}
"""

#: one feature space's pictures and viewer links (in the one-page report and a subject's page)
_SPACE = """{% for im in fs.images %}
<figure>
<img src="{{ im.data_uri }}" alt="{{ im.caption }}">
<figcaption>{{ im.caption }}</figcaption>
</figure>
{% else %}
<p>No pictures.</p>
{% endfor %}
{% for v in fs.viewers %}
<p class="viewer"><a href="{{ v.href }}">Open the interactive viewer</a> &middot; {{ v.caption }}</p>
{% endfor %}
{% if fs.viewer_note %}<p class="meta">{{ fs.viewer_note }}</p>{% endif %}
"""

_TEMPLATE = _HEAD + """<body>
<h1>{{ title }}</h1>
""" + _META + _NOTICES + """
<h2>Summary</h2>
<table>
<thead><tr><th>Subject</th><th>Feature space</th><th>Mean r</th><th>Median r</th><th>Max r</th>
<th>N targets</th><th>N valid</th></tr></thead>
<tbody>
{% for s in subjects %}{% for fs in s.feature_spaces %}
<tr><td>{{ s.label }}{% if s.simulated %} <span class="badge">simulated</span>{% endif %}</td>
<td>{{ fs.name }}</td>
{% for m in fs.metrics_text %}<td class="num">{{ m }}</td>{% endfor %}</tr>
{% endfor %}{% endfor %}
</tbody>
</table>

{% for s in subjects %}
<h2 id="sub-{{ loop.index }}">Subject {{ s.label }}{% if s.simulated %} <span class="badge">simulated</span>{% endif %}</h2>
{% for fs in s.feature_spaces %}
<h3>{{ fs.name }}</h3>
""" + _SPACE + """{% endfor %}
{% endfor %}

""" + _FOOT

_INDEX_TEMPLATE = _HEAD + """<body>
<h1>{{ title }}</h1>
""" + _META + _NOTICES + """<h2>Cohort</h2>
<p>{{ n_subjects }} subjects: {{ n_ok }} fitted{% if n_failed %}, <strong>{{ n_failed }} failed</strong>{% endif %}.
Each subject's scores and pictures are on its own page (linked below).</p>
<table>
<thead><tr><th>Feature space</th><th>Subjects</th><th>Mean of mean r</th><th>Median of mean r</th>
<th>Min mean r</th><th>Max mean r</th><th>Max r (any subject)</th></tr></thead>
<tbody>
{% for fs in cohort %}
<tr><td>{{ fs.name }}</td>{% for m in fs.cells %}<td class="num">{{ m }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>

<h2>Subjects</h2>
<table>
<thead><tr><th>Subject</th><th>Status</th><th>N targets</th>
{% for name in space_names %}<th>{{ name }}: mean r</th><th>{{ name }}: max r</th>{% endfor %}
<th>Page</th></tr></thead>
<tbody>
{% for s in rows %}
<tr id="sub-{{ s.label }}"><td>{{ s.label }}{% if s.simulated %} <span class="badge">simulated</span>{% endif %}</td>
{% if s.ok %}
<td>ok</td><td class="num">{{ s.n_targets }}</td>
{% for m in s.cells %}<td class="num">{{ m }}</td>{% endfor %}
<td><a href="{{ s.page }}">sub-{{ s.label }}</a></td>
{% else %}
<td>failed</td><td class="err" colspan="{{ 2 + 2 * space_names|length }}">{{ s.error }}</td>
{% endif %}
</tr>
{% endfor %}
</tbody>
</table>

""" + _FOOT

_SUBJECT_TEMPLATE = _HEAD + """<body>
<p><a href="{{ index }}">&larr; all subjects</a> &middot; <a href="{{ config }}">configuration</a></p>
<h1>{{ title }}</h1>
""" + _META + """
{% if s.simulated %}
<p><span class="badge">simulated</span> This subject carries synthetic data, not recordings.</p>
{% endif %}
<table>
<thead><tr><th>Feature space</th><th>Mean r</th><th>Median r</th><th>Max r</th>
<th>N targets</th><th>N valid</th></tr></thead>
<tbody>
{% for fs in s.feature_spaces %}
<tr><td>{{ fs.name }}</td>{% for m in fs.metrics_text %}<td class="num">{{ m }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% for fs in s.feature_spaces %}
<h2>{{ fs.name }}</h2>
""" + _SPACE + """{% endfor %}
</body>
</html>
"""

_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _png_data_uri(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise NeuroflowError(f"report image {path} does not exist")
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise IntegrityError(f"report image {path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _fmt_metric(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key.startswith("n_"):
        try:
            return str(int(value))
        except (TypeError, ValueError):
            return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _get(mapping: dict, key: str, where: str) -> Any:
    try:
        return mapping[key]
    except (KeyError, TypeError) as err:
        raise NeuroflowError(f"report is missing key '{key}' in {where}") from err


def _viewer_href(path: str | Path, page_dir: Path, where: str) -> str:
    """A viewer page's link from the page in `page_dir`: relative, and inside the analysis' folder."""
    path = Path(path)
    if not path.is_file():
        raise NeuroflowError(f"report viewer page {path} ({where}) does not exist")
    href = Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()
    if not _PAGE_PATH.fullmatch(href) or ".." in href.split("/"):
        raise NeuroflowError(f"report viewer page {path} ({where}) is not inside the report's folder {page_dir}")
    return href


def _subject_view(subj: dict, where: str, page_dir: Path | None = None) -> dict:
    """One subject's label, simulated flag and feature spaces with metrics as text, pictures embedded
    and interactive viewers linked (relative to `page_dir`, the folder of the page that links them)."""
    spaces = []
    for j, fs in enumerate(_get(subj, "feature_spaces", where)):
        fwhere = f"{where}.feature_spaces[{j}]"
        metrics = _get(fs, "metrics", fwhere)
        spaces.append({
            "name": str(_get(fs, "name", fwhere)),
            "metrics_text": [_fmt_metric(k, metrics.get(k)) for k in _METRIC_KEYS],
            "images": [
                {"data_uri": _png_data_uri(_get(im, "path", f"{fwhere}.images[{k}]")),
                 "caption": str(im.get("caption", ""))}
                for k, im in enumerate(fs.get("images", []))
            ],
            "viewers": [
                {"href": _viewer_href(_get(v, "path", f"{fwhere}.viewers[{k}]"), page_dir or Path("."),
                                      f"{fwhere}.viewers[{k}]"),
                 "caption": str(v.get("caption", ""))}
                for k, v in enumerate(fs.get("viewers", []))
            ],
            "viewer_note": str(fs.get("viewer_note", "")),
        })
    return {"label": str(_get(subj, "label", where)), "simulated": bool(subj.get("simulated", False)),
            "feature_spaces": spaces}


def _page_header(report: dict) -> dict:
    """What every page of an analysis shows at its top: title, dataset, analysis id."""
    dataset = _get(report, "dataset", "report")
    return {"title": str(_get(report, "title", "report")),
            "dataset": {"id": str(_get(dataset, "id", "dataset")),
                        "version": str(_get(dataset, "version", "dataset")),
                        "source": str(dataset.get("source") or "")},
            "analysis_id": str(_get(report, "analysis_id", "report")),
            "group": report.get("group")}  # {"page", "line"}: the group level's page and one line about it


def _provenance(report: dict) -> list[tuple[str, str]]:
    return [(str(k), _fmt_value(v)) for k, v in (report.get("provenance") or {}).items()]


def _write_atomic(path: Path, html: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(html)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def render_report(report: dict, path: str | Path) -> Path:
    """Write one self-contained HTML page for an analysis.

    Parameters
    ----------
    report : dict
        ``{"title", "dataset": {"id", "version", "source"}, "analysis_id", "config_yaml",
        "provenance": dict, "subjects": [{"label", "simulated", "feature_spaces": [{"name",
        "metrics": {"mean_r", "median_r", "max_r", "n_targets", "n_valid"},
        "images": [{"path", "caption"}], "viewers": [{"path", "caption"}], "viewer_note"}]}]}``.
        Image paths are local PNG files; they are read and embedded, so they may be deleted
        afterwards. Viewer paths are local HTML pages inside the report's folder (published beside
        it): each is linked, relative to the page (optional, as is ``viewer_note``, the reason a
        feature space has none).
    path : str or Path
        Output HTML file (written atomically).

    Returns
    -------
    Path
        The written file.
    """
    subjects = [_subject_view(subj, f"subjects[{i}]", Path(path).parent)
                for i, subj in enumerate(_get(report, "subjects", "report"))]
    html = _ENV.from_string(_TEMPLATE).render(
        **_page_header(report),
        any_simulated=any(s["simulated"] for s in subjects),
        subjects=subjects,
        config_yaml=str(report.get("config_yaml", "")),
        provenance=_provenance(report),
        warnings=[str(w) for w in report.get("warnings") or []],
    )
    return _write_atomic(Path(path), html)


def _cohort_rows(subjects: list[dict], failed: list[dict]) -> tuple[list[str], list[dict], list[dict]]:
    """Feature space names, the cohort summary per feature space, one row per subject (sorted by label)."""
    names: list[str] = []
    for subj in subjects:
        for fs in subj["feature_spaces"]:
            if fs["name"] not in names:
                names.append(fs["name"])
    cohort = []
    for name in names:
        means = [float(fs["metrics"]["mean_r"]) for s in subjects for fs in s["feature_spaces"]
                 if fs["name"] == name and fs["metrics"].get("mean_r") is not None
                 and not math.isnan(float(fs["metrics"]["mean_r"]))]
        maxes = [float(fs["metrics"]["max_r"]) for s in subjects for fs in s["feature_spaces"]
                 if fs["name"] == name and fs["metrics"].get("max_r") is not None
                 and not math.isnan(float(fs["metrics"]["max_r"]))]
        ordered = sorted(means)
        median = None
        if ordered:
            mid = len(ordered) // 2
            median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        cohort.append({"name": name, "cells": [
            str(len(means)), _fmt_metric("mean", sum(means) / len(means) if means else None),
            _fmt_metric("median", median), _fmt_metric("min", min(means, default=None)),
            _fmt_metric("max", max(means, default=None)), _fmt_metric("max", max(maxes, default=None))]})
    rows = []
    for i, subj in enumerate(subjects):
        by_name = {fs["name"]: fs["metrics"] for fs in subj["feature_spaces"]}
        cells = []
        for name in names:
            m = by_name.get(name, {})
            cells += [_fmt_metric("mean_r", m.get("mean_r")), _fmt_metric("max_r", m.get("max_r"))]
        n_targets = next((m.get("n_targets") for m in by_name.values() if m.get("n_targets") is not None), None)
        page = str(_get(subj, "page", f"subjects[{i}]"))
        if not _PAGE_PATH.fullmatch(page) or ".." in page.split("/"):
            raise NeuroflowError(f"report subjects[{i}] page {page!r} is not a relative .html path inside the "
                                 "analysis")
        rows.append({"label": str(subj["label"]), "simulated": bool(subj.get("simulated", False)), "ok": True,
                     "n_targets": _fmt_metric("n_targets", n_targets), "cells": cells, "page": page})
    for i, fail in enumerate(failed):
        rows.append({"label": str(_get(fail, "label", f"failed[{i}]")), "simulated": False, "ok": False,
                     "error": str(fail.get("error", "failed"))[:500]})
    rows.sort(key=lambda r: r["label"])
    return names, cohort, rows


def render_report_pages(report: dict, index_path: str | Path) -> list[tuple[Path, str | None]]:
    """Write an index page and one self-contained page per subject.

    Parameters
    ----------
    report : dict
        As for :func:`render_report`, each subject with ``"page"``: its page's path relative to
        the index's folder (e.g. ``"sub-01/report.html"``), and optionally ``"failed": [{"label",
        "error"}]``: subjects whose fit failed (a row on the index, no page).
    index_path : str or Path
        The index page (written atomically); subject pages are written beside it at their
        ``page`` paths, one at a time (only one subject's pictures are held in memory).

    Returns
    -------
    list of (Path, str or None)
        Every page written: the index (subject None), then each subject's page and label.
    """
    index_path = Path(index_path)
    header = _page_header(report)
    subjects = list(_get(report, "subjects", "report"))
    names, cohort, rows = _cohort_rows(subjects, list(report.get("failed") or []))
    written: list[tuple[Path, str | None]] = []
    index_rel = index_path.name
    for i, subj in enumerate(subjects):
        page = subj["page"]
        view = _subject_view(subj, f"subjects[{i}]", (index_path.parent / page).parent)
        up = "../" * page.count("/")
        html = _ENV.from_string(_SUBJECT_TEMPLATE).render(
            **{**header, "title": f"{header['title']}: sub-{view['label']}"}, s=view,
            index=f"{up}{index_rel}#sub-{view['label']}", config=f"{up}config.yaml")
        written.append((_write_atomic(index_path.parent / page, html), view["label"]))
    html = _ENV.from_string(_INDEX_TEMPLATE).render(
        **header,
        any_simulated=any(r["simulated"] for r in rows),
        n_subjects=len(rows), n_ok=len(subjects), n_failed=len(rows) - len(subjects),
        space_names=names, cohort=cohort, rows=rows,
        config_yaml=str(report.get("config_yaml", "")),
        provenance=_provenance(report),
        warnings=[str(w) for w in report.get("warnings") or []],
    )
    return [(_write_atomic(index_path, html), None), *written]
