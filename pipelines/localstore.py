"""Published results in a local folder (``output: /abs/path`` or ``file:///abs/path``).

The same interface and guarantees as :class:`pipelines.resultstore.ResultStore` on S3, on a
file system:

- every write goes to a temporary file in the same folder (``.nf-tmp-*``), is flushed to disk and
  renamed over its name (``os.replace``: readers see the old file or the new one, never half),
  then read back and checked against its size and sha256;
- a conditional create (the manifest's commit) links the finished temporary file to its name
  (``os.link`` fails when a file is there), so of two racing writers exactly one wins;
- a conditional replace (the index) holds an exclusive lock on the folder while it compares the
  file's version (its ETag: inode, mtime and size, new at every rename) with the one read;
- below the output folder, links are never followed: every folder is opened with ``O_NOFOLLOW``
  relative to its parent's descriptor, and a link met where neuroflow reads or writes is one
  :class:`~pipelines.errors.IntegrityError` naming it (listings skip links). The output folder
  itself may be reached through links: that is the user's choice.
"""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import unquote, urlsplit

from .blockread import BlockReads
from .errors import ConfigError, DatasetError, IntegrityError
from .keys import check_relative_key
from .storage import ObjectInfo, sha256_file

TMP_PREFIX = ".nf-tmp-"
BLOCK = 16 * 1024 * 1024
# POSIX only (Linux, macOS): elsewhere these are 0 and LocalStore refuses to start (see _check_platform)
_NOFOLLOW, _DIRECTORY, _CLOEXEC = (getattr(os, f, 0) for f in ("O_NOFOLLOW", "O_DIRECTORY", "O_CLOEXEC"))
_DIR_FLAGS = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
_READ_FLAGS = os.O_RDONLY | _NOFOLLOW | _CLOEXEC


def is_local_uri(uri: str) -> bool:
    """True for ``file://...`` and for a path (anything that is not ``scheme://``)."""
    return isinstance(uri, str) and (uri.startswith("file://") or "://" not in uri)


def canonical_local_uri(value: str, what: str = "'output'") -> str:
    """``/abs/path`` or ``file:///abs/path`` -> ``file:///abs/path`` (normalised, no trailing ``/``).

    One canonical form, so the same folder written either way gives the same analysis id. Refused
    (ConfigError naming `what`): a relative path, ``~``, a ``file://`` URI with a host, the root
    folder itself, control or non-ASCII characters.
    """
    fix = "give an absolute folder, e.g. /home/you/neuroflow-results or file:///home/you/neuroflow-results"
    path = value
    if value.startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ConfigError(f"{what} {value!r}: a file:// URI names a folder on this machine "
                              f"(file:///abs/path, no host or query); {fix}")
        path = unquote(parts.path)
    if not path.startswith("/"):
        raise ConfigError(f"{what} {value!r} is not an absolute path (or s3://bucket[/prefix]); {fix}")
    if any(ord(c) < 32 for c in path) or not path.isascii():
        raise ConfigError(f"{what} {value!r} contains a control or non-ASCII character; {fix}")
    norm = os.path.normpath(path)
    if norm.startswith("//"):  # POSIX keeps a leading '//' as is: one root only
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise ConfigError(f"{what} {value!r} is the root of the file system; {fix}")
    return "file://" + norm


def local_path(uri: str) -> Path:
    """The folder of a local output URI (``file:///abs`` or ``/abs``)."""
    return Path(canonical_local_uri(uri)[len("file://"):])


