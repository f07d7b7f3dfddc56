"""The whole analysis in-process against the real S3 server: publish, reopen, re-run, recover."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.config import parse_config
from pipelines.consume import get_artifact, list_analyses, read_manifest
from pipelines.errors import IntegrityError
from pipelines.publish import validate_manifest
from pipelines.run import run_analysis
from pipelines.s3 import split_s3_uri
from pipelines.resultstore import ResultStore

from .conftest import demo_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def published(openneuro_demo, tiny_bert_dir, tmp_path_factory, s3_url):
    from .conftest import make_bucket

    make_bucket("pipeline-results")
    cfg = parse_config(demo_config(tiny_bert_dir, "s3://pipeline-results"))
    cache = tmp_path_factory.mktemp("cache")
    result = run_analysis(cfg, cache_dir=cache)
    return cfg, cache, result


def test_manifest_is_complete_valid_and_lists_verified_artifacts(published):
    cfg, _, result = published
    assert result["manifest_uri"] == f"{cfg.publish_prefix}/manifest.json"
    manifest = read_manifest(result["manifest_uri"])
    validate_manifest(manifest)
    assert manifest["status"] == "complete"
    assert manifest["subjects"] == ["18", "sim01"]
    assert manifest["subject_info"]["sim01"]["simulated"] is True
    assert manifest["subject_info"]["18"]["simulated"] is False
    assert set(manifest["metrics"]["18"]) == {"wordrate", "minilmL4"}
    kinds = {a["kind"] for a in manifest["artifacts"]}
    assert {"statmap_nifti", "statmap_tsv", "figure_png", "report_html", "config_yaml"} <= kinds
    store = ResultStore(cfg.publish_prefix)
    for art in manifest["artifacts"]:
        data = store.get_bytes(art["path"])
        assert len(data) == art["bytes"]
    inputs = {i["key"] for i in manifest["inputs"]}
    assert "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid" in inputs
    assert manifest["provenance"]["backend"] in ("numpy", "torch", "torch_cuda")
    # the language model's resolved dtype and device; the word-rate space runs no model
    runtime = manifest["provenance"]["feature_models"]
    assert set(runtime) == {"minilmL4"}
    assert (runtime["minilmL4"]["dtype"], runtime["minilmL4"]["device"]) == ("float32", "cpu")


def test_maps_reopen_with_the_right_geometry(published, tmp_path):
    cfg, _, result = published
    manifest = read_manifest(result["manifest_uri"])
    nii = [a["path"] for a in manifest["artifacts"]
           if a["kind"] == "statmap_nifti" and a["subject"] == "sim01" and a.get("stat") == "r"]
    assert nii and all("space-MNI152NLin2009cAsym" in p for p in nii)
    path = get_artifact(result["manifest_uri"], nii[0], tmp_path / "r.nii.gz")
    img = nib.load(path)
    from .conftest import SIM_RESOLUTION_MM
    from pipelines.simulate import demo_mask

    mask = demo_mask(SIM_RESOLUTION_MM)
    assert img.shape == mask.shape and np.allclose(img.affine, mask.affine)
    tsv = next(a["path"] for a in manifest["artifacts"] if a["kind"] == "statmap_tsv" and "r" in a["stat"].split(","))
    table = pd.read_csv(get_artifact(result["manifest_uri"], tsv, tmp_path / "t.tsv"), sep="\t")
    assert list(table["target"]) == ["LATL", "RATL", "LPTL", "LIPL", "LPreM", "LIFG"]
    assert {"r", "r2", "alpha"} <= set(table.columns)


def test_planted_voxels_are_recovered(published, demo_tree, tmp_path):
    """Held-out r separates planted from null voxels (AUC >= 0.95); null r is centred on 0."""
    cfg, _, result = published
    manifest = read_manifest(result["manifest_uri"])
    path = next(a["path"] for a in manifest["artifacts"] if a["kind"] == "statmap_nifti"
                and a["subject"] == "sim01" and a["feature_space"] == "wordrate" and a["stat"] == "r")
    r_img = nib.load(get_artifact(result["manifest_uri"], path, tmp_path / "r.nii.gz"))
    from .conftest import SIM_RESOLUTION_MM
    from pipelines.simulate import demo_mask

    mask = np.asarray(demo_mask(SIM_RESOLUTION_MM).dataobj) > 0
    r = np.asarray(r_img.dataobj)[mask]
    planted = np.load(demo_tree.parent / "planted.npy")
    assert planted.sum() >= 10 and (~planted).sum() >= 500
    assert roc_auc_score(planted, r) >= 0.95
    assert abs(float(np.nanmean(r[~planted]))) <= 0.02


def test_rerun_lands_on_the_same_prefix_with_an_identical_manifest(published):
    cfg, cache, first = published
    again = run_analysis(cfg, cache_dir=cache)
    assert again["manifest_uri"] == first["manifest_uri"]
    assert all(not f["computed"] for f in again["features"])  # features reused from the cache
    assert all(f["reused"] for f in again["fits"])  # fits reused from the work prefix
    a = read_manifest(first["manifest_uri"])
    b = json.loads(open(f"{again['local_dir']}/manifest.json").read())
    for m in (a, b):
        m["provenance"].pop("started"), m["provenance"].pop("finished")
    # `a` was re-read after the second run overwrote it; compare to the first run's local copy
    first_local = json.loads(open(f"{first['local_dir']}/manifest.json").read())
    first_local["provenance"].pop("started"), first_local["provenance"].pop("finished")
    assert first_local == b


def test_maps_list_and_tampered_artifact(published, tmp_path):
    cfg, _, result = published
    rows = list_analyses(cfg.output)
    assert [r["analysis_id"] for r in rows] == [cfg.analysis_id]
    assert rows[0]["subjects"] == ["18", "sim01"]
    manifest = read_manifest(result["manifest_uri"])
    victim = next(a["path"] for a in manifest["artifacts"] if a["kind"] == "statmap_tsv" and "r" in a["stat"].split(","))
    store = ResultStore(cfg.publish_prefix)
    original = store.get_bytes(victim)
    bucket, key = split_s3_uri(f"{cfg.publish_prefix}/{victim}")
    store.client.put_object(Bucket=bucket, Key=key, Body=original.replace(b"LATL", b"XATL"))
    try:
        with pytest.raises(IntegrityError, match="does not match the manifest"):
            get_artifact(result["manifest_uri"], victim, tmp_path / "x.tsv")
    finally:
        store.client.put_object(Bucket=bucket, Key=key, Body=original)


def test_python_api_loads_maps_as_images_and_tables(published):
    from pipelines.consume import PublishedAnalysis
    from pipelines.errors import DatasetError

    _, _, result = published
    analysis = PublishedAnalysis(result["manifest_uri"])
    img = analysis.load_map("sim01", "wordrate", "r")
    assert img.ndim == 3 and np.nanmax(np.asarray(img.dataobj)) > 0.3
    table = analysis.load_map("18", "minilmL4", "alpha")
    assert list(table.index) == ["LATL", "RATL", "LPTL", "LIPL", "LPreM", "LIFG"]
    assert (table["alpha"] > 0).all()
    with pytest.raises(DatasetError, match="no 'r' map for sub-99"):
        analysis.load_map("99", "wordrate")


def test_report_opens_in_a_browser_with_every_image(published, browser):
    """The report, opened from the local folder and from S3, shows every picture."""
    cfg, _, result = published
    local = browser.images(f"file://{result['report_path']}")
    assert local["n"] >= 6 and local["broken"] == []
    assert "ds002322" in local["title"] and "simulated" in local["text"]
    store = ResultStore(cfg.publish_prefix)
    bucket, key = split_s3_uri(f"{cfg.publish_prefix}/report.html")
    url = store.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
    remote = browser.images(url)
    assert remote["n"] == local["n"] and remote["broken"] == []
    # the gallery at the output root, refreshed by publish, lists the analysis and links its report
    root = ResultStore(cfg.output)
    bucket, key = split_s3_uri(f"{cfg.output}/index.html")
    gallery = browser.images(root.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                                ExpiresIn=300))
    assert gallery["broken"] == [] and cfg.analysis_id in gallery["text"] and "ds002322" in gallery["text"]


def test_a_layer_sweep_is_one_extraction_per_story_and_one_fit_per_layer(openneuro_demo, tiny_bert_dir,
                                                                        results_bucket, tmp_path):
    from pipelines.cache import load_npz as _load_npz
    from pipelines.steps import extract_features, fit_subject

    store = ResultStore(results_bucket)
    sweep_cfg = demo_config(tiny_bert_dir, results_bucket, subjects=("18", "22"))
    sweep_cfg["features"][1]["layer"] = [1, 2]
    sweep = extract_features(parse_config(sweep_cfg), "minilmL4", cache_dir=tmp_path)
    # two subjects heard the same story on the same clock: one extraction, one cache entry
    assert sweep["n_stimuli"] == 1 and sweep["spaces"] == ["layer1", "layer2"] and sweep["computed"]
    single_cfg = demo_config(tiny_bert_dir, results_bucket, subjects=("18", "22"))
    single_cfg["features"][1]["layer"] = 2
    single = extract_features(parse_config(single_cfg), "minilmL4", cache_dir=tmp_path)
    (sweep_rel,), (single_rel,) = sweep["entries"].values(), single["entries"].values()
    np.testing.assert_allclose(_load_npz(store.get_bytes(sweep_rel))["layer2"],
                               _load_npz(store.get_bytes(single_rel))["values"], atol=1e-5)
    fit = fit_subject(parse_config(sweep_cfg), "18", [sweep], cache_dir=tmp_path)
    assert sorted(fit["metrics"]) == ["minilmL4_layer1", "minilmL4_layer2"]
    assert fit["computed_features"] == ["minilmL4_layer1", "minilmL4_layer2"]
    arrays = _load_npz(store.get_bytes(fit["result_rel"]))
    assert not np.array_equal(arrays["minilmL4_layer1__r"], arrays["minilmL4_layer2__r"])


def test_decoding_identifies_held_out_segments_and_is_published(openneuro_demo, tiny_bert_dir, results_bucket,
                                                                 tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket, subjects=("sim01",))
    cfg["decoding"] = {"enabled": True, "segment_length": 10, "max_targets": 500}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path)
    dec = result["metrics"]["sim01"]["wordrate"]["decoding"]
    # sim01's planted voxels carry the word rate: its held-out segments are identified far above chance
    assert dec["n_segments"] >= 30 and dec["top1"] > 5 * dec["chance_top1"] and dec["auc"] > 0.8
    manifest = read_manifest(result["manifest_uri"])
    assert manifest["metrics"]["sim01"]["minilmL4"]["decoding"]["n_segments"] == dec["n_segments"]
    assert any(a["path"].endswith("_decoding.png") for a in manifest["artifacts"])


def test_banded_ridge_splits_the_variance_per_feature_space(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket, subjects=("sim01",))
    cfg["model"] = {**cfg["model"], "kind": "banded_ridge", "n_iter": 5}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path)
    banded = result["metrics"]["sim01"]["banded"]
    assert set(result["metrics"]["sim01"]) == {"banded"}
    assert {"r2_split_mean:wordrate", "r2_split_mean:minilmL4"} <= set(banded)
    manifest = read_manifest(result["manifest_uri"])
    split_maps = sorted(a["feature_space"] for a in manifest["artifacts"] if a.get("stat") == "r2split")
    assert split_maps == ["minilmL4", "wordrate"]
    from pipelines.simulate import demo_mask

    from .conftest import SIM_RESOLUTION_MM

    mask = demo_mask(SIM_RESOLUTION_MM)
    in_mask = np.asarray(mask.dataobj) > 0
    maps = {}
    for art in manifest["artifacts"]:
        if art.get("stat") in ("r2split", "r2") and art.get("subject") == "sim01" and art["kind"] == "statmap_nifti":
            img = nib.load(get_artifact(result["manifest_uri"], art["path"], tmp_path / art["path"].rsplit("/")[-1]))
            assert img.shape == mask.shape
            maps[(art["feature_space"], art["stat"])] = np.asarray(img.dataobj)[in_mask]
    # where the model explains variance, the bands' shares add up to its held-out R² (the split is of
    # fold-centred predictions; on noise voxels the joint R² also carries the folds' mean offsets)
    total = maps[("minilmL4", "r2split")] + maps[("wordrate", "r2split")]
    explained = maps[("banded", "r2")] > 0.1
    assert explained.sum() >= 20
    np.testing.assert_allclose(total[explained], maps[("banded", "r2")][explained], atol=0.05)
