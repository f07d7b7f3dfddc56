"""MEG-MASC (Gwilliams et al. 2023, NEMAR nm000229): KIT MEG, word rows in events.tsv.

Layout in a lab's own bucket (``s3://lab-megmasc/nm000229``, signed requests: the dataset is on
NEMAR/OSF, not OpenNeuro): the real metadata of sub-01 (both sessions, 4 stories each: channels,
meg.json, events.tsv with word and phoneme onsets, head shapes, markers, scans) and the top-level
files. In the real snapshot the KIT ``.con`` recordings are git-annex pointers; KIT files cannot
be synthesised, so for task-0 (the story ``lw1``) of both sessions a FIF written with MNE
replaces the ``.con`` (256 channels as in channels.tsv: 208 axial gradiometers, 16 reference
magnetometers, 32 misc), at 25 Hz instead of 1000 Hz to stay small; in session 0 its meg.json
states the 25 Hz, in session 1 it still says 1000 Hz (a mismatch the reader must refuse). The
other stories keep their real pointers. Five sensors follow the word onsets of the real events.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import check_run_timing, check_subjects, load_run_words, load_subject, open_dataset

from .conftest import demo_config
from .datasets import corr, fif_bytes, helmet_positions, metadata_files, realdata, smooth_rate, stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "nm000229_megmasc_meta"
SOURCE = "s3://lab-megmasc/nm000229"
SFREQ, SECONDS = 25.0, 396
TYPES = {"MEGGRADAXIAL": "mag", "MEGREFMAG": "ref_meg", "MISC": "misc"}
RESPONSES = {"kind": "meg", "tasks": ["0"], "sessions": ["0"], "story_from": "events", "h_freq": 4.0, "sfreq": 10.0}
WORDS = {"format": "events", "files": {}}
MEG = "sub-01/ses-{s}/meg/sub-01_ses-{s}_task-{t}_meg"


def config(tmp_path, version="1.0.1"):
    cfg = demo_config(tmp_path, "s3://unused", subjects=("01",))
    cfg["dataset"].update(source=SOURCE, version=version, task="0",
                          word_timings={"format": "textgrid", "files": {"0": "unused"}})
    cfg["dataset"]["responses"] = {}
    return parse_config(cfg)


@pytest.fixture(scope="module")
def megmasc(s3_url):
    rng = np.random.default_rng(229)
    files = dict(metadata_files(NAME))
    ch = pd.read_csv(files["sub-01/ses-0/meg/sub-01_ses-0_task-0_channels.tsv"], sep="\t", encoding="utf-8-sig")
    t = np.arange(int(SECONDS * SFREQ)) / SFREQ
    for ses in ("0", "1"):
        events = pd.read_csv(files[f"sub-01/ses-{ses}/meg/sub-01_ses-{ses}_task-0_events.tsv"], sep="\t")
        words = events[events["trial_type"] == "word"]
        rate = smooth_rate(words, t, width=0.3)
        data = 1e-13 * rng.standard_normal((len(ch), len(t)))
        data[:5] += 2e-13 * (rate - rate.mean()) / rate.std()
        base = MEG.format(s=ses, t="0")
        del files[base + ".con"]
        files[base + ".fif"] = fif_bytes(ch["name"].tolist(), [TYPES[x] for x in ch["type"]], SFREQ, data,
                                         positions=helmet_positions(len(ch)))
    side = json.loads(files[MEG.format(s="0", t="0") + ".json"].read_text())
    side["SamplingFrequency"] = SFREQ
    files[MEG.format(s="0", t="0") + ".json"] = json.dumps(side)
    stage(SOURCE, files)
    return {"channels": ch}


def test_meg_run_reads_through_mne_bids_with_words_from_events(megmasc, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    assert ingest.version_found == "1.0.1"  # no CHANGES; dataset_description's Version
    assert check_subjects(ingest) == ["01"]
    subject = load_subject(ingest, "01")
    assert subject.kind == "meg" and len(subject.runs) == 1
    run = subject.runs[0]
    assert run.meta["reader"] == "mne_bids.read_raw_bids"
    assert (run.story, run.task, run.session) == ("lw1", "0", "0")  # the story from events.tsv
    assert run.sfreq == 10.0 and run.data.shape == (3960, 208)  # reference and misc channels are not targets
    assert subject.target_names[0] == "MEG 001" and set(subject.target_info["type"]) == {"mag"}
    words = load_run_words(ingest, run)
    assert len(words) == 668 and words["word"].iloc[0] == "Tara" and words["onset"].iloc[0] == 23.506
    assert (words["story"] == "lw1").all()
    check_run_timing(run, words, "01")  # 396 s recorded vs RecordingDuration 395.999 s; words end at 363 s
    rate = smooth_rate(words, run.times, width=0.3)
    assert min(corr(run.data[:, i], rate) for i in range(5)) > 0.8
    assert max(corr(run.data[:, i], smooth_rate(words, run.times - 1.0, width=0.3)) for i in range(5)) < 0.5
    assert max(abs(corr(run.data[:, i], rate)) for i in range(5, 208)) < 0.3


def test_bad_channels_are_dropped(megmasc, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", words=WORDS,
                          responses={**RESPONSES, "bad_channels": ["MEG 010", "MEG 200"]})
    subject = load_subject(ingest, "01")
    assert len(subject.target_names) == 206 and "MEG 010" not in subject.target_names
    assert subject.runs[0].meta["bad_channels"] == ["MEG 010", "MEG 200"]


@pytest.mark.reliability
def test_bad_inputs(megmasc, tmp_path, ledger):
    with ledger.bad_input("MEG-MASC: KIT recording is a git-annex pointer"):
        ingest = open_dataset(config(tmp_path), tmp_path / "cache", words=WORDS,
                              responses={**RESPONSES, "tasks": ["1"]})
        with pytest.raises(DatasetError, match=r"sub-01_ses-0_task-1_meg\.con: is a git-annex pointer.*SHA256E-s\d+"
                                               r".*the real file is \d+ bytes.*datalad get"):
            load_subject(ingest, "01")
    with ledger.bad_input("MEG-MASC: sidecar sampling rate differs from the recording"):
        ingest = open_dataset(config(tmp_path), tmp_path / "cache", words=WORDS,
                              responses={**RESPONSES, "sessions": ["1"]})
        with pytest.raises(DatasetError, match=r"sub-01_ses-1_task-0_meg\.fif: the recording is sampled at 25 Hz but "
                                               r"its sidecar says SamplingFrequency 1000 Hz"):
            load_subject(ingest, "01")
    with ledger.bad_input("MEG-MASC: events.tsv without word rows of that trial_type"):
        ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=RESPONSES,
                              words={**WORDS, "trial_type": "token"})
        run = load_subject(ingest, "01").runs[0]
        with pytest.raises(DatasetError, match=r"task-0_events\.tsv: no events of trial_type 'token' with a 'word'; "
                                               r"its trial types are \['phoneme', 'sound', 'word'\]"):
            load_run_words(ingest, run)
    with ledger.bad_input("MEG-MASC: pinned version differs"):
        with pytest.raises(DatasetError, match=r"holds version 1\.0\.1, the config pins 1\.0\.0"):
            open_dataset(config(tmp_path, version="1.0.0"), tmp_path / "cache")


def test_real_events_of_every_story_read_as_words():
    """All eight real events.tsv of sub-01 give words; easy_money's word "None" stays a word.

    (pandas' default NA parsing would turn it into a missing value and drop it.)
    """
    from pipelines.wordtimings import read_events_words

    root = realdata(NAME) / "bids"
    counts = {}
    for path in sorted(root.glob("sub-01/ses-*/meg/*_events.tsv")):
        words = read_events_words(path)
        assert words["onset"].is_monotonic_increasing and (words["offset"] >= words["onset"]).all()
        counts[path.name] = (words["story"].iloc[0], len(words), words.attrs["n_dropped"])
        if words["story"].iloc[0] == "easy_money":
            assert "None" in set(words["word"])
    assert counts["sub-01_ses-0_task-2_events.tsv"] == ("easy_money", 2637, 0)
    assert {v[0] for v in counts.values()} == {"lw1", "cable_spool_fort", "easy_money", "The_Black_Willow"}


def test_the_whole_analysis_runs_on_meg_with_words_from_events(megmasc, tmp_path, results_bucket):
    """MEG at 10 Hz, word rate from the run's own events.tsv, TRF lags, contiguous folds, published."""
    from pipelines.run import run_analysis

    cfg = demo_config(tmp_path, results_bucket, subjects=("01",))
    cfg["dataset"].update(source=SOURCE, version="1.0.1", task="0", responses=RESPONSES, word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"cv": "contiguous_blocks", "n_folds": 5, "tmin": -0.3, "tmax": 0.3,
                    "alphas": [1, 10, 100, 1000, 10000]}
    cfg["decoding"] = {"enabled": True, "delays": [0, 1, 2, 3], "segment_length": 20}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    # word-level decoding: the samples where a word falls are told from the others (chance 0.5)
    dec = result["metrics"]["01"]["wordrate"]["decoding"]
    assert dec["word_roc_auc"] > 0.6 and dec["top1"] > dec["chance_top1"]
    (fit,) = result["fits"]
    assert result["status"] == "complete" and fit["kind"] == "meg" and fit["n_targets"] == 208
    assert fit["stories"] == ["lw1"]
    from pipelines.cache import load_npz as _load_npz
    from pipelines.resultstore import ResultStore

    arrays = _load_npz(ResultStore(results_bucket).get_bytes(fit["result_rel"]))
    r = arrays["wordrate__r"]
    assert r[:5].min() > 0.5 and np.abs(r[5:]).max() < 0.3  # the planted sensors, and only those
    # the TRF: the planted sensors follow the words without delay, so their weight peaks at lag 0 (+-100 ms)
    lags, weights = arrays["wordrate__lag_times"], arrays["wordrate__lag_weights"]
    np.testing.assert_allclose(lags, np.arange(-3, 4) / 10, atol=1e-6)
    assert (np.abs(lags[weights[:, :5].argmax(axis=0)]) <= 0.1 + 1e-6).all()
    assert weights[:, :5].max(axis=0).min() > 5 * np.nanmedian(weights[:, 5:].max(axis=0))
    from pipelines.consume import read_manifest

    manifest = read_manifest(result["manifest_uri"])
    assert any(a["path"].endswith("_topomaps.png") for a in manifest["artifacts"])
    table = next(a for a in manifest["artifacts"] if a["kind"] == "statmap_tsv" and a["feature_space"] == "wordrate"
                 and "_stat-r_" in a["path"])
    assert "x" in ResultStore(result["manifest_uri"].rsplit("/", 1)[0]).get_bytes(table["path"]).decode().split("\n")[0]
