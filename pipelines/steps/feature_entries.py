"""A feature space's cache entries for one subject's runs, read one space (layer) at a time.

A layer sweep's entry holds every layer of a story (a 7B model's 33 layers x 4,096 dims: 540 KB
per word). The fit reads only the layer it is fitting: each entry is opened once (a ranged
reader on S3, the file itself on a local output) and only that layer's array is read from it,
so a fit holds one layer of every run, never every layer.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack

import numpy as np

from pipelines.errors import DatasetError
from pipelines.features.registry import FeatureResult
from pipelines.resultstore import Store

from ..ingest import Run
from .results import FeatureSet

__all__ = ["FeatureEntries"]

log = logging.getLogger(__name__)


class FeatureEntries:
    """The cache entries of ``feat`` for ``runs`` of ``subject``, open for reading by space.

    Use as a context manager; :meth:`results` gives each run's features of one space.

    Raises
    ------
    DatasetError
        A run the features step could not do (its recorded problem), or an entry missing from
        the cache or unreadable, naming the feature space, the run and the fix.
    """

    def __init__(self, store: Store, spec, feat: FeatureSet, runs: list[Run], subject: str) -> None:
        self.store, self.spec, self.runs, self.subject = store, spec, runs, subject
        self.rels: list[str] = []
        for run in runs:
            problem = feat.get("problems", {}).get(f"{subject}/{run.label}") or feat.get("problems", {}).get(subject)
            if problem:
                raise DatasetError(problem)
            sha = feat.get("runs", {}).get(f"{subject}/{run.label}")
            rel = feat.get("entries", {}).get(sha) if sha else None
            if not rel or not store.exists(rel):
                raise self._bad(run, missing=True)
            self.rels.append(rel)
        self._stack = ExitStack()
        self._npz: dict[str, np.lib.npyio.NpzFile] = {}
        self._meta: dict[str, dict] = {}

    def __enter__(self) -> "FeatureEntries":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _bad(self, run: Run, missing: bool = False) -> DatasetError:
        what = "is missing from" if missing else "went bad in"
        return DatasetError(f"sub-{self.subject} {run.label}: feature {self.spec.name!r} of story {run.story!r} "
                            f"{what} the feature cache; run the features step for it first (neuroflow run does), "
                            "then fit again")

    def _open(self, run: Run, rel: str) -> np.lib.npyio.NpzFile:
        if rel not in self._npz:
            try:
                fh = self._stack.enter_context(self.store.open_read(rel))
                npz = self._stack.enter_context(np.load(fh, allow_pickle=False))
                meta = {"times": np.asarray(npz["__times"]), "sampling": str(npz["__sampling"]),
                        "sfreq": float(npz["__sfreq"]) if "__sfreq" in npz.files else None,
                        "columns": [str(c) for c in npz["__columns"]] if "__columns" in npz.files else None,
                        "spaces": sorted(k for k in npz.files if not k.startswith("__"))}
            except DatasetError:
                raise
            except Exception as err:  # noqa: BLE001 - an unreadable entry is never trusted
                log.warning("feature %s: cache entry %s is unreadable (%s)", self.spec.name, rel, err)
                raise self._bad(run) from err
            self._npz[rel], self._meta[rel] = npz, meta
        return self._npz[rel]

    def spaces(self) -> list[str]:
        """The spaces (``values``, or ``layer<k>`` of a sweep) of the entries."""
        self._open(self.runs[0], self.rels[0])
        return list(self._meta[self.rels[0]]["spaces"])

    def results(self, space: str) -> list[FeatureResult]:
        """Each run's features of ``space`` alone (checked: 2-D, one row per time, finite)."""
        out = []
        for run, rel in zip(self.runs, self.rels):
            npz = self._open(run, rel)
            meta = self._meta[rel]
            try:
                arr = np.asarray(npz[space])
            except Exception as err:  # noqa: BLE001 - a missing or damaged member
                raise self._bad(run) from err
            if arr.ndim != 2 or arr.shape[0] != meta["times"].shape[0] or not np.isfinite(arr).all():
                raise self._bad(run)
            out.append(FeatureResult(values={space: arr}, times=meta["times"], sampling=meta["sampling"],
                                     sfreq=meta["sfreq"], columns=meta["columns"]))
        return out
