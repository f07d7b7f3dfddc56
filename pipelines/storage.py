"""A dataset's files, S3 or a local folder: listing, and verified, resumable downloads into a cache.

Endpoints and clients are :mod:`pipelines.s3`'s; published results :mod:`pipelines.resultstore`'s.
Downloads land in a
``.part`` file that is renamed only once its size (and checksum, when known) match,
so a partial file is never visible as complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from .keys import check_relative_key
from .errors import DatasetError, IntegrityError, TransientIOError
from .s3 import endpoint_identity, s3_client, split_s3_uri, translate_s3_error

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str = ""
    checksum: str = ""  # "md5:<hex>" / "sha256:<hex>" that the source vouches for; "" when none
    annex_key: str = ""  # the git-annex key of an annexed file in a local clone
    present: bool = True  # False: an annexed file whose content the local clone does not have
    modified: str = ""  # the listing's LastModified (the object's identity when a server gives no ETag)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def check_not_pointer(path: str | Path, where: str) -> None:
    """Raise DatasetError when `path` is a git-annex/LFS pointer left where data was expected."""
    path = Path(path)
    size = path.stat().st_size
    if size >= POINTER_MAX_BYTES:
        return
    with open(path, "rb") as fh:
        pointer = pointer_text(fh.read(1024))
    if pointer is None:
        return
    annex = parse_annex_key(pointer)
    real = f"; the real file is {annex[1]} bytes" if annex else ""
    raise DatasetError(f"{where}: is a git-annex pointer ({size} bytes: {pointer[:120]}{real}), not data; the "
                       "dataset was published without this file's content. Fetch it (`datalad get`) or use a "
                       "source that has it")


_ANNEX_KEY = re.compile(r"\b(?P<backend>MD5E?|SHA1E?|SHA256E?|SHA512E?)-s(?P<size>\d+)"
                        r"--(?P<digest>[0-9a-fA-F]{32,128})")
_ANNEX_ALGOS = {"MD5": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
POINTER_MAX_BYTES = 4096
MAX_RESUMES = 5


def parse_annex_key(text: str) -> tuple[str, int, str] | None:
    """``MD5E-s123--<md5>.nii.gz`` (anywhere in `text`) -> ``("md5", 123, "<md5>")``; None if absent."""
    m = _ANNEX_KEY.search(text)
    if not m:
        return None
    return _ANNEX_ALGOS[m.group("backend").rstrip("E")], int(m.group("size")), m.group("digest").lower()


def etag_checksum(etag: str) -> str:
    """``md5:<hex>`` when an S3 ETag is the object's MD5 (single-part upload), else ``""``.

    Multipart ETags (``<hex>-<parts>``) are an MD5 of the parts' MD5s and cannot be checked
    without the part size, so only the size of such objects is verified.
    """
    etag = etag.strip('"').lower()
    return f"md5:{etag}" if re.fullmatch(r"[0-9a-f]{32}", etag) else ""


def hash_file(path: str | Path, algos: tuple[str, ...] = ("sha256",)) -> dict[str, str]:
    """Digests of one file in a single pass: ``{"sha256": ..., "md5": ...}``."""
    hashes = {a: hashlib.new(a) for a in dict.fromkeys(algos)}
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def pointer_text(head: bytes) -> str | None:
    """The annex/LFS pointer that `head` (a small file's first bytes) is, or None for real content."""
    text = head[:1024].decode("ascii", errors="replace").strip()
    if text.startswith("version https://git-lfs"):
        return text.splitlines()[0]
    if ("annex/objects/" in text and (text.startswith("/annex/objects/") or text.startswith("../")
                                     or text.startswith(".git/"))) and "\n" not in text:
        return text
    return None


def safe_key(key: str, source: str) -> str:
    """Refuse keys that could escape a folder: absolute, ``..``/``.`` segments, NUL, non-ASCII, ..."""
    try:
        check_relative_key(key, "dataset file")
    except ValueError as err:
        raise DatasetError(f"{source}: refusing key {key!r}: it would escape the cache folder ({err})") from err
    if not key or key.endswith("/") or any(p in (".", "") for p in key.split("/")):
        raise DatasetError(f"{source}: refusing key {key!r}: empty or '.' path segment; it would escape "
                           "or alias the cache folder")
    return key


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (two processes never write one cache file at once)."""
    import fcntl

    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stream_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the body stopped arriving': the transfer is resumed from the .part size."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError, ReadTimeoutError as UrllibReadTimeout

    return (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ProtocolError, UrllibReadTimeout,
            ConnectionError, TimeoutError, _CutTransfer)


class _CutTransfer(Exception):
    """The server closed the body before `size` bytes arrived."""


class StreamDigests:
    """Digests of a file taken while it is written, block by block (no second pass over it).

    ``catch_up(path, size)`` brings them to the file's first ``size`` bytes when bytes were
    written without them (a transfer cut between a write and its digest, or a part left by an
    earlier process), reading only those bytes.
    """

    def __init__(self, algos: tuple[str, ...]) -> None:
        self.algos = tuple(dict.fromkeys(algos))
        self.reset()

    def reset(self) -> None:
        self.hashes = {a: hashlib.new(a) for a in self.algos}
        self.n_bytes = 0

    def update(self, block: bytes) -> None:
        for h in self.hashes.values():
            h.update(block)
        self.n_bytes += len(block)

    def catch_up(self, path: Path, size: int) -> None:
        if self.n_bytes > size:
            self.reset()
        with open(path, "rb") as fh:
            fh.seek(self.n_bytes)
            while self.n_bytes < size:
                block = fh.read(min(CHUNK, size - self.n_bytes))
                if not block:
                    break
                self.update(block)

    def hexdigests(self) -> dict[str, str]:
        return {a: h.hexdigest() for a, h in self.hashes.items()}


def _stream_to_file(client, bucket: str, key: str, dest: Path, offset: int = 0, etag: str = "",
                    digests: StreamDigests | None = None) -> dict:
    """GET one object (from byte `offset` on) into `dest`, appending; returns the response headers used.

    GET only (anonymous HEAD is refused by some servers). With an offset the request carries
    ``Range: bytes=<offset>-`` and, when the listing gave an ETag, ``If-Match`` so that a
    resumed transfer never splices two versions of an object. ``digests`` (caught up to
    ``offset``) are updated with every block written.
    """
    kwargs = {"Bucket": bucket, "Key": key}
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
        if etag:
            kwargs["IfMatch"] = f'"{etag}"'
    resp = client.get_object(**kwargs)
    ranged = bool(offset) and bool(resp.get("ContentRange"))
    body = resp["Body"]
    if digests is not None and not ranged:
        digests.reset()  # the object is written from its first byte
    with open(dest, "ab" if ranged else "wb") as fh:
        for block in iter(lambda: body.read(CHUNK), b""):
            fh.write(block)
            if digests is not None:
                digests.update(block)
    return {"version_id": resp.get("VersionId") or "", "ranged": ranged}


class DatasetSource:
    """A BIDS dataset at a pinned version: an S3 prefix or a local folder.

    S3 files are fetched into a cache folder of their own per (S3 endpoint, full source URI,
    version): ``cache_root/s3/<sha256 of the three>/files/<key>`` (``source.json`` beside it says
    which), so two sources whose bucket/prefix/version/key strings line up, or one bucket name on
    two servers, never share an entry. Each file is verified:

    - size, always, against the listing;
    - checksum, where the source gives one: the S3 ETag when it is an MD5 (single-part
      uploads, as OpenNeuro's), the git-annex key of a local DataLad/git-annex clone
      (``MD5E-s<size>--<md5>``, ``SHA256E-...``), or a ``checksums`` mapping handed in
      (key -> annex key or ``md5:<hex>`` / ``sha256:<hex>``), which wins over the others;
    - a cached file is reused only when its record (``records/<key>.json``, written once the
      download was verified) names the object the listing shows now (ETag and size; the
      LastModified time when the server gives no ETag) and agrees with the checksum the source
      vouches for now, and the file is a regular file (never a link) whose size, mtime_ns,
      ctime_ns, inode and device are the ones recorded. When any of these differ the file is
      hashed again (sha256, and the source's algorithm) and reused only when the digests match
      the record; otherwise it is downloaded again. The digests are then handed to the reader
      (:attr:`digests`), so an unchanged 8 GB file is not hashed on every run.

    Downloads go to ``<key>.part`` (renamed only once complete and verified) and are resumed
    with HTTP Range requests from the ``.part`` size, both within one call (a cut transfer is
    resumed up to ``MAX_RESUMES`` times) and across runs. A per-file lock keeps two processes
    sharing one cache from writing the same file. Keys that could escape the cache folder are
    refused; links found inside the cache are removed, never followed. A local dataset is read
    in place, and only its own files: a path that resolves outside the dataset folder (its
    ``.git/annex/objects`` are inside it) is refused.
    """

    def __init__(self, source: str, version: str, cache_root: str | Path,
                 checksums: dict[str, str] | None = None):
        self.source = source.rstrip("/")
        self.version = version
        self.is_s3 = self.source.startswith("s3://")
        root = Path(cache_root).expanduser().resolve()
        if self.is_s3:
            self.bucket, self.prefix = split_s3_uri(self.source)
            self.endpoint = endpoint_identity()
            ident = json.dumps({"endpoint": self.endpoint, "source": self.source, "version": version},
                               sort_keys=True)
            self.cache_home = root / "s3" / hashlib.sha256(ident.encode()).hexdigest()[:32]
            self.cache_dir = self.cache_home / "files"
        else:
            self.root = Path(self.source).expanduser().resolve()
            self.cache_home = root / "local" / hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
            self.cache_dir = self.cache_home / version
        self.checksums = dict(checksums or {})
        self.version_ids: dict[str, str] = {}
        self.verified: dict[str, str] = {}
        self.digests: dict[str, dict[str, str]] = {}
        self.resumed: dict[str, int] = {}
        self._listing: dict[str, ObjectInfo] | None = None

    # --- listing -----------------------------------------------------------------
    def list_files(self) -> dict[str, ObjectInfo]:
        """Every file of the dataset, keyed by its path relative to the dataset root."""
        if self._listing is None:
            listing = dict(self._list_s3() if self.is_s3 else self._list_local())
            if not listing:
                raise DatasetError(
                    f"{self.source}: the dataset is empty or does not exist; "
                    "check 'dataset.source' (and AWS_ENDPOINT_URL for a non-AWS server)"
                )
            self._listing = listing
        return self._listing

    def _list_s3(self) -> Iterator[tuple[str, ObjectInfo]]:
        client = s3_client(self.bucket)
        prefix = self.prefix + "/" if self.prefix else ""
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix):]
                    if rel and not rel.endswith("/"):
                        etag = obj.get("ETag", "").strip('"')
                        modified = obj.get("LastModified")
                        yield rel, ObjectInfo(rel, int(obj["Size"]), etag, checksum=etag_checksum(etag),
                                              modified=modified.isoformat() if modified else "")
        except Exception as err:  # noqa: BLE001 - translated to a project error
            raise translate_s3_error(err, self.source) from err

    def _list_local(self) -> Iterator[tuple[str, ObjectInfo]]:
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found; check 'dataset.source'")
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in (".git", ".datalad"))
            for name in sorted(files):
                path = Path(folder) / name
                rel = path.relative_to(self.root).as_posix()
                if path.is_symlink():
                    target = os.readlink(path)
                    annex = parse_annex_key(target) if "annex/objects/" in target else None
                    if self.root not in path.resolve().parents:  # out of the dataset: not even stat'ed
                        yield rel, ObjectInfo(rel, 0, present=False)
                    elif path.exists():
                        yield rel, ObjectInfo(rel, path.stat().st_size, annex_key=_key_text(target) if annex else "",
                                              checksum=f"{annex[0]}:{annex[2]}" if annex else "")
                    elif annex:  # an annexed file whose content this clone does not have
                        yield rel, ObjectInfo(rel, annex[1], annex_key=_key_text(target), present=False)
                    else:
                        yield rel, ObjectInfo(rel, 0, present=False)
                elif path.is_file():
                    yield rel, ObjectInfo(rel, path.stat().st_size)

    # --- fetching ----------------------------------------------------------------
    def local_path(self, key: str) -> Path:
        """Where `key` is cached: ``cache_dir/key``, never through a link (links found on the way are removed)."""
        safe_key(key, self.source)
        return _below(self.cache_dir, key)

    def info(self, key: str) -> ObjectInfo:
        safe_key(key, self.source)
        info = self.list_files().get(key)
        if info is None:
            raise DatasetError(f"{self.source}/{key}: file not in dataset version {self.version}; "
                               "check the subject, task and paths in the config")
        return info

    def expected_checksum(self, key: str) -> tuple[str, str, str]:
        """``(algo, hexdigest, where)`` the source vouches for, or ``("", "", "")``."""
        given = self.checksums.get(key)
        if given:
            annex = parse_annex_key(given)
            if annex:
                return annex[0], annex[2], "checksum list (git-annex key)"
            algo, _, digest = given.partition(":")
            if algo in hashlib.algorithms_available and digest:
                return algo, digest.lower(), "checksum list"
        info = self.list_files().get(key)
        if info is not None and info.checksum:
            algo, _, digest = info.checksum.partition(":")
            return algo, digest, "git-annex key" if info.annex_key else "S3 ETag (MD5)"
        return "", "", ""

    def expected_size(self, key: str) -> int | None:
        """The size a git-annex key in the ``checksums`` mapping states for `key`, if any."""
        annex = parse_annex_key(self.checksums.get(key, ""))
        return annex[1] if annex else None

    def _check_listed_size(self, key: str, info: ObjectInfo) -> None:
        stated = self.expected_size(key)
        if stated is not None and stated != info.size:
            raise IntegrityError(f"{self.source}/{key}: the source's file is {info.size} bytes, its checksum list "
                                 f"(git-annex key) says {stated}; this is not the file the list describes: "
                                 "check that the source and the checksum list are of the same snapshot")

    def fetch(self, key: str) -> Path:
        """Download `key` (once) and return its local path, verified against size and checksum."""
        info = self.info(key)
        self._check_listed_size(key, info)
        if not self.is_s3:
            return self._fetch_local(key, info)
        dest = self.local_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._aux_path("locks", key, ".lock")):
            digests = self._reusable(key, info, dest)
            if digests is not None:
                self.verified.setdefault(key, "size+sha256 (cached copy matches the record of its verified download)")
            else:
                part = dest.with_name(dest.name + ".part")
                streamed = self._download(key, info, part)
                self.verified[key], digests = self._verify(key, info, part, streamed)
                _drop_if_link(dest)
                os.replace(part, dest)
                part.with_name(part.name + ".json").unlink(missing_ok=True)
                self._write_record(key, info, dest, digests)
            self.digests[key] = digests
        self._check_pointer(key, dest)
        return dest

    def _aux_path(self, folder: str, key: str, suffix: str) -> Path:
        """``cache_home/<folder>/<key><suffix>`` (locks, records), kept outside the cached tree: tools such as
        MNE-BIDS take their own ``<file>.lock`` beside the files they read, and must not find ours there."""
        path = _below(self.cache_home / folder, key + suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_if_link(path)
        return path

    def _write_record(self, key: str, info: ObjectInfo, dest: Path, digests: dict[str, str]) -> None:
        """Record which object `dest` holds and the digests it was verified with (written atomically)."""
        if not (self.cache_home / "source.json").is_file():
            _write_atomic(self.cache_home / "source.json", json.dumps(
                {"endpoint": self.endpoint, "source": self.source, "version": self.version}, indent=1))
        record = {"key": key, "size": info.size, "etag": info.etag, "modified": info.modified,
                  "version_id": self.version_ids.get(key, ""), "digests": digests, "stat": _stat_guard(dest)}
        _write_atomic(self._aux_path("records", key, ".json"), json.dumps(record, sort_keys=True))

    def _reusable(self, key: str, info: ObjectInfo, dest: Path) -> dict[str, str] | None:
        """The digests of the cached copy of `key` when it may be used as is; None when it must be downloaded.

        Never size alone: the record must name the object the listing shows now, agree with the checksum
        the source vouches for, and the file must be a regular file whose size, mtime_ns, ctime_ns, inode
        and device are the recorded ones; if any of the stat fields differ, the file is hashed again and
        must give the recorded digests.
        """
        record_path = self._aux_path("records", key, ".json")
        if not _drop_if_link(dest) or not dest.exists():
            record_path.unlink(missing_ok=True)
            return None
        try:
            record = json.loads(record_path.read_text())
            digests = dict(record["digests"])
            same_object = (record["key"] == key and record["size"] == info.size and record["etag"] == info.etag
                           and (info.etag or record["modified"] == info.modified))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # no record (an old cache, or a download cut before it was written): download afresh
        if not same_object or dest.stat().st_size != info.size:
            return None
        algo, digest, _ = self.expected_checksum(key)
        if algo and digests.get(algo, digest) != digest:
            return None
        if record.get("stat") != _stat_guard(dest) or (algo and algo not in digests):
            fresh = hash_file(dest, tuple(dict.fromkeys(("sha256", "md5", *((algo,) if algo else ())))))
            if any(fresh[a] != v for a, v in digests.items() if a in fresh) or (algo and fresh[algo] != digest):
                log.warning("%s/%s: the cached copy was altered after it was verified; downloading it again",
                            self.source, key)
                return None
            digests.update(fresh)
            self.version_ids.setdefault(key, record.get("version_id", ""))
            self._write_record(key, info, dest, digests)
        if record.get("version_id"):
            self.version_ids.setdefault(key, record["version_id"])
        return digests

    def _fetch_local(self, key: str, info: ObjectInfo) -> Path:
        path = self.root / key
        resolved = path.resolve()
        if self.root not in resolved.parents:
            raise DatasetError(f"{path}: a symbolic link out of the dataset folder {self.root}; refusing to read "
                               "it (only the dataset's own files and its own .git/annex objects are read): copy "
                               "the file into the dataset")
        if not info.present or not resolved.is_file():
            what = f"git-annex key {info.annex_key}, {info.size} bytes" if info.annex_key else "a broken link"
            raise DatasetError(f"{path}: is a git-annex symlink whose content is not in this clone ({what}); "
                               f"run `datalad get {key}` (or `git annex get {key}`) in {self.root}")
        if path.stat().st_size != info.size:
            raise IntegrityError(f"{path}: size changed while reading")
        self._check_pointer(key, path)
        if key not in self.verified:
            algo, _, _ = self.expected_checksum(key)
            self.verified[key] = "size" if not algo else f"size (+{algo} when read)"
        return path

    def _check_pointer(self, key: str, path: Path) -> None:
        check_not_pointer(path, f"{self.source}/{key}")

    def _digest_algos(self, key: str) -> tuple[str, ...]:
        """The digests a download is verified and recorded with: sha256, md5 and the source's algorithm."""
        algo = self.expected_checksum(key)[0]
        return tuple(dict.fromkeys(("sha256", "md5", *((algo,) if algo else ()))))

    def _download(self, key: str, info: ObjectInfo, part: Path) -> dict[str, str]:
        """Fill `part` with the object's bytes, resuming a previous partial transfer of the same ETag;
        returns the digests of the bytes written, taken while they were written."""
        client = s3_client(self.bucket)
        full_key = f"{self.prefix}/{key}" if self.prefix else key
        meta = part.with_name(part.name + ".json")
        offset = 0
        if not _drop_if_link(part) or not _drop_if_link(meta):  # a link or folder left here: never written through
            meta.unlink(missing_ok=True)
        if part.exists():
            try:
                prev = json.loads(meta.read_text())
            except (OSError, ValueError):
                prev = {}
            if prev.get("etag") == info.etag and prev.get("size") == info.size and part.stat().st_size < info.size:
                offset = part.stat().st_size
            else:
                part.unlink()
        meta.write_text(json.dumps({"etag": info.etag, "size": info.size}))
        cuts = 0
        streaming = _stream_errors()
        digests = StreamDigests(self._digest_algos(key))
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                if offset:
                    digests.catch_up(part, offset)
                got = _stream_to_file(client, self.bucket, full_key, part, offset, info.etag, digests)
                if got["version_id"]:
                    self.version_ids[key] = got["version_id"]
                if offset and got["ranged"]:
                    self.resumed[key] = self.resumed.get(key, 0) + 1
                if part.stat().st_size < info.size:
                    raise _CutTransfer()
                size = part.stat().st_size
                if digests.n_bytes != size:  # a block written without its digest: read only what is missing
                    digests.catch_up(part, size)
                return digests.hexdigests()
            except streaming as err:
                now = part.stat().st_size if part.exists() else 0
                if now == before and not isinstance(err, _CutTransfer):  # nothing arrived: the server is unreachable
                    raise translate_s3_error(err, f"{self.source}/{key}") from err
                cuts += 1
                offset = now
                if cuts > MAX_RESUMES:
                    raise TransientIOError(
                        f"{self.source}/{key}: the transfer was cut {cuts} times (at {offset} of {info.size} "
                        "bytes); run again: the download resumes from there") from err
            except Exception as err:  # noqa: BLE001
                mapped = translate_s3_error(err, f"{self.source}/{key}")
                if not isinstance(mapped, TransientIOError):  # the object is gone or changed: start over next time
                    part.unlink(missing_ok=True)
                    meta.unlink(missing_ok=True)
                code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
                if code in ("PreconditionFailed", "412"):
                    mapped = DatasetError(f"{self.source}/{key}: the object changed while it was being "
                                          "downloaded (ETag no longer matches the listing); the dataset is "
                                          "being modified: run again once it is stable")
                raise mapped from err

    def _verify(self, key: str, info: ObjectInfo, part: Path,
                streamed: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        """Size and (where the source gives one) checksum of a finished download; removes it if wrong.

        Returns the verification label and the file's digests (sha256 and md5, plus the source's algorithm):
        ``streamed``, taken while the download was written, else one pass over the file.
        """
        got = part.stat().st_size
        if got != info.size:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{self.source}/{key}: downloaded {got} bytes, expected {info.size}; "
                                 "the transfer was cut or the object changed, run again")
        algo, digest, where = self.expected_checksum(key)
        algos = self._digest_algos(key)
        digests = streamed if streamed is not None and set(algos) <= set(streamed) else hash_file(part, algos)
        if not algo:
            return "size", digests
        if digests[algo] != digest:
            part.unlink(missing_ok=True)
            raise IntegrityError(f"{self.source}/{key}: {algo} {digests[algo]} does not match the {where} {digest}; "
                                 "the download is corrupt (it was deleted): run again, and if it persists the "
                                 "dataset's copy is damaged")
        return f"size+{algo} ({where})", digests

    def check_digests(self, key: str, path: Path, digests: dict[str, str]) -> None:
        """Compare digests computed while reading a file with the checksum the source gives.

        Catches a cached or local file that was altered after it was verified. On mismatch the
        cached copy is deleted (a re-run downloads it afresh) and IntegrityError is raised.
        """
        algo, digest, where = self.expected_checksum(key)
        if algo and algo in digests and digests[algo] != digest:
            if self.is_s3:
                path.unlink(missing_ok=True)
                self._aux_path("records", key, ".json").unlink(missing_ok=True)
                self.digests.pop(key, None)
            fix = "cached copy was deleted, run again" if self.is_s3 else "file is damaged: re-fetch it (datalad get)"
            raise IntegrityError(f"{self.source}/{key}: {algo} {digests[algo]} does not match the {where} "
                                 f"{digest}; the {fix}")
        if algo:
            self.verified[key] = f"size+{algo} ({where})"

    def read_text(self, key: str) -> str:
        return self.fetch(key).read_text(encoding="utf-8")


def _below(base: Path, rel: str) -> Path:
    """``base/rel`` (`rel` already checked by :func:`safe_key`), with any link on the way below `base` removed.

    The cache is ours: a link planted in it (to ``/etc/passwd``, to another folder) is deleted, never followed.
    """
    path = base
    for part in PurePosixPath(rel).parts[:-1]:
        path = path / part
        if path.is_symlink():
            path.unlink()
    return path / PurePosixPath(rel).name


def _drop_if_link(path: Path) -> bool:
    """Remove `path` when it is a link (or anything but a regular file); True when it is now absent or a file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    if stat.S_ISREG(st.st_mode):
        return True
    if stat.S_ISDIR(st.st_mode):
        try:
            path.rmdir()  # an empty folder only: what it holds was not put there by neuroflow
        except OSError as err:
            raise IntegrityError(f"{path}: a folder with files in it stands where neuroflow keeps a cached file; "
                                 "it is left as it is: move it away, then run again") from err
    else:
        path.unlink()
    return False


def _stat_guard(path: Path) -> dict[str, int]:
    """What changes when a file's bytes are changed or the file is replaced: size, mtime, ctime, inode, device."""
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "dev": st.st_dev}


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (a link at `path` is replaced, not followed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    os.replace(tmp, path)


def _key_text(target: str) -> str:
    """The annex key (last path part) of a git-annex symlink target."""
    return PurePosixPath(target).name

