"""Reading a config's YAML safely: size, depth and node limits (an alias bomb of 1 KB expands to
gigabytes), then plain values only. Used by :mod:`pipelines.config` and ``neuroflow init``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_DEPTH", "MAX_CONFIG_NODES", "MAX_OVERRIDES", "safe_yaml_load",
           "read_config_text"]


# Limits on what a config may be: a config is a page of settings, so anything far larger or
# deeper is a mistake or an attack (a YAML alias bomb of 1 KB expands to gigabytes).
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000
MAX_OVERRIDES = 256


def _yaml_events_check(text: str, origin: str) -> None:
    """Refuse nesting deeper than MAX_CONFIG_DEPTH while scanning the event stream (no recursion)."""
    depth = 0
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    mark = event.start_mark
                    raise ConfigError(f"{origin}: line {mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} "
                                      "levels deep; a neuroflow config is a few levels of keys")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    finally:
        loader.dispose()


def _check_node_graph(root: yaml.Node, origin: str) -> None:
    """Refuse duplicate keys and aliases that expand past MAX_CONFIG_NODES (counted with memo,
    before anything is constructed)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:  # depth is bounded by _yaml_events_check
        if id(node) in active:
            raise ConfigError(f"{origin}: line {node.start_mark.line + 1}: a YAML alias refers to the value it is "
                              "inside of (a loop); write the values out")
        if id(node) in sizes:
            return sizes[id(node)]
        active.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple, int] = {}
            total = 1
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    ident = (key.tag, key.value)
                    if ident in seen:
                        raise ConfigError(f"{origin}: line {key.start_mark.line + 1}: key {key.value!r} appears "
                                          f"twice in one mapping (first on line {seen[ident]}); keep one")
                    seen[ident] = key.start_mark.line + 1
                total += size(key) + size(value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(item) for item in node.value)
        else:
            total = 1
        if total > MAX_CONFIG_NODES:
            raise ConfigError(f"{origin}: expands to more than {MAX_CONFIG_NODES:,} values (YAML aliases "
                              "repeating one another); write the values out or use fewer aliases")
        sizes[id(node)] = total
        active.discard(id(node))
        return total

    size(root)


def safe_yaml_load(text: str, origin: str) -> Any:
    """``yaml.safe_load`` with limits: size, nesting depth, alias expansion and duplicate keys."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{origin}: over {MAX_CONFIG_BYTES // 1024} KiB; a config is a page of settings")
    try:
        _yaml_events_check(text, origin)
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None
            _check_node_graph(root, origin)
            return loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{origin}:{where} is not valid YAML ({problem})") from err


def read_config_text(path: Path) -> str:
    """The config file's text: a regular file, at most MAX_CONFIG_BYTES, in UTF-8."""
    try:
        if not path.is_file():
            what = "is a folder" if path.is_dir() else ("not found" if not path.exists() else "is not a regular file")
            raise ConfigError(f"{path}: config file {what}; give the path to a YAML config")
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except PermissionError as err:
        raise ConfigError(f"{path}: config file cannot be read (permission denied)") from err
    except OSError as err:
        raise ConfigError(f"{path}: config file cannot be read ({err.strerror})") from err
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES // 1024} KiB; a config is a page of settings, "
                          "check that this is the right file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                          f"{err.start}); save the config as UTF-8") from err
