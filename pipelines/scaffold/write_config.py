"""Write a detected :class:`~pipelines.scaffold.detect.Plan` as a commented YAML config.

Sections are written as blocks, values in YAML's flow style, each setting with the comment
:mod:`.detect` gave it, and the alternatives it did not choose as commented lines below their
section. The text is read back through the config's own strict loader before it is written, so a
file ``neuroflow init`` writes is one ``neuroflow validate`` accepts.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from ..config import parse_config, safe_yaml_load
from ..errors import ConfigError
from ..manifest import printable
from .detect import Plan

__all__ = ["render", "write_config"]

_COMMENT_COLUMN = 44
#: Keys written as one flow-style line even though they are mappings.
_FLOW = {"dataset.word_timings.files", "compute"}


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        plain = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        plain = plain[:-3].strip() if plain.endswith("...") else plain
        ok = not plain.startswith(("'", '"')) and yaml.safe_load(plain) == value and ": " not in plain
        return plain if ok else json.dumps(value)
    return json.dumps(value)


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _scalar(value)


def _safe(text: str) -> str:
    """Comment text from the dataset (names, keys) on one line: no line breaks, control characters escaped."""
    return printable(" ".join(str(text).split()), 2000)


def _line(indent: int, text: str, comment: str | None) -> str:
    line = " " * indent + text
    if comment:
        line = line.ljust(_COMMENT_COLUMN - 1) + " # " + _safe(comment)
    return line


def _block(data: dict, path: str, indent: int, plan: Plan, out: list[str]) -> None:
    for key, value in data.items():
        here = f"{path}.{key}" if path else key
        comment = plan.comments.get(here)
        if isinstance(value, dict) and value and here not in _FLOW:
            out.append(_line(indent, f"{key}:", comment))
            _block(value, here, indent + 2, plan, out)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(_line(indent, f"{key}:", comment))
            out.extend(_line(indent + 2, f"- {_flow(v)}", None) for v in value)
        else:
            out.append(_line(indent, f"{key}: {_flow(value)}", comment))
        for alt in plan.alternatives.get(here, []):
            prefix = "- " if key == "features" else ""
            out.append(" " * (indent + 2) + f"# {prefix}{_safe(alt)}")


def render(plan: Plan, command: str = "neuroflow init") -> str:
    """The config text: a header of what was found and chosen, then the settings."""
    head = [f"# Written by `{command}` from the dataset's own files. Check: `neuroflow validate FILE`;",
            "# run: `neuroflow run FILE`. Lines starting with '#' are notes and alternatives, not settings.", "#",
            "# What init found and chose:"]
    for note in plan.notes:
        words, line = _safe(note).split(), "#   -"
        for w in words:
            if len(line) + 1 + len(w) > 110 and line.strip("# -"):
                head.append(line)
                line = "#    "
            line += " " + w
        head.append(line)
    body: list[str] = []
    _block(plan.config, "", 0, plan, body)
    return "\n".join(head + [""] + body) + "\n"


def write_config(plan: Plan, path: str | Path | None, command: str = "neuroflow init") -> str:
    """Render `plan`, check it through the config loader, and write it to `path` (None: only return it).

    An existing file is never replaced: the user's own config is theirs.
    """
    text = render(plan, command)
    try:
        data = safe_yaml_load(text, "the config neuroflow init wrote")
        parse_config(data, "the config neuroflow init wrote")
    except ConfigError as err:  # a bug of init's, not the user's: say so rather than write a broken file
        raise ConfigError(f"neuroflow init built a config it cannot read back ({err}); please report it, with the "
                          "dataset's address") from err
    if data != json.loads(json.dumps(plan.config)):
        raise ConfigError("neuroflow init wrote a config that reads back differently; please report it")
    if path is not None:
        dest = Path(path)
        if dest.exists() or dest.is_symlink():
            raise ConfigError(f"{dest}: exists; neuroflow init never replaces a file: choose another -o FILE or "
                              "move it away")
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never replaces a file
        except OSError as err:
            raise ConfigError(f"{dest}: cannot create it ({err.strerror}); choose another -o FILE") from err
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text
