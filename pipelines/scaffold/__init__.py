"""``neuroflow init``: a working config detected from a dataset, and ``neuroflow validate``'s table.

- :mod:`.scan`: one pass over the listing (response files, word-timing files, events) by name;
- :mod:`.responses`: which responses to read (kind, derivative, subjects);
- :mod:`.timings`: word-timing sources and which stories they time;
- :mod:`.known_layouts`: datasets the field uses, recognised by their own metadata;
- :mod:`.detect`: the whole detection (:func:`detect` -> :class:`Plan`);
- :mod:`.write_config`: the commented YAML, checked through the config loader;
- :mod:`.survey`: per subject and story, what a config finds in its dataset (``neuroflow validate``).
"""
from __future__ import annotations

from .detect import Plan, detect
from .known_layouts import KNOWN_LAYOUTS, KnownLayout, recognise
from .survey import StoryRow, survey, survey_table
from .write_config import render, write_config

__all__ = ["KNOWN_LAYOUTS", "KnownLayout", "Plan", "StoryRow", "detect", "recognise", "render", "survey",
           "survey_table", "write_config"]
