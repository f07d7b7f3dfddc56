"""Model comparison with known truth: layer curves, best-layer maps, baselines, alpha-grid edges, and the
comparison of published analyses of one dataset version.

The planted subject's responses are generated from one layer of a tiny random GPT-2 (its tokenizer
covers every word of the story), through the features the pipeline itself extracts, delayed as
the fit delays them; the pipeline then runs unchanged on that dataset (local BIDS folder, results
on the test S3 server).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.compare.alpha_edge import alpha_edge_map, alpha_edges
from pipelines.compare.comparison import build_comparison, comparison_rows
from pipelines.compare.layer_curve import best_layer_map, layer_curve, split_space, subject_layer_curves, sweeps
from pipelines.config import parse_config
from pipelines.fit import fit_encoding
from pipelines.manifest import read_manifest, validate_manifest
from pipelines.resultstore import ResultStore

PLANTED_LAYER = 2
N_TARGETS = 60
SUBJECT = "plant"


# ------------------------------------------------------------------ pure functions, known truth


def test_split_space_names_feature_control_and_layer():
    feats = ["lm", "lm_big", "wordrate"]
    assert split_space("lm_layer3", feats) == ("lm", None, 3)
    assert split_space("lm_big_layer0", feats) == ("lm_big", None, 0)
    assert split_space("lm_untrained_layer2", feats) == ("lm", "untrained", 2)
    assert split_space("lm_shuffled", feats) == ("lm", "shuffled", None)
    assert split_space("lm_random_embedding", feats) == ("lm", "random_embedding", None)
    assert split_space("wordrate", feats) == ("wordrate", None, None)
    assert split_space("banded", feats) is None and split_space("lm_other", feats) is None
    names = ["lm_layer0", "lm_layer1", "lm_untrained_layer0", "lm_untrained_layer1", "lm_random_embedding",
             "wordrate"]
    assert sweeps(names, feats) == {"lm": {None: {0: "lm_layer0", 1: "lm_layer1"},
                                           "untrained": {0: "lm_untrained_layer0", 1: "lm_untrained_layer1"},
                                           "random_embedding": {None: "lm_random_embedding"}}}


def test_layer_curve_peaks_where_planted_per_label_and_best_layer_map(rng):
    layers = [0, 3, 6, 9]
    n = 400
    labels = np.repeat(["A", "B", ""], [150, 150, 100])
    truth = np.where(labels == "A", 1, 3)  # A peaks at layer 3 (index 1), B and unlabelled at layer 9 (index 3)
    r = 0.05 * rng.standard_normal((4, n))
    for t in range(n):
        r[:, t] += 0.4 - 0.1 * np.abs(np.arange(4) - truth[t])
    valid = np.ones(n, bool)
    valid[:5] = False
    r[0, 5] = np.nan  # a target not finite at one layer is left out everywhere
    curve = layer_curve(r, layers, valid=valid, labels=labels)
    sets = curve["sets"]
    assert set(sets) == {"all", "top", "label:A", "label:B"}
    assert sets["all"]["n_targets"] == n - 6 and sets["top"]["n_targets"] == 40
    assert int(np.argmax(sets["label:A"]["mean_r"])) == 1 and int(np.argmax(sets["label:B"]["mean_r"])) == 3
    assert curve["best_layer"] == 9
    best = best_layer_map(r, layers, valid)
    assert np.isnan(best[:6]).all()
    expected = np.asarray(layers, dtype=np.float32)[truth[6:]]
    assert np.mean(best[6:] == expected) > 0.8
    with pytest.raises(ValueError, match="labels has 3 entries"):
        layer_curve(r, layers, labels=["a", "b", "c"])


def test_alpha_edge_warning_fires_on_a_narrow_grid_and_not_on_a_wide_one(rng):
    """A real nested ridge fit of planted targets (and pure-noise ones): a grid of alphas far too
    large puts the predicted targets at its smallest alpha; a wide grid holds them inside."""
    n, p = 600, 40
    X = rng.standard_normal((n, p)).astype(np.float32)
    W = rng.standard_normal((p, 120)).astype(np.float32)
    Y = np.concatenate([X @ W / np.sqrt(p) + 1.0 * rng.standard_normal((n, 120)),
                        rng.standard_normal((n, 80))], axis=1).astype(np.float32)
    groups = np.repeat(np.arange(5), n // 5)
    counts = {}
    for label, grid in (("narrow", [1e4, 1e5, 1e6]), ("wide", list(10.0 ** np.arange(-2, 7)))):
        res = fit_encoding(X, Y, groups, grid, backend="numpy", client=None)
        counts[label] = alpha_edges(res.alpha, grid, res.valid, res.r, n)
        edge = alpha_edge_map(res.alpha, grid, res.valid)
        assert set(np.unique(edge[np.isfinite(edge)])) <= {-1.0, 0.0, 1.0}
        assert counts[label]["n_at_min"] == int((edge == -1).sum())
    narrow, wide = counts["narrow"], counts["wide"]
    assert narrow["warn"] and narrow["n_predicted_at_min"] >= 100
    assert not wide["warn"] and wide["n_predicted"] >= 110
    assert wide["n_predicted_at_min"] + wide["n_predicted_at_max"] <= 0.1 * wide["n_predicted"]
    assert not alpha_edges(res.alpha, [10.0], res.valid, res.r, n)["warn"]  # one alpha: no grid, no edge


def test_comparison_rows_and_curves_from_manifests():
    def manifest(aid, metrics):
        return {"analysis_id": aid, "status": "complete", "subjects": sorted(metrics),
                "provenance": {"finished": "2026-11-30T00:00:00+00:00"},
                "feature_spaces": [{"name": "lm", "kind": "language_model", "model": "/m/gpt2"},
                                   {"name": "wordrate", "kind": "word_rate"}],
                "metrics": metrics}

    m1 = manifest("a-000000000001", {
        "01": {"lm_layer0": {"mean_r": 0.1}, "lm_layer1": {"mean_r": 0.3}, "lm_untrained_layer0": {"mean_r": 0.05},
               "lm_untrained_layer1": {"mean_r": 0.02}, "wordrate": {"mean_r": 0.2}, "banded": {"mean_r": 0.4}},
        "02": {"lm_layer0": {"mean_r": 0.2}, "lm_layer1": {"mean_r": 0.1}}})
    m2 = manifest("b-000000000002", {"01": {"wordrate": {"mean_r": 0.25}}})
    rows = comparison_rows(m1)
    assert len(rows) == 7 and all(r["space"] != "banded" for r in rows)
    comp = build_comparison("ds", "1.0", [("ds/1.0/a/manifest.json", "e1", m1), ("ds/1.0/b/manifest.json", "e2", m2)])
    assert [a["analysis_id"] for a in comp["analyses"]] == ["a-000000000001", "b-000000000002"]
    curve = next(c for c in comp["curves"] if c["feature"] == "lm" and c["baseline"] is None)
    assert curve["layers"] == [0, 1] and curve["mean_r"] == {"01": [0.1, 0.3], "02": [0.2, 0.1]}
    assert curve["mean_over_subjects"] == [0.15, 0.2] and curve["best_layer"] == 1
    assert {c["baseline"] for c in comp["curves"] if c["feature"] == "lm"} == {None, "untrained"}
    assert {(c["analysis_id"], c["feature"]) for c in comp["curves"]} >= {("b-000000000002", "wordrate")}


# ------------------------------------------------------------------ end to end on a planted dataset


@pytest.fixture(scope="module")
def story_lm_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 (3 layers, hidden 32) whose word-level tokenizer covers the demo story."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    from pipelines.demo import DEMO_SOURCE, TEXTGRID
    from pipelines.stimulus import read_textgrid_words

    path = tmp_path_factory.mktemp("story-gpt2")
    words = read_textgrid_words(Path(DEMO_SOURCE) / TEXTGRID)["word"].astype(str).str.lower()
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<unk>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=3, n_head=2, n_positions=256, initializer_range=0.2)
    GPT2Model(cfg).save_pretrained(path, safe_serialization=True)
    return path


def _config(tree: Path, model: Path, output: str, *, name: str, layer, baselines=None, alphas=None) -> dict:
    feature = {"name": "lm", "kind": "language_model", "model": str(model), "layer": layer, "context_words": 8}
    if baselines:
        feature["baselines"] = baselines
    return {
        "name": name,
        "dataset": {"source": str(tree), "version": "1.0.4", "task": "alice", "subjects": [SUBJECT],
                    "responses": {"derivatives": ["derivatives/brennan2016roi"]},
                    "word_timings": {"format": "textgrid",
                                     "files": {"alice": "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"},
                                     "tier": "word"}},
        "features": [feature],
        "model": {"alphas": alphas or [0.1, 1, 10, 100, 1000, 10000, 100000], "delays": [1, 2, 3, 4],
                  "cv": "contiguous_blocks", "n_folds": 5},
        "compute": {"backend": "numpy", "dask": "none"},
        "output": output,
    }


@pytest.fixture(scope="module")
def planted(story_lm_dir, tmp_path_factory, s3_url):
    """The demo dataset plus sub-plant: 60 ROI-like targets driven by layer 2 of the story's GPT-2."""
    from pipelines.features.align import make_delays
    from pipelines.features.registry import align_to_samples, compute_feature
    from pipelines.fit import zscore_by_group
    from pipelines.demo import DEMO_SOURCE
    from pipelines.ingest import open_dataset, plan_runs
    from pipelines.steps.features import run_stimulus

    from .conftest import make_bucket

    tree = tmp_path_factory.mktemp("planted") / "ds002322"
    shutil.copytree(DEMO_SOURCE, tree)
    src = tree / "derivatives/brennan2016roi/sub-18/func"
    cache = tmp_path_factory.mktemp("cache")
    cfg = parse_config({**_config(tree, story_lm_dir, "s3://unused", name="probe", layer=PLANTED_LAYER),
                        "dataset": {**_config(tree, story_lm_dir, "", name="x", layer=0)["dataset"],
                                    "subjects": ["18"]}})
    ingest = open_dataset(cfg, cache)
    run = plan_runs(ingest, "18")[0]
    stim, _ = run_stimulus(ingest, run, {"words"})
    n_samples = 362
    times = 20.0 + 2.0 * np.arange(n_samples)  # the run's clock: StartTime + k * TR (sub-18's sidecar)
    result = compute_feature(cfg.features[0], stim)
    X = align_to_samples(result, times, method="lanczos", window=3)
    X = make_delays(zscore_by_group(X.astype(np.float32), np.zeros(n_samples, int)), [n_samples], [1, 2, 3, 4])
    rng = np.random.default_rng(7)
    signal = X @ rng.standard_normal((X.shape[1], N_TARGETS))
    signal = (signal - signal.mean(0)) / signal.std(0)
    Y = 100.0 + signal + 0.7 * rng.standard_normal(signal.shape)
    dest = tree / f"derivatives/brennan2016roi/sub-{SUBJECT}/func"
    dest.mkdir(parents=True)
    columns = [f"t{j:02d}" for j in range(N_TARGETS)]
    pd.DataFrame(Y, columns=columns).to_csv(dest / f"sub-{SUBJECT}_task-alice_desc-roi6mm_timeseries.tsv",
                                            sep="\t", index=False, float_format="%.6f")
    meta = json.loads((src / "sub-18_task-alice_desc-roi6mm_timeseries.json").read_text())
    meta.update({"Columns": columns, "Description": "SIMULATED: layer 2 of a tiny random GPT-2, delayed, plus noise"})
    (dest / f"sub-{SUBJECT}_task-alice_desc-roi6mm_timeseries.json").write_text(json.dumps(meta))
    raw = tree / f"sub-{SUBJECT}"
    raw.mkdir()
    for f in ("bold.json", "events.tsv"):
        shutil.copy(tree / "sub-18" / f"sub-18_task-alice_{f}", raw / f"sub-{SUBJECT}_task-alice_{f}")
    make_bucket("compare-results")
    return tree, cache


