"""Reading published analyses: list them, open a manifest, fetch verified artifacts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import DatasetError, IntegrityError
from .storage import ResultStore, split_s3_uri


def _store_and_rel(uri: str) -> tuple[ResultStore, str]:
    bucket, key = split_s3_uri(uri)
    return ResultStore(f"s3://{bucket}"), key


def read_manifest(manifest_uri: str) -> dict[str, Any]:
    """The manifest at `manifest_uri` (validated against the schema)."""
    from .publish import validate_manifest

    store, key = _store_and_rel(manifest_uri)
    if not key.endswith("manifest.json"):
        raise DatasetError(f"{manifest_uri}: not a manifest.json URI; use `neuroflow maps list` to find one")
    try:
        manifest = json.loads(store.get_bytes(key))
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{manifest_uri}: not valid JSON ({err})") from None
    validate_manifest(manifest)
    return manifest


def list_analyses(output_uri: str) -> list[dict[str, Any]]:
    """Every published analysis under `output_uri`: one row per manifest."""
    bucket, prefix = split_s3_uri(output_uri)
    store = ResultStore(output_uri)
    rows = []
    for obj in store.list():
        if not obj.key.endswith("/manifest.json") or obj.key.startswith(("_work/", "_cache/")):
            continue
        uri = f"s3://{bucket}/{prefix + '/' if prefix else ''}{obj.key}"
        m = read_manifest(uri)
        means = [v["mean_r"] for s in m["metrics"].values() for v in s.values() if v["mean_r"] is not None]
        rows.append({"dataset": m["dataset"]["id"], "version": m["dataset"]["version"],
                     "analysis_id": m["analysis_id"], "status": m["status"], "subjects": m["subjects"],
                     "feature_spaces": [f["name"] for f in m["feature_spaces"]],
                     "best_mean_r": max(means) if means else None, "manifest_uri": uri,
                     "finished": m["provenance"]["finished"]})
    return sorted(rows, key=lambda r: (r["dataset"], r["version"], r["analysis_id"]))


def get_artifact(manifest_uri: str, path: str, dest: str | Path) -> Path:
    """Download one artifact listed in the manifest and verify its sha256."""
    manifest = read_manifest(manifest_uri)
    entry = next((a for a in manifest["artifacts"] if a["path"] == path), None)
    if entry is None:
        raise DatasetError(f"{path!r} is not listed in {manifest_uri}; `neuroflow maps show` lists artifacts")
    store, key = _store_and_rel(manifest_uri)
    base = key.rsplit("/", 1)[0]
    data = store.get_bytes(f"{base}/{path}")
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{path}: its content does not match the manifest's sha256; "
                             "the published artifact was altered or damaged")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
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
            if art["kind"] == "statmap_tsv":
                import pandas as pd

                table = pd.read_csv(self.fetch(art["path"]), sep="\t", na_values="n/a").set_index("target")
                if stat not in table.columns:
                    raise DatasetError(f"{art['path']}: no column {stat!r}; it has {list(table.columns)}")
                return table[[stat]]
        raise DatasetError(f"no {stat!r} map for sub-{subject} / {feature_space!r} in {self.manifest_uri}; "
                           f"subjects: {self.subjects}, feature spaces: "
                           f"{[f['name'] for f in self.manifest['feature_spaces']]}")
