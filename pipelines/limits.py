"""Limits on what one input file may make neuroflow allocate, checked before allocating.

A dataset file states its own size: a NIfTI header its dimensions, a GIFTI its arrays' ``Dim``
attributes, an HDF5 dataset its shape, a gzip stream how far it inflates, a TSV its header line.
A damaged or hostile file can claim terabytes in a few bytes. Each reader checks the claim here
first, so such a file fails its own subject with one line instead of exhausting the machine.

Limits (each raised by an environment variable, for real data that needs more):

``NEUROFLOW_MEMORY_BUDGET``
    bytes one file's arrays may take once read (``64G``, ``512M`` or a plain number of bytes).
    Default: half of the memory available when the run starts, at least 256 MiB.
``NEUROFLOW_MAX_TEXT_BYTES``
    the largest text file (JSON sidecar, TSV table, TextGrid, gentle JSON) read, in bytes or
    with a suffix. Default 256M. A text table is also refused when parsing it would need more
    than the memory budget (``TEXT_EXPANSION`` times its size).

Fixed: ``MAX_COLUMNS`` columns and ``MAX_HEADER_BYTES`` bytes in a table's header line;
``MAX_ABS_SECONDS`` for any time or duration read from a file.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from pathlib import Path

from .errors import ConfigError, DatasetError

ENV_MEMORY_BUDGET = "NEUROFLOW_MEMORY_BUDGET"
ENV_MAX_TEXT_BYTES = "NEUROFLOW_MAX_TEXT_BYTES"
MIN_MEMORY_BUDGET = 256 << 20
DEFAULT_MAX_TEXT_BYTES = 256 << 20
#: Parsing a text table into pandas string/float cells takes up to this many bytes per byte of text.
TEXT_EXPANSION = 12
MAX_COLUMNS = 100_000
MAX_HEADER_BYTES = 8 << 20
#: No time, onset, duration or TR in a dataset lies beyond this (about 11.6 days), in seconds.
MAX_ABS_SECONDS = 1e6
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, name: str) -> int:
    """``"64G"``, ``"512M"``, ``"1.5G"`` or ``"1000000"`` -> bytes; ConfigError naming `name` otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{name}={text!r} is not a size; use bytes or a suffix, e.g. {name}=16G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available_memory() -> int:
    """Bytes of memory available now (psutil, else /proc/meminfo, else 4 GiB)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported: fall back
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def memory_budget() -> int:
    """Bytes one file's arrays may take: ``NEUROFLOW_MEMORY_BUDGET``, else half the available memory."""
    given = os.environ.get(ENV_MEMORY_BUDGET)
    if given:
        return parse_size(given, ENV_MEMORY_BUDGET)
    return max(MIN_MEMORY_BUDGET, available_memory() // 2)


def max_text_bytes() -> int:
    """The largest text file read: ``NEUROFLOW_MAX_TEXT_BYTES``, default 256 MiB."""
    given = os.environ.get(ENV_MAX_TEXT_BYTES)
    return parse_size(given, ENV_MAX_TEXT_BYTES) if given else DEFAULT_MAX_TEXT_BYTES


def human(n: float) -> str:
    """Bytes as a short text (``3.1 GB``)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def n_elements(shape) -> int:
    """The product of a shape, as an exact Python int (no overflow); negative dims count as 0."""
    return math.prod(max(int(d), 0) for d in shape)


def check_allocation(n_bytes: int, key: str, what: str) -> None:
    """Refuse a read that would allocate more than the memory budget, before it allocates."""
    budget = memory_budget()
    if n_bytes > budget:
        raise DatasetError(f"{key}: {what} would take {human(n_bytes)} of memory, over the budget of "
                           f"{human(budget)}; the file is damaged or not what it claims. If it is real, raise "
                           f"{ENV_MEMORY_BUDGET} (e.g. {ENV_MEMORY_BUDGET}=64G) on a machine with that memory")


def check_text_size(path: str | Path, key: str, what: str, *, max_bytes: int | None = None) -> int:
    """Refuse a text file (JSON, TSV, TextGrid) larger than the cap or than parsing fits in; its size."""
    size = Path(path).stat().st_size
    cap = max_text_bytes() if max_bytes is None else max_bytes
    if size > cap:
        raise DatasetError(f"{key}: a {what} of {human(size)}, over the {human(cap)} limit for text files; "
                           f"the file is damaged or not a {what}. If it is real, raise {ENV_MAX_TEXT_BYTES} "
                           f"(e.g. {ENV_MAX_TEXT_BYTES}=2G)")
    check_allocation(size * TEXT_EXPANSION, key, f"parsing this {what}")
    return size


def check_table(path: str | Path, key: str, what: str, sep: str = "\t") -> int:
    """Size cap, then the header line's length and column count, before pandas parses the table.

    Returns the number of columns of the header line.
    """
    check_text_size(path, key, what)
    with open(path, "rb") as fh:
        header = fh.readline(MAX_HEADER_BYTES + 1)
    if len(header) > MAX_HEADER_BYTES and not header.endswith(b"\n"):
        raise DatasetError(f"{key}: the header line of this {what} is longer than {human(MAX_HEADER_BYTES)}; "
                           "the file is damaged or not a table: fix or re-download it")
    n_columns = header.count(sep.encode()) + 1
    if n_columns > MAX_COLUMNS:
        raise DatasetError(f"{key}: this {what} has {n_columns} columns, over the limit of {MAX_COLUMNS}; the "
                           "file is damaged or not a table: fix or re-download it")
    return n_columns


def check_gzip_size(path: str | Path, key: str, expected: int, what: str, *, slack: int = 1 << 20,
                    chunk: int = 1 << 20, label: str = "gzip data") -> int:
    """Stream-inflate a gzip file, refusing it as soon as it inflates past ``expected + slack`` bytes.

    Never holds more than `chunk` inflated bytes; a gzip bomb is refused after inflating at most
    its stated size. Returns the inflated size. A corrupt stream is a DatasetError too.
    """
    limit = int(expected) + int(slack)
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while True:
                block = fh.read(chunk)
                if not block:
                    break
                total += len(block)
                if total > limit:
                    raise DatasetError(f"{key}: inflates past {human(limit)}, more than its {what} states "
                                       f"({human(expected)}); the file is damaged or a decompression bomb: "
                                       "re-download it or remove it from the dataset")
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(f"{key}: corrupt or truncated {label} ({type(err).__name__}: {err}); "
                           "re-download the file") from err
    return total


def check_seconds(value: float, key: str, name: str) -> float:
    """Refuse a time (seconds) that is not finite or lies beyond ``MAX_ABS_SECONDS``."""
    if not math.isfinite(value) or abs(value) > MAX_ABS_SECONDS:
        raise DatasetError(f"{key}: {name} {value!r} is not a time in seconds (finite, within "
                           f"±{MAX_ABS_SECONDS:g} s); fix the file")
    return value
