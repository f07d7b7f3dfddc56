"""ds005574 (Podcast ECoG, Zada et al. 2025): no events.tsv, a transcript on the recording's clock.

Layout in ``s3://openneuro.org/ds005574``: all the real metadata of v1.0.2 (channels.tsv with its
UTF-8 BOM and bad-channel statuses, electrodes.tsv in MNI152NLin2009aSym, ieeg.json with
RecordingDuration 1799.998 s, and the real word-aligned ``stimuli/*/transcript.tsv``), plus
synthetic files at the real annexed paths of sub-01:

- ``derivatives/ecogprep/sub-01/ieeg/sub-01_task-podcast_desc-highgamma_ieeg.fif``: the 99 good ECoG
  channels (the real file holds exactly those: 364997794 bytes = 99 x 921600 float32 samples),
  here at 10 Hz instead of 512 Hz, 1800 s; five channels follow the real transcript's word rate.
- ``sub-01/ieeg/sub-01_task-podcast_ieeg.edf``: all 124 channels at 512 Hz (EDF written by the
  tests' own writer) but only 60 s long, so the real sidecar's RecordingDuration refuses it.

The high-gamma path from raw EDF is checked on a shortened copy (``s3://lab-podcast/...``: the
real sub-01 metadata with RecordingDuration set to 60 s), where five channels carry a 110 Hz
oscillation whose amplitude follows the words.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import check_run_timing, load_run_words, load_subject, open_dataset

from .conftest import demo_config
from .datasets import annexed, corr, edf_bytes, fif_bytes, metadata_files, realdata, smooth_rate, stage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "ds005574_podcast_ecog_meta"
SOURCE = "s3://openneuro.org/ds005574"
SHORT = "s3://lab-podcast/ds005574-short"
TRANSCRIPT = "stimuli/whisper-medium/transcript.tsv"
WORDS = {"format": "words_tsv", "files": {"podcast": TRANSCRIPT}}
DERIV = {"kind": "ieeg", "derivatives": ["derivatives/ecogprep"], "desc": "highgamma", "sfreq": 5.0}
HG_KEY = "derivatives/ecogprep/sub-01/ieeg/sub-01_task-podcast_desc-highgamma_ieeg.fif"
EDF_KEY = "sub-01/ieeg/sub-01_task-podcast_ieeg.edf"
EDF_SECONDS, EDF_SFREQ = 60, 512


def config(tmp_path, source=SOURCE, version="1.0.2"):
    cfg = demo_config(tmp_path, "s3://unused", subjects=("01",))
    cfg["dataset"].update(source=source, version=version, task="podcast",
                          word_timings={"format": "textgrid", "files": {"podcast": TRANSCRIPT}})
    cfg["dataset"]["responses"] = {}
    return parse_config(cfg)


def channels() -> pd.DataFrame:
    return pd.read_csv(realdata(NAME) / "bids/sub-01/ieeg/sub-01_task-podcast_channels.tsv", sep="\t",
                       encoding="utf-8-sig")


def real_words() -> pd.DataFrame:
    from pipelines.wordtimings import read_words_tsv

    return read_words_tsv(realdata(NAME) / "bids" / TRANSCRIPT)


@pytest.fixture(scope="module")
def podcast(s3_url):
    rng = np.random.default_rng(5574)
    ch = channels()
    words = real_words()
    good = ch[(ch["type"] == "ECOG") & (ch["status"] == "good")]["name"].tolist()
    assert len(good) == 99
    sf, n = 10.0, 18000
    rate = smooth_rate(words, np.arange(n) / sf, width=0.4)
    hg = 1e-5 + 1e-6 * rng.standard_normal((len(good), n))
    hg[:5] += 3e-6 * (rate - rate.mean()) / rate.std()
    # the EDF: all 124 channels, 60 s at 512 Hz; five ECoG channels' 110 Hz amplitude follows the words
    t = np.arange(EDF_SECONDS * EDF_SFREQ) / EDF_SFREQ
    edf_rate = smooth_rate(words, t, width=0.3)
    amp = 1 + 2 * edf_rate / edf_rate.max()
    raw = 20 * rng.standard_normal((len(ch), len(t)))
    planted_names = good[:5]
    for name in planted_names:
        i = ch.index[ch["name"] == name][0]
        raw[i] += 60 * amp * np.sin(2 * np.pi * 110 * t + rng.uniform(0, 6.28))
    edf = edf_bytes(ch["name"].tolist(), EDF_SFREQ, raw)
    files = dict(metadata_files(NAME))
    files[HG_KEY] = fif_bytes(good, ["ecog"] * len(good), sf, hg)
    files[EDF_KEY] = edf
    stage(SOURCE, files)
    short = metadata_files(NAME, lambda k: k.startswith("sub-01/") or "/" not in k or k == TRANSCRIPT)
    side = json.loads(short["sub-01/ieeg/sub-01_task-podcast_ieeg.json"].read_text())
    side["RecordingDuration"] = EDF_SECONDS - 1 / EDF_SFREQ
    kept = [line for line in short[TRANSCRIPT].read_text().splitlines()]
    header, rows = kept[0], [r for r in kept[1:] if float(r.split("\t")[4]) < EDF_SECONDS - 2]
    short.update({"sub-01/ieeg/sub-01_task-podcast_ieeg.json": json.dumps(side),
                  TRANSCRIPT: "\n".join([header] + rows) + "\n", EDF_KEY: edf})
    stage(SHORT, short)
    return {"good": good, "planted": planted_names}


def test_paths_are_the_real_annexed_ones(podcast):
    assert {HG_KEY, EDF_KEY} <= set(annexed(NAME)["path"])


def test_high_gamma_derivative_aligns_with_the_transcript(podcast, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=DERIV, words=WORDS)
    subject = load_subject(ingest, "01")
    assert subject.kind == "ieeg" and len(subject.runs) == 1
    run = subject.runs[0]
    assert run.story == "podcast" and run.events_key is None  # the dataset has no events.tsv
    assert run.sfreq == 5.0 and run.data.shape == (9000, 99) and subject.target_names == podcast["good"]
    # electrodes.tsv (MNI) joined onto the channels; the real file lacks a few good channels
    info = subject.target_info
    assert list(info.columns[:2]) == ["name", "type"] and info["x"].notna().sum() >= 95
    words = load_run_words(ingest, run)
    assert len(words) == 5134 and words["onset"].iloc[0] == pytest.approx(3.71)
    check_run_timing(run, words, "01")  # 9000 samples at 5 Hz = 1800 s vs RecordingDuration 1799.998 s
    rate = smooth_rate(words, run.times, width=0.4)
    assert min(corr(run.data[:, i], rate) for i in range(5)) > 0.8
    assert max(corr(run.data[:, i], smooth_rate(words, run.times - 1.0, width=0.4)) for i in range(5)) < 0.5


def test_named_bad_channels_are_dropped(podcast, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses={**DERIV, "bad_channels": ["G2", "G3"]},
                          words=WORDS)
    subject = load_subject(ingest, "01")
    assert len(subject.target_names) == 97 and "G2" not in subject.target_names
    with pytest.raises(DatasetError, match=r"'bad_channels' names channels the recording does not have: \['G1'\]"):
        # G1 is bad in channels.tsv: the derivative no longer has it
        load_subject(open_dataset(config(tmp_path), tmp_path / "cache", responses={**DERIV, "bad_channels": ["G1"]},
                                  words=WORDS), "01")


def test_high_gamma_envelope_from_raw_edf(podcast, tmp_path):
    """Raw EDF read through MNE-BIDS: channels.tsv types and bad statuses, 70-150 Hz envelope, 10 Hz."""
    cfg = config(tmp_path, source=SHORT)
    ingest = open_dataset(cfg, tmp_path / "cache", words=WORDS,
                          responses={"kind": "ieeg", "high_gamma": [70.0, 150.0], "sfreq": 10.0, "notch": 60.0})
    subject = load_subject(ingest, "01")
    run = subject.runs[0]
    ch = channels()
    bad = set(ch.loc[ch["status"] == "bad", "name"])
    assert run.meta["reader"] == "mne_bids.read_raw_bids"
    assert set(subject.target_names) == set(ch.loc[(ch["type"] == "ECOG") & (ch["status"] == "good"), "name"])
    assert not bad & set(subject.target_names) and run.data.shape == (EDF_SECONDS * 10, 99)
    words = load_run_words(ingest, run)
    check_run_timing(run, words, "01")
    rate = smooth_rate(words, run.times, width=0.3)
    idx = [subject.target_names.index(n) for n in podcast["planted"]]
    assert min(corr(run.data[:, i], rate) for i in idx) > 0.8
    others = [i for i in range(99) if i not in idx]
    assert max(abs(corr(run.data[:, i], rate)) for i in others) < 0.4


@pytest.mark.reliability
def test_bad_inputs(podcast, tmp_path, ledger):
    with ledger.bad_input("Podcast: EDF shorter than its RecordingDuration"):
        ingest = open_dataset(config(tmp_path), tmp_path / "cache", words=WORDS,
                              responses={"kind": "ieeg", "sfreq": 16.0})
        run = load_subject(ingest, "01").runs[0]
        with pytest.raises(DatasetError, match=r"sub-01_task-podcast_ieeg\.edf: sub-01 run 1 \(story 'podcast'\) "
                                               r"lasts 60\.000 s, but its sidecar says RecordingDuration 1799\.998 s"):
            check_run_timing(run, load_run_words(ingest, run), "01")
    with ledger.bad_input("Podcast: high-gamma band above Nyquist"):
        ingest = open_dataset(config(tmp_path), tmp_path / "cache", words=WORDS,
                              responses={**DERIV, "high_gamma": [70.0, 150.0]})
        with pytest.raises(DatasetError, match=r"highgamma_ieeg\.fif: sampled at 10 Hz, too slow for a 70-150 Hz "
                                               r"envelope"):
            load_subject(ingest, "01")
    with ledger.bad_input("Podcast: unknown subject"):
        from pipelines.ingest import check_subjects

        cfg = config(tmp_path)
        cfg = parse_config({**cfg.to_dict(), "dataset": {**cfg.to_dict()["dataset"], "subjects": ["10"]}})
        with pytest.raises(DatasetError, match=r"no subject sub-10; the dataset has: 01, 02, 03, 04, 05, 06, 07, "
                                               r"08, 09"):
            check_subjects(open_dataset(cfg, tmp_path / "cache"))


def test_the_whole_analysis_runs_on_the_podcast_ecog(podcast, tmp_path, results_bucket):
    """High-gamma ECoG at 5 Hz, words from the transcript, TRF lags, contiguous folds, published."""
    from pipelines.run import run_analysis

    cfg = demo_config(tmp_path, results_bucket, subjects=("01",))
    cfg["dataset"].update(source=SOURCE, version="1.0.2", task="podcast", responses=DERIV, word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"}]
    cfg["model"] = {"cv": "contiguous_blocks", "n_folds": 5, "tmin": -0.4, "tmax": 0.4,
                    "alphas": [1, 10, 100, 1000, 10000]}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    (fit,) = result["fits"]
    assert result["status"] == "complete" and fit["kind"] == "ieeg" and fit["n_targets"] == 99
    m = result["metrics"]["01"]["wordrate"]
    assert m["max_r"] > 0.5 and m["n_valid"] == 99
    from pipelines.cache import load_npz as _load_npz
    from pipelines.resultstore import ResultStore

    r = _load_npz(ResultStore(results_bucket).get_bytes(fit["result_rel"]))["wordrate__r"]
    assert r[:5].min() > 0.5 and abs(float(np.median(r[5:]))) < 0.1  # the planted electrodes, not the rest
