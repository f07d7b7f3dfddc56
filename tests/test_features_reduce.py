"""features[].pca: a PCA per space fitted on the training stories only, against scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.cache import load_npz, save_npz, write_entry
from pipelines.errors import ConfigError
from pipelines.features.reduce import apply_pca, fit_pca
from pipelines.features.cache_keys import cache_key
from pipelines.features.registry import FeatureResult, parse_feature
from pipelines.resultstore import ResultStore
from pipelines.steps.features import reduce_features


def _story(rng, n_rows: int, n_dims: int = 12, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(7).normal(size=(n_dims, n_dims)) * np.linspace(3, 0.1, n_dims)[:, None]
    return (rng.normal(size=(n_rows, n_dims)) @ mixing + shift).astype(np.float32)


def test_pca_matches_scikit_learn(rng):
    from sklearn.decomposition import PCA

    stories = [_story(rng, 80), _story(rng, 70)]
    fit = fit_pca(stories, 4)
    X = np.concatenate(stories).astype(np.float64)
    ref = PCA(4, svd_solver="full").fit(X)
    new = _story(rng, 10)
    # components are defined up to sign: compare the projections' absolute values
    np.testing.assert_allclose(np.abs(apply_pca(new, fit)), np.abs(ref.transform(new)), rtol=1e-4, atol=1e-4)
    assert fit.n_rows == 150 and fit.components.shape == (4, 12)
    assert fit.explained == pytest.approx(ref.explained_variance_ratio_.sum())
    by_variance = fit_pca(stories, 0.9)
    assert by_variance.explained >= 0.9 > fit_pca(stories, by_variance.components.shape[0] - 1).explained


def test_pca_refuses_more_components_than_the_training_rows_give(rng):
    with pytest.raises(ConfigError, match=r"features\[lm\]\.pca: 20 components .* at most 12"):
        fit_pca([_story(rng, 30)], 20, what="features[lm].pca")
    with pytest.raises(ConfigError, match="every story is a test story"):
        fit_pca([], 3)


def test_pca_values_are_checked_by_name(tiny_gpt2_dir):
    spec = {"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir)}
    for bad in (0, 1.5, -2, "half"):
        with pytest.raises(ConfigError, match=r"pca: must be a number of components"):
            parse_feature({**spec, "pca": bad})
    assert parse_feature({**spec, "pca": 0.9}).pca == 0.9 and parse_feature({**spec, "pca": 16}).pca == 16
    # the PCA is applied after extraction: it does not change the extraction's cache key
    assert cache_key({**spec, "pca": 16}, "sha") == cache_key(spec, "sha")


def test_pca_needs_test_stories(tiny_gpt2_dir):
    from pipelines.config import parse_config

    from .conftest import demo_config

    cfg = demo_config(tiny_gpt2_dir, "s3://x")
    cfg["features"][1]["pca"] = 8
    with pytest.raises(ConfigError, match=r"features\[.*\]\.pca.*needs 'model.test_stories'"):
        parse_config(cfg)


def _write(store: ResultStore, name: str, layers: dict[str, np.ndarray]) -> str:
    n = next(iter(layers.values())).shape[0]
    result = FeatureResult(values=layers, times=np.arange(n, dtype=np.float64), sampling="events")
    rel = f"_cache/features/raw-{name}.npz"
    write_entry(store, save_npz(result.to_arrays()), rel)
    return rel


def test_a_held_out_story_changes_nothing_in_the_fitted_pca(results_bucket, rng):
    store = ResultStore(results_bucket)
    spec = parse_feature({"name": "lm", "kind": "language_model", "model": "org/any", "layer": [1, 2], "pca": 3})
    spaces = ["layer1", "layer2"]
    raw = {s: {sp: _story(rng, 60) for sp in spaces} for s in ("a", "b", "test")}
    entries = {s: _write(store, s, raw[s]) for s in raw}
    reduced, summary = reduce_features(store, spec, entries, {"a", "b"}, spaces)
    assert summary["layer1"]["n_components"] == 3 and summary["layer1"]["n_rows"] == 120
    before = {s: load_npz(store.get_bytes(rel)) for s, rel in reduced.items()}
    assert before["a"]["layer2"].shape == (60, 3) and before["a"]["layer2"].dtype == np.float32
    # the test story is projected on the training stories' PCA, not part of it
    fit = fit_pca([raw["a"]["layer2"], raw["b"]["layer2"]], 3)
    np.testing.assert_allclose(np.abs(before["test"]["layer2"]), np.abs(apply_pca(raw["test"]["layer2"], fit)),
                               atol=1e-4)

    # the held-out story's features change (a new extraction: a new cache entry)
    changed = {sp: _story(rng, 60, shift=5.0) * 3 for sp in spaces}
    entries2 = {**entries, "test": _write(store, "test-changed", changed)}
    reduced2, summary2 = reduce_features(store, spec, entries2, {"a", "b"}, spaces)
    assert summary2 == summary
    for s in ("a", "b"):
        assert reduced2[s] == reduced[s]
        after = load_npz(store.get_bytes(reduced2[s]))
        for sp in spaces:
            np.testing.assert_array_equal(after[sp], before[s][sp])
    assert not np.allclose(load_npz(store.get_bytes(reduced2["test"]))["layer1"], before["test"]["layer1"])

    # a training story's features do move the PCA (the check above can fail)
    entries3 = {**entries, "a": _write(store, "a-changed", changed)}
    reduced3, _ = reduce_features(store, spec, entries3, {"a", "b"}, spaces)
    assert not np.allclose(np.abs(load_npz(store.get_bytes(reduced3["b"]))["layer1"]), np.abs(before["b"]["layer1"]),
                           atol=1e-3)