def _etag(st: os.stat_result) -> str:
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore(BlockReads):
    """Writes published results under a local folder, verifying each write (see the module doc)."""

    def __init__(self, output_uri: str):
        if not (_NOFOLLOW and _DIRECTORY and os.open in os.supports_dir_fd and os.scandir in os.supports_fd):
            raise ConfigError("a local 'output' folder needs a POSIX system (Linux, macOS) to write safely; "
                              "on this one, publish to s3://bucket[/prefix]")
        self.uri = canonical_local_uri(output_uri)
        self.root = Path(self.uri[len("file://"):])

    # --- names ----------------------------------------------------------------------
    def key(self, rel: str) -> str:
        check_relative_key(rel, "artifact path")
        return rel

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{self.key(rel)}"

    @staticmethod
    def _split(rel: str) -> tuple[list[str], str]:
        parts = rel.split("/")
        if not parts[-1] or parts[-1] in (".", "..") or parts[-1].startswith(TMP_PREFIX):
            raise ConfigError(f"'artifact path' {rel!r} does not name a file; use a plain relative path")
        return parts[:-1], parts[-1]

    def _refuse_link(self, rel: str) -> IntegrityError:
        return IntegrityError(f"{self.uri_of(rel)} is a symbolic link; neuroflow never follows links inside its "
                              "output folder (they could lead out of it): remove the link")

    @contextmanager
    def _dir(self, parts: list[str], create: bool) -> Iterator[int]:
        """A descriptor of ``root/parts``, each folder opened without following links."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                    nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:  # ELOOP: a link; ENOTDIR: a file where a folder should be
                    rel = "/".join(parts[: i + 1])
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        raise self._refuse_link(rel) from err
                    raise DatasetError(f"{self.uri_of(rel)} is a file where neuroflow needs a folder; "
                                       "move it away or choose another 'output'") from err
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def _lstat(self, fd: int, name: str, rel: str) -> os.stat_result | None:
        """The entry `name` in `fd` (None: absent); a link there is refused."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise self._refuse_link(rel)
        return st

    def _open_file(self, rel: str) -> int:
        """A read descriptor of the regular file `rel` (DatasetError when absent, IntegrityError for a link)."""
        folders, name = self._split(self.key(rel))
        try:
            with self._dir(folders, create=False) as fd:
                if self._lstat(fd, name, rel) is None:
                    raise FileNotFoundError(rel)
                fh = os.open(name, _READ_FLAGS, dir_fd=fd)
        except FileNotFoundError as err:
            raise DatasetError(f"{self.uri_of(rel)}: no such file; check the path and that the analysis "
                               "was published there") from err
        except OSError as err:
            if err.errno == errno.ELOOP:  # replaced by a link between the check and the open
                raise self._refuse_link(rel) from err
            raise DatasetError(f"{self.uri_of(rel)}: cannot be read ({err.strerror})") from err
        if not stat.S_ISREG(os.fstat(fh).st_mode):
            os.close(fh)
            raise DatasetError(f"{self.uri_of(rel)}: not a file; check the path")
        return fh

    # --- writing --------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the output folder if needed; fail early, naming 'output', when it cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(f"'output' {self.uri}: the folder cannot be created ({err.strerror}); "
                               "choose a folder you can write to") from err
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise DatasetError(f"'output' {self.uri}: not a writable folder; choose a folder you can write to")

    def _write(self, rel: str, fill: Callable, *, exclusive: bool = False, expect: str | None | bool = False
               ) -> bool:
        """Write `rel` through a temporary file in its folder; False when a condition failed.

        `exclusive`: only if no file is there (link, atomic). `expect` (not False): only if the
        file's current ETag is that (None: no file), checked under an exclusive lock on the folder.
        """
        folders, name = self._split(self.key(rel))
        try:
            with self._dir(folders, create=True) as fd:
                tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}-{name}"[:255]
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644, dir_fd=fd)
                try:
                    with os.fdopen(out, "wb") as fh:
                        fill(fh)
                        fh.flush()
                        os.fsync(fh.fileno())
                    if exclusive:
                        self._lstat(fd, name, rel)
                        try:
                            os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
                        except FileExistsError:
                            return False
                    elif expect is not False:
                        import fcntl  # POSIX only, like the rest of this store

                        fcntl.flock(fd, fcntl.LOCK_EX)
                        try:
                            st = self._lstat(fd, name, rel)
                            if (None if st is None else _etag(st)) != expect:
                                return False
                            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                        finally:
                            fcntl.flock(fd, fcntl.LOCK_UN)
                    else:
                        self._lstat(fd, name, rel)
                        os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
                    os.fsync(fd)
                finally:
                    try:
                        os.unlink(tmp, dir_fd=fd)
                    except FileNotFoundError:
                        pass
        except (IntegrityError, DatasetError, ConfigError):
            raise
        except OSError as err:
            raise DatasetError(f"{self.uri_of(rel)}: cannot be written ({err.strerror}); check that 'output' "
                               "is a folder you can write to and that the disk is not full") from err
        return True

    def put_file(self, local: str | Path, rel: str, content_type: str | None = None) -> dict:
        """Copy `local` to `rel` (atomically), read it back and check size and sha256."""
        local = Path(local)
        digest = sha256_file(local)
        size = local.stat().st_size

        def fill(fh):
            with open(local, "rb") as src:
                while block := src.read(BLOCK):
                    fh.write(block)

        self._write(rel, fill)
        self.verify(rel, digest, size)
        return {"path": rel, "sha256": digest, "bytes": size}

    def put_bytes(self, data: bytes, rel: str, content_type: str = "application/octet-stream",
                  if_none_match: bool = False) -> dict | None:
        """Write `data` to `rel` (atomically) and verify it; with `if_none_match`, None when a file was there."""
        digest = hashlib.sha256(data).hexdigest()
        if not self._write(rel, lambda fh: fh.write(data), exclusive=if_none_match):
            return None
        self.verify(rel, digest, len(data))
        return {"path": rel, "sha256": digest, "bytes": len(data)}

    def create_bytes(self, data: bytes, rel: str, content_type: str = "application/octet-stream") -> dict | None:
        """Write `rel` only if no file is there yet; None when one already was (of racing writers, one wins)."""
        return self.put_bytes(data, rel, content_type, if_none_match=True)

    def put_if(self, rel: str, body: bytes, content_type: str, etag: str | None) -> bool:
        """Replace `rel` only if its ETag is still `etag` (None: only if there is no file); False otherwise."""
        if not self._write(rel, lambda fh: fh.write(body), expect=etag):
            return False
        self.verify(rel, hashlib.sha256(body).hexdigest(), len(body))
        return True

    # --- reading --------------------------------------------------------------------
    def get_with_etag(self, rel: str) -> tuple[bytes | None, str | None]:
        """(bytes, ETag) of `rel`, or (None, None) when there is no file."""
        if not self.exists(rel):
            return None, None
        fh = self._open_file(rel)
        with os.fdopen(fh, "rb") as f:
            return f.read(), _etag(os.fstat(f.fileno()))

    def get_bytes(self, rel: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes; with `max_bytes`, a larger file is refused before it is read."""
        fh = self._open_file(rel)
        with os.fdopen(fh, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise IntegrityError(f"{self.uri_of(rel)}: the file is {size:,} bytes, over the {max_bytes:,} "
                                     "expected here; it is not what it claims to be, so it was not read")
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise IntegrityError(f"{self.uri_of(rel)}: the file is over the {max_bytes:,} bytes expected here; "
                                 "it was not read")
        return data

    def open_read(self, rel: str) -> BinaryIO:
        """The file opened for reading (seekable; links refused as everywhere here)."""
        return os.fdopen(self._open_file(rel), "rb")

    def exists(self, rel: str) -> bool:
        """True when `rel` is a file; a link there (or on the way) is an IntegrityError."""
        folders, name = self._split(self.key(rel))
        try:
            with self._dir(folders, create=False) as fd:
                st = self._lstat(fd, name, rel)
        except FileNotFoundError:
            return False
        except DatasetError:  # a file where a folder of the path should be: no such object
            return False
        return st is not None and stat.S_ISREG(st.st_mode)

    def list(self, rel_prefix: str = "") -> list[ObjectInfo]:
        """Every file whose relative path starts with `rel_prefix`, sorted (links and temporary files skipped)."""
        if rel_prefix:
            check_relative_key(rel_prefix.rstrip("/") or "x", "artifact path")
        start = rel_prefix.rsplit("/", 1)[0].split("/") if "/" in rel_prefix else []
        out: list[ObjectInfo] = []
        try:
            with self._dir(start, create=False) as fd:
                self._walk(fd, "/".join(start), rel_prefix, out)
        except FileNotFoundError:
            return []
        return sorted(out, key=lambda o: o.key)

    def _walk(self, fd: int, here: str, prefix: str, out: list[ObjectInfo]) -> None:
        with os.scandir(fd) as entries:
            for entry in entries:
                rel = f"{here}/{entry.name}" if here else entry.name
                if entry.is_symlink() or entry.name.startswith(TMP_PREFIX):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if not (rel + "/").startswith(prefix) and not prefix.startswith(rel + "/"):
                        continue
                    try:
                        sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:  # replaced by a link or removed since: skipped
                        continue
                    try:
                        self._walk(sub, rel, prefix, out)
                    finally:
                        os.close(sub)
                elif entry.is_file(follow_symlinks=False) and rel.startswith(prefix):
                    st = entry.stat(follow_symlinks=False)
                    out.append(ObjectInfo(rel, int(st.st_size), _etag(st)))

    def _blocks(self, rel: str):
        """The file's bytes in blocks of 16 MiB (memory stays at one block)."""
        fh = self._open_file(rel)
        with os.fdopen(fh, "rb") as f:
            while block := f.read(BLOCK):
                yield block
