"""In-silico experiments on a newly published analysis: what the ``neuroflow_insilico`` DAG runs.

An *experiment* is a small JSON object (a DAG param or the Airflow Variable ``neuroflow_insilico``)::

    {"candidates": ["sentence", ...], "n": 5, "top": 10,
     "contrasts": [{"name": "animals-vs-tools", "a": ["..."], "b": ["..."]}]}

For every subject and feature space the analysis publishes a model of, :func:`run_experiment` selects
the ``n`` candidates predicted to drive and to suppress its ``top`` best-predicted targets, and runs
each contrast. Results go beside the published analysis, never into it (its manifest stays as
published): ``{output}/_insilico/{dataset}/{version}/{analysis_id}/``, each file uploaded verified,
and ``summary.json`` (every file with its sha256, the drive / suppress sentences) written last.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DatasetError
from ..gallery import output_of
from ..manifest import read_manifest
from ..resultstore import open_store
from .export import MODEL_KIND
from .insilico import contrast, select_sentences

log = logging.getLogger("neuroflow")

__all__ = ["check_experiment", "run_experiment", "results_prefix"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,40}$")


def check_experiment(spec: dict[str, Any]) -> dict[str, Any]:
    """The experiment with its defaults, or one ConfigError naming the bad key and the fix."""
    if not isinstance(spec, dict):
        raise ConfigError(f"the in-silico experiment must be a JSON object; got {type(spec).__name__}")
    unknown = set(spec) - {"candidates", "n", "top", "contrasts"}
    if unknown:
        raise ConfigError(f"in-silico experiment: unknown key(s) {sorted(unknown)}; valid: candidates, n, top, "
                          "contrasts")
    candidates = spec.get("candidates") or []
    contrasts = spec.get("contrasts") or []
    if not candidates and not contrasts:
        raise ConfigError("in-silico experiment: give 'candidates' (sentences to select from) or 'contrasts'")
    if not all(isinstance(s, str) and s.strip() for s in candidates):
        raise ConfigError("in-silico experiment: 'candidates' must be non-empty sentences (strings)")
    for c in contrasts:
        if not isinstance(c, dict) or set(c) != {"name", "a", "b"} or not _NAME.match(str(c.get("name", ""))):
            raise ConfigError("in-silico experiment: each contrast is {name, a, b}, name letters, digits, '-' or "
                              f"'_'; got {str(c)[:120]}")
        if not (c["a"] and c["b"] and all(isinstance(s, str) and s.strip() for s in [*c["a"], *c["b"]])):
            raise ConfigError(f"in-silico contrast {c['name']!r}: 'a' and 'b' must be non-empty lists of sentences")
    n, top = spec.get("n", 5), spec.get("top", 10)
    if not (isinstance(n, int) and n >= 1 and isinstance(top, int) and top >= 1):
        raise ConfigError(f"in-silico experiment: 'n' and 'top' are integers >= 1; got n={n!r}, top={top!r}")
    return {"candidates": list(candidates), "n": n, "top": top, "contrasts": list(contrasts)}


def results_prefix(manifest_uri: str) -> tuple[str, str]:
    """The output root and the relative folder of an analysis' in-silico results."""
    output = output_of(manifest_uri)
    rel = manifest_uri[len(output) + 1:].rsplit("/", 1)[0]
    return output, f"_insilico/{rel}"


def run_experiment(manifest_uri: str, experiment: dict[str, Any], *, cache_dir: str | Path | None = None
                   ) -> dict[str, Any]:
    """Run ``experiment`` on every published model of the analysis; return the summary (also uploaded).

    An analysis that publishes no model is skipped (``{"skipped": reason}``), not an error.
    """
    spec = check_experiment(experiment)
    manifest = read_manifest(manifest_uri)
    pairs = sorted({(a["subject"], a["feature_space"]) for a in manifest["artifacts"] if a["kind"] == MODEL_KIND})
    if not pairs:
        log.info("%s publishes no encoding model; no in-silico experiment", manifest_uri)
        return {"manifest_uri": manifest_uri, "skipped": "the analysis publishes no encoding model"}
    output, rel = results_prefix(manifest_uri)
    store = open_store(output)
    files: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="neuroflow-insilico-") as tmp:
        folder = Path(tmp)
        for subject, space in pairs:
            entry: dict[str, Any] = {"subject": subject, "feature_space": space}
            if spec["candidates"]:
                sel = select_sentences(manifest_uri, spec["candidates"], n=spec["n"], top=spec["top"],
                                       subject=subject, feature_space=space, out=folder, cache_dir=cache_dir)
                entry.update(drive=sel.drive, suppress=sel.suppress, n_targets=int(sel.targets.size))
            for c in spec["contrasts"]:
                res = contrast(manifest_uri, c["a"], c["b"], subject=subject, feature_space=space,
                               out=folder / c["name"], cache_dir=cache_dir)
                finite = res.difference[res.difference == res.difference]
                entry.setdefault("contrasts", {})[c["name"]] = {
                    "mean_difference": round(float(finite.mean()), 6) if finite.size else None}
            results.append(entry)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            rec = store.put_file(path, f"{rel}/{name}")
            files.append({"path": name, "sha256": rec["sha256"], "bytes": rec["bytes"]})
    summary = {"manifest_uri": manifest_uri, "analysis_id": manifest["analysis_id"], "experiment": spec,
               "results": results, "files": files}
    store.put_bytes(json.dumps(summary, indent=2, sort_keys=True).encode(), f"{rel}/summary.json",
                    content_type="application/json")
    summary["summary_uri"] = store.uri_of(f"{rel}/summary.json")
    return summary


def manifests_of_events(events: list[dict[str, Any]]) -> list[str]:
    """The manifest URIs named by asset events' extras (deduplicated, in order)."""
    out: list[str] = []
    for extra in events:
        uri = (extra or {}).get("manifest_uri")
        if uri and uri not in out:
            if not str(uri).endswith("/manifest.json"):
                raise DatasetError(f"asset event names {str(uri)[:200]!r}, not a manifest.json URI")
            out.append(str(uri))
    return out
