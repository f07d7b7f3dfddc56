"""The ingest options: the config's ``dataset.responses`` and ``dataset.word_timings`` models, with overrides.

Ingest reads the pydantic models of :mod:`pipelines.config` directly (:class:`ResponsesConfig`,
:class:`WordTimingsConfig`). Callers (tests, notebooks) may override fields with a dict: the
result is a ``model_copy(update=...)`` of the config's model whose values are validated against
each field's type and bounds; an unknown field is a ValueError naming the valid ones. The
config's cross-field and key checks (``check_relative_key``, "needs 'files' or a 'pattern'")
are not re-run on overrides: every key is still checked when it is read (``safe_key``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Mapping, TypeVar

from pydantic import BaseModel, TypeAdapter

from ..config import AnalysisConfig, ResponsesConfig, WordTimingsConfig

__all__ = ["ResponseOptions", "WordOptions", "options_from_config", "with_overrides"]

#: Former names of the two config models (``dataset.responses``, ``dataset.word_timings``), kept so
#: existing imports keep working; they are the same classes.
ResponseOptions = ResponsesConfig
WordOptions = WordTimingsConfig

Model = TypeVar("Model", bound=BaseModel)


@lru_cache(maxsize=None)
def _field_adapter(model_cls: type[BaseModel], name: str) -> TypeAdapter:
    info = model_cls.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation)


def with_overrides(model: Model, overrides: Mapping[str, Any] | None, label: str) -> Model:
    """`model` with the fields of `overrides` replaced, each value validated against its field's type.

    Parameters
    ----------
    model : a config model (frozen pydantic model).
    overrides : field name -> value; None or empty gives an unchanged copy.
    label : the options' name in the error message ("ResponseOptions", "WordOptions").

    Raises
    ------
    ValueError
        An unknown field (the message lists the valid ones).
    pydantic.ValidationError
        A value of the wrong type or out of the field's bounds.
    """
    names = type(model).model_fields
    unknown = set(overrides or {}) - set(names)
    if unknown:
        raise ValueError(f"unknown {label} {sorted(unknown)}; valid: {sorted(names)}")
    update = {name: _field_adapter(type(model), name).validate_python(value)
              for name, value in (overrides or {}).items()}
    return model.model_copy(update=update)


def _as_model(model_cls: type[Model], value: object, label: str) -> Model:
    """`value` when it is a `model_cls`; else its attributes of the same names over the defaults (older configs)."""
    if isinstance(value, model_cls):
        return value
    present = {name: getattr(value, name) for name in model_cls.model_fields
               if value is not None and hasattr(value, name)}
    return with_overrides(model_cls.model_construct(), present, label)


def options_from_config(config: AnalysisConfig, responses: Mapping[str, Any] | ResponsesConfig | None = None,
                        words: Mapping[str, Any] | WordTimingsConfig | None = None,
                        ) -> tuple[ResponsesConfig, WordTimingsConfig]:
    """The ingest options of a config (``dataset.responses``, ``dataset.word_timings``), then overrides.

    A model given as `responses` / `words` is taken as it is; a dict overrides fields of the config's
    model (see :func:`with_overrides`). Config fields are read by name, so a config object without
    the newer fields gets the defaults. ``tasks`` falls back to ``dataset.tasks`` (if the config has
    it), then ``(dataset.task,)``.
    """
    ds = config.dataset
    if isinstance(responses, ResponsesConfig):
        resp = responses
    else:
        resp = with_overrides(_as_model(ResponsesConfig, ds.responses, "ResponseOptions"), responses,
                              "ResponseOptions")
    if resp.tasks is None:
        resp = with_overrides(resp, {"tasks": tuple(getattr(ds, "tasks", None) or (ds.task,))}, "ResponseOptions")
    if isinstance(words, WordTimingsConfig):
        wopts = words
    else:
        wopts = with_overrides(_as_model(WordTimingsConfig, ds.word_timings, "WordOptions"), words, "WordOptions")
    return resp, wopts
