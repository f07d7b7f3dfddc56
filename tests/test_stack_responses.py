"""The response matrix is built in place: the same numbers as the plain concatenate-and-z-score
recipe, with the responses held once."""
from __future__ import annotations

import numpy as np

from pipelines.fit import zscore_by_group
from pipelines.ingest import Run
from pipelines.steps.response_matrix import stack_responses


def _runs(rng, lengths=(50, 70, 40), n_targets=30) -> list[Run]:
    runs = []
    for i, n in enumerate(lengths):
        data = rng.standard_normal((n, n_targets)).astype(np.float32) * (i + 1) + i
        data[:, 3] = 7.0  # constant in every run
        runs.append(Run(label=str(i), data=data, times=np.arange(n) * 2.0, tr=2.0, key=f"run-{i}"))
    runs[1].data[5, 4] = np.nan
    runs[2].data[0, 6] = np.inf
    runs[0].data[:, 8] = 1.0  # constant in one run only: still varies across runs
    return runs


def _plain_recipe(runs: list[Run]):
    """What fit_subject did before: concatenate, zero NaN/Inf, z-score a copy."""
    lengths = [len(r.times) for r in runs]
    Y = np.concatenate([r.data for r in runs]).astype(np.float32)
    run_ids = np.repeat(np.arange(len(lengths)), lengths)
    finite = np.isfinite(Y).all(axis=0)
    Y = np.where(np.isfinite(Y), Y, 0.0).astype(np.float32)
    Y = zscore_by_group(Y, run_ids)
    constant = finite & ~(np.abs(Y).sum(axis=0) > 0)
    Y[:, ~finite] = np.nan
    return Y, finite, constant


def test_stack_responses_equals_the_plain_recipe_bit_for_bit(rng):
    expected = _plain_recipe(_runs(np.random.default_rng(3)))
    runs = _runs(np.random.default_rng(3))
    Y, finite, constant = stack_responses(runs)
    np.testing.assert_array_equal(Y, expected[0])  # NaN in the same places, every other bit equal
    np.testing.assert_array_equal(finite, expected[1])
    np.testing.assert_array_equal(constant, expected[2])
    assert list(np.flatnonzero(~finite)) == [4, 6] and list(np.flatnonzero(constant)) == [3]
    assert all(r.data.size == 0 for r in runs)  # each run's own copy was released


def test_zscore_in_place_equals_a_fresh_copy(rng):
    A = rng.standard_normal((90, 12)).astype(np.float32) * 5 + 2
    groups = np.repeat([0, 1, 2], 30)
    fresh = zscore_by_group(A, groups)
    same = A.copy()
    assert zscore_by_group(same, groups, out=same) is same
    np.testing.assert_array_equal(same, fresh)
