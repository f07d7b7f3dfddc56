"""Chunks of targets: how many per chunk, and running them in process or on dask.

Targets are independent given ``X``: a chunk is one call of a pure function, sized to
the memory free on this machine, on each dask worker, and on the GPU (never more than
:data:`GPU_CHUNK_MAX_BYTES` there). On dask, shared inputs are broadcast once, each
chunk's columns of ``Y`` are scattered to its worker, and data lost with a dead worker
is sent again (:data:`SEND_RETRIES` times at most).
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import GPU_BACKENDS, memory_budget_bytes
from ..errors import FitError
from ..progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from distributed import Client

__all__ = [
    "GPU_CHUNK_MAX_BYTES",
    "MEMORY_BUDGET_BYTES",
    "SEND_RETRIES",
    "broadcast",
    "bytes_per_target",
    "columns",
    "default_targets_chunk",
    "plan_chunks",
    "run_chunks",
    "scatter",
    "set_columns",
]

#: Memory budget of one chunk when none is given and none can be measured.
MEMORY_BUDGET_BYTES: int = 256 * 2**20

#: Most bytes of per-target arrays one chunk holds on a GPU, whatever the free device memory:
#: the target matrix is never copied to the device whole, a chunk's copy-in and results stay
#: bounded, and ~14,000 LeBel-sized targets per chunk still run the products at the GPU's rate.
GPU_CHUNK_MAX_BYTES: int = 1 << 30

#: Times data is sent to dask workers again when a worker receiving or holding it died (a failed
#: scatter, or a chunk cancelled because its columns of Y were lost with their worker).
SEND_RETRIES: int = 3


def bytes_per_target(n_samples: int, n_features: int, max_train: int, max_val: int, max_test: int,
                     solver: str, mode: str, return_predictions: bool) -> int:
    """float32 values a chunk holds per target, times 4 (see default_targets_chunk)."""
    values = n_samples  # the chunk of Y (a copy on a dask worker or a GPU)
    values += n_samples if return_predictions else 0
    if solver == "kernel":
        values += max_train  # Y of the training rows
        m = max_train
    else:
        values += 2 * (n_features + 1)  # outer and inner right-hand sides
        m = n_features + 1
    values += 2 * max_val + max_test  # validation rows, residuals, held-out predictions
    if mode == "rotation":
        values += m + max_val
    if solver == "himalaya":
        values += 20 * max_val  # himalaya's predictions for every alpha (about)
    return 4 * values


def default_targets_chunk(n_samples: int, n_features: int, max_val: int, max_test: int,
                          budget_bytes: int = MEMORY_BUDGET_BYTES, *, max_train: int | None = None,
                          solver: str = "primal", mode: str = "operator",
                          return_predictions: bool = True) -> int:
    """Number of targets per chunk that keeps one chunk's arrays under a memory budget.

    Per target, a chunk holds its float32 responses (``n_samples``), its held-out
    predictions (``n_samples``, when returned), the outer and inner right-hand sides
    (``2 * (n_features + 1)``; the kernel solver holds the training rows of ``Y``
    instead), the validation rows and their residuals (``2 * max_val``) and the
    held-out predictions of one fold (``max_test``)::

        chunk = budget_bytes // (4 * (2 * n_samples + 2 * (n_features + 1) + 2 * max_val + max_test))

    (at least 1). The target-independent arrays (one alpha's operator at a time,
    ``max_val * (n_features + 1)`` floats) come on top. With 256 MiB, 3300
    samples, 1024 features, 600-sample validation folds and a 300-sample test set this
    is about 7,200 targets per chunk.
    """
    per_target = bytes_per_target(n_samples, n_features, max_train or n_samples, max_val, max_test,
                                  solver, mode, return_predictions)
    return max(1, int(budget_bytes) // per_target)


def columns(Y: Any, cols: np.ndarray) -> np.ndarray:
    """``Y[:, cols]`` (``cols`` increasing): a view when ``cols`` is a contiguous range.

    ``Y`` may also be an array on storage (an ``h5py.Dataset``, a zarr or dask array: see
    :func:`pipelines.fit.checks.is_stored`): the range ``cols[0]..cols[-1]`` is read as one
    block of columns and the others dropped in memory.
    """
    if not cols.size:
        return np.empty((Y.shape[0], 0), dtype=np.float32)
    first, last = int(cols[0]), int(cols[-1]) + 1
    contiguous = last - first == cols.size
    if isinstance(Y, np.ndarray):
        return Y[:, first:last] if contiguous else Y[:, cols]
    block = np.asarray(Y[:, first:last], dtype=np.float32)
    return block if contiguous else block[:, cols - first]


def set_columns(out: Any, cols: np.ndarray, values: np.ndarray) -> None:
    """``out[:, cols] = values`` (``cols`` increasing); on storage, one block of columns written.

    The block spans ``cols[0]..cols[-1]``; the columns in it that are not in ``cols`` are
    written NaN (the chunks of a fit cover disjoint ranges, and the targets between their
    columns are the invalid ones, NaN in every result).
    """
    if isinstance(out, np.ndarray) or not cols.size:
        out[:, cols] = values
        return
    first, last = int(cols[0]), int(cols[-1]) + 1
    if last - first == cols.size:
        out[:, first:last] = values
        return
    block = np.full((out.shape[0], last - first), np.nan, dtype=np.float32)
    block[:, cols - first] = values
    out[:, first:last] = block


def _worker_threads(client: Client) -> dict[str, int]:
    threads = dict(client.nthreads())
    if not threads:
        raise FitError("The dask cluster has no workers; start some or use `compute.dask: none`.")
    return threads


def _chunk_budget(backend_name: str, budget: int) -> int:
    """A chunk's memory budget: on a GPU, never more than :data:`GPU_CHUNK_MAX_BYTES`."""
    return min(budget, GPU_CHUNK_MAX_BYTES) if backend_name in GPU_BACKENDS else budget


