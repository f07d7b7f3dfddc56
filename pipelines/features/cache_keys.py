"""Keys of the feature cache: what a cached feature was computed from.

A key covers the stimulus' content, the feature's parameters (not its name or batch sizes),
the model's files by content, the kind's code version and the model's resolved runtime
(dtype, quantization, kind of device).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel

from pipelines.features.model_runtime import cache_fields
from pipelines.features.registry import KINDS, parse_feature

__all__ = ["cache_key", "cache_params", "model_fingerprint"]


def model_fingerprint(model: str, revision: str | None) -> str:
    """Content hash of a local model folder (configs, tokenizer, weights), or ``hub:id@revision``."""
    path = Path(model).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*")):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".model"):
                h.update(f.name.encode())
                d = hashlib.sha256()
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        d.update(block)
                h.update(d.hexdigest().encode())
        return "dir:" + h.hexdigest()
    return f"hub:{model}@{revision or 'main'}"


def cache_params(params: Mapping[str, Any] | BaseModel) -> dict[str, Any]:
    """What the cache key covers: the spec without its name and batch sizes, the model's content."""
    spec = parse_feature(params)
    entry = KINDS[spec.kind]
    out = spec.model_dump(mode="json")
    out.pop("name")
    out.pop("pca", None)  # applied after extraction (pipelines.features.reduce), keyed there
    for key in entry.batch_fields:
        out.pop(key, None)
    if entry.model_field:
        out[entry.model_field] = model_fingerprint(getattr(spec, entry.model_field), getattr(spec, "revision", None))
    out["code"] = entry.version
    return out


def cache_key(params: Mapping[str, Any] | BaseModel, stimulus_sha256: str, *, extra: Mapping[str, Any] | None = None,
              runtime: Mapping[str, Any] | None = None) -> str:
    """Hash of (stimulus content, :func:`cache_params`, ``extra``, the model's runtime): 24 hex digits.

    The run a stimulus was heard in is not part of the key, so a story heard in several runs
    (or by several subjects) is extracted once. ``runtime`` (:func:`model_runtime`) adds the
    resolved dtype, quantization and kind of device, so ``dtype: auto`` resolved to bfloat16
    on a GPU and to float32 on a CPU gives two entries.
    """
    blob = {"stimulus": stimulus_sha256, "params": cache_params(params), "extra": dict(extra or {})}
    if runtime is not None:
        blob["runtime"] = cache_fields(runtime)
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
