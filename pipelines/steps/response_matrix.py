"""One subject's response matrix: its runs z-scored one at a time, in memory or on disk.

The runs arrive one by one from :func:`pipelines.ingest.load_subject` (``on_run``). While
they fit in half the memory budget (:func:`pipelines.limits.memory_budget`,
``NEUROFLOW_MEMORY_BUDGET``) they are kept and stacked into one preallocated float32 matrix
(:func:`stack_responses`). Once they outgrow it, every run is z-scored and appended to an
HDF5 file of column-block chunks under the cache, and released: the fit then reads a
block of columns at a time (``Y`` out of core, see :func:`pipelines.fit.fit_encoding`) and
never holds the matrix. Both ways give the same numbers, bit for bit.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..fit import zscore_by_group
from ..ingest import Run
from ..limits import human, memory_budget

log = logging.getLogger("neuroflow")

__all__ = ["ResponseMatrix", "stack_responses", "standardise_run"]

#: Bytes of one storage chunk of an out-of-core matrix (rows x columns of float32).
SPILL_CHUNK_BYTES: int = 4 * 2**20
#: Rows of one storage chunk (the columns follow from :data:`SPILL_CHUNK_BYTES`).
SPILL_CHUNK_ROWS: int = 256


def standardise_run(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score one run in place (float32), its NaN/Inf set to 0 first.

    Returns the run's finite columns and the columns that vary in it (after z-scoring), the
    two things the whole matrix needs to know of each run.
    """
    ok = np.isfinite(block)
    finite = ok.all(axis=0)
    np.copyto(block, 0.0, where=~ok)
    del ok
    zscore_by_group(block, np.zeros(block.shape[0], dtype=np.int64), out=block)
    varies = np.zeros(block.shape[1], dtype=bool)
    for first in range(0, block.shape[0], 1024):  # in row blocks: no full-size temporary
        varies |= (block[first:first + 1024] != 0).any(axis=0)
    return finite, varies


def stack_responses(runs: list[Run]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The runs' responses as one matrix, z-scored within each run, built in place.

    Each run is copied into one preallocated float32 matrix and its own array released, NaN/Inf
    are zeroed, and the z-scoring writes over the matrix: the responses are held once (plus one
    run in float64), never as a list of runs, a concatenation and a z-scored copy at once.

    Returns
    -------
    Y : float32 array of shape (n_samples, n_targets)
        Z-scored within each run; the columns of targets with any NaN/Inf are NaN (reported
        invalid by the fit, never fitted).
    finite : bool array of shape (n_targets,)
        Targets whose every sample was finite.
    constant : bool array of shape (n_targets,)
        Finite targets that are constant within every run (nothing to fit).
    """
    n_targets = runs[0].data.shape[1]
    Y = np.empty((sum(len(r.times) for r in runs), n_targets), dtype=np.float32)
    finite = np.ones(n_targets, dtype=bool)
    varies = np.zeros(n_targets, dtype=bool)
    start = 0
    for run in runs:
        block = Y[start:start + len(run.times)]
        block[...] = run.data
        run.data = np.empty((0, n_targets), dtype=np.float32)  # copied: the run's own array is released
        run_finite, run_varies = standardise_run(block)
        finite &= run_finite
        varies |= run_varies
        start += len(block)
    Y[:, ~finite] = np.nan
    return Y, finite, finite & ~varies


class ResponseMatrix:
    """Collects a subject's runs (``add``, as ``load_subject``'s ``on_run``) into its response matrix.

    Parameters
    ----------
    spill_root : folder under which an out-of-core matrix is written (a private temporary
        folder, removed by :meth:`close`).
    budget_bytes : the runs are kept in memory while they take at most this many bytes;
        default half of :func:`pipelines.limits.memory_budget`.

    Use as a context manager: the HDF5 file is open (and ``Y`` readable) until it exits.
    """

    def __init__(self, spill_root: str | Path, budget_bytes: int | None = None) -> None:
        self.spill_root = Path(spill_root)
        self.budget_bytes = memory_budget() // 2 if budget_bytes is None else int(budget_bytes)
        self.held: list[Run] = []
        self.held_bytes = 0
        self.finite: np.ndarray | None = None
        self.varies: np.ndarray | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._h5: Any = None
        self._Y: Any = None

    @property
    def out_of_core(self) -> bool:
        """Whether the matrix is on disk (the runs outgrew the budget)."""
        return self._Y is not None

    def add(self, run: Run) -> None:
        """Take one run: kept in memory, or z-scored onto disk and its array released."""
        if not self.out_of_core:
            self.held.append(run)
            self.held_bytes += run.data.shape[0] * run.data.shape[1] * 4
            if self.held_bytes <= self.budget_bytes:
                return
            self._open_spill(run.data.shape[1])
            held, self.held = self.held, []
            for earlier in held:
                self._append(earlier)
            return
        self._append(run)

    def finish(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """``(Y, finite, constant)`` as :func:`stack_responses` gives them; ``Y`` an ``h5py.Dataset``
        (float32, the same values) when the runs were written to disk."""
        if not self.out_of_core:
            return stack_responses(self.held)
        bad = np.flatnonzero(~self.finite)
        width = self._Y.chunks[1]
        for first in np.unique(bad // width) * width:  # the storage blocks holding a non-finite target
            block = self._Y[:, first:first + width]
            block[:, bad[(bad >= first) & (bad < first + width)] - first] = np.nan
            self._Y[:, first:first + width] = block
        self._h5.flush()
        return self._Y, self.finite, self.finite & ~self.varies

    def predictions_like(self) -> Any:
        """An on-disk float32 array of ``Y``'s shape, all NaN, for held-out predictions (out of core only)."""
        return self._h5.create_dataset("predictions", shape=self._Y.shape, dtype=np.float32,
                                       chunks=self._Y.chunks, fillvalue=np.nan)

    def close(self) -> None:
        """Close and delete the on-disk matrix, if any."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = self._Y = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> ResponseMatrix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_spill(self, n_targets: int) -> None:
        import h5py

        self.spill_root.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="responses-", dir=self.spill_root)
        path = Path(self._tmp.name) / "responses.h5"
        log.info("responses over %s: fitted out of core from %s", human(self.budget_bytes), path)
        cols = max(1, min(n_targets, SPILL_CHUNK_BYTES // (4 * SPILL_CHUNK_ROWS)))
        # a chunk cache holding one row of chunks: a run's rows are written without re-reading chunks
        n_blocks = -(-n_targets // cols)
        self._h5 = h5py.File(path, "w", rdcc_nbytes=min(1 << 30, n_blocks * SPILL_CHUNK_BYTES + (1 << 20)),
                             rdcc_nslots=max(521, 10 * n_blocks + 1))
        self._Y = self._h5.create_dataset("Y", shape=(0, n_targets), maxshape=(None, n_targets), dtype=np.float32,
                                          chunks=(SPILL_CHUNK_ROWS, cols))
        self.finite = np.ones(n_targets, dtype=bool)
        self.varies = np.zeros(n_targets, dtype=bool)

    def _append(self, run: Run) -> None:
        block = np.asarray(run.data, dtype=np.float32)
        run.data = np.empty((0, block.shape[1]), dtype=np.float32)  # the matrix holds it now
        run_finite, run_varies = standardise_run(block)
        self.finite &= run_finite
        self.varies |= run_varies
        start = self._Y.shape[0]
        self._Y.resize(start + block.shape[0], axis=0)
        self._Y[start:] = block
