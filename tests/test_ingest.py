"""Ingest against the real S3 server: version pinning, subjects, responses, bad inputs."""
from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import check_run_timing, check_subjects, load_subject, load_words, open_dataset
from pipelines.resultstore import copy_tree_to_s3

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


# --- downloads: resumable, verified, never visible half-done ------------------------------

BIG = "sub-01/func/sub-01_task-x_bold.nii.gz"


@pytest.fixture
def blob_source(s3_url, request):
    """A tiny dataset with one 3 MB object, in a fresh prefix per test."""
    from .datasets import stage

    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    prefix = "blob-" + request.node.name.lower().replace("_", "-")[:40]
    src = stage(f"s3://lab-downloads/{prefix}", {"dataset_description.json": '{"Name": "x", "BIDSVersion": "1.8"}',
                                                "CHANGES": "1.0.0 2024-01-01\n  - first\n", BIG: data})
    return src, data


def _source(src, tmp_path, **kw):
    from pipelines.storage import DatasetSource

    return DatasetSource(src, "1.0.0", tmp_path / "cache", **kw)


def test_a_cut_transfer_resumes_with_a_range_request(blob_source, tmp_path, monkeypatch, ledger):
    import hashlib

    from .faultproxy import FaultProxy

    src, data = blob_source
    with ledger.fault("S3 transfer cut halfway (resumed with Range)"):
        with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            source = _source(src, tmp_path)
            source.list_files()
            proxy.truncate = {BIG.rsplit("/", 1)[1]: 1}
            path = source.fetch(BIG)
        assert proxy.counts["truncated"] == 1 and source.resumed[BIG] == 1
        assert hashlib.md5(path.read_bytes()).hexdigest() == hashlib.md5(data).hexdigest()
        assert source.verified[BIG] == "size+md5 (S3 ETag (MD5))"
        assert not list(path.parent.glob("*.part*"))


def test_a_partial_file_is_resumed_across_runs_and_never_looks_complete(blob_source, tmp_path, monkeypatch, ledger):
    import json

    import pipelines.storage as storage
    from pipelines.errors import TransientIOError

    from .faultproxy import FaultProxy

    src, data = blob_source
    upstream = os.environ["AWS_ENDPOINT_URL"]
    with ledger.fault("S3 transfer cut on every try (run fails retryably, the next run resumes)"):
        with FaultProxy(upstream) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            monkeypatch.setattr(storage, "MAX_RESUMES", 1)
            source = _source(src, tmp_path)
            source.list_files()
            proxy.truncate = {BIG.rsplit("/", 1)[1]: 5}
            with pytest.raises(TransientIOError, match=r"sub-01_task-x_bold\.nii\.gz: the transfer was cut 2 times "
                                                       r"\(at \d+ of 3145728 bytes\); run again: the download resumes"):
                source.fetch(BIG)
            dest = source.local_path(BIG)
            part = dest.with_name(dest.name + ".part")
            assert not dest.exists() and 0 < part.stat().st_size < len(data)  # never visible as the file
            assert json.loads(part.with_name(part.name + ".json").read_text())["size"] == len(data)
            proxy.truncate = {}  # the network is fine again; same endpoint, so the same cache folder
            again = _source(src, tmp_path)  # a later run, same cache: resumes from the .part
            assert again.fetch(BIG).read_bytes() == data and again.resumed[BIG] == 1


def test_digests_taken_while_streaming_equal_a_pass_over_the_file(blob_source, tmp_path, monkeypatch):
    """The digests recorded for a download are taken as its bytes arrive (no second read), also when the
    transfer is cut and resumed, and they equal the file's own."""
    import hashlib

    import pipelines.storage as storage

    from .faultproxy import FaultProxy

    src, data = blob_source
    passes = []
    real_hash_file = storage.hash_file
    monkeypatch.setattr(storage, "hash_file", lambda path, algos=("sha256",): passes.append(path)
                        or real_hash_file(path, algos))
    with FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        source = _source(src, tmp_path)
        source.list_files()
        proxy.truncate = {BIG.rsplit("/", 1)[1]: 2}  # cut twice, resumed twice
        path = source.fetch(BIG)
    assert proxy.counts["truncated"] == 2 and source.resumed[BIG] >= 1
    assert passes == []  # never read again to be hashed
    assert source.digests[BIG]["sha256"] == hashlib.sha256(data).hexdigest() == storage.sha256_file(path)
    assert source.digests[BIG]["md5"] == hashlib.md5(data).hexdigest()
    # a part left by an earlier process is caught up from disk, reading only its bytes
    digests = storage.StreamDigests(("sha256",))
    digests.update(data[:100])
    part = tmp_path / "part"
    part.write_bytes(data[:5000])
    digests.catch_up(part, 5000)
    assert digests.n_bytes == 5000 and digests.hexdigests()["sha256"] == hashlib.sha256(data[:5000]).hexdigest()
    digests.catch_up(part, 4000)  # fewer bytes than digested: started again from the first byte
    assert digests.hexdigests()["sha256"] == hashlib.sha256(data[:4000]).hexdigest()


