"""Keys and relative paths taken from configs, datasets and manifests: one check for all.

The lowest layer with :mod:`pipelines.errors`: storage, config and manifests import it; it
imports nothing of the analysis.
"""
from __future__ import annotations

from .errors import ConfigError


def check_relative_key(key: str, param: str) -> str:
    """Refuse keys that could escape a prefix or a cache folder.

    Rejects absolute paths, ``..`` segments, empty segments (``//``), NUL and control
    characters, backslashes and non-ASCII look-alike characters.
    """
    problems = []
    if key.startswith("/"):
        problems.append("is absolute")
    parts = key.split("/")
    if any(p == ".." for p in parts):
        problems.append("contains '..'")
    if "" in parts[int(key.startswith("/")):-1]:  # the leading '/' of an absolute path is reported as such
        problems.append("contains '//'")
    if any(ord(c) < 32 or c == "\\" for c in key):
        problems.append("contains a control character or backslash")
    if not key.isascii():
        problems.append("contains non-ASCII characters")
    if problems:
        raise ConfigError(f"{param!r} {' and '.join(problems)}; got {key!r}. Use a plain relative path.")
    return key
