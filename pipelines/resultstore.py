"""Published results: an ``s3://bucket/prefix`` written object by object, each upload read back
and verified, with conditional creates so that of two racing writers exactly one wins.

:func:`open_store` picks the store of an output: this one for S3, :class:`pipelines.localstore.LocalStore`
(same interface and guarantees) for a local folder."""
from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import BinaryIO, Union

from .blockread import BlockReads
from .errors import ConfigError, DatasetError, IntegrityError
from .keys import check_relative_key
from .localstore import LocalStore, is_local_uri
from .s3 import client_for, endpoint_url, s3_client, split_s3_uri, translate_s3_error
from .storage import ObjectInfo, sha256_file


class ResultStore(BlockReads):
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
                                   "create it or fix 'output' in the config") from err
            raise translate_s3_error(err, f"s3://{self.bucket}") from err
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, f"s3://{self.bucket}") from err

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
            raise translate_s3_error(err, self.uri_of(rel)) from err
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
            raise translate_s3_error(err, self.uri_of(rel)) from err
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
            raise translate_s3_error(err, self.uri_of(rel)) from err
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from err
        self.verify(rel, digest, len(data))
        return {"path": rel, "sha256": digest, "bytes": len(data)}

    def get_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; with `max_bytes`, an object larger than that is refused before
        it is read (and a body longer than announced is cut off), so memory stays bounded."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            if max_bytes is None:
                return resp["Body"].read()
            size = int(resp.get("ContentLength", 0))
            if size > max_bytes:
                resp["Body"].close()
                raise IntegrityError(f"{self.uri_of(rel)}: the object is {size:,} bytes, over the {max_bytes:,} "
                                     "expected here; it is not what it claims to be, so it was not read")
            data = resp["Body"].read(max_bytes + 1)
        except IntegrityError:
            raise
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from err
        if len(data) > max_bytes:
            raise IntegrityError(f"{self.uri_of(rel)}: the object is over the {max_bytes:,} bytes expected here; "
                                 "it was not read")
        return data

    #: bytes fetched per ranged GET of :meth:`open_read` (fewer, larger requests; a member of a
    #: large ``.npz`` is still read alone)
    read_buffer: int = 8 * 1024 * 1024

    def open_read(self, rel: str) -> BinaryIO:
        """A seekable binary file of the object that reads only the byte ranges asked for
        (ranged GETs through a buffer): one array of a large ``.npz`` is read without the rest."""
        try:
            size = int(self.client.head_object(Bucket=self.bucket, Key=self.key(rel))["ContentLength"])
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from err
        return io.BufferedReader(_RangedObject(self, rel, size), buffer_size=self.read_buffer)

    def exists(self, rel: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise translate_s3_error(err, self.uri_of(rel)) from err
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from err

    def list(self, rel_prefix: str = "") -> list[ObjectInfo]:
        prefix = self.key(rel_prefix) if rel_prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj.get("ETag", "").strip('"')))
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, f"s3://{self.bucket}/{prefix}") from err
        return out

    def get_with_etag(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of `rel`, or (None, None) when there is no object."""
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))
            return obj["Body"].read(), obj["ETag"]
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None, None
            raise translate_s3_error(err, self.uri_of(rel)) from err
        except Exception as err:  # noqa: BLE001 - an unreachable endpoint: one clear error
            raise translate_s3_error(err, self.uri_of(rel)) from err

    def put_if(self, rel: str, body: bytes, content_type: str, etag: str | None) -> bool:
        """Put `rel` only if its ETag is still `etag` (None: only if there is no object); False otherwise."""
        from botocore.exceptions import ClientError

        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=body, ContentType=content_type,
                                   **cond)
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = err.response.get("Error", {}).get("Code", "")
            if status in (404, 409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                     "NoSuchKey"):
                return False
            raise translate_s3_error(err, self.uri_of(rel)) from err
        except Exception as err:  # noqa: BLE001 - an unreachable endpoint: one clear error
            raise translate_s3_error(err, self.uri_of(rel)) from err
        return True

    def _blocks(self, rel: str):
        """The object's bytes in blocks of 16 MiB (memory stays at one block)."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
            yield from body.iter_chunks(16 * 1024 * 1024)
        except Exception as err:  # noqa: BLE001
            raise translate_s3_error(err, self.uri_of(rel)) from err


#: Tries of one ranged read before giving up (waits of 0.25 s doubling to 8 s: about 30 s in all).
RANGED_ATTEMPTS = 7


class _RangedObject(io.RawIOBase):
    """A read-only, seekable view of an S3 object: each read is one ranged GET."""

    def __init__(self, store: ResultStore, rel: str, size: int) -> None:
        self.store, self.rel, self.size, self.pos = store, rel, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.size - self.pos)
        if want <= 0:
            return 0
        data, last = b"", None
        for attempt in range(RANGED_ATTEMPTS):  # a body cut short (a dropped connection) is asked for again
            try:
                body = self.store.client.get_object(Bucket=self.store.bucket, Key=self.store.key(self.rel),
                                                    Range=f"bytes={self.pos}-{self.pos + want - 1}")["Body"]
                data = body.read()
                if len(data) == want:
                    break
                last = None
            except Exception as err:  # noqa: BLE001 - the client's own retries are spent: wait and ask again
                last = err
            time.sleep(min(0.25 * 2**attempt, 8.0))
        else:
            if last is not None:
                raise translate_s3_error(last, self.store.uri_of(self.rel)) from last
            raise IntegrityError(f"{self.store.uri_of(self.rel)}: bytes {self.pos}-{self.pos + want - 1} came back "
                                 f"short ({len(data)} of {want}) {RANGED_ATTEMPTS} times; check the connection to S3")
        buffer[:want] = data
        self.pos += want
        return want


Store = Union[ResultStore, LocalStore]


def open_store(output_uri: str) -> Store:
    """The store of an output: :class:`ResultStore` for ``s3://``, :class:`LocalStore` for a folder
    (``file:///abs/path`` or ``/abs/path``)."""
    if output_uri.startswith("s3://"):
        return ResultStore(output_uri)
    if is_local_uri(output_uri):
        return LocalStore(output_uri)
    raise ConfigError(f"{output_uri!r}: an output is s3://bucket[/prefix], file:///abs/path or /abs/path")


def copy_tree_to_s3(local_root: str | Path, uri: str) -> int:
    """Upload every file under `local_root` to `uri` (used to stage demo/test datasets)."""
    bucket, prefix = split_s3_uri(uri)
    client = client_for(False, endpoint_url())
    n = 0
    for path in sorted(Path(local_root).rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_root).as_posix()
            client.upload_file(str(path), bucket, f"{prefix}/{rel}" if prefix else rel)
            n += 1
    return n
