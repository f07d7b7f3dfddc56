"""Responses larger than the memory budget are fitted out of core, with the same numbers.

The runs are z-scored one at a time onto an HDF5 file of column-block chunks; the fit reads a
block of columns per chunk and writes its per-target results chunk by chunk. Every result is
compared with the in-memory path on the same data.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipelines.cache import load_npz
from pipelines.config import parse_config
from pipelines.fit import fit_banded_encoding, fit_encoding
from pipelines.fit.checks import is_stored, valid_targets
from pipelines.fit.chunks import columns, set_columns
from pipelines.ingest import Run
from pipelines.resultstore import ResultStore
from pipelines.steps.response_matrix import ResponseMatrix, stack_responses

from .conftest import demo_config, make_bucket
from .datasets import hf5_bytes, metadata_files, planted, stage, synthetic_words, textgrid_bytes, word_rate


def _runs(seed: int, lengths=(50, 70, 40), n_targets=3000) -> list[Run]:
    rng = np.random.default_rng(seed)
    runs = []
    for i, n in enumerate(lengths):
        data = rng.standard_normal((n, n_targets)).astype(np.float32) * (i + 1) + i
        data[:, 3] = 7.0  # constant in every run
        runs.append(Run(label=str(i), data=data, times=np.arange(n) * 2.0, tr=2.0, key=f"run-{i}"))
    runs[1].data[5, 4] = np.nan  # non-finite targets in different storage blocks
    runs[2].data[0, 2500] = np.inf
    runs[0].data[:, 8] = 1.0  # constant in one run only
    return runs


@pytest.mark.parametrize("budget", [0, 50 * 3000 * 4 + 1])  # straight to disk; after the first run is held
def test_the_matrix_on_disk_holds_the_numbers_of_the_one_in_memory(tmp_path, budget):
    expected = stack_responses(_runs(5))
    with ResponseMatrix(tmp_path / "spill", budget_bytes=budget) as matrix:
        runs = _runs(5)
        for run in runs:
            matrix.add(run)
        Y, finite, constant = matrix.finish()
        assert matrix.out_of_core and isinstance(Y, h5py.Dataset) and is_stored(Y)
        assert all(r.data.size == 0 for r in runs)  # every run's array was released
        np.testing.assert_array_equal(Y[:], expected[0])  # bit for bit, NaN columns included
        np.testing.assert_array_equal(finite, expected[1])
        np.testing.assert_array_equal(constant, expected[2])
        assert list(np.flatnonzero(~finite)) == [4, 2500] and list(np.flatnonzero(constant)) == [3]
        np.testing.assert_array_equal(valid_targets(Y), valid_targets(expected[0]))
        spilled = list((tmp_path / "spill").iterdir())
        assert len(spilled) == 1
    assert list((tmp_path / "spill").iterdir()) == []  # the on-disk matrix is gone with the fit


def test_runs_that_fit_the_budget_stay_in_memory(tmp_path):
    with ResponseMatrix(tmp_path / "spill", budget_bytes=1 << 30) as matrix:
        for run in _runs(6):
            matrix.add(run)
        Y, _, _ = matrix.finish()
        assert not matrix.out_of_core and isinstance(Y, np.ndarray)
        np.testing.assert_array_equal(Y, stack_responses(_runs(6))[0])
    assert not (tmp_path / "spill").exists()


def _design(seed: int, n_samples: int, n_features: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, n_features)).astype(np.float32)
    groups = np.repeat(np.arange(4), n_samples // 4)
    return X, groups


@pytest.mark.parametrize("solver", ["primal", "kernel"])
def test_a_fit_on_a_stored_matrix_equals_the_fit_in_memory(tmp_path, solver):
    X, groups = _design(1, 160)
    rng = np.random.default_rng(2)
    Y = (X[:, :2] @ rng.standard_normal((2, 900)) + rng.standard_normal((160, 900))).astype(np.float32)
    Y[:, 7] = np.nan
    Y[:, 11] = 0.0
    with h5py.File(tmp_path / "y.h5", "w") as h5:
        stored = h5.create_dataset("Y", data=Y, chunks=(64, 128))
        out = h5.create_dataset("P", shape=Y.shape, dtype=np.float32, chunks=(64, 128), fillvalue=np.nan)
        lazy = fit_encoding(X, stored, groups, [0.1, 10, 1000], n_targets_chunk=250, solver=solver,
                            predictions_out=out)
        held = fit_encoding(X, Y, groups, [0.1, 10, 1000], n_targets_chunk=250, solver=solver)
        for name in ("r", "r2", "alpha", "valid", "fold_alphas", "sample_fold"):
            np.testing.assert_array_equal(getattr(lazy, name), getattr(held, name), err_msg=name)
        assert lazy.predictions is out
        np.testing.assert_array_equal(out[:], held.predictions)  # NaN for the invalid targets too
        assert not lazy.valid[7] and not lazy.valid[11]


def test_a_banded_fit_on_a_stored_matrix_equals_the_fit_in_memory(tmp_path):
    X, groups = _design(3, 160, 8)
    rng = np.random.default_rng(4)
    Y = (X[:, :3] @ rng.standard_normal((3, 300)) + rng.standard_normal((160, 300))).astype(np.float32)
    with h5py.File(tmp_path / "y.h5", "w") as h5:
        stored = h5.create_dataset("Y", data=Y, chunks=(160, 64))
        bands = {"a": X[:, :4], "b": X[:, 4:]}
        lazy = fit_banded_encoding(bands, stored, groups, [1, 100], n_iter=3, n_targets_chunk=100,
                                   return_predictions=False)
        held = fit_banded_encoding(bands, Y, groups, [1, 100], n_iter=3, n_targets_chunk=100,
                                   return_predictions=False)
    np.testing.assert_array_equal(lazy.r, held.r)
    np.testing.assert_array_equal(lazy.r2_split, held.r2_split)


def test_reading_and_writing_blocks_of_stored_columns(tmp_path):
    A = np.arange(40, dtype=np.float32).reshape(4, 10)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        stored = h5.create_dataset("A", data=A)
        cols = np.array([2, 3, 6])
        np.testing.assert_array_equal(columns(stored, cols), A[:, cols])
        np.testing.assert_array_equal(columns(stored, np.arange(4, 8)), A[:, 4:8])
        out = h5.create_dataset("B", shape=A.shape, dtype=np.float32, fillvalue=np.nan)
        set_columns(out, cols, A[:, cols])
        got = out[:]
        np.testing.assert_array_equal(got[:, cols], A[:, cols])
        assert np.isnan(got[:, [0, 1, 4, 5, 7, 8, 9]]).all()


# --- end to end: one LeBel-shaped subject, in memory and out of core --------------------------------

META = "ds003020_lebel_meta"
SOURCE = "s3://openneuro.org/ds003020-ooc"
STORIES = ["inamoment", "adollshouse", "theclosetthatateeverything", "life"]
START, TR, TRIM, N_VOX, PLANTED = 10.0, 2.0, 20, 2000, list(range(10))


@pytest.fixture(scope="module")
def lebel_2000(s3_url):
    rng = np.random.default_rng(16)
    files = dict(metadata_files(META))
    respdict = json.loads(files["derivative/respdict.json"].read_text())
    for story in STORIES:
        n = respdict[story] - TRIM
        words = synthetic_words(rng, 1.0, START + TR * n - 3.0)
        files[f"derivative/TextGrids/{story}.TextGrid"] = textgrid_bytes(words, START + TR * n + 8)
        data = planted(rng, word_rate(words, START + TR * np.arange(n)), N_VOX, PLANTED, snr=1.0, scale=10.0,
                       base=100.0)
        data[:, 1500] = np.nan if story == "life" else data[:, 1500]  # a voxel outside the brain in one story
        files[f"derivative/preprocessed_data/UTS01/{story}.hf5"] = hf5_bytes(data)
    stage(SOURCE, files)
    return SOURCE


def _analysis(source: str, output: str, tmp_path) -> dict:
    cfg = demo_config(tmp_path, output, subjects=("UTS01",))
    cfg["dataset"].update(
        source=source, version="3.1.0", task="stories",
        responses={"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5",
                   "start_time": START, "tr_counts": "derivative/respdict.json", "tr_counts_trim": TRIM},
        word_timings={"format": "textgrid", "files": {}, "pattern": "derivative/TextGrids/{story}.TextGrid",
                      "tier": "word"})
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"delays": [1, 2, 3, 4], "alphas": [1, 100, 10000], "permutations": 50}
    cfg["decoding"] = {"enabled": True, "max_targets": 40}
    cfg["compute"] = {"dask": "none"}
    return cfg


@pytest.mark.slow
def test_an_analysis_out_of_core_publishes_the_numbers_of_the_one_in_memory(lebel_2000, tmp_path, monkeypatch,
                                                                           caplog):
    from pipelines.run import run_analysis

    results = {}
    for mode, budget in (("memory", None), ("disk", str(16 * 2**20))):  # Y is 9.5 MB: spilled over 8 MiB
        make_bucket(f"ooc-{mode}")
        if budget:
            monkeypatch.setenv("NEUROFLOW_MEMORY_BUDGET", budget)
        caplog.clear()
        with caplog.at_level("INFO", logger="neuroflow"):
            result = run_analysis(parse_config(_analysis(lebel_2000, f"s3://ooc-{mode}", tmp_path)),
                                  cache_dir=tmp_path / f"cache-{mode}")
        assert ("fitted out of core" in caplog.text) == (mode == "disk")
        assert result["status"] == "complete"
        (fit,) = result["fits"]
        results[mode] = (fit, load_npz(ResultStore(f"s3://ooc-{mode}").get_bytes(fit["result_rel"])))
        assert list((tmp_path / f"cache-{mode}" / "staging").iterdir()) == []  # nothing left on disk
    (fit_m, mem), (fit_d, disk) = results["memory"], results["disk"]
    assert set(mem) == set(disk) and "wordrate__p" in mem and "wordrate__decoding_r" in mem
    for key in mem:
        np.testing.assert_array_equal(disk[key], mem[key], err_msg=key)
    assert fit_d["metrics"] == fit_m["metrics"] and fit_d["n_invalid_targets"] == 1
    assert np.nanmean(mem["wordrate__r"][PLANTED]) > 0.3 and mem["wordrate__p"][PLANTED].max() < 0.05


def test_the_targets_to_fit_can_be_given_instead_of_read_from_y():
    X, groups = _design(5, 160)
    rng = np.random.default_rng(6)
    Y = (X[:, :2] @ rng.standard_normal((2, 50)) + rng.standard_normal((160, 50))).astype(np.float32)
    Y[:, 3] = 0.0
    given = np.ones(50, dtype=bool)
    given[[3, 9]] = False  # 9 varies but the caller leaves it out
    fit = fit_encoding(X, Y, groups, [1, 100], valid=given)
    np.testing.assert_array_equal(fit.valid, given)
    assert np.isnan(fit.r[[3, 9]]).all() and np.isfinite(fit.r[given]).all()
    np.testing.assert_array_equal(fit.r[given], fit_encoding(X, Y, groups, [1, 100]).r[given])
    from pipelines.errors import FitError

    with pytest.raises(FitError, match=r"'valid' must be a bool array of shape \(50,\)"):
        fit_encoding(X, Y, groups, [1, 100], valid=np.ones(49, dtype=bool))