def plan_chunks(valid_idx: np.ndarray, n_targets_chunk: int | None, per_target: int, backend_name: str,
                client: Client | None, y_bytes: int | None = None) -> tuple[list[np.ndarray], int | None]:
    """Chunks of target indices, and the BLAS threads each dask task may use.

    ``valid_idx`` (n_valid,) are the targets to fit, ``per_target`` the bytes a chunk holds
    per target (:func:`bytes_per_target`). Returns the chunks (index arrays that cover
    ``valid_idx`` in order) and the BLAS threads of each dask task (None in process).

    With ``n_targets_chunk`` None, the chunk size comes from the memory free on this machine
    (or on the most loaded dask worker) and on the GPU; then the chunks are made equal in
    size (no small last chunk) and, on dask, their number a multiple of the worker threads,
    so every thread gets the same share of the work.

    In process, ``y_bytes`` (the size of ``Y`` when it is held in memory) also caps a chunk at
    half of it (never under :data:`MEMORY_BUDGET_BYTES`): the fit then holds at most about 1.5
    times the responses, whatever the free memory, and a large chunk gains no speed (the
    decompositions of ``X`` are shared by the chunks).
    """
    n_valid = valid_idx.size
    n_threads = None
    if client is None:
        if n_targets_chunk is None:
            budget = _chunk_budget(backend_name, memory_budget_bytes(backend_name))
            if y_bytes is not None:
                budget = min(budget, max(MEMORY_BUDGET_BYTES, y_bytes // 2))
            n_targets_chunk = _balanced(n_valid, max(1, budget // per_target), 1)
    else:
        threads = _worker_threads(client)
        total = sum(threads.values())
        if n_targets_chunk is None:
            budgets = client.run(memory_budget_bytes, backend_name, max(threads.values()))
            budget = _chunk_budget(backend_name, min(budgets.values()) if budgets else MEMORY_BUDGET_BYTES)
            n_targets_chunk = _balanced(n_valid, max(1, budget // per_target), total)
        n_chunks = math.ceil(n_valid / n_targets_chunk)
        n_threads = max(1, min(min(threads.values()), total // max(1, min(n_chunks, total))))
    chunks = [valid_idx[i:i + n_targets_chunk] for i in range(0, n_valid, n_targets_chunk)]
    return chunks, n_threads


def _balanced(n_valid: int, largest: int, multiple: int) -> int:
    """Chunk size at most ``largest`` giving equal chunks, their number a multiple of ``multiple``."""
    n_chunks = math.ceil(n_valid / largest)
    n_chunks = min(max(1, n_valid), multiple * math.ceil(n_chunks / multiple))
    return max(1, math.ceil(n_valid / n_chunks))


def run_chunks(func: Callable[..., dict], shared: Any, Y: np.ndarray, chunks: list[np.ndarray],
               client: Client | None, n_threads: int | None, *args: Any) -> list[dict]:
    """``func(shared, Y[:, chunk], *args)`` for every chunk, in process or on dask.

    Returns the chunks' results in the order of ``chunks``.

    On dask, ``shared`` holds futures placed by the caller (:func:`broadcast`); each
    chunk's columns of ``Y`` are scattered straight to a worker (not embedded in the task
    graph, which would route them through the scheduler) and at most two chunks per worker
    thread are in flight, so the cluster never holds a second copy of ``Y``. Tasks are pure:
    a task lost with its worker is recomputed elsewhere, and a chunk whose columns were lost
    with their worker is scattered again (:data:`SEND_RETRIES` times at most); either
    gives the same result.
    """
    progress = Progress(len(chunks), f"fit: {Y.shape[1]} targets in chunks", unit="chunks")
    if client is None:
        out = []
        for c in chunks:
            out.append(func(shared, columns(Y, c), *args))
            progress.update()
        progress.close()
        return out
    from distributed import as_completed  # dask is optional: loaded only when a client is given

    parts: list[dict | None] = [None] * len(chunks)
    order = iter(range(len(chunks)))
    index: dict[str, int] = {}
    resubmits = [0] * len(chunks)
    running = as_completed()

    def submit(batch: list[int]) -> None:
        if not batch:
            return
        # one scatter call for the batch: the blocks travel to their workers concurrently
        blocks = scatter(client, [np.ascontiguousarray(columns(Y, chunks[i])) for i in batch], direct=True)
        for i, block in zip(batch, blocks):
            future = client.submit(func, shared, block, *args, n_threads=n_threads, pure=True)
            index[future.key] = i
            running.add(future)

    submit(list(itertools.islice(order, 2 * sum(_worker_threads(client).values()))))
    for future in running:
        i = index.pop(future.key)
        if future.cancelled() and resubmits[i] < SEND_RETRIES:
            # its columns of Y were lost with their worker: send them again
            resubmits[i] += 1
            submit([i])
            continue
        parts[i] = future.result()
        future.release()
        progress.update()
        submit(list(itertools.islice(order, 1)))
    progress.close()
    return parts  # type: ignore[return-value]


def scatter(client: Client, data: Any, **kwargs: Any) -> Any:
    """``client.scatter(data, hash=False, **kwargs)``, tried again when a worker it was
    sending to died (the next try asks the scheduler for the workers alive then).

    ``hash=False``: a key of its own; with a content hash, an earlier identical fit releasing
    its copy can delete this one's before its tasks run ("lost dependencies").
    """
    for attempt in range(SEND_RETRIES + 1):
        try:
            return client.scatter(data, hash=False, **kwargs)
        # a worker dead mid-send: connection refused or reset (OSError, as distributed's
        # CommClosedError), or the scheduler no longer knowing the worker (its KeyError)
        except (OSError, KeyError):
            if attempt == SEND_RETRIES:
                raise
            time.sleep(0.5 * (attempt + 1))


def broadcast(client: Client | None, data: Any) -> Any:
    """``data`` itself in process; on dask, a future of it held by every worker."""
    return data if client is None else scatter(client, data, broadcast=True)


# plan_chunks' name from before the split: tests patch this module's memory_budget_bytes and call it
_plan_chunks = plan_chunks
