"""Voxelwise encoding models: ridge with one alpha per target, nested CV, banded ridge.

Features ``X`` are mapped to responses ``Y`` by ridge regression with an intercept, one
regularization ``alpha`` per target (voxel, channel), chosen by an inner
leave-one-group-out cross-validation inside the training groups and scored on held-out
groups of an outer loop (every group in turn, or one fixed held-out test set, e.g. a
story played several times). Folds are always whole groups (runs, stories or contiguous
blocks), never shuffled samples, and an optional ``gap`` drops training samples next to
held-out ones so that autocorrelated neighbours do not leak between them.

Solvers (``solver=``):

* ``"primal"``: one eigendecomposition of the centred ``X^T X`` (features x features,
  float64) per training set serves every alpha; the target-dependent work is
  ``X^T Y`` once per outer training set, a downdate ``- X_E^T Y_E`` per inner fold
  (``E`` the samples the inner fold leaves out) and one ``(n_val x n_features)`` by
  ``(n_features x n_targets)`` product per alpha, on the himalaya backend in float32.
* ``"kernel"``: the same in sample space (eigendecomposition of the centred kernel
  ``X X^T`` of the training samples), when there are fewer training samples than features.
* ``"auto"`` (default): ``"kernel"`` when the outer training sets have fewer samples than
  ``X`` has features, else ``"primal"``.
* ``"himalaya"``: himalaya's ``RidgeCV`` per outer fold, kept as the reference the others
  are tested against (same alphas chosen, same scores).

Per target, the primal solver does ``2 * n_features * (n_train + sum_folds n_left_out
+ n_alphas * sum_folds n_val + n_test)`` flops (:func:`ridge_flops`); himalaya's
``RidgeCV`` multiplies ``Y`` by one ``(n_val x n_train)`` matrix per alpha and fold
instead, twice that with 5 runs of 600 TRs and 1,024 features, and a minimal solver with
one SVD per fold (``U^T Y`` per fold) 1.2 times (``bench/results/fit.md``). With fewer
targets than ``n_alphas * n_val`` the per-alpha operators would cost more than the
targets' own work, so the right-hand side is rotated into the eigenbasis once instead
(``mode="rotation"``), decided once for all chunks.

Targets are independent given ``X``, so they are sharded into chunks: each chunk is one
call of a pure function (one dask task when a ``distributed.Client`` is given), and the
result does not depend on how targets are chunked or where chunks run, up to float32
rounding of BLAS (a chunk re-run on the same machine gives the same bits).

Layout, one concern per module: :mod:`~pipelines.fit.splits` (folds, gap, per-group
z-scoring), :mod:`~pipelines.fit.scores` (r, R², averages over folds),
:mod:`~pipelines.fit.checks` (inputs), :mod:`~pipelines.fit.designs` (the primal and
kernel eigendecompositions), :mod:`~pipelines.fit.solvers` (one chunk of targets, the
registry :data:`RIDGE_SOLVERS`, the choice of solver and mode), :mod:`~pipelines.fit.banded`
(banded ridge: one chunk of targets, and himalaya's ``BandedRidgeCV`` as its reference),
:mod:`~pipelines.fit.chunks` (chunk sizes, GPU cap, running chunks in process or on
dask) and :mod:`~pipelines.fit.encoding` (the public fits and their results).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .checks import check_alphas
from .chunks import GPU_CHUNK_MAX_BYTES, MEMORY_BUDGET_BYTES, SEND_RETRIES, columns, default_targets_chunk, run_chunks
from .encoding import (
    BandedEncodingResult,
    EncodingResult,
    fit_banded_encoding,
    fit_encoding,
    fit_ridge_fixed_alpha,
)
from .scores import pearson_r, r2_score
from .solvers import RIDGE_SOLVERS, SOLVERS, ChunkInputs, fit_chunk, ridge_flops
from .splits import OuterSplit, nested_group_splits, zscore_by_group

__all__ = [
    "GPU_CHUNK_MAX_BYTES",
    "MEMORY_BUDGET_BYTES",
    "RIDGE_SOLVERS",
    "SEND_RETRIES",
    "SOLVERS",
    "BandedEncodingResult",
    "ChunkInputs",
    "EncodingResult",
    "OuterSplit",
    "default_targets_chunk",
    "fit_banded_encoding",
    "fit_chunk",
    "fit_encoding",
    "fit_ridge_fixed_alpha",
    "nested_group_splits",
    "pearson_r",
    "r2_score",
    "ridge_flops",
    "run_chunks",
    "zscore_by_group",
]

# The private names this module had before it became a package, for code and tests that
# still import them from here.
_check_alphas = check_alphas
_columns = columns
_run_chunks = run_chunks


def _fit_chunk(X: np.ndarray, Y: np.ndarray, *args: Any, **kwargs: Any) -> dict[str, np.ndarray | None]:
    """:func:`fit_chunk` with ``X`` an array (no shared decompositions), as it was called before."""
    return fit_chunk(ChunkInputs(X), Y, *args, **kwargs)