@pytest.fixture(scope="module")
def sweep_published(planted, story_lm_dir):
    from pipelines.steps.flow import run_analysis

    tree, cache = planted
    cfg = parse_config(_config(tree, story_lm_dir, "s3://compare-results", name="sweep", layer="all",
                               baselines=["untrained", "shuffled", "random_embedding"]))
    return cfg, run_analysis(cfg, cache_dir=cache)


@pytest.mark.integration
@pytest.mark.slow
def test_layer_curve_peaks_at_the_planted_layer_and_baselines_score_below(sweep_published):
    cfg, result = sweep_published
    manifest = read_manifest(result["manifest_uri"])
    validate_manifest(manifest)
    assert "warnings" not in manifest  # a wide alpha grid: nothing at its edges
    store = ResultStore(cfg.publish_prefix)
    arts = {a["path"]: a for a in manifest["artifacts"]}
    curve_path = f"sub-{SUBJECT}/sub-{SUBJECT}_task-alice_desc-lm_layercurve.json"
    assert arts[curve_path]["kind"] == "layer_curve_json"
    curve = json.loads(store.get_bytes(curve_path))
    assert curve["layers"] == [0, 1, 2, 3]
    model = curve["model"]["sets"]["all"]["mean_r"]
    assert curve["model"]["best_layer"] == PLANTED_LAYER and int(np.argmax(model)) == PLANTED_LAYER
    assert set(curve["baselines"]) == {"untrained", "shuffled", "random_embedding"}
    for name, control in curve["baselines"].items():  # every control below the model at the planted layer
        assert control["sets"]["all"]["mean_r"][PLANTED_LAYER] < model[PLANTED_LAYER] - 0.1, name
    # the targets are ROI-like time series: one curve per target label too
    assert "label:t00" in curve["model"]["sets"]
    best = pd.read_csv(_download(store, f"sub-{SUBJECT}/sub-{SUBJECT}_task-alice_desc-lm_stat-bestlayer_statmap.tsv"),
                       sep="\t")
    assert np.mean(best["bestlayer"] == PLANTED_LAYER) >= 0.6
    # the analysis-level file, the figure in the report, the metrics of the controls
    whole = json.loads(store.get_bytes("layer_curves.json"))
    assert whole["features"]["lm"]["subjects"][SUBJECT]["best_layer"] == PLANTED_LAYER
    assert any(p.endswith("_layercurve.png") for p in arts)
    assert "mean held-out r by layer (best layer 2)" in store.get_bytes("report.html").decode()
    assert {"lm_untrained_layer2", "lm_shuffled_layer2", "lm_random_embedding"} <= set(manifest["metrics"][SUBJECT])
    edge = manifest["metrics"][SUBJECT]["lm_layer2"]["alpha_edge"]
    assert edge["n_predicted"] >= 50 and edge["n_predicted_at_min"] + edge["n_predicted_at_max"] <= 5


