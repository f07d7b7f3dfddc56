"""Where a transformers model comes from, and whether it is safe to load.

A local folder must hold ``config.json`` and ``*.safetensors`` weights; a hub id must be
available offline; a config asking for its own code is refused. Used by the language and
speech model extractors and by the runtime choice (dtype, device) alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.errors import ModelError

__all__ = ["first_line", "safe_model_config"]


def safe_model_config(model: str, revision: str | None, label: str) -> tuple[str, dict[str, Any], Any]:
    """(source, from_pretrained kwargs, config) of a model that is safe to load, else ModelError.

    A local folder must hold ``config.json`` and ``*.safetensors`` weights (pickled weights are
    refused, as they can run code when unpickled); a hub id must be available offline; a config
    asking for its own code (``auto_map``) is refused: ``trust_remote_code`` is never set.
    ``label`` names the model in messages ("model", "speech model").
    """
    from transformers import AutoConfig  # heavy and optional: imported only when a model loads

    path = Path(os.path.expanduser(model))
    local = path.is_dir()
    if not local and _looks_like_path(model):
        raise ModelError(f"{label} {model!r} not found: give a local folder or a hub id available offline")
    if local:
        if not (path / "config.json").is_file():
            raise ModelError(f"{label} folder {model!r} has no config.json: give a folder written by "
                             "save_pretrained")
        if not any(path.glob("*.safetensors")):
            raise ModelError(
                f"{label} folder {model!r} has no *.safetensors weights (pickled .bin files are refused): "
                "convert it with save_pretrained(folder, safe_serialization=True) on a trusted machine"
            )
    src = str(path) if local else model
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision is not None and not local:
        kwargs["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(src, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{label} {model!r} cannot be loaded ({first_line(exc)}): "
                         "give a local folder or a hub id available offline") from exc
    if getattr(config, "auto_map", None):
        raise ModelError(
            f"{label} {model!r} asks for its own code (auto_map in config.json); neuroflow never runs "
            "remote code (trust_remote_code): use a model whose architecture transformers ships"
        )
    return src, kwargs, config


def _looks_like_path(model: str) -> bool:
    """True when ``model`` can only be a filesystem path (hub ids are ``name`` or ``org/name``)."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).exists()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
