"""The config is strict: unknown keys suggest the closest valid one, values are range-checked."""
from __future__ import annotations

import pytest
import yaml

from pipelines.config import apply_overrides, check_relative_key, load_config, parse_config
from pipelines.errors import ConfigError

from .conftest import REPO


def base() -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["features"][1]["model"] = "/models/minilm"
    return cfg


def test_demo_config_is_valid_and_hash_is_stable():
    a, b = parse_config(base()), parse_config(base())
    assert a.config_hash == b.config_hash
    assert a.analysis_id == f"alice-demo-{a.config_hash}"
    assert a.publish_prefix == f"s3://neuroflow-results/ds002322/1.0.4/{a.analysis_id}"
    changed = base()
    changed["features"][1]["layer"] = 3
    assert parse_config(changed).config_hash != a.config_hash


@pytest.mark.parametrize("path, bad_key, suggestion", [
    ((), "modle", "model"),
    (("model",), "alpha", "alphas"),
    (("dataset",), "subject", "subjects"),
    (("compute",), "dask_address", "dask"),
])
def test_unknown_key_names_it_and_suggests(path, bad_key, suggestion):
    cfg = base()
    node = cfg
    for p in path:
        node = node[p]
    node[bad_key] = 1
    with pytest.raises(ConfigError) as err:
        parse_config(cfg, origin="demo.yaml")
    msg = str(err.value)
    assert bad_key in msg and f"Did you mean {suggestion!r}" in msg and msg.startswith("demo.yaml")


def test_unknown_key_inside_a_feature():
    cfg = base()
    cfg["features"][1]["layers"] = [1, 2]
    with pytest.raises(ConfigError, match="layers.*Did you mean 'layer'"):
        parse_config(cfg)


@pytest.mark.parametrize("key, value, fragment", [
    ("alphas", [-1, 10], "'model.alphas' must be positive"),
    ("alphas", [], "model.alphas"),
    ("delays", [1, 1], "lists a delay twice"),
    ("n_folds", 2, "model.n_folds"),
    ("cv", "shuffle", "model.cv"),
])
def test_bad_model_values(key, value, fragment):
    cfg = base()
    cfg["model"][key] = value
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        parse_config(cfg)


@pytest.mark.parametrize("source", ["s3://openneuro.org/../etc", "s3://openneuro.org//ds1", "ftp://x/y",
                                    "s3://UPPER/ds1", "s3://openneuro.org/ds\u0430"])
def test_bad_sources_refused(source):
    cfg = base()
    cfg["dataset"]["source"] = source
    with pytest.raises(ConfigError, match="dataset.source"):
        parse_config(cfg)


@pytest.mark.parametrize("key", ["/etc/passwd", "a/../../b", "a//b", "a\x00b", "caf\u00e9"])
def test_relative_keys_refused(key):
    with pytest.raises(ConfigError):
        check_relative_key(key, "x")


def test_wrong_type_names_the_key():
    cfg = base()
    cfg["dataset"]["subjects"] = "18"
    with pytest.raises(ConfigError, match="dataset.subjects"):
        parse_config(cfg)


def test_overrides_and_file_errors(tmp_path):
    cfg = apply_overrides(base(), ["model.alphas=[1, 2]", "features.1.layer=2", "name=other"])
    parsed = parse_config(cfg)
    assert parsed.model.alphas == [1.0, 2.0] and parsed.features[1].layer == 2 and parsed.name == "other"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(base(), ["novalue"])


def test_word_timings_must_name_a_file_or_a_pattern():
    cfg = base()
    cfg["dataset"]["word_timings"]["files"] = {}
    with pytest.raises(ConfigError, match="needs 'files'.*or a 'pattern'"):
        parse_config(cfg)
    cfg["dataset"]["word_timings"]["pattern"] = "derivative/TextGrids/{story}.TextGrid"
    assert parse_config(cfg).dataset.word_timings.pattern.endswith("{story}.TextGrid")
    cfg["dataset"]["word_timings"]["pattern"] = "../{story}.TextGrid"
    with pytest.raises(ConfigError, match="contains '..'"):
        parse_config(cfg)


def test_reader_options_are_validated():
    cfg = base()
    cfg["dataset"]["responses"] = {"kind": "ieeg", "high_gamma": [150, 70]}
    with pytest.raises(ConfigError, match="high_gamma"):
        parse_config(cfg)
    cfg["dataset"]["responses"] = {"kind": "ieeg", "hi_gamma": [70, 150]}
    with pytest.raises(ConfigError, match="Did you mean 'high_gamma'"):
        parse_config(cfg)
    cfg["dataset"]["responses"] = {"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5",
                                   "tr_counts": "derivative/respdict.json", "tr_counts_trim": 20}
    assert parse_config(cfg).dataset.responses.tr_counts_trim == 20


def test_the_public_api_is_importable_from_the_package_and_light():
    import subprocess
    import sys

    import pipelines

    for name in pipelines.__all__:
        assert getattr(pipelines, name) is not None, name
    assert pipelines.run_analysis.__module__ == "pipelines.steps.flow"
    # importing the package alone loads none of the heavy libraries (DAG files import it at parse time)
    code = ("import sys, pipelines; heavy = [m for m in ('torch', 'transformers', 'nibabel', 'dask', 'himalaya', "
            "'matplotlib') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