def test_a_stale_partial_of_another_object_version_is_discarded(blob_source, tmp_path):
    import json

    src, data = blob_source
    source = _source(src, tmp_path)
    dest = source.local_path(BIG)
    dest.parent.mkdir(parents=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(b"x" * 1000)
    part.with_name(part.name + ".json").write_text(json.dumps({"etag": "0" * 32, "size": len(data)}))
    assert source.fetch(BIG).read_bytes() == data and BIG not in source.resumed


def test_a_download_that_does_not_match_its_etag_is_deleted(blob_source, tmp_path, monkeypatch, ledger):
    import pipelines.storage as storage
    from pipelines.errors import IntegrityError

    src, _ = blob_source
    real = storage._stream_to_file

    def corrupting(client, bucket, key, dest, offset=0, etag="", digests=None):
        out = real(client, bucket, key, dest, offset, etag)
        with open(dest, "r+b") as fh:  # one flipped byte, same size
            fh.seek(1000)
            b = fh.read(1)
            fh.seek(1000)
            fh.write(bytes([b[0] ^ 0xFF]))
        if digests is not None:  # the digests taken while streaming see the bytes as they arrived: flipped
            digests.reset()
            digests.catch_up(dest, dest.stat().st_size)
        return out

    with ledger.bad_input("download corrupted in transit (MD5 != ETag)"):
        monkeypatch.setattr(storage, "_stream_to_file", corrupting)
        source = _source(src, tmp_path)
        with pytest.raises(IntegrityError, match=r"sub-01_task-x_bold\.nii\.gz: md5 [0-9a-f]{32} does not match the "
                                                 r"S3 ETag \(MD5\) [0-9a-f]{32}; the download is corrupt"):
            source.fetch(BIG)
        dest = source.local_path(BIG)
        assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()


def test_an_object_replaced_mid_download_is_not_spliced(blob_source, tmp_path):
    import json

    from pipelines.s3 import s3_client, split_s3_uri

    src, data = blob_source
    source = _source(src, tmp_path)
    source.list_files()
    dest = source.local_path(BIG)
    dest.parent.mkdir(parents=True)
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(data[:1000])
    part.with_name(part.name + ".json").write_text(json.dumps({"etag": source.info(BIG).etag, "size": len(data)}))
    bucket, prefix = split_s3_uri(src)
    s3_client(bucket).put_object(Bucket=bucket, Key=f"{prefix}/{BIG}", Body=data[::-1])  # a new version
    with pytest.raises(DatasetError, match=r"the object changed while it was being downloaded"):
        source.fetch(BIG)
    assert not dest.exists()


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "sub-01/../../x", "a\x00b", "sub\u201001/x.tsv",
                                 "sub-01/./x", "a\\..\\b", "sub-01//x"])
def test_keys_that_could_escape_the_cache_are_refused(blob_source, tmp_path, key):
    source = _source(blob_source[0], tmp_path)
    with pytest.raises(DatasetError, match=r"refusing key"):
        source.fetch(key)


def test_a_listed_key_that_escapes_is_refused(s3_url, tmp_path):
    """A bucket listing an object named ``prefix/../../x`` cannot write outside the cache."""
    from .datasets import stage

    src = stage("s3://lab-evil/ds", {"dataset_description.json": "{}", "../../../outside.txt": "x"})
    source = _source(src, tmp_path)
    listed = [k for k in source.list_files() if ".." in k]
    if not listed:
        pytest.skip("this S3 server normalises '..' in keys")
    with pytest.raises(DatasetError, match=r"refusing key '\.\./"):
        source.fetch(listed[0])
    assert not (tmp_path / "outside.txt").exists()


