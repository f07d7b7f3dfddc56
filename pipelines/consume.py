"""Reading published analyses: list them, fetch verified artifacts, open one as maps.

Manifests themselves (schema, validation, reading) are :mod:`pipelines.manifest`'s;
``read_manifest`` is importable from here too, for consumers' code.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError, DatasetError, IntegrityError, NeuroflowError
from .keys import check_relative_key
from .manifest import parse_s3_uri, printable, read_manifest, store_and_key
from .localstore import LocalStore, canonical_local_uri, is_local_uri
from .resultstore import ResultStore, Store

__all__ = ["PublishedAnalysis", "get_artifact", "list_analyses", "read_manifest", "scan_analyses"]


def scan_analyses(output_uri: str) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Every published analysis under `output_uri` (one row per valid manifest) and the problems:
    manifests that could not be read, each with its URI and the reason (they do not hide the others)."""
    if is_local_uri(output_uri):
        store: Store = LocalStore(canonical_local_uri(output_uri, "the output URI"))
        base = store.uri + "/"
        if not store.root.is_dir():
            raise DatasetError(f"{printable(output_uri)}: no such folder; give the 'output' folder an analysis "
                               "was published to (or its s3://bucket[/prefix])")
    else:
        bucket, prefix = parse_s3_uri(output_uri, "the output URI")
        store = ResultStore(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}")
        base = f"s3://{bucket}/{prefix + '/' if prefix else ''}"
    rows, problems = [], []
    for obj in store.list():
        if not (obj.key == "manifest.json" or obj.key.endswith("/manifest.json")) or \
                obj.key.startswith(("_work/", "_cache/")):
            continue
        uri = base + obj.key
        try:
            m = read_manifest(uri)
        except NeuroflowError as err:
            problems.append({"manifest_uri": uri, "error": str(err)})
            continue
        means = [v["mean_r"] for s in m["metrics"].values() for v in s.values() if v["mean_r"] is not None]
        rows.append({"dataset": m["dataset"]["id"], "version": m["dataset"]["version"],
                     "analysis_id": m["analysis_id"], "status": m["status"], "subjects": m["subjects"],
                     "feature_spaces": [f["name"] for f in m["feature_spaces"]],
                     "best_mean_r": max(means) if means else None, "manifest_uri": uri,
                     "finished": m["provenance"]["finished"]})
    rows.sort(key=lambda r: (r["dataset"], r["version"], r["analysis_id"]))
    return rows, problems


def list_analyses(output_uri: str) -> list[dict[str, Any]]:
    """Every published analysis under `output_uri`: one row per valid manifest (see scan_analyses)."""
    return scan_analyses(output_uri)[0]


def get_artifact(manifest_uri: str, path: str, dest: str | Path, *, overwrite: bool = True) -> Path:
    """Download one artifact listed in the manifest, verify its size and sha256, then move it to
    `dest` (an existing `dest` is replaced only when `overwrite`)."""
    manifest = read_manifest(manifest_uri)
    entry = next((a for a in manifest["artifacts"] if a["path"] == path), None)
    if entry is None:
        raise DatasetError(f"{printable(path)!r} is not listed in {manifest_uri}; "
                           "`neuroflow maps show` lists artifacts")
    dest = Path(dest)
    if dest.is_dir() or (dest.exists() and not overwrite):
        what = "is a folder" if dest.is_dir() else "already exists"
        raise ConfigError(f"{dest}: {what}; name a new file to write the artifact to"
                          + ("" if dest.is_dir() else " (or pass --overwrite)"))
    store, key = store_and_key(manifest_uri)
    base = key.rpartition("/")[0]
    data = store.get_bytes(f"{base}/{path}" if base else path, max_bytes=int(entry["bytes"]))
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{path}: its content does not match the manifest's sha256; "
                             "the published artifact was altered or damaged")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, part = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(part, dest)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
    return dest


class PublishedAnalysis:
    """One published analysis, opened from its manifest URI.

    >>> a = PublishedAnalysis("s3://results/ds002322/1.0.4/alice-demo-0123456789ab/manifest.json")
    >>> img = a.load_map("sim01", "wordrate", "r")      # nibabel image (volume data)
    >>> table = a.load_map("18", "wordrate", "r")        # pandas DataFrame (ROI / channel data)
    """

    def __init__(self, manifest_uri: str, cache_dir: str | Path | None = None):
        import tempfile

        self.manifest_uri = manifest_uri
        self.manifest = read_manifest(manifest_uri)
        self._cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="neuroflow-maps-"))

    @property
    def subjects(self) -> list[str]:
        return list(self.manifest["subjects"])

    @property
    def metrics(self) -> dict:
        return self.manifest["metrics"]

    def artifacts(self, **match) -> list[dict]:
        """Artifacts whose fields equal every given value (subject=, feature_space=, kind=, stat=)."""
        return [a for a in self.manifest["artifacts"] if all(str(a.get(k)) == str(v) for k, v in match.items())]

    def fetch(self, path: str) -> Path:
        """Download (once) and verify one artifact; return its local path."""
        check_relative_key(path, "artifact path")  # never written outside the cache folder
        dest = self._cache / path
        if not dest.exists():
            get_artifact(self.manifest_uri, path, dest)
        return dest

    def load_map(self, subject: str, feature_space: str, stat: str = "r"):
        """A score map as a nibabel image (volumes) or a DataFrame indexed by target (ROIs, channels)."""
        for art in self.artifacts(subject=subject, feature_space=feature_space):
            if art["kind"] == "statmap_nifti" and art.get("stat") == stat:
                import nibabel as nib

                return nib.load(self.fetch(art["path"]))
            if art["kind"] == "statmap_tsv" and stat in str(art.get("stat", stat)).split(","):
                # the table of every statistic of the targets (an alpha-edge map is a table of its own)
                import pandas as pd

                table = pd.read_csv(self.fetch(art["path"]), sep="\t", na_values="n/a").set_index("target")
                if stat not in table.columns:
                    raise DatasetError(f"{art['path']}: no column {stat!r}; it has {list(table.columns)}")
                return table[[stat]]
        raise DatasetError(f"no {stat!r} map for sub-{subject} / {feature_space!r} in {self.manifest_uri}; "
                           f"subjects: {self.subjects}, feature spaces: "
                           f"{[f['name'] for f in self.manifest['feature_spaces']]}")
