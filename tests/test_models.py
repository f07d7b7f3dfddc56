"""Published encoding models (issue 19): publish -> predict -> the published held-out r, and in-silico experiments.

The analyses run on ``tests/datasets/planted_stories.py``: four stories, one held out, ROIs planted
from one dimension of the tiny BERT's layer 2, so both the held-out r and the sentences that drive
the planted ROIs are known.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.errors import ConfigError, DatasetError
from pipelines.manifest import validate_manifest
from pipelines.models.predict import load_models, words_from_text
from pipelines.models.weights import ridge_weights, predict_rows
from pipelines.steps import run_analysis

from .datasets.planted_stories import (DIM, N_PLANTED, VOCAB, build_planted_stories, feature,
                                       planted_config)

STATMAP = "sub-p01/sub-p01_task-listen_desc-lm_stat-r_statmap.tsv"


def neuroflow(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=timeout)


def one_line_error(proc, *fragments) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not re.match(r"\d\d:\d\d:\d\d neuroflow: ", ln)
             and not ln.startswith("Loading weights")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def held_out_responses(dataset: Path, run: int = 4) -> np.ndarray:
    path = dataset / f"derivatives/planted/sub-p01/func/sub-p01_task-listen_run-{run}_desc-roi_timeseries.tsv"
    return pd.read_csv(path, sep="\t").to_numpy()


def correlations(pred: np.ndarray, Y: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(pred[:, j], Y[:, j])[0, 1] for j in range(Y.shape[1])])


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_bert_dir) -> Path:
    return build_planted_stories(tmp_path_factory.mktemp("planted") / "ds002322", tiny_bert_dir)


@pytest.fixture(scope="module")
def local_analysis(planted, tiny_bert_dir, tmp_path_factory) -> str:
    """The planted analysis published to a local output folder; its manifest URI."""
    root = tmp_path_factory.mktemp("published")
    cfg = parse_config(planted_config(str(planted), str(root / "out"), tiny_bert_dir))
    result = run_analysis(cfg, cache_dir=root / "cache")
    assert result["status"] == "complete"
    return result["manifest_uri"]


# --- the weights: the fit's held-out prediction, from a model ------------------------------

@pytest.mark.parametrize("n_features", [12, 400])  # primal, and kernel (more features than training samples)
def test_the_exported_weights_give_the_fits_held_out_prediction(rng, n_features):
    from pipelines.fit import fit_encoding

    lengths = [90, 80, 100, 70]
    groups = np.repeat(np.arange(4), lengths)
    X = rng.standard_normal((groups.size, n_features)).astype(np.float32)
    Y = (X[:, :3] @ rng.standard_normal((3, 6)) + 2.0 * rng.standard_normal((groups.size, 6))).astype(np.float32)
    Y[:, 5] = 3.0  # constant: never fitted, zero weights
    fit = fit_encoding(X, Y, groups, [0.1, 10, 1000, 1e5], backend="numpy", test_groups=[3])
    train, test = np.flatnonzero(groups != 3), np.flatnonzero(groups == 3)
    W, b = ridge_weights(X, Y, train, fit.alpha.astype(np.float64), fit.valid)
    pred = predict_rows(X[test], W, b)
    ok = fit.valid
    np.testing.assert_allclose(pred[:, ok], fit.predictions[test][:, ok], rtol=1e-4, atol=1e-4)
    assert not ok[5] and not W[:, 5].any() and b[5] == 0


# --- publish -> predict -> the published held-out r ----------------------------------------

@pytest.mark.slow
def test_publish_then_predict_the_held_out_story_gives_the_published_r(planted, tiny_bert_dir, tmp_path,
                                                                       results_bucket):
    """End to end on S3: the model, its recipe and the methods are in the manifest; `neuroflow predict`
    on the held-out story's TextGrid reproduces every target's published held-out r."""
    cfg = parse_config(planted_config(str(planted), results_bucket, tiny_bert_dir))
    result = run_analysis(cfg, cache_dir=tmp_path / "cache")
    manifest_uri = result["manifest_uri"]
    manifest = read_manifest(manifest_uri)
    validate_manifest(manifest)
    (model_art,) = [a for a in manifest["artifacts"] if a["kind"] == "encoding_model"]
    assert model_art["path"] == "sub-p01/models/sub-p01_task-listen_desc-lm_model.safetensors"
    assert model_art["bytes"] > 128 * 8 * 4  # the weights (128 delayed features x 8 targets, float32) and more
    recipe = model_art["recipe"]
    assert recipe["feature"]["model"] == str(tiny_bert_dir) and recipe["feature"]["layer"] == 2
    assert recipe["model"]["fingerprint"].startswith("dir:") and "model.safetensors" in recipe["model"]["files"]
    assert recipe["design"] == {"kind": "fir_delays", "delays": [1, 2, 3, 4]}
    assert recipe["resampling"] == {"method": "lanczos", "lanczos_window": 3}
    assert recipe["trained_on"] == ["1", "2", "3"] and recipe["held_out"] == ["4"]
    methods = manifest["methods"]
    assert methods["folds"]["p01"] == [{"fold": 0, "train_runs": ["1", "2", "3"], "test_runs": ["4"],
                                        "n_train": 330, "n_test": 110}]
    assert "weighted by the fold's number of samples" in methods["aggregation"]
    assert methods["repeats"]["averaged"] is True and methods["models"]["published"] is True

    (model,) = load_models(manifest_uri, cache_dir=tmp_path / "cache")
    assert model.arrays["weights"].shape == (128, 8) and model.arrays["weights"].dtype == np.float32
    assert model.arrays["feature_mean"].shape == (4, 32) and model.arrays["response_std"].shape == (4, 8)
    np.testing.assert_allclose(model.arrays["response_mean"], 100.0, atol=0.5)  # the responses as read

    out = tmp_path / "pred"
    proc = neuroflow("predict", manifest_uri, "--textgrid", str(planted / "stimuli" / "story4.TextGrid"),
                     "--like-story", "story4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == str(out)
    pred = np.load(out / "sub-p01_desc-lm_pred.npy")
    table = pd.read_csv(out / "sub-p01_desc-lm_pred.tsv", sep="\t")
    assert list(table.columns) == ["time", *[f"PLANT{j}" for j in range(1, 5)], *[f"NOISE{j}" for j in range(1, 5)]]
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(), pred, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table["time"], 2.0 * np.arange(110))
    from pipelines.resultstore import ResultStore

    published = pd.read_csv(__import__("io").BytesIO(ResultStore(cfg.publish_prefix).get_bytes(STATMAP)), sep="\t")
    r = correlations(pred, held_out_responses(planted))
    np.testing.assert_allclose(r, published["r"].to_numpy(), atol=1e-5)  # float32 tolerance
    assert r[:N_PLANTED].min() > 0.5  # and the planted targets are the well-predicted ones
    predmap = pd.read_csv(out / "sub-p01_desc-lm_predmap.tsv", sep="\t")
    np.testing.assert_allclose(predmap["predicted"], pred.mean(axis=0), atol=1e-5)


def test_the_same_from_python_with_a_local_output_folder(local_analysis, planted, tmp_path):
    import pipelines

    (pred,) = pipelines.predict(local_analysis, textgrid=planted / "stimuli" / "story4.TextGrid",
                                like_story="story4", cache_dir=tmp_path / "cache")
    published = pd.read_csv(Path(local_analysis[len("file://"):]).parent / STATMAP, sep="\t")["r"].to_numpy()
    np.testing.assert_allclose(correlations(pred.values, held_out_responses(planted)), published, atol=1e-5)
    # a training story is predicted well too (it was fitted), plain text gets the training word rate
    (text,) = pipelines.predict(local_analysis, text=_write(tmp_path / "t.txt", "alice was very tired"),
                                cache_dir=tmp_path / "cache")
    rate = text.model.recipe["word_timings"]["words_per_second"]
    assert 1.5 < rate < 4.0
    # 4 words from the first sample, then the longest delay (4 TRs of 2 s)
    assert text.values.shape == (int(np.floor((4 / rate + 8.0) / 2.0)) + 1, 8)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_models_can_be_left_out_or_halved(planted, tiny_bert_dir, tmp_path, local_analysis):
    base = planted_config(str(planted), str(tmp_path / "out"), tiny_bert_dir)
    default = parse_config(base)
    off = parse_config({**base, "publish": {"models": False}})
    half = parse_config({**base, "publish": {"models_dtype": "float16"}})
    # the defaults are left out of the resolved config: analyses published before keep their ids
    assert "publish" not in default.to_dict() and len({default.analysis_id, off.analysis_id, half.analysis_id}) == 3
    with pytest.raises(ConfigError, match="models"):
        parse_config({**base, "publish": {"modles": False}})

    result = run_analysis(off, cache_dir=tmp_path / "cache")
    manifest = read_manifest(result["manifest_uri"])
    assert not [a for a in manifest["artifacts"] if a["kind"] == "encoding_model"]
    assert manifest["methods"]["models"] == {"published": False} and manifest["methods"]["folds"]["p01"]
    proc = neuroflow("predict", result["manifest_uri"], "--text", str(_write(tmp_path / "t.txt", "alice ran")),
                     "--out", str(tmp_path / "p"))
    one_line_error(proc, "publishes no encoding model", "publish.models: false")

    result = run_analysis(half, cache_dir=tmp_path / "cache")
    (model,) = load_models(result["manifest_uri"], cache_dir=tmp_path / "cache")
    assert model.arrays["weights"].dtype == np.float16 and model.recipe["weights_dtype"] == "float16"
    (art,) = [a for a in read_manifest(result["manifest_uri"])["artifacts"] if a["kind"] == "encoding_model"]
    (full,) = [a for a in read_manifest(local_analysis)["artifacts"] if a["kind"] == "encoding_model"]
    assert art["bytes"] <= full["bytes"] - 128 * 8 * 2  # the weights take half the bytes


def test_bad_predict_requests_are_one_clear_error(local_analysis, planted, tiny_bert_dir, tmp_path):
    text = str(_write(tmp_path / "t.txt", "alice was tired"))
    one_line_error(neuroflow("predict", local_analysis, "--out", str(tmp_path / "p")), "--text FILE")
    one_line_error(neuroflow("predict", local_analysis, "--text", text, "--subject", "zz", "--out",
                             str(tmp_path / "p")), "--subject 'zz'", "p01")
    one_line_error(neuroflow("predict", local_analysis, "--text", str(tmp_path / "none.txt"), "--out",
                             str(tmp_path / "p")), "--text", "no such file")
    one_line_error(neuroflow("predict", local_analysis, "--text", text, "--like-story", "story9", "--out",
                             str(tmp_path / "p")), "story9", "story4")
    # the model's folder is checked against the files it was fitted with
    other = tmp_path / "other-model"
    other.mkdir()
    for f in tiny_bert_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "config.json").write_text((tiny_bert_dir / "config.json").read_text().replace("}", ', "x": 1}', 1))
    one_line_error(neuroflow("predict", local_analysis, "--text", text, "--model-dir", str(other), "--out",
                             str(tmp_path / "p")), "--model-dir", "differ")
    one_line_error(neuroflow("predict", local_analysis.replace("manifest.json", "config.yaml"), "--text", text),
                   "not a manifest.json URI")
    with pytest.raises(DatasetError, match="no words"):
        words_from_text(" ,. ", 0.0, 2.0)


# --- in-silico experiments on the planted dataset -----------------------------------------------

def sentences_and_truth(tiny_bert_dir, n: int = 30, seed: int = 3) -> tuple[list[str], np.ndarray]:
    """Random sentences of the vocabulary, and how much each drives the planted dimension (its mean over
    the sentence's words, from the feature itself: no encoding model involved)."""
    from pipelines.features.registry import Stimulus, compute_feature

    rng = np.random.default_rng(seed)
    sentences = [" ".join(rng.choice(VOCAB, size=int(rng.integers(5, 10)))) for _ in range(n)]
    truth = np.array([compute_feature(feature(tiny_bert_dir), Stimulus(words=words_from_text(s, 4.0, 2.5)))
                      .single()[:, DIM].mean() for s in sentences])
    return sentences, truth


def test_selection_finds_the_sentences_that_drive_the_planted_targets(local_analysis, tiny_bert_dir, tmp_path):
    from scipy.stats import spearmanr

    from pipelines.models.insilico import select_sentences

    sentences, truth = sentences_and_truth(tiny_bert_dir)
    best, worst = np.argsort(-truth), np.argsort(truth)
    planted_names = [f"PLANT{j}" for j in range(1, N_PLANTED + 1)]
    sel = select_sentences(local_analysis, sentences, n=5, targets=planted_names, out=tmp_path / "sel",
                           cache_dir=tmp_path / "cache")
    scores = sel.table.set_index("sentence").loc[sentences, "score"].to_numpy()
    assert spearmanr(scores, truth).statistic > 0.8
    assert {sentences[i] for i in best[:8]} >= set(sel.drive)
    assert {sentences[i] for i in worst[:8]} >= set(sel.suppress)
    # the best-predicted targets by published r are the planted ones: the same choice
    top = select_sentences(local_analysis, sentences, n=5, top=N_PLANTED, cache_dir=tmp_path / "cache")
    assert list(top.targets) == list(range(N_PLANTED)) and top.drive == sel.drive
    # the noise targets are driven by nothing in particular
    noise = select_sentences(local_analysis, sentences, n=5, targets=["NOISE1", "NOISE2", "NOISE4"],
                             cache_dir=tmp_path / "cache")
    assert np.ptp(noise.table["score"]) < 0.5 * np.ptp(sel.table["score"])
    written = json.loads((tmp_path / "sel" / "sub-p01_desc-lm_selection.json").read_text())
    assert written["drive"] == sel.drive and written["targets"] == planted_names


def test_contrast_of_driving_and_suppressing_sentences_is_a_map_of_the_planted_targets(
        local_analysis, tiny_bert_dir, tmp_path):
    sentences, truth = sentences_and_truth(tiny_bert_dir)
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text("# high on the planted dimension\n" + "\n".join(sentences[i] for i in np.argsort(-truth)[:6]))
    b.write_text("\n".join(sentences[i] for i in np.argsort(truth)[:6]) + "\n\n")
    out = tmp_path / "contrast"
    proc = neuroflow("insilico", "contrast", local_analysis, "--a", str(a), "--b", str(b), "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = pd.read_csv(out / "sub-p01_desc-lm_contrast.tsv", sep="\t")
    t = pd.read_csv(out / "sub-p01_desc-lm_contrast-t.tsv", sep="\t")
    planted, noise = diff["predicted"].to_numpy()[:N_PLANTED], diff["predicted"].to_numpy()[N_PLANTED:]
    assert planted.min() > 3 * np.abs(noise).max()
    assert t["predicted"].to_numpy()[:N_PLANTED].min() > 3.0
    summary = json.loads((out / "sub-p01_desc-lm_contrast.json").read_text())
    assert len(summary["sentences_a"]) == 6 and len(summary["sentences_b"]) == 6
    # the command line's selection, and its errors
    cands = tmp_path / "c.txt"
    cands.write_text("\n".join(sentences))
    proc = neuroflow("insilico", "select", local_analysis, "--candidates", str(cands), "--top", "4", "-n", "2",
                     "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    drive = [ln.split("\t", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("drive\t")]
    assert len(drive) == 2 and set(drive) <= {sentences[i] for i in np.argsort(-truth)[:6]}
    one_line_error(neuroflow("insilico", "select", local_analysis, "--candidates", str(cands), "--targets",
                             "PLANT1,V1", "--out", str(tmp_path / "s")), "['V1']", "PLANT1")
    one_line_error(neuroflow("insilico", "select", local_analysis, "--candidates", str(cands), "--roi-mask",
                             str(a), "--out", str(tmp_path / "s")), "--roi-mask", "not voxels")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    one_line_error(neuroflow("insilico", "contrast", local_analysis, "--a", str(empty), "--b", str(b), "--out",
                             str(tmp_path / "s")), "empty.txt", "holds no sentence")


# --- the consumer DAG ---------------------------------------------------------------------------

@pytest.mark.integration
def test_the_insilico_dag_runs_an_experiment_on_a_published_analysis(airflow_db, dagbag, local_analysis,
                                                                     tiny_bert_dir, tmp_path):
    from airflow.utils.state import DagRunState

    from pipelines.models.experiments import results_prefix
    from pipelines.resultstore import open_store

    dag = dagbag.dags["neuroflow_insilico"]
    assert "neuroflow" in dag.tags and dag.catchup is False
    assert all(t.retries >= 1 and t.execution_timeout is not None for t in dag.tasks)
    assert [a.name for a in dag.timetable.asset_condition.objects] == ["neuroflow_published_maps"]
    sentences, truth = sentences_and_truth(tiny_bert_dir)
    experiment = {"candidates": sentences, "n": 3, "top": N_PLANTED,
                  "contrasts": [{"name": "high-vs-low", "a": [sentences[i] for i in np.argsort(-truth)[:5]],
                                 "b": [sentences[i] for i in np.argsort(truth)[:5]]}]}
    run = dag.test(run_conf={"manifest_uri": local_analysis, "experiment": experiment})
    assert run.state == DagRunState.SUCCESS
    output, rel = results_prefix(local_analysis)
    store = open_store(output)
    summary = json.loads(store.get_bytes(f"{rel}/summary.json"))
    (entry,) = summary["results"]
    assert entry["subject"] == "p01" and entry["n_targets"] == N_PLANTED
    assert set(entry["drive"]) <= {sentences[i] for i in np.argsort(-truth)[:6]}
    assert entry["contrasts"]["high-vs-low"]["mean_difference"] is not None
    for f in summary["files"]:  # every file it lists is there, as listed
        assert len(store.get_bytes(f"{rel}/{f['path']}")) == f["bytes"]
    # the published analysis itself is untouched: its manifest lists nothing of the experiment
    assert not [a for a in read_manifest(local_analysis)["artifacts"] if "insilico" in a["path"]]
    # a bad experiment fails the run at its check
    bad = dag.test(run_conf={"manifest_uri": local_analysis, "experiment": {"candidates": [], "top": 0}})
    assert bad.state == DagRunState.FAILED
    states = {ti.task_id: ti for ti in bad.get_task_instances()}
    assert states["experiment"].state == "failed" and states["experiment"].try_number == 1  # refused, not retried


from .test_dags import airflow_db, dagbag  # noqa: E402,F401 - the DAG fixtures


# --- predicted maps in the dataset's kind -------------------------------------------------------

def test_predicted_maps_are_volumes_surfaces_or_tables_in_the_fits_target_order(tmp_path, rng):
    """The predicted map puts each target where the published score maps put it (same mask, same order)."""
    import nibabel as nib

    from pipelines.maps import write_volume_map
    from pipelines.models.predict import Prediction, PublishedModel, write_prediction

    mask = np.zeros((5, 6, 4), dtype=np.uint8)
    mask[1:4, 2:5, 1:3] = 1
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    n = int(mask.sum())
    values = rng.standard_normal((7, n)).astype(np.float32)
    arrays = {"valid": np.ones(n, np.uint8), "intercept": np.zeros(n, np.float32), "mask": mask}
    vol = PublishedModel("m", "01", "lm_layer2", {"targets": {"kind": "bold", "affine": affine.tolist()}}, arrays, "p")
    paths = write_prediction(Prediction(vol, 2.0 * np.arange(7), values), tmp_path / "vol")
    assert [p.name for p in paths] == ["sub-01_desc-lmlayer2_pred.npy", "sub-01_desc-lmlayer2_pred.tsv",
                                       "sub-01_desc-lmlayer2_predmap.nii.gz"]
    reference = write_volume_map(values.mean(0), nib.Nifti1Image(mask, affine), tmp_path / "ref.nii.gz")
    np.testing.assert_allclose(nib.load(paths[-1]).get_fdata(), nib.load(reference).get_fdata(), atol=1e-6)
    np.testing.assert_allclose(nib.load(paths[-1]).affine, affine)

    hemi = np.array([0, 0, 1, 1, 1], np.uint8)
    vertex = np.array([3, 0, 2, 5, 1])
    arrays = {"valid": np.array([1, 1, 1, 0, 1], np.uint8), "intercept": np.zeros(5, np.float32), "hemi": hemi,
              "vertex": vertex}
    surf = PublishedModel("m", "01", "lm", {"targets": {"kind": "gifti", "space": "fsaverageX"}}, arrays, "p")
    pred = Prediction(surf, np.arange(3.0), rng.standard_normal((3, 5)).astype(np.float32))
    paths = write_prediction(pred, tmp_path / "surf")
    left, right = (nib.load(p).darrays[0].data for p in paths[-2:])
    assert [p.name for p in paths[-2:]] == ["sub-01_hemi-L_desc-lm_predmap.func.gii",
                                            "sub-01_hemi-R_desc-lm_predmap.func.gii"]
    assert left[3] == pytest.approx(pred.map[0]) and left[0] == pytest.approx(pred.map[1])
    assert right[2] == pytest.approx(pred.map[2]) and np.isnan(right[5]) and right[1] == pytest.approx(pred.map[4])


def test_a_tampered_model_is_refused_and_a_bad_file_is_one_clear_error(local_analysis, planted, tmp_path):
    import shutil

    from pipelines.errors import IntegrityError
    from pipelines.models.export import read_model_bytes

    # a copy of the published analysis whose model file was altered after publishing
    folder = Path(local_analysis[len("file://"):]).parent
    copy = tmp_path / "out" / "ds002322" / "1.0.4" / folder.name
    shutil.copytree(folder, copy)
    model = copy / "sub-p01/models/sub-p01_task-listen_desc-lm_model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF
    model.write_bytes(bytes(data))
    text = str(_write(tmp_path / "t.txt", "alice was tired"))
    line = one_line_error(neuroflow("predict", str(copy / "manifest.json"), "--text", text, "--out",
                                    str(tmp_path / "p"), "--cache-dir", str(tmp_path / "cache")), "sha256")
    assert "model.safetensors" in line
    for bad in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", bytes(data[:100])):
        with pytest.raises(IntegrityError, match="not a readable neuroflow model"):
            read_model_bytes(bad, "m.safetensors")


def test_without_a_held_out_story_the_model_is_refitted_on_every_run_and_says_so(planted, tiny_bert_dir, tmp_path):
    cfg = planted_config(str(planted), str(tmp_path / "out"), tiny_bert_dir)
    cfg["model"].pop("test_stories")  # leave-one-run-out over the four stories
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    manifest = read_manifest(result["manifest_uri"])
    folds = manifest["methods"]["folds"]["p01"]
    assert [(f["train_runs"], f["test_runs"]) for f in folds] == [
        ([r for r in "1234" if r != k], [k]) for k in "1234"]
    assert manifest["methods"]["cross_validation"]["outer"].startswith("leave-one-run-out")
    (model,) = load_models(result["manifest_uri"], cache_dir=tmp_path / "cache")
    assert model.recipe["trained_on"] == ["1", "2", "3", "4"] and model.recipe["held_out"] == []
    assert "geometric mean" in model.recipe["training"]
    # fitted on story1 too: its prediction follows the planted targets there
    import pipelines

    (pred,) = pipelines.predict(result["manifest_uri"], textgrid=planted / "stimuli" / "story1.TextGrid",
                                like_story="story1", cache_dir=tmp_path / "cache")
    assert correlations(pred.values, held_out_responses(planted, run=1))[:N_PLANTED].min() > 0.6


@pytest.mark.slow
def test_bench_models_writes_its_table(tmp_path):
    from .conftest import REPO

    out = tmp_path / "models.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_models.py"), "--quick", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    text = out.read_text()
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| float")]
    assert [r[0].strip() for r in rows] == ["float32", "float16"]
    assert float(rows[0][3]) < 1e-4 and int(rows[1][1].replace(",", "")) < int(rows[0][1].replace(",", ""))
    assert float(re.search(r"largest difference of r ([0-9.e+-]+)\.", text).group(1)) < 1e-4


@pytest.mark.slow
def test_an_acoustic_model_predicts_from_the_sound(planted, tiny_bert_dir, tmp_path):
    """--audio: the envelope's model, fed the held-out story's WAV, gives its published held-out r back."""
    cfg = planted_config(str(planted), str(tmp_path / "out"), tiny_bert_dir)
    cfg["features"].append({"name": "env", "kind": "envelope"})
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    wav = str(planted / "stimuli" / "story4.wav")
    out = tmp_path / "pred"
    proc = neuroflow("predict", result["manifest_uri"], "--audio", wav, "--feature-space", "env", "--like-story",
                     "story4", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    pred = np.load(out / "sub-p01_desc-env_pred.npy")
    published = pd.read_csv(Path(result["manifest_uri"][len("file://"):]).parent
                            / "sub-p01/sub-p01_task-listen_desc-env_stat-r_statmap.tsv", sep="\t")["r"].to_numpy()
    np.testing.assert_allclose(correlations(pred, held_out_responses(planted)), published, atol=1e-5)
    # every feature space at once: the language model needs the words too
    one_line_error(neuroflow("predict", result["manifest_uri"], "--audio", wav, "--out", str(out),
                             "--cache-dir", str(tmp_path / "cache")), "'lm'", "--text or --textgrid")
