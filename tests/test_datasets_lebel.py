"""ds003020 (LeBel et al. 2023) as it is on OpenNeuro: per-story HDF5 responses, TextGrids, respdict.

Layout: the real metadata of ds003020 v3.1.0 (README, CHANGES, dataset_description, top-level
``task-<story>_bold.json`` with the TR, every subject's sidecars, ``derivative/respdict.json``)
in ``s3://openneuro.org/ds003020``, plus synthetic files at real annexed paths:
``derivative/preprocessed_data/<subject>/<story>.hf5`` (float64 ``data`` [TRs x voxels], TRs =
respdict - 20 as in the real files' sizes) and ``derivative/TextGrids/<story>.TextGrid`` (phone
and word tiers). Row j of a response was acquired at 10 + 2 j s on the story's clock (the
dataset's code trims 10 TRs and starts the sound 10 s into the scan); the planted voxels follow
the word rate on that clock.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError, IntegrityError
from pipelines.ingest import (
    check_run_timing,
    check_subjects,
    load_run_words,
    load_subject,
    open_dataset,
    read_checksum_table,
)

from .conftest import demo_config
from .datasets import (
    annex_pointer,
    annexed,
    corr,
    hf5_bytes,
    metadata_files,
    planted,
    realdata,
    stage,
    synthetic_words,
    textgrid_bytes,
    word_rate,
)

pytestmark = pytest.mark.integration

NAME = "ds003020_lebel_meta"
SOURCE = "s3://openneuro.org/ds003020"
STORIES = ["inamoment", "adollshouse", "theclosetthatateeverything"]
START, TR, TRIM = 10.0, 2.0, 20
RESPONSES = {"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5", "start_time": START,
             "tr_counts": "derivative/respdict.json", "tr_counts_trim": TRIM}
WORDS = {"format": "textgrid", "files": {}, "pattern": "derivative/TextGrids/{story}.TextGrid", "tier": "word"}
N_VOX, PLANTED = 40, [0, 1, 2, 3, 4]


def config(tmp_path, subjects=("UTS01",), version="3.1.0"):
    cfg = demo_config(tmp_path, "s3://unused", subjects=subjects)
    cfg["dataset"].update(source=SOURCE, version=version, task="stories",
                          word_timings={"format": "textgrid", "files": {"stories": "unused.TextGrid"}})
    cfg["dataset"]["responses"] = {}
    return parse_config(cfg)


@pytest.fixture(scope="module")
def lebel(s3_url):
    """Stage the layout once; returns {story: words on the story clock} and the synthetic bytes."""
    rng = np.random.default_rng(3020)
    respdict = json.loads((realdata(NAME) / "bids/derivative/respdict.json").read_text())
    files = dict(metadata_files(NAME))
    words, synthetic = {}, {}
    for story in STORIES + ["wheretheressmoke"]:
        n = respdict[story] - TRIM
        words[story] = synthetic_words(rng, 1.0, START + TR * n - 3.0)
        synthetic[f"derivative/TextGrids/{story}.TextGrid"] = textgrid_bytes(words[story], START + TR * n + 8)
    for story in STORIES:
        n = respdict[story] - TRIM
        signal = word_rate(words[story], START + TR * np.arange(n))
        synthetic[f"derivative/preprocessed_data/UTS01/{story}.hf5"] = hf5_bytes(
            planted(rng, signal, N_VOX, PLANTED, scale=10.0, base=100.0))
    n = respdict["adollshouse"] - TRIM
    good = hf5_bytes(rng.standard_normal((n, N_VOX)))
    synthetic["derivative/preprocessed_data/UTS02/adollshouse.hf5"] = good[: len(good) // 2]  # truncated
    key = "MD5E-s156412976--d6067a4446b7efe7f60e376a15781506.hf5"  # the real annex key of UTS01's file
    synthetic["derivative/preprocessed_data/UTS03/adollshouse.hf5"] = annex_pointer(key)
    short = respdict["inamoment"] - TRIM - 5
    synthetic["derivative/preprocessed_data/UTS04/inamoment.hf5"] = hf5_bytes(rng.standard_normal((short, N_VOX)))
    synthetic["derivative/preprocessed_data/UTS05/life.hf5"] = hf5_bytes(
        rng.standard_normal((respdict["life"] - TRIM, N_VOX)))  # no TextGrid for "life" is staged
    n = respdict["wheretheressmoke"] - TRIM
    signal = word_rate(words["wheretheressmoke"], START + TR * np.arange(n))
    repeats = np.stack([planted(rng, signal, N_VOX, PLANTED, snr=2.0) for _ in range(3)])
    synthetic["derivative/preprocessed_data/UTS06/wheretheressmoke.hf5"] = hf5_bytes(repeats)
    files.update(synthetic)
    stage(SOURCE, files)
    return {"words": words, "synthetic": synthetic, "respdict": respdict}


def test_real_metadata_is_laid_out_as_annexed(lebel):
    """The synthetic files sit at paths the real snapshot lists as annexed."""
    real = set(annexed(NAME)["path"])
    assert {k for k in lebel["synthetic"] if k.startswith("derivative/")} <= real


def test_stories_are_read_with_their_clock_and_words(lebel, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    assert ingest.version_found == "3.1.0"
    assert check_subjects(ingest) == ["UTS01"]
    subject = load_subject(ingest, "UTS01")
    assert subject.kind == "hdf5"
    assert sorted(r.story for r in subject.runs) == sorted(STORIES)
    for run in subject.runs:
        n = lebel["respdict"][run.story] - TRIM
        assert run.data.shape == (n, N_VOX) and run.data.dtype == np.float32
        assert run.tr == TR  # from the real top-level task-<story>_bold.json
        assert run.times[0] == START and run.meta["expected_samples"] == n
        words = load_run_words(ingest, run)
        assert list(words.columns) == ["onset", "offset", "word", "story"]
        assert len(words) == len(lebel["words"][run.story]) and (words["story"] == run.story).all()
        check_run_timing(run, words, "UTS01")
        # the planted voxels follow the word rate on the run's clock; an error of one TR would show
        rate = word_rate(words, run.times)
        assert min(corr(run.data[:, v], rate) for v in PLANTED) > 0.9
        assert max(corr(run.data[:, v], word_rate(words, run.times - TR)) for v in PLANTED) < 0.7
        assert abs(corr(run.data[:, N_VOX - 1], rate)) < 0.3
    # every file read is in the manifest's input list, verified against the S3 ETag (MD5)
    rec = ingest.files_read["derivative/preprocessed_data/UTS01/inamoment.hf5"]
    assert rec.verified.startswith("size+md5") and len(rec.sha256) == 64 and rec.etag


def test_phone_tier_is_read_too(lebel, tmp_path):
    from pipelines.wordtimings import read_textgrid_phones

    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    path = ingest.fetch("derivative/TextGrids/inamoment.TextGrid")
    phones = read_textgrid_phones(path, key="derivative/TextGrids/inamoment.TextGrid")
    assert list(phones.columns) == ["onset", "offset", "phone"] and len(phones) > 2 * len(lebel["words"]["inamoment"])


def test_repeated_test_story_is_averaged(lebel, tmp_path):
    ingest = open_dataset(config(tmp_path, ("UTS06",)), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    run = load_subject(ingest, "UTS06").runs[0]
    assert run.story == "wheretheressmoke" and run.data.shape == (291, N_VOX)
    words = load_run_words(ingest, run)
    check_run_timing(run, words, "UTS06")
    assert corr(run.data[:, 0], word_rate(words, run.times)) > 0.9  # 3 repeats averaged: noise / sqrt(3)


@pytest.mark.reliability
def test_bad_inputs_are_refused_with_the_file_and_the_fix(lebel, tmp_path, ledger):
    def opened(*subjects, **kw):
        return open_dataset(config(tmp_path, subjects), tmp_path / "cache", responses={**RESPONSES, **kw}, words=WORDS)

    with ledger.bad_input("LeBel: truncated HDF5"):
        with pytest.raises(DatasetError, match=r"UTS02/adollshouse\.hf5: not a readable HDF5 file.*re-download"):
            load_subject(opened("UTS02"), "UTS02")
    with ledger.bad_input("LeBel: git-annex pointer instead of HDF5"):
        with pytest.raises(DatasetError, match=r"UTS03/adollshouse\.hf5: is a git-annex pointer.*156412976 bytes"
                                               r".*datalad get"):
            load_subject(opened("UTS03"), "UTS03")
    with ledger.bad_input("LeBel: response shorter than respdict"):
        ingest = opened("UTS04")
        run = load_subject(ingest, "UTS04").runs[0]
        with pytest.raises(DatasetError, match=r"UTS04/inamoment\.hf5: sub-UTS04 run inamoment.*200 samples.*"
                                               r"respdict\.json\['inamoment'\] = 225 minus 20 = 205"):
            check_run_timing(run, load_run_words(ingest, run), "UTS04")
    with ledger.bad_input("LeBel: story without word timings"):
        ingest = opened("UTS05")
        run = load_subject(ingest, "UTS05").runs[0]
        with pytest.raises(DatasetError, match=r"life\.hf5 \(run life, story 'life'\): no word timings: "
                                               r"derivative/TextGrids/life\.TextGrid is not in dataset version "
                                               r"3\.1\.0"):
            load_run_words(ingest, run)
    with ledger.bad_input("LeBel: unknown subject"):
        with pytest.raises(DatasetError, match=r"no subject sub-UTS99; the dataset has: UTS01, UTS02"):
            check_subjects(opened("UTS01", "UTS99"))
    with ledger.bad_input("LeBel: pinned version differs"):
        with pytest.raises(DatasetError, match=r"holds version 3\.1\.0, the config pins 2\.2\.0"):
            open_dataset(config(tmp_path, version="2.2.0"), tmp_path / "cache")
    with ledger.bad_input("LeBel: wrong HDF5 array name"):
        with pytest.raises(DatasetError, match=r"inamoment\.hf5: no dataset 'resp'; it has \['data'\]"):
            load_subject(opened("UTS01", hdf5_dataset="resp", stories=["inamoment"]), "UTS01")


@pytest.mark.reliability
def test_checksums_from_a_git_annex_listing_are_enforced(lebel, tmp_path, ledger):
    """Files are verified against git-annex keys (MD5E-s<size>--<md5>) when a listing is given."""
    key = "derivative/preprocessed_data/UTS01/inamoment.hf5"
    data = lebel["synthetic"][key]
    good = f"MD5E-s{len(data)}--{hashlib.md5(data).hexdigest()}.hf5"
    ingest = open_dataset(config(tmp_path), tmp_path / "ok", responses=RESPONSES, words=WORDS, checksums={key: good})
    ingest.fetch(key)
    assert ingest.files_read[key].verified == "size+md5 (checksum list (git-annex key))"
    with ledger.bad_input("LeBel: content differs from its git-annex key"):
        bad = f"MD5E-s{len(data)}--{'0' * 32}.hf5"
        ingest = open_dataset(config(tmp_path), tmp_path / "bad", responses=RESPONSES, words=WORDS,
                              checksums={key: bad})
        with pytest.raises(IntegrityError, match=r"inamoment\.hf5: md5 [0-9a-f]{32} does not match the checksum "
                                                 r"list \(git-annex key\) 0{32}; the download is corrupt"):
            ingest.fetch(key)
        assert not (ingest.source.local_path(key)).exists()  # nothing half-verified stays in the cache
    with ledger.bad_input("LeBel: a file that is not the real one (real annex listing)"):
        # the real ANNEXED_FILES.tsv: the synthetic file's size is not the real file's
        real = read_checksum_table(realdata(NAME) / "ANNEXED_FILES.tsv")
        ingest = open_dataset(config(tmp_path), tmp_path / "real", responses=RESPONSES, words=WORDS, checksums=real)
        with pytest.raises(IntegrityError, match=r"inamoment\.hf5: the source's file is \d+ bytes, its checksum "
                                                 r"list \(git-annex key\) says 133048688"):
            ingest.fetch(key)


@pytest.mark.slow
def test_the_whole_analysis_runs_on_lebels_layout(lebel, tmp_path, results_bucket):
    """prepare -> features per story -> fit (one fold per story) -> publish, on the real layout."""
    import json as _json

    from pipelines.run import run_analysis
    from pipelines.resultstore import ResultStore

    cfg = demo_config(tmp_path, results_bucket, subjects=("UTS01",))
    cfg["dataset"].update(source=SOURCE, version="3.1.0", task="stories", responses=RESPONSES, word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"delays": [0, 1], "alphas": [0.1, 1, 10, 100, 1000]}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    assert result["status"] == "complete"
    (feat,) = result["features"]
    assert feat["n_stimuli"] == 3  # one extraction per story, cached by content
    (fit,) = result["fits"]
    assert fit["kind"] == "hdf5" and fit["stories"] == sorted(STORIES) and fit["n_runs"] == 3
    r = ResultStore(results_bucket)
    manifest = _json.loads(r.get_bytes(result["manifest_uri"][len(results_bucket) + 1:]))
    assert manifest["subject_info"]["UTS01"]["stories"] == sorted(STORIES)
    table = next(a for a in manifest["artifacts"] if a["kind"] == "statmap_tsv" and "r" in a["stat"].split(","))
    import io

    import pandas as pd

    scores = pd.read_csv(io.BytesIO(r.get_bytes(result["manifest_uri"].rsplit("/", 1)[0][len(results_bucket) + 1:]
                                                 + "/" + table["path"])), sep="\t")
    assert scores["r"].iloc[PLANTED].min() > 0.5  # held-out stories, planted voxels found
    assert scores["r"].drop(index=PLANTED).abs().mean() < 0.15
    # every story's words and responses file is an input of the manifest
    keys = {i["key"] for i in manifest["inputs"]}
    assert {f"derivative/TextGrids/{s}.TextGrid" for s in STORIES} <= keys
    assert {f"derivative/preprocessed_data/UTS01/{s}.hf5" for s in STORIES} <= keys


@pytest.mark.slow
def test_a_repeated_test_story_gives_ceiling_normalised_scores(lebel, tmp_path, results_bucket):
    """UTS07: three stories plus the repeated test story (3 repeats): r, and r over the noise ceiling."""
    import io

    import pandas as pd

    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis
    from pipelines.stats import noise_ceiling
    from pipelines.resultstore import ResultStore

    rng = np.random.default_rng(7)
    files = {}
    for story in STORIES:
        n = lebel["respdict"][story] - TRIM
        files[f"derivative/preprocessed_data/UTS07/{story}.hf5"] = hf5_bytes(
            planted(rng, word_rate(lebel["words"][story], START + TR * np.arange(n)), N_VOX, PLANTED, snr=2.0))
    n = lebel["respdict"]["wheretheressmoke"] - TRIM
    signal = word_rate(lebel["words"]["wheretheressmoke"], START + TR * np.arange(n))
    repeats = np.stack([planted(rng, signal, N_VOX, PLANTED, snr=2.0) for _ in range(3)])
    files["derivative/preprocessed_data/UTS07/wheretheressmoke.hf5"] = hf5_bytes(repeats)
    stage(SOURCE, files)

    cfg = demo_config(tmp_path, results_bucket, subjects=("UTS07",))
    cfg["dataset"].update(source=SOURCE, version="3.1.0", task="stories", responses=RESPONSES, word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"delays": [0, 1], "alphas": [0.1, 1, 10, 100, 1000]}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    m = result["metrics"]["UTS07"]["wordrate"]
    assert m["n_with_ceiling"] >= len(PLANTED) and m["mean_r_normalised"] is not None
    manifest = read_manifest(result["manifest_uri"])
    table = next(a for a in manifest["artifacts"] if a["kind"] == "statmap_tsv" and "r" in a["stat"].split(","))
    scores = pd.read_csv(io.BytesIO(ResultStore(result["manifest_uri"].rsplit("/", 1)[0]).get_bytes(table["path"])),
                         sep="\t")
    r_max = noise_ceiling(repeats.astype(np.float32)).r_max
    np.testing.assert_allclose(scores["rnorm"].iloc[PLANTED], scores["r"].iloc[PLANTED] / r_max[PLANTED], rtol=1e-4)
    assert (r_max[PLANTED] > 0.7).all() and scores["rnorm"].iloc[PLANTED].min() > 0.5
    # noise voxels have no repeatable signal: no ceiling (reliability tested at 0.05), so no normalised score
    assert scores["rnorm"].drop(index=PLANTED).isna().mean() > 0.9
    # the repeated story as the held-out test story: alphas from the other three stories only
    cfg["model"]["test_stories"] = ["wheretheressmoke"]
    held = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    from pipelines.cache import load_npz as _load_npz

    (fit,) = held["fits"]
    arrays = _load_npz(ResultStore(results_bucket).get_bytes(fit["result_rel"]))
    assert arrays["wordrate__r"][PLANTED].min() > 0.5 and held["manifest_uri"] != result["manifest_uri"]
    cfg["model"]["test_stories"] = ["nosuchstory"]
    from pipelines.errors import DatasetError as _DatasetError

    with pytest.raises(_DatasetError, match="'model.test_stories'"):
        from pipelines.steps import fit_subject

        fit_subject(parse_config(cfg), "UTS07", held["features"], cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_pca_of_a_layer_sweep_is_fitted_on_the_training_stories(lebel, tmp_path, results_bucket, tiny_gpt2_dir):
    """features[].pca with model.test_stories: each layer's PCA sees the other stories' words only."""
    from pipelines.cache import load_npz as _load_npz
    from pipelines.resultstore import ResultStore
    from pipelines.steps import extract_features

    cfg = demo_config(tiny_gpt2_dir, results_bucket, subjects=("UTS01",))
    cfg["dataset"].update(source=SOURCE, version="3.1.0", task="stories", responses=RESPONSES, word_timings=WORDS)
    cfg["features"] = [{"name": "lm", "kind": "language_model", "model": str(tiny_gpt2_dir), "layer": [1, 2],
                        "context_words": 4, "pca": 5}]
    cfg["model"] = {"delays": [0, 1], "test_stories": ["inamoment"]}
    feat = extract_features(parse_config(cfg), "lm", cache_dir=tmp_path / "cache")
    assert feat["n_stimuli"] == 3 and feat["spaces"] == ["layer1", "layer2"]
    n_words = {s: len(lebel["words"][s]) for s in STORIES}
    assert feat["pca"]["layer1"]["n_rows"] == n_words["adollshouse"] + n_words["theclosetthatateeverything"]
    assert feat["pca"]["layer2"]["n_components"] == 5 and 0 < feat["pca"]["layer2"]["explained"] < 1
    assert feat["model_runtime"]["dtype"] == "float32"
    store = ResultStore(results_bucket)
    for rel in feat["entries"].values():
        arrays = _load_npz(store.get_bytes(rel))
        assert arrays["layer1"].shape[1] == 5 and arrays["layer2"].dtype == np.float32
    # the fit reads the reduced entries: one model per layer, scored on the test story
    from pipelines.run import run_analysis

    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    assert result["status"] == "complete"
    assert set(result["metrics"]["UTS01"]) == {"lm_layer1", "lm_layer2"}
    (again,) = [f for f in result["features"] if f["feature"] == "lm"]
    assert not again["computed"] and again["entries"] == feat["entries"]
