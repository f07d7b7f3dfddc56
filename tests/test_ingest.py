"""Ingest against the real S3 server: version pinning, subjects, responses, bad inputs."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import check_run_timing, check_subjects, load_subject, load_words, open_dataset
from pipelines.storage import copy_tree_to_s3

from .conftest import demo_config, make_bucket

pytestmark = pytest.mark.integration


def cfg_for(source: str, tmp_path, **dataset) -> object:
    cfg = demo_config(tmp_path, "s3://unused")
    cfg["dataset"]["source"] = source
    cfg["dataset"].update(dataset)
    return parse_config(cfg)


def test_real_roi_subject_reads_with_its_clock(openneuro_demo, tmp_path):
    ingest = open_dataset(cfg_for(openneuro_demo, tmp_path), tmp_path / "cache")
    subject = load_subject(ingest, "18")
    assert subject.kind == "timeseries"
    assert subject.target_names == ["LATL", "RATL", "LPTL", "LIPL", "LPreM", "LIFG"]
    run = subject.runs[0]
    assert run.data.shape == (362, 6) and run.data.dtype == np.float32
    assert run.times[0] == 20.0 and run.tr == 2.0  # StartTime from the sidecar
    words = load_words(ingest)
    assert len(words) == 2127 and words.iloc[0].word == "Alice"
    check_run_timing(run, words, "18")
    # every file read is recorded with size and sha256
    rec = ingest.files_read["derivatives/brennan2016roi/sub-18/func/sub-18_task-alice_desc-roi6mm_timeseries.tsv"]
    assert rec.size > 0 and len(rec.sha256) == 64 and rec.etag


def test_simulated_bold_subject_is_masked_and_flagged(openneuro_demo, tmp_path):
    ingest = open_dataset(cfg_for(openneuro_demo, tmp_path), tmp_path / "cache")
    subject = load_subject(ingest, "sim01")
    assert subject.kind == "bold" and subject.simulated
    mask = np.asarray(subject.mask_img.dataobj) > 0
    assert subject.runs[0].data.shape == (372, int(mask.sum()))
    assert subject.space == "MNI152NLin2009cAsym"


def test_version_mismatch_is_refused(openneuro_demo, tmp_path):
    with pytest.raises(DatasetError, match=r"holds version 1\.0\.4, the config pins 1\.0\.3.*dataset\.version"):
        open_dataset(cfg_for(openneuro_demo, tmp_path, version="1.0.3"), tmp_path / "cache")


def test_unknown_subject_names_the_ones_that_exist(openneuro_demo, tmp_path):
    ingest = open_dataset(cfg_for(openneuro_demo, tmp_path, subjects=["18", "99"]), tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"no subject sub-99.*18, 22, 23, sim01"):
        check_subjects(ingest)


def test_missing_dataset_is_an_error_not_an_empty_success(s3_url, tmp_path):
    make_bucket("openneuro.org")
    with pytest.raises(DatasetError, match="empty or does not exist"):
        open_dataset(cfg_for("s3://openneuro.org/ds999999", tmp_path), tmp_path / "cache")


def _variant(demo_tree, tmp_path, name, mutate) -> str:
    tree = tmp_path / name
    shutil.copytree(demo_tree, tree)
    mutate(tree)
    make_bucket("variants")
    copy_tree_to_s3(tree, f"s3://variants/{name}")
    return f"s3://variants/{name}"


BOLD = "sub-sim01/func/sub-sim01_task-alice_space-MNI152NLin2009cAsym_bold.nii.gz"


def test_annex_pointer_is_named(demo_tree, tmp_path):
    def mutate(tree):
        (tree / BOLD).write_text("../../.git/annex/objects/Xx/Yy/MD5E-s123--abc.nii.gz/MD5E-s123--abc.nii.gz")
    src = _variant(demo_tree, tmp_path, "pointer", mutate)
    ingest = open_dataset(cfg_for(src, tmp_path), tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"sub-sim01_task-alice.*git-annex pointer.*datalad get"):
        load_subject(ingest, "sim01")


def test_truncated_nifti_is_named(demo_tree, tmp_path):
    def mutate(tree):
        data = (tree / BOLD).read_bytes()
        (tree / BOLD).write_bytes(data[: len(data) // 3])
    src = _variant(demo_tree, tmp_path, "truncated", mutate)
    ingest = open_dataset(cfg_for(src, tmp_path), tmp_path / "cache")
    with pytest.raises(DatasetError, match=r"bold\.nii\.gz: corrupt or truncated NIfTI"):
        load_subject(ingest, "sim01")


def test_response_shorter_than_stimulus_is_refused(demo_tree, tmp_path):
    tsv = "derivatives/brennan2016roi/sub-18/func/sub-18_task-alice_desc-roi6mm_timeseries.tsv"

    def mutate(tree):
        lines = (tree / tsv).read_text().splitlines()
        (tree / tsv).write_text("\n".join(lines[:200]) + "\n")
    src = _variant(demo_tree, tmp_path, "short", mutate)
    ingest = open_dataset(cfg_for(src, tmp_path), tmp_path / "cache")
    run = load_subject(ingest, "18").runs[0]
    with pytest.raises(DatasetError, match=r"199 samples.*words run until 743\.3 s"):
        check_run_timing(run, load_words(ingest), "18")


def test_download_is_cached_and_verified(openneuro_demo, tmp_path):
    ingest = open_dataset(cfg_for(openneuro_demo, tmp_path), tmp_path / "cache")
    path = ingest.source.fetch("participants.tsv")
    assert path.is_file() and not list(path.parent.glob("*.part"))
    assert str(path).startswith(str(tmp_path / "cache"))
    with pytest.raises(DatasetError, match="would escape|'dataset file'"):
        ingest.source.local_path("../../etc/passwd")
