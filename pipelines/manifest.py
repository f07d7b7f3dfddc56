"""Manifests: the schema, validating one, reading one from S3 or a local folder, and the values they record.

The manifest (``{prefix}/manifest.json``, written last) is the only commit point of a published
analysis. This module is a lower layer: it knows storage and keys, nothing of the steps that
write manifests or of the consumers that read them.
"""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema

from .errors import ConfigError, IntegrityError
from .keys import check_relative_key
from .s3 import split_s3_uri
from .localstore import LocalStore, canonical_local_uri, is_local_uri
from .resultstore import ResultStore

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"
LIBRARIES = ("numpy", "scipy", "himalaya", "torch", "transformers", "nibabel", "nilearn", "dask",
             "distributed", "boto3", "pydantic")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    """The manifest's JSON Schema (``pipelines/schemas/manifest.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_manifest(manifest: dict) -> None:
    """Raise jsonschema.ValidationError unless `manifest` matches the versioned schema."""
    jsonschema.validate(manifest, manifest_schema())


def utc_now() -> str:
    """The current time in UTC, ISO 8601 to the second (the manifest's timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# A manifest of a cohort of a few hundred subjects is a few MB; anything far larger is not one.
MAX_MANIFEST_BYTES = int(os.environ.get("NEUROFLOW_MAX_MANIFEST_BYTES", 64 * 1024 * 1024))
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")


def parse_s3_uri(uri: str, what: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://`` URI given on the command line, or a ConfigError naming it."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ConfigError(f"{printable(uri)}: {what} must be an s3://bucket/... URI")
    bucket, key = split_s3_uri(uri)
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(f"{printable(uri)}: {what} has an invalid bucket name {printable(bucket)!r}")
    if key:
        check_relative_key(key, what)
    return bucket, key


def store_and_key(uri: str) -> tuple[ResultStore | LocalStore, str]:
    """The store and the key of a manifest URI: the bucket's for ``s3://``; for a local file
    (``file:///abs/...`` or ``/abs/...``) its folder's, the key being the file name (a ConfigError
    if it is neither)."""
    if is_local_uri(uri) and isinstance(uri, str):
        folder, _, name = canonical_local_uri(uri, "the manifest URI").rpartition("/")
        return LocalStore(folder), name
    bucket, key = parse_s3_uri(uri, "the manifest URI")
    return ResultStore(f"s3://{bucket}"), key


def printable(value: Any, limit: int = 300) -> str:
    """`value` as text safe for a terminal: control characters (escape sequences) shown escaped,
    and cut at `limit` characters. Manifests are written by other people."""
    text = str(value)
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_manifest(data: bytes, manifest_uri: str) -> dict[str, Any]:
    """Decode and validate a manifest's bytes; one IntegrityError naming the URI and the problem."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise IntegrityError(f"{manifest_uri}: not UTF-8 text (byte {err.start}); not a neuroflow manifest") from err
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{manifest_uri}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
                             "the manifest is damaged, re-publish the analysis") from err
    except RecursionError as err:
        raise IntegrityError(f"{manifest_uri}: JSON nested too deeply; not a neuroflow manifest") from err
    try:
        validate_manifest(manifest)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path) or "top level"
        raise IntegrityError(f"{manifest_uri}: not a valid neuroflow manifest (at {printable(where, 120)}: "
                             f"{printable(err.message, 200)}); it was not written by neuroflow "
                             f"{SCHEMA_VERSION} or was altered") from err
    except RecursionError as err:
        raise IntegrityError(f"{manifest_uri}: JSON nested too deeply; not a neuroflow manifest") from err
    for art in manifest["artifacts"]:
        try:
            check_relative_key(art["path"], "artifact path")
        except ConfigError as err:
            raise IntegrityError(f"{manifest_uri}: lists an artifact path {printable(art['path'], 120)!r} that "
                                 "could escape its folder; the manifest is not trusted") from err
    return manifest


def read_manifest(manifest_uri: str) -> dict[str, Any]:
    """The manifest at `manifest_uri` (at most MAX_MANIFEST_BYTES, validated against the schema)."""
    store, key = store_and_key(manifest_uri)
    if not key.endswith("manifest.json") or not (key == "manifest.json" or key.endswith("/manifest.json")):
        raise ConfigError(f"{printable(manifest_uri)}: not a manifest.json URI; use `neuroflow maps list` to find one")
    data = store.get_bytes(key, max_bytes=MAX_MANIFEST_BYTES)
    return parse_manifest(data, manifest_uri)


