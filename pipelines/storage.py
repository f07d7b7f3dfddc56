"""S3 and local-folder access: listing, verified downloads into a cache, verified uploads.

The S3 endpoint and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so any S3-compatible server works.
The public OpenNeuro bucket is read with unsigned requests. Downloads land in a
``.part`` file that is renamed only once its size (and checksum, when known) match,
so a partial file is never visible as complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from .config import check_relative_key
from .errors import DatasetError, IntegrityError, TransientIOError

UNSIGNED_BUCKETS = frozenset({"openneuro.org"})
CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key.strip("/")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client(unsigned: bool, endpoint: str | None):
    return _cached_client(unsigned, endpoint, os.environ.get("AWS_MAX_ATTEMPTS"), os.environ.get("AWS_RETRY_MODE"))


@lru_cache(maxsize=16)
def _cached_client(unsigned: bool, endpoint: str | None, _attempts: str | None, _mode: str | None):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    # Throttling (503 SlowDown), 5xx and connection errors are retried with exponential backoff
    # and jitter; AWS_MAX_ATTEMPTS / AWS_RETRY_MODE in the environment override these defaults.
    cfg = Config(
        signature_version=UNSIGNED if unsigned else None,
        retries={"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
                 "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "10"))},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"},
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, config=cfg,
                          region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def s3_client(bucket: str):
    """A boto3 S3 client for `bucket` (unsigned for public OpenNeuro)."""
    return _client(bucket in UNSIGNED_BUCKETS, endpoint_url())


def translate_s3_error(err: Exception, what: str) -> Exception:
    """Map botocore errors to the project's errors with a message naming `what` and a fix."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)):
        return TransientIOError(
            f"cannot reach the S3 endpoint for {what} ({endpoint_url() or 'AWS default'}); "
            "check AWS_ENDPOINT_URL and that the server is running"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchBucket",):
            return DatasetError(f"{what}: the bucket does not exist; check the s3:// URI")
        if code in ("NoSuchKey", "404", "NotFound"):
            return DatasetError(f"{what}: no such object; check the path and the dataset version")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return DatasetError(f"{what}: access denied; check AWS credentials (AWS_ACCESS_KEY_ID, ...)")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return TransientIOError(f"{what}: the S3 server answered {code or status}; retry later")
        return DatasetError(f"{what}: S3 error {code or status}: {err}")
    return err


def _stream_to_file(client, bucket: str, key: str, dest: Path) -> None:
    """GET one object into `dest` in 1 MiB blocks (GET only: anonymous HEAD is refused by some servers)."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with open(dest, "wb") as fh:
        for block in iter(lambda: body.read(CHUNK), b""):
            fh.write(block)


class DatasetSource:
    """A BIDS dataset at a pinned version: an S3 prefix or a local folder.

    Files are fetched into ``cache_root/<source>/<version>/<key>`` and verified.
    """

    def __init__(self, source: str, version: str, cache_root: str | Path):
        self.source = source.rstrip("/")
        self.version = version
        self.is_s3 = self.source.startswith("s3://")
        if self.is_s3:
            self.bucket, self.prefix = split_s3_uri(self.source)
        else:
            self.root = Path(self.source).expanduser().resolve()
        safe = self.source.replace("s3://", "s3/").replace(":", "_").strip("/")
        if not self.is_s3:
            safe = "local/" + hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        self.cache_dir = Path(cache_root).expanduser().resolve() / safe / version
        self._listing: dict[str, ObjectInfo] | None = None

    # --- listing -----------------------------------------------------------------
    def list_files(self) -> dict[str, ObjectInfo]:
        """Every file of the dataset, keyed by its path relative to the dataset root."""
        if self._listing is None:
            self._listing = dict(self._list_s3() if self.is_s3 else self._list_local())
            if not self._listing:
                raise DatasetError(
                    f"{self.source}: the dataset is empty or does not exist; "
                    "check 'dataset.source' (and AWS_ENDPOINT_URL for a non-AWS server)"
                )
        return self._listing

    def _list_s3(self) -> Iterator[tuple[str, ObjectInfo]]:
        client = s3_client(self.bucket)
        prefix = self.prefix + "/" if self.prefix else ""
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel:
                        yield rel, ObjectInfo(rel, int(obj["Size"]), obj.get("ETag", "").strip('"'))
        except Exception as err:  # noqa: BLE001 - translated to a project error
            raise translate_s3_error(err, self.source) from None

    def _list_local(self) -> Iterator[tuple[str, ObjectInfo]]:
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found; check 'dataset.source'")
        for path in sorted(self.root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(self.root).as_posix()
                yield rel, ObjectInfo(rel, path.stat().st_size)

    # --- fetching ----------------------------------------------------------------
    def local_path(self, key: str) -> Path:
        try:
            check_relative_key(key, "dataset file")
        except ValueError as err:
            raise DatasetError(f"{self.source}: refusing key {key!r}, it would escape the cache folder ({err})") from None
        path = (self.cache_dir / key).resolve()
        if self.cache_dir not in path.parents:
            raise DatasetError(f"{key!r} would escape the cache folder {self.cache_dir}")
        return path

    def fetch(self, key: str) -> Path:
        """Download `key` (once) and return its verified local path."""
        info = self.list_files().get(key)
        if info is None:
            raise DatasetError(f"{self.source}/{key}: file not in dataset version {self.version}; "
                               "check the subject, task and paths in the config")
        if not self.is_s3:
            path = self.root / key
            if path.stat().st_size != info.size:
                raise IntegrityError(f"{path}: size changed while reading")
            return path
        dest = self.local_path(key)
        if dest.exists() and dest.stat().st_size == info.size:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        client = s3_client(self.bucket)
        full_key = f"{self.prefix}/{key}" if self.prefix else key
        try:
            _stream_to_file(client, self.bucket, full_key, part)
        except Exception as err:  # noqa: BLE001
            part.unlink(missing_ok=True)
            raise translate_s3_error(err, f"{self.source}/{key}") from None
        got = part.stat().st_size
        if got != info.size:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{self.source}/{key}: downloaded {got} bytes, expected {info.size}; "
                                 "the transfer was cut, run again")
        os.replace(part, dest)
        return dest

    def read_text(self, key: str) -> str:
        return self.fetch(key).read_text(encoding="utf-8")


class ResultStore:
    """Writes published results under an ``s3://bucket/prefix``, verifying each upload."""

    def __init__(self, output_uri: str):
        self.bucket, self.prefix = split_s3_uri(output_uri)
        self.uri = output_uri.rstrip("/")

    def key(self, rel: str) -> str:
        check_relative_key(rel, "artifact path")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def uri_of(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"

    @property
    def client(self):
        return s3_client(self.bucket)

    def ensure_bucket(self) -> None:
        """Fail early, naming 'output', when the results bucket is missing or unreachable."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise DatasetError(f"s3://{self.bucket}: the results bucket does not exist; "
                                   "create it or fix 'output' in the config") from None
            raise translate_s3_error(err, f"s3://{self.bucket}") from None
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, f"s3://{self.bucket}") from None

    def put_file(self, local: str | Path, rel: str, content_type: str | None = None) -> dict:
        """Upload `local` to `rel`, read it back and check size and sha256."""
        local = Path(local)
        digest = sha256_file(local)
        size = local.stat().st_size
        extra = {"Metadata": {"sha256": digest}}
        if content_type:
            extra["ContentType"] = content_type
        try:
            self.client.upload_file(str(local), self.bucket, self.key(rel), ExtraArgs=extra)
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from None
        self.verify(rel, digest, size)
        return {"path": rel, "sha256": digest, "bytes": size}

    def put_bytes(self, data: bytes, rel: str, content_type: str = "application/octet-stream",
                  if_none_match: bool = False) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        kwargs = dict(Bucket=self.bucket, Key=self.key(rel), Body=data, ContentType=content_type,
                      Metadata={"sha256": digest})
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kwargs)
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from None
        self.verify(rel, digest, len(data))
        return {"path": rel, "sha256": digest, "bytes": len(data)}

    def create_bytes(self, data: bytes, rel: str, content_type: str = "application/octet-stream") -> dict | None:
        """Write `rel` only if no object is there yet; None when one already was.

        Uses S3's conditional write (``If-None-Match: *``) so that of two writers racing,
        exactly one wins. On a server that ignores the header, the existence check just
        before the write still catches every writer that is not simultaneous to the
        millisecond; the remaining window is documented in the README.
        """
        from botocore.exceptions import ClientError

        if self.exists(rel):
            return None
        digest = hashlib.sha256(data).hexdigest()
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data, ContentType=content_type,
                                   Metadata={"sha256": digest}, IfNoneMatch="*")
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = err.response.get("Error", {}).get("Code", "")
            if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return None
            raise translate_s3_error(err, self.uri_of(rel)) from None
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from None
        self.verify(rel, digest, len(data))
        return {"path": rel, "sha256": digest, "bytes": len(data)}

    def get_bytes(self, rel: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from None

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise translate_s3_error(err, self.uri_of(rel)) from None
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from None

    def list(self, rel_prefix: str = "") -> list[ObjectInfo]:
        prefix = self.key(rel_prefix) if rel_prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj.get("ETag", "").strip('"')))
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, f"s3://{self.bucket}/{prefix}") from None
        return out

    def verify(self, rel: str, sha256: str, size: int) -> None:
        """Read the object back; raise IntegrityError unless size and sha256 match."""
        data = self.get_bytes(rel)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(f"{self.uri_of(rel)}: verification after upload failed "
                                 f"({len(data)} bytes, expected {size}); the upload was not stored intact")

    def download(self, rel: str, dest: str | Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(self.get_bytes(rel))
        os.replace(part, dest)
        return dest


def copy_tree_to_s3(local_root: str | Path, uri: str) -> int:
    """Upload every file under `local_root` to `uri` (used to stage demo/test datasets)."""
    bucket, prefix = split_s3_uri(uri)
    client = _client(False, endpoint_url())
    n = 0
    for path in sorted(Path(local_root).rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_root).as_posix()
            client.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
            n += 1
    return n


def clear_cache_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
