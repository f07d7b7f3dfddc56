"""Any BIDS dataset in a lab's own S3 prefix or a local folder: events.tsv naming a story per run, a words table.

A synthetic dataset (all of it: there is no real counterpart) with three runs of one subject, each
hearing a different story: the story is the run's events.tsv ``stim_file`` (played from 2, 4 and
6 s into the run), the word timings are ``stimuli/<story>_words.tsv`` (columns word, start, end on
the audio file's clock). Read from a local folder and from ``s3://lab-own/...``; the planted voxels
follow each story's word rate on its run's clock.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import (
    ResponseOptions,
    WordOptions,
    check_run_timing,
    load_run_words,
    load_subject,
    open_dataset,
    options_from_config,
)

from .conftest import demo_config
from .datasets import corr, nifti_bytes, planted, stage, synthetic_words, word_rate

pytestmark = pytest.mark.integration

STORIES = {"1": ("harbour", 2.0), "2": ("lighthouse", 4.0), "3": ("ferry", 6.0)}
TR, N = 1.0, 200
RESPONSES = {"kind": "bold", "story_from": "events"}
WORDS = {"format": "words_tsv", "files": {}, "pattern": "stimuli/{story}_words.tsv", "onset_from_events": True}


def build(root, rng):
    files = {"dataset_description.json": '{"Name": "lab stories", "BIDSVersion": "1.8.0"}',
             "CHANGES": "1.2.0 2025-01-10\n  - more runs\n1.1.0 2024-06-01\n  - first\n",
             "participants.tsv": "participant_id\nsub-01\n",
             "task-stories_bold.json": '{"RepetitionTime": 1.0, "TaskName": "stories"}'}
    words = {}
    for run, (story, onset) in STORIES.items():
        w = synthetic_words(rng, 0.3, N * TR - onset - 12)
        words[story] = w
        files[f"stimuli/{story}_words.tsv"] = w.rename(columns={"onset": "start", "offset": "end"})[
            ["word", "start", "end"]].to_csv(sep="\t", index=False)
        files[f"sub-01/func/sub-01_task-stories_run-{run}_events.tsv"] = (
            "onset\tduration\ttrial_type\tstim_file\n"
            f"{onset}\t{N * TR - onset - 10}\tstory\tstimuli/{story}.wav\n")
        vol = np.full((4, 4, 3, N), 50.0, np.float32)
        sig = planted(rng, word_rate(w, TR * np.arange(N) - onset), 4, [0, 1, 2], scale=2.0, base=50.0)
        for i, (x, y, z) in enumerate([(1, 1, 1), (2, 2, 1), (1, 2, 2), (3, 3, 0)]):
            vol[x, y, z] = sig[:, i]
        files[f"sub-01/func/sub-01_task-stories_run-{run}_bold.nii.gz"] = nifti_bytes(vol, TR)
    for key, body in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return files, words


@pytest.fixture(scope="module")
def lab(tmp_path_factory, s3_url):
    root = tmp_path_factory.mktemp("lab") / "stories"
    files, words = build(root, np.random.default_rng(11))
    uri = stage("s3://lab-own/projects/stories", files)
    return {"local": str(root), "s3": uri, "words": words}


def config(tmp_path, source):
    cfg = demo_config(tmp_path, "s3://unused", subjects=("01",))
    cfg["dataset"].update(source=source, version="1.2.0", task="stories",
                          word_timings={"format": "textgrid", "files": {"stories": "unused"}})
    cfg["dataset"]["responses"] = {}
    return parse_config(cfg)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_each_run_hears_its_own_story(lab, tmp_path, where):
    ingest = open_dataset(config(tmp_path, lab[where]), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    subject = load_subject(ingest, "01")
    assert [r.label for r in subject.runs] == ["1", "2", "3"]
    assert [r.story for r in subject.runs] == ["harbour", "lighthouse", "ferry"]
    assert subject.runs[0].data.shape == (N, 4)  # the variance mask: 3 planted + 1 noise voxel
    for run in subject.runs:
        onset = STORIES[run.label][1]
        words = load_run_words(ingest, run)
        assert words["onset"].iloc[0] == pytest.approx(lab["words"][run.story]["onset"].iloc[0] + onset)
        check_run_timing(run, words, "01")
        rate = word_rate(words, run.times)
        assert min(corr(run.data[:, i], rate) for i in range(3)) > 0.9
    recs = ingest.files_read
    assert "stimuli/harbour_words.tsv" in recs and all(r.sha256 for r in recs.values())
    if where == "s3":
        assert all(r.verified.startswith("size+md5") for r in recs.values())


def test_a_run_whose_words_table_is_missing(lab, tmp_path, ledger):
    with ledger.bad_input("lab dataset: pattern pointing at no file"):
        ingest = open_dataset(config(tmp_path, lab["local"]), tmp_path / "cache", responses=RESPONSES,
                              words={**WORDS, "pattern": "stimuli/{story}.tsv"})
        run = load_subject(ingest, "01").runs[0]
        with pytest.raises(DatasetError, match=r"run-1_bold\.nii\.gz \(run 1, story 'harbour'\): no word timings: "
                                               r"stimuli/harbour\.tsv is not in dataset version 1\.2\.0"):
            load_run_words(ingest, run)
    with ledger.bad_input("lab dataset: word-timing pattern escaping the dataset"):
        ingest = open_dataset(config(tmp_path, lab["local"]), tmp_path / "cache", responses=RESPONSES,
                              words={**WORDS, "pattern": "../{story}.tsv"})
        run = load_subject(ingest, "01").runs[0]
        with pytest.raises(DatasetError, match=r"refusing key '\.\./harbour\.tsv'"):
            load_run_words(ingest, run)


def test_options_come_from_config_fields_of_the_same_name(tmp_path):
    """The fields proposed for the config flow in by name; older configs get the defaults."""
    cfg = config(tmp_path, "/nowhere")
    resp, words = options_from_config(cfg)
    assert resp == ResponseOptions(tasks=("stories",)) and words.format == "textgrid"
    future = SimpleNamespace(dataset=SimpleNamespace(
        task="stories", tasks=["a", "b"],
        responses=SimpleNamespace(kind="hdf5", derivatives=[], desc=None, files="d/{subject}/{story}.hf5",
                                  tr_counts="d/respdict.json", tr_counts_trim=20, start_time=10.0, high_gamma=None),
        word_timings=SimpleNamespace(format="gentle", files={}, pattern="g/{story}/align.json", tier="word",
                                     offset=0.0, onset_from_events=True, unaligned="drop")))
    resp, words = options_from_config(future)
    assert (resp.kind, resp.files, resp.tr_counts_trim, resp.start_time, resp.tasks) == \
        ("hdf5", "d/{subject}/{story}.hf5", 20, 10.0, ("a", "b"))
    assert words == WordOptions(format="gentle", pattern="g/{story}/align.json", onset_from_events=True,
                                unaligned="drop")
    with pytest.raises(ValueError, match=r"unknown ResponseOptions \['hemis'\]"):
        options_from_config(cfg, responses={"hemis": ["L"]})


def test_a_checksum_table_inside_the_dataset_is_enforced(lab, tmp_path, ledger):
    """``checksums`` may name a (path, annex_key) table that the dataset itself ships."""
    import hashlib

    from pipelines.errors import IntegrityError

    files, _ = build(tmp_path / "ds", np.random.default_rng(11))
    key = "stimuli/harbour_words.tsv"
    body = files[key].encode()
    rows = ["path\tannex_key", f"{key}\tMD5E-s{len(body)}--{hashlib.md5(body).hexdigest()}.tsv"]
    (tmp_path / "ds/code").mkdir()
    (tmp_path / "ds/code/checksums.tsv").write_text("\n".join(rows) + "\n")
    ingest = open_dataset(config(tmp_path, str(tmp_path / "ds")), tmp_path / "cache", responses=RESPONSES,
                          words=WORDS, checksums="code/checksums.tsv")
    ingest.fetch(key)
    assert ingest.files_read[key].verified == "size+md5 (checksum list (git-annex key))"
    with ledger.bad_input("lab dataset: file differs from the dataset's own checksum table"):
        (tmp_path / "ds" / key).write_bytes(body.replace(b"\t", b" ", 1).ljust(len(body)))
        again = open_dataset(config(tmp_path, str(tmp_path / "ds")), tmp_path / "cache", responses=RESPONSES,
                             words=WORDS, checksums="code/checksums.tsv")
        with pytest.raises(IntegrityError, match=r"harbour_words\.tsv: md5 [0-9a-f]{32} does not match the checksum "
                                                 r"list \(git-annex key\)"):
            again.fetch(key)
