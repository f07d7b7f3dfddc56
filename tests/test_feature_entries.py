"""The fit reads one layer of a sweep's cache entries at a time (issue 17, item 2), through ranged
reads on the real S3 server and plain reads of a local output."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.cache import save_npz
from pipelines.errors import DatasetError
from pipelines.features.registry import FeatureResult, parse_feature
from pipelines.ingest.responses import Run
from pipelines.localstore import LocalStore
from pipelines.resultstore import ResultStore
from pipelines.steps.feature_entries import FeatureEntries
from pipelines.steps.fit_layer import layer_units

N_LAYERS, N_WORDS, DIMS = 6, 500, 64


def _entry(seed: int) -> tuple[bytes, FeatureResult]:
    rng = np.random.default_rng(seed)
    values = {f"layer{k}": rng.standard_normal((N_WORDS, DIMS)).astype(np.float32) for k in range(N_LAYERS)}
    result = FeatureResult(values=values, times=np.sort(rng.uniform(0, 300, N_WORDS)), sampling="events")
    return save_npz(result.to_arrays()), result


def _runs(n: int) -> list[Run]:
    return [Run(label=f"run-{k}", data=np.zeros((3, 1)), times=np.arange(3.0), tr=2.0, key=f"k{k}", story=f"s{k}")
            for k in range(n)]


def _feature_set(rels: list[str]) -> dict:
    return {"feature": "lm", "entries": {f"sha{k}": rel for k, rel in enumerate(rels)},
            "runs": {f"01/run-{k}": f"sha{k}" for k in range(len(rels))}, "problems": {},
            "spaces": [f"layer{k}" for k in range(N_LAYERS)]}


SPEC = parse_feature({"name": "lm", "kind": "language_model", "model": "/nowhere"})


def _counting(store: ResultStore) -> list[int]:
    """Bytes of every GET the store's client makes."""
    fetched: list[int] = []
    client = store.client

    def count(**kwargs):
        resp = original(**kwargs)
        fetched.append(int(resp["ContentLength"]))
        return resp

    original = client.get_object
    client.get_object = count
    return fetched


def test_one_layer_is_read_from_s3_without_the_others(results_bucket):
    store = ResultStore(results_bucket)
    store.read_buffer = 32 * 1024  # the entries here are small; a real sweep's are gigabytes
    entries, rels = [], []
    for k in range(2):
        data, result = _entry(k)
        rels.append(f"_cache/features/e{k}.npz")
        store.put_bytes(data, rels[-1])
        entries.append((len(data), result))
    fetched = _counting(store)
    with FeatureEntries(store, SPEC, _feature_set(rels), _runs(2), "01") as reader:
        assert reader.spaces() == [f"layer{k}" for k in range(N_LAYERS)]
        got = reader.results("layer3")
    for (size, want), res in zip(entries, got):
        assert list(res.values) == ["layer3"]
        np.testing.assert_array_equal(res.values["layer3"], want.values["layer3"])
        np.testing.assert_array_equal(res.times, want.times)
    total = sum(size for size, _ in entries)
    assert sum(fetched) < 0.5 * total  # one layer of six (and the small arrays), not the whole entries


def test_every_layer_equals_the_entry_read_whole(tmp_path):
    store = LocalStore(str(tmp_path))
    data, result = _entry(7)
    store.put_bytes(data, "_cache/features/e.npz")
    with FeatureEntries(store, SPEC, _feature_set(["_cache/features/e.npz"]), _runs(1), "01") as reader:
        for space in reader.spaces():
            np.testing.assert_array_equal(reader.results(space)[0].values[space], result.values[space])


@pytest.mark.parametrize("damage", ["missing", "truncated", "nan", "garbage"])
def test_a_missing_or_damaged_entry_names_the_feature_and_run(tmp_path, damage):
    store = LocalStore(str(tmp_path))
    data, result = _entry(3)
    rel = "_cache/features/e.npz"
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "nan":
        result.values["layer2"][5, 5] = np.nan
        data = save_npz(result.to_arrays())
    elif damage == "garbage":
        data = b"PK\x03\x04 not a zip at all" * 100
    if damage != "missing":
        store.put_bytes(data, rel)
    with pytest.raises(DatasetError, match=r"sub-01 run-0: feature 'lm' of story 's0' (is missing from|went bad in)"):
        with FeatureEntries(store, SPEC, _feature_set([rel]), _runs(1), "01") as reader:
            reader.results("layer2")


def test_layer_units_cover_sweeps_only(demo_config_dict):
    cfg = demo_config_dict
    sweep = {"feature": "lm", "spaces": ["layer0", "layer1", "layer2"]}
    single = {"feature": "wordrate", "spaces": ["values"]}
    units = layer_units(cfg, ["01", "02"], [single, sweep])
    assert len(units) == 6 and {u["feature"] for u in units} == {"lm"}
    assert {(u["subject"], u["space"]) for u in units} == {(s, f"layer{k}") for s in ("01", "02") for k in range(3)}
    banded = {**cfg, "model": {**cfg["model"], "kind": "banded_ridge"}}
    assert layer_units(banded, ["01"], [single, sweep]) == []


@pytest.fixture
def demo_config_dict(tiny_bert_dir):
    from .conftest import demo_config

    return demo_config(tiny_bert_dir, "s3://nowhere")


def test_a_ranged_read_cut_short_or_reset_is_asked_for_again(results_bucket, s3_url, monkeypatch):
    """Through a proxy that cuts bodies in half, then resets every connection for 2 s: the layer read
    is the stored one (botocore's retries do not cover a body cut short; the ranged reader does)."""
    import time

    from .faultproxy import FaultProxy

    data, result = _entry(11)
    ResultStore(results_bucket).put_bytes(data, "_cache/features/cut.npz")
    with FaultProxy(s3_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = ResultStore(results_bucket)
        store.read_buffer = 32 * 1024
        proxy.truncate = {"cut.npz": 3}
        with FeatureEntries(store, SPEC, _feature_set(["_cache/features/cut.npz"]), _runs(1), "01") as reader:
            np.testing.assert_array_equal(reader.results("layer1")[0].values["layer1"], result.values["layer1"])
            proxy.down_until = time.monotonic() + 2.0
            np.testing.assert_array_equal(reader.results("layer4")[0].values["layer4"], result.values["layer4"])
        assert proxy.counts["truncated"] == 3 and proxy.counts["reset"] > 0