def _download(store: ResultStore, rel: str):
    import io

    return io.BytesIO(store.get_bytes(rel))


@pytest.mark.integration
@pytest.mark.slow
def test_narrow_alpha_grid_warns_and_comparison_holds_both_analyses(planted, story_lm_dir, sweep_published):
    from pipelines.steps.flow import run_analysis

    tree, cache = planted
    sweep_cfg, _ = sweep_published
    cfg = parse_config(_config(tree, story_lm_dir, "s3://compare-results", name="narrow", layer=[1, 2],
                               alphas=[1e5, 1e6, 1e7]))
    result = run_analysis(cfg, cache_dir=cache)
    manifest = read_manifest(result["manifest_uri"])
    assert any("lm_layer2" in w and "smallest alpha" in w for w in manifest["warnings"]), manifest.get("warnings")
    edge = manifest["metrics"][SUBJECT]["lm_layer2"]["alpha_edge"]
    assert edge["n_predicted_at_min"] > 0.5 * edge["n_predicted"]
    paths = {a["path"]: a for a in manifest["artifacts"]}
    amap = f"sub-{SUBJECT}/sub-{SUBJECT}_task-alice_desc-lmlayer2_stat-alphaedge_statmap.tsv"
    assert paths[amap]["stat"] == "alphaedge"
    store = ResultStore(cfg.publish_prefix)
    table = pd.read_csv(_download(store, amap), sep="\t")
    assert (table["alphaedge"] == -1).sum() == edge["n_at_min"]
    assert "Warning: sub-plant lm_layer2" in store.get_bytes("report.html").decode()
    # the gallery's comparison of the dataset version: both analyses, models x layers x subjects
    out = ResultStore("s3://compare-results")
    comp = json.loads(out.get_bytes("ds002322/1.0.4/comparison.json"))
    assert {a["analysis_id"] for a in comp["analyses"]} == {sweep_cfg.analysis_id, cfg.analysis_id}
    curves = {(c["analysis_id"], c["baseline"]): c for c in comp["curves"] if c["feature"] == "lm"}
    assert curves[(sweep_cfg.analysis_id, None)]["layers"] == [0, 1, 2, 3]
    assert curves[(sweep_cfg.analysis_id, None)]["best_layer"] == PLANTED_LAYER
    assert curves[(cfg.analysis_id, None)]["layers"] == [1, 2]
    assert (sweep_cfg.analysis_id, "untrained") in curves
    assert {r["subject"] for r in comp["rows"]} == {SUBJECT}
    page = out.get_bytes("ds002322/1.0.4/comparison.html").decode()
    assert sweep_cfg.analysis_id in page and cfg.analysis_id in page
    assert "ds002322/1.0.4/comparison.html" in out.get_bytes("index.html").decode()


