"""The steps' contract: each reads what the previous step returned, and the fit never computes
features (a language model must not load inside a fit task)."""
from __future__ import annotations

import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.resultstore import ResultStore
from pipelines.steps import extract_features, fit_subject, prepare

from .conftest import demo_config

pytestmark = pytest.mark.integration


def _feature_objects(bucket: str) -> set[str]:
    return {o.key for o in ResultStore(bucket).list("_cache/features")}


def test_the_fit_reads_features_from_the_features_step_and_never_computes_them(openneuro_demo, tiny_bert_dir,
                                                                                 results_bucket, tmp_path):
    cfg = parse_config(demo_config(tiny_bert_dir, results_bucket, subjects=["22"]))
    prepared = prepare(cfg, cache_dir=tmp_path)
    wordrate = extract_features(cfg, "wordrate", cache_dir=tmp_path)
    assert set(wordrate["runs"]) == {"22/1"} and wordrate["problems"] == {}
    before = _feature_objects(results_bucket)

    # a feature space the features step never ran: an error naming it, and nothing computed
    lm_never_extracted = {**wordrate, "feature": "minilmL4", "kind": "language_model", "runs": {}, "entries": {}}
    with pytest.raises(DatasetError, match=r"sub-22 1: feature 'minilmL4' of story 'alice' is missing from the "
                                           r"feature cache; run the features step"):
        fit_subject(cfg, "22", [wordrate, lm_never_extracted], cache_dir=tmp_path)
    assert _feature_objects(results_bucket) == before

    # a run the features step could not do: its own error, not a guess
    failed = {**wordrate, "problems": {"22/1": "sub-22 run 1: the stimulus could not be read"}}
    with pytest.raises(DatasetError, match="the stimulus could not be read"):
        fit_subject(cfg, "22", [failed], cache_dir=tmp_path)

    fit = fit_subject(cfg, "22", [wordrate], cache_dir=tmp_path)
    assert fit["status"] == "ok" and set(fit["metrics"]) == {"wordrate"}
    assert prepared["subjects"] == ["22"]
