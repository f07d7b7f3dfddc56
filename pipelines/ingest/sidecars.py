"""JSON files of a dataset and BIDS sidecars: strict reading, inheritance records, checked numbers.

Nothing here knows where a file comes from: callers fetch it (:class:`pipelines.ingest.Ingest`)
and pass its local path and dataset key, which every message names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DatasetError
from ..limits import MAX_ABS_SECONDS, check_text_size

__all__ = ["SIDECAR_RANGES", "Sidecar", "json_type", "read_json", "sidecar_number"]


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for name, value in pairs:
        if name in seen:
            raise _DuplicateKey(name)
        seen[name] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def read_json(path: Path, key: str | None = None, *, want: type | None = dict) -> dict:
    """A JSON file (size-capped, UTF-8, no duplicate keys) whose top level is a `want` (an object)."""
    where = key or str(path)
    check_text_size(path, where, "JSON file")
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8-sig"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as err:
        raise DatasetError(f"{where}: key {err.args[0]!r} appears twice, so its value is ambiguous; keep one "
                           "and fix the file") from err
    except RecursionError:  # its traceback is thousands of frames of the json parser, no help to the reader
        raise DatasetError(f"{where}: JSON nested too deeply; the file is damaged: fix or re-download it") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, bad UTF-8, a 5000-digit integer
        raise DatasetError(f"{where}: not valid JSON ({type(err).__name__}: {str(err)[:200]}); fix or re-download "
                           "the file") from err
    if want is not None and not isinstance(value, want):
        raise DatasetError(f"{where}: expected a JSON object {{\"Name\": value, ...}}, got a JSON "
                           f"{json_type(value)}; fix the file")
    return value


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (object, array, string, boolean, null, number)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


class Sidecar(dict):
    """A merged JSON sidecar that remembers which file gave each field (``origin[field]``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.origin: dict[str, str] = {}

    def merge(self, other: dict, key: str) -> None:
        """Overlay `other` (read from `key`) on this sidecar."""
        self.update(other)
        self.origin.update({name: key for name in other})
        if isinstance(other, Sidecar):
            self.origin.update(other.origin)


#: Numeric sidecar fields: (lowest allowed, highest allowed, lowest exclusive?, unit)
SIDECAR_RANGES = {
    "RepetitionTime": (0.0, 100.0, True, "seconds"),
    "StartTime": (-MAX_ABS_SECONDS, MAX_ABS_SECONDS, False, "seconds"),
    "SamplingFrequency": (0.0, 1e6, True, "Hz"),
    "RecordingDuration": (0.0, MAX_ABS_SECONDS, True, "seconds"),
    "DelayTime": (0.0, 100.0, False, "seconds"),
}


def sidecar_number(side: dict, name: str, key: str, default: float | None = None) -> float | None:
    """A numeric sidecar field, validated: a finite JSON number (not a string, list or boolean) in range.

    Missing, ``null`` or ``"n/a"`` gives `default`. Anything else outside ``SIDECAR_RANGES[name]`` is a
    DatasetError naming the sidecar file that gave the value, the field and the fix.
    """
    value = side.get(name)
    if value is None or value == "n/a":
        return default
    where = getattr(side, "origin", {}).get(name, key)
    lo, hi, exclusive, unit = SIDECAR_RANGES.get(name, (-MAX_ABS_SECONDS, MAX_ABS_SECONDS, False, ""))
    bound = f"{'>' if exclusive else '>='} {lo:g} and <= {hi:g} {unit}".strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = " (write the number without quotes)" if isinstance(value, str) else ""
        raise DatasetError(f"{where}: {name} is {_short(value)}, a JSON {json_type(value)}; it must be a number "
                           f"{bound}{hint}: fix the sidecar")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        number = math.inf
    if not math.isfinite(number) or number < lo or number > hi or (exclusive and number <= lo):
        raise DatasetError(f"{where}: {name} is {_short(value)}; it must be a number {bound}: fix the sidecar")
    return number


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