# ------------------------------------------------------------------ the controls as features

STORY = ("alice was beginning to get very tired of sitting by her sister on the bank and of having nothing to do "
         "once or twice she had peeped into the book her sister was reading").split()


def test_baselines_are_extra_spaces_streamed_or_in_memory_alike(tiny_gpt2_dir, tmp_path):
    from pipelines.features.baselines import shuffled_words
    from pipelines.features.registry import Stimulus, compute_feature, stream_feature

    words = pd.DataFrame({"word": STORY, "onset": np.arange(len(STORY)) * 0.4,
                          "offset": np.arange(len(STORY)) * 0.4 + 0.3})
    spec = {"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "layer": [0, 2], "context_words": 4,
            "baselines": ["untrained", "shuffled", "random_embedding"]}
    result = compute_feature(spec, Stimulus(words=words))
    assert sorted(result.values) == ["layer0", "layer2", "random_embedding", "shuffled_layer0", "shuffled_layer2",
                                     "untrained_layer0", "untrained_layer2"]
    meta, files = stream_feature(spec, Stimulus(words=words), tmp_path)
    assert sorted(files) == sorted(result.values)
    for space, path in files.items():
        np.testing.assert_allclose(np.load(path), result.values[space], atol=1e-6, err_msg=space)
    values = result.values
    assert not np.allclose(values["untrained_layer2"], values["layer2"])  # other weights, same architecture
    again = compute_feature(spec, Stimulus(words=words)).values
    for space in values:  # fixed seeds: the same controls every time
        np.testing.assert_array_equal(again[space], values[space])
    emb = values["random_embedding"]
    her = [i for i, w in enumerate(STORY) if w == "her"]
    np.testing.assert_array_equal(emb[her[0]], emb[her[1]])  # one vector per word type
    assert emb.shape == (len(STORY), 32) and not np.allclose(emb[0], emb[1])
    shuffled = shuffled_words(STORY)
    assert sorted(shuffled) == sorted(STORY) and shuffled != STORY
    single = compute_feature({**spec, "layer": 2, "baselines": ["untrained"]}, Stimulus(words=words)).values
    assert sorted(single) == ["untrained", "values"]
    np.testing.assert_array_equal(single["untrained"], values["untrained_layer2"])


