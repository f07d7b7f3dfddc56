"""The local copy of a published analysis (``neuroflow run --local-dir DIR``): never anyone else's files.

A run renders into a private staging folder under the cache and, once the manifest is committed,
copies the finished files into the local folder. That folder must be new, empty, or an earlier
local copy of this same analysis: a marker file (:data:`MARKER`) lists every file neuroflow wrote
there with its sha256. Only those files are replaced; files someone else put there are never
touched, and one of ours that someone changed since is left alone when the new result drops it.
Each file lands with a rename of a finished temporary file, so two runs installing the same
analysis at once never see each other's half-written files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError
from .storage import file_lock, sha256_file

MARKER = ".neuroflow-output.json"
MARKER_VERSION = 1


def _fail(path: str | Path, problem: str, analysis_id: str) -> ConfigError:
    return ConfigError(f"--local-dir {path}: {problem}; pass a new or empty folder for the local copy "
                       f"(e.g. {Path(path) / analysis_id}) or leave --local-dir out")


def _inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies under it (both resolved)."""
    return path == folder or folder in path.parents


def read_marker(folder: Path) -> dict | None:
    """The marker of an earlier neuroflow local copy in `folder`, or None (absent or unreadable)."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("analysis_id"), str) \
            or not isinstance(data.get("files"), dict):
        return None
    return data


def _legacy_owner(folder: Path) -> str | None:
    """The analysis id of a local copy written before markers existed (its manifest.json), or None."""
    manifest = folder / "manifest.json"
    if manifest.is_symlink() or not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        return data.get("analysis_id") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def owner_of(folder: Path) -> str | None:
    """The analysis whose local copy `folder` is, or None when it is not a neuroflow local copy."""
    marker = read_marker(folder)
    return marker["analysis_id"] if marker else _legacy_owner(folder)


def check_local_dir(path: str | Path, analysis_id: str, *, cache_dir: str | Path,
                    protected: tuple[str | Path, ...] = ()) -> Path:
    """Refuse a local folder the run may not write into; return it resolved (call before any work).

    Allowed: a folder that does not exist yet (under a writable one), an empty writable folder,
    an earlier local copy of this same analysis, or any folder under ``<cache>/published/`` (the
    default, where only neuroflow writes). Refused: a file, a folder holding anyone
    else's files or another analysis' copy, the cache or a folder holding it, a folder inside or
    holding one of `protected` (the dataset being read), and a folder that cannot be written.
    """
    shown = str(path)
    target = Path(path).expanduser()
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise _fail(shown, f"cannot be resolved ({err.__class__.__name__})", analysis_id) from err
    cache = Path(cache_dir).expanduser().resolve()
    if _inside(cache, resolved):
        raise _fail(shown, f"is the cache folder {cache} or holds it", analysis_id)
    for place in protected:
        place = Path(place).expanduser().resolve()
        if _inside(resolved, place) or _inside(place, resolved):
            raise _fail(shown, f"is inside the dataset {place} or holds it (the dataset is only ever read)",
                        analysis_id)
    if resolved.exists() and not resolved.is_dir():
        raise _fail(shown, "is a file, not a folder", analysis_id)
    if resolved.is_dir():
        try:
            entries = [p.name for p in resolved.iterdir()]
        except OSError as err:
            raise _fail(shown, f"cannot be listed ({err.strerror})", analysis_id) from err
        managed = resolved != cache / "published" and _inside(resolved, cache / "published")
        if entries and not managed:  # (the default copies under the cache hold only neuroflow's files)
            owner = owner_of(resolved)
            if owner is None:
                raise _fail(shown, f"is not empty (it holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, e.g. "
                                   f"{sorted(entries)[0]!r}) and is "
                                   "not an earlier neuroflow copy of this analysis: neuroflow never writes among "
                                   "other files", analysis_id)
            if owner != analysis_id:
                raise _fail(shown, f"holds the local copy of another analysis ({owner})", analysis_id)
        if not os.access(resolved, os.W_OK | os.X_OK):
            raise _fail(shown, "is not writable", analysis_id)
        return resolved
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(shown, f"cannot be created: {parent} is not a writable folder", analysis_id)
    return resolved


def _lock_file(cache_dir: Path, dest: Path) -> Path:
    locks = cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"localdir-{hashlib.sha256(str(dest).encode()).hexdigest()[:24]}.lock"


def _real_dir(dest: Path, rel_dir: str) -> Path:
    """``dest/rel_dir``, created as real folders; a symlink or file on the way is refused."""
    here = dest
    for part in [p for p in rel_dir.split("/") if p]:
        here = here / part
        if here.is_symlink() or (here.exists() and not here.is_dir()):
            raise ConfigError(f"--local-dir {dest}: {here} is a link or a file where neuroflow writes a folder; "
                              "move it away or pass a new folder")
        here.mkdir(exist_ok=True)
    return here


def _place(src: Path, dest: Path, rel: str) -> str:
    """Copy `src` to ``dest/rel`` through a temporary file renamed over it; return its sha256."""
    folder = _real_dir(dest, rel.rsplit("/", 1)[0] if "/" in rel else "")
    fd, tmp = tempfile.mkstemp(prefix=".nf-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.replace(tmp, folder / rel.rsplit("/", 1)[-1])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return sha256_file(src)


def install(staging: Path, files: list[str], dest: str | Path, analysis_id: str, *, cache_dir: str | Path,
            prune: bool = True) -> Path:
    """Copy ``staging/<rel>`` for every rel of `files` into `dest`, replacing only files we wrote.

    With `prune`, files an earlier copy of this analysis wrote that the new one does not (and
    that nobody changed since) are removed, so the local copy matches the new manifest; without
    it they are kept and stay listed as ours. The marker is written last.
    """
    cache_dir = Path(cache_dir)
    dest_shown = dest
    dest = check_local_dir(dest, analysis_id, cache_dir=cache_dir)  # again: the folder may have changed
    with file_lock(_lock_file(cache_dir, dest)):
        dest = check_local_dir(dest_shown, analysis_id, cache_dir=cache_dir)
        dest.mkdir(parents=True, exist_ok=True)
        old = (read_marker(dest) or {}).get("files", {})
        written = {rel: _place(staging / rel, dest, rel) for rel in files}
        kept = {}
        for rel, digest in old.items():
            if rel in written or not isinstance(digest, str):
                continue
            path = dest / rel
            if not prune:
                kept[rel] = digest
            elif not path.is_symlink() and path.is_file() and sha256_file(path) == digest:
                path.unlink()  # ours, unchanged, and no longer part of the result
        marker = {"marker_version": MARKER_VERSION, "analysis_id": analysis_id, "files": {**kept, **written}}
        fd, tmp = tempfile.mkstemp(prefix=".nf-", suffix=".part", dir=dest)
        with os.fdopen(fd, "w") as out:
            json.dump(marker, out, indent=2, sort_keys=True)
        os.replace(tmp, dest / MARKER)
    return dest
