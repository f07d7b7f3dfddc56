"""One self-contained HTML report per analysis.

The page embeds every picture as a base64 ``data:`` URI and carries its own CSS, so it can
be opened from disk, mailed or served from any bucket without the files next to it. All
text that comes from users (dataset ids, labels, captions, config, provenance) is escaped
by jinja2's autoescaping.
"""
from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from pipelines.errors import IntegrityError, NeuroflowError

__all__ = ["render_report"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_METRIC_KEYS = ("mean_r", "median_r", "max_r", "n_targets", "n_valid")

_TEMPLATE = """<!DOCTYPE html>
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
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p class="meta">
Dataset <strong>{{ dataset.id }}</strong> version <strong>{{ dataset.version }}</strong>
{%- if dataset.source %} (source: {{ dataset.source }}){% endif %}
&middot; analysis <strong>{{ analysis_id }}</strong>
</p>
{% if any_simulated %}
<p><span class="badge">simulated</span> Subjects marked simulated carry synthetic data, not recordings.</p>
{% endif %}

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
{% for im in fs.images %}
<figure>
<img src="{{ im.data_uri }}" alt="{{ im.caption }}">
<figcaption>{{ im.caption }}</figcaption>
</figure>
{% else %}
<p>No pictures.</p>
{% endfor %}
{% endfor %}
{% endfor %}

<h2>Configuration</h2>
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


def render_report(report: dict, path: str | Path) -> Path:
    """Write one self-contained HTML page for an analysis.

    Parameters
    ----------
    report : dict
        ``{"title", "dataset": {"id", "version", "source"}, "analysis_id", "config_yaml",
        "provenance": dict, "subjects": [{"label", "simulated", "feature_spaces": [{"name",
        "metrics": {"mean_r", "median_r", "max_r", "n_targets", "n_valid"},
        "images": [{"path", "caption"}]}]}]}``. Image paths are local PNG files; they are
        read and embedded, so they may be deleted afterwards.
    path : str or Path
        Output HTML file (written atomically).

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    dataset = _get(report, "dataset", "report")
    subjects = []
    any_simulated = False
    for i, subj in enumerate(_get(report, "subjects", "report")):
        where = f"subjects[{i}]"
        simulated = bool(subj.get("simulated", False))
        any_simulated |= simulated
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
            })
        subjects.append({"label": str(_get(subj, "label", where)), "simulated": simulated,
                         "feature_spaces": spaces})

    html = _ENV.from_string(_TEMPLATE).render(
        title=str(_get(report, "title", "report")),
        dataset={"id": str(_get(dataset, "id", "dataset")),
                 "version": str(_get(dataset, "version", "dataset")),
                 "source": str(dataset.get("source") or "")},
        analysis_id=str(_get(report, "analysis_id", "report")),
        any_simulated=any_simulated,
        subjects=subjects,
        config_yaml=str(report.get("config_yaml", "")),
        provenance=[(str(k), _fmt_value(v)) for k, v in (report.get("provenance") or {}).items()],
    )

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