def test_baselines_config_is_checked_and_absent_when_empty(tiny_gpt2_dir):
    from pipelines.errors import ConfigError
    from pipelines.features.cache_keys import cache_key
    from pipelines.features.registry import parse_feature

    base = {"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "layer": "all"}
    with pytest.raises(ConfigError, match="lists a baseline twice"):
        parse_feature({**base, "baselines": ["shuffled", "shuffled"]})
    with pytest.raises(ConfigError, match="quantization"):
        parse_feature({**base, "baselines": ["untrained"], "quantization": "8bit"})
    with pytest.raises(ConfigError, match="baselines"):
        parse_feature({**base, "baselines": ["scrambled"]})
    # no baselines: the spec, its cache key and the analysis id are what they were before the key existed
    assert "baselines" not in parse_feature({**base, "baselines": []}).model_dump()
    assert cache_key(base, "s") == cache_key({**base, "baselines": []}, "s")
    assert cache_key(base, "s") != cache_key({**base, "baselines": ["shuffled"]}, "s")


def test_comparison_page_escapes_and_ignores_what_a_hostile_manifest_holds():
    from pipelines.compare.comparison import render_comparison_html

    m = {"analysis_id": "x-000000000001", "status": "complete", "subjects": ["01"], "provenance": {},
         "feature_spaces": [{"name": "lm", "kind": "language_model", "model": "<script>alert(1)</script>"}],
         "metrics": {"01": {"lm_layer0": {"mean_r": 0.1, "mean_r_normalised": "<b>"},
                            "lm_layer1": {"mean_r": 0.2, "mean_r_normalised": float("nan")}}}}
    comp = build_comparison("ds", "1.0", [("ds/1.0/x/manifest.json", "e", m)])
    assert comp["curves"][0]["mean_r_normalised"] is None
    page = render_comparison_html(comp)
    assert "<script>" not in page and "&lt;script&gt;" in page