def test_local_git_annex_clone_is_verified_against_its_keys(tmp_path, ledger):
    """A DataLad/git-annex clone: symlinks into .git/annex/objects, named by MD5E keys."""
    import hashlib

    from pipelines.errors import IntegrityError

    root = tmp_path / "ds"
    (root / "sub-01/func").mkdir(parents=True)
    (root / "dataset_description.json").write_text("{}")
    content = b"real content" * 100

    def annex(rel: str, data: bytes, present: bool = True, key_md5: str | None = None):
        key = f"MD5E-s{len(data)}--{key_md5 or hashlib.md5(data).hexdigest()}.tsv"
        obj = root / ".git/annex/objects/Xx/Yy" / key / key
        if present:
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
        link = root / rel
        link.symlink_to(os.path.relpath(obj, link.parent))

    annex("sub-01/func/good.tsv", content)
    annex("sub-01/func/missing.tsv", content + b"!", present=False)
    annex("sub-01/func/tampered.tsv", content, key_md5="f" * 32)
    (root / "sub-01/func/outside.tsv").symlink_to("/etc/hostname")
    cfg = cfg_for(str(root), tmp_path)
    source = _source(str(root), tmp_path)
    assert ".git/annex" not in " ".join(source.list_files())  # the annex store is not the dataset
    from pipelines.ingest import Ingest

    ingest = Ingest(cfg, source)
    assert ingest.fetch("sub-01/func/good.tsv").read_bytes() == content
    assert ingest.files_read["sub-01/func/good.tsv"].verified == "size+md5 (git-annex key)"
    with ledger.bad_input("local git-annex symlink without content"):
        with pytest.raises(DatasetError, match=r"missing\.tsv: is a git-annex symlink whose content is not in this "
                                               r"clone \(git-annex key MD5E-s1201--[0-9a-f]{32}\.tsv, 1201 bytes\); "
                                               r"run `datalad get sub-01/func/missing\.tsv`"):
            ingest.fetch("sub-01/func/missing.tsv")
    with ledger.bad_input("local annexed file altered after it was fetched"):
        with pytest.raises(IntegrityError, match=r"tampered\.tsv: md5 [0-9a-f]{32} does not match the git-annex key "
                                                 r"f{32}; the file is damaged: re-fetch it"):
            ingest.fetch("sub-01/func/tampered.tsv")
    with ledger.bad_input("local symlink out of the dataset"):
        with pytest.raises(DatasetError, match=r"outside\.tsv: a symbolic link out of the dataset folder"):
            ingest.fetch("sub-01/func/outside.tsv")


def test_a_timing_file_is_parsed_once_across_steps_and_a_bad_stored_table_is_parsed_again(demo_tree, tmp_path,
                                                                                          monkeypatch):
    """Each step opens the dataset anew (its own process under Airflow): the parsed words come from the
    cache, keyed by the file's content; a damaged or planted entry is never trusted."""
    import pandas as pd

    import pipelines.ingest.words as words_module

    parsed = []
    real = words_module.read_word_timings
    monkeypatch.setattr(words_module, "read_word_timings", lambda *a, **k: parsed.append(a[0]) or real(*a, **k))
    cfg = cfg_for(str(demo_tree), tmp_path)
    first = load_words(open_dataset(cfg, tmp_path / "cache"))
    assert len(parsed) == 1
    again = load_words(open_dataset(cfg, tmp_path / "cache"))  # a later step
    assert len(parsed) == 1
    pd.testing.assert_frame_equal(first, again)
    (stored,) = list((tmp_path / "cache").rglob("words/*.npz"))
    stored.write_bytes(b"not an npz")  # damaged: parsed again, and stored afresh
    pd.testing.assert_frame_equal(load_words(open_dataset(cfg, tmp_path / "cache")), first)
    assert len(parsed) == 2
    stored.unlink()
    stored.symlink_to(tmp_path / "elsewhere.npz")  # a link where a table belongs is never followed
    pd.testing.assert_frame_equal(load_words(open_dataset(cfg, tmp_path / "cache")), first)
    assert len(parsed) == 3
