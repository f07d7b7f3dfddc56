"""Issue 14 items 2 and 7: the download cache cannot be poisoned, nothing outside the dataset is read.

Cache: entries are keyed by (S3 endpoint, full source URI, version) and reused only when a record of the
verified download names the object the listing shows now and the file is unchanged (never size alone).
Local datasets: only the dataset's own files (and its own ``.git/annex`` objects), fully resolved, are read;
``dataset.checksums`` is a file of the dataset; errors never echo a refused file's content.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.errors import ConfigError, DatasetError, IntegrityError

from .conftest import demo_config
from .datasets import stage
from .hostile import Sandbox, assert_one_clear_error, run_cli

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

KEY = "sub-01/func/sub-01_task-x_bold.nii.gz"
DESC = '{"Name": "x", "BIDSVersion": "1.8"}'
SECRET = "root:x:0:0:SECRET-LINE-THAT-MUST-NOT-BE-ECHOED\n"


def _bytes(seed: int, n: int = 200_000) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _source(src: str, cache: Path, version: str = "1.0.0", **kw):
    from pipelines.storage import DatasetSource

    return DatasetSource(src, version, cache, **kw)


def _put(src: str, key: str, body: bytes) -> None:
    from pipelines.s3 import s3_client, split_s3_uri

    bucket, prefix = split_s3_uri(src)
    s3_client(bucket).put_object(Bucket=bucket, Key=f"{prefix}/{key}" if prefix else key, Body=body)


@pytest.fixture
def blob(s3_url, request):
    """One dataset with one 200 kB object, in a fresh prefix per test."""
    data = _bytes(1)
    prefix = "c-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:50]
    return stage(f"s3://lab-cache/{prefix}", {"dataset_description.json": DESC, KEY: data}), data


# --- item 2: the download cache ---------------------------------------------------------

@pytest.mark.parametrize("first", ["outer", "inner"])
def test_two_sources_whose_paths_line_up_never_share_cache_entries(s3_url, tmp_path, ledger, first):
    """``s3://b/lab`` @ ``dsX`` key ``1.0.0/f`` and ``s3://b/lab/dsX`` @ ``1.0.0`` key ``f``: once one path."""
    outer_bytes, inner_bytes = _bytes(2), _bytes(3)  # same size, different content
    name = f"poison-{first}"
    stage(f"s3://{name}/lab", {"dsX/1.0.0/f.bin": b"never read", "1.0.0/f.bin": outer_bytes})
    stage(f"s3://{name}/lab/dsX", {"f.bin": inner_bytes})
    outer = lambda: _source(f"s3://{name}/lab", tmp_path, "dsX")  # noqa: E731
    inner = lambda: _source(f"s3://{name}/lab/dsX", tmp_path, "1.0.0")  # noqa: E731
    with ledger.bad_input(f"cache: two sources whose bucket/prefix/version/key line up ({first} first)"):
        if first == "outer":
            assert outer().fetch("1.0.0/f.bin").read_bytes() == outer_bytes
            assert inner().fetch("f.bin").read_bytes() == inner_bytes
        else:
            assert inner().fetch("f.bin").read_bytes() == inner_bytes
            assert outer().fetch("1.0.0/f.bin").read_bytes() == outer_bytes
        assert outer().cache_dir != inner().cache_dir
        # and again from the warm cache, each its own bytes
        assert outer().fetch("1.0.0/f.bin").read_bytes() == outer_bytes
        assert inner().fetch("f.bin").read_bytes() == inner_bytes


def test_one_bucket_name_on_two_s3_servers_never_shares_entries(s3_url, tmp_path, monkeypatch, ledger):
    from pipelines.devserver import aws_env, start_s3_server, stop

    a, b = _bytes(4), _bytes(5)
    stage("s3://twin/ds", {"dataset_description.json": DESC, KEY: a})
    url2, proc = start_s3_server()
    try:
        with ledger.bad_input("cache: the same bucket name on two S3 endpoints"):
            first = _source("s3://twin/ds", tmp_path)
            assert first.fetch(KEY).read_bytes() == a
            for k, v in aws_env(url2).items():
                monkeypatch.setenv(k, v)
            stage("s3://twin/ds", {"dataset_description.json": DESC, KEY: b})
            second = _source("s3://twin/ds", tmp_path)
            assert second.cache_dir != first.cache_dir
            assert second.fetch(KEY).read_bytes() == b
            assert "neuroflow-local" not in (second.cache_home / "source.json").read_text()  # no credentials kept
    finally:
        stop(proc)


def test_endpoint_identity_ignores_case_and_refuses_credentials(monkeypatch):
    from pipelines.errors import ConfigError
    from pipelines.s3 import endpoint_identity

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "HTTP://user:secret@Example.org:9000/")
    with pytest.raises(ConfigError, match="carries credentials") as err:
        endpoint_identity()
    assert "secret" not in str(err.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "HTTP://Example.org:9000/")
    assert endpoint_identity() == "http://example.org:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://example.org:9001")
    assert endpoint_identity() == "http://example.org:9001"


def _flip(path: Path, at: int = 1000) -> None:
    with open(path, "r+b") as fh:
        fh.seek(at)
        b = fh.read(1)
        fh.seek(at)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("restore_mtime", [False, True])
def test_a_cached_file_changed_in_place_with_the_same_size_is_downloaded_again(blob, tmp_path, ledger,
                                                                               restore_mtime):
    src, data = blob
    path = _source(src, tmp_path).fetch(KEY)
    st = path.stat()
    with ledger.bad_input("cache: cached file altered in place, same size" + (" (mtime restored)" * restore_mtime)):
        _flip(path)
        if restore_mtime:  # the ctime still moves: the stat guard holds
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        again = _source(src, tmp_path)
        assert again.fetch(KEY).read_bytes() == data
        assert again.digests[KEY]["sha256"] == hashlib.sha256(data).hexdigest()


def test_an_object_replaced_on_the_server_with_the_same_size_is_downloaded_again(blob, tmp_path, ledger):
    src, data = blob
    assert _source(src, tmp_path).fetch(KEY).read_bytes() == data
    with ledger.bad_input("cache: object replaced on the server (new ETag, same size)"):
        _put(src, KEY, data[::-1])
        assert _source(src, tmp_path).fetch(KEY).read_bytes() == data[::-1]


@pytest.mark.parametrize("damage", ["truncated", "emptied", "no record", "a folder in its place"])
def test_a_damaged_cache_entry_is_downloaded_again(blob, tmp_path, ledger, damage):
    import shutil

    src, data = blob
    source = _source(src, tmp_path)
    path = source.fetch(KEY)
    with ledger.bad_input(f"cache: cached file {damage}"):
        if damage == "truncated":
            with open(path, "r+b") as fh:
                fh.truncate(len(data) // 2)
        elif damage == "emptied":
            path.write_bytes(b"")
        elif damage == "no record":
            shutil.rmtree(source.cache_home / "records")
        else:
            path.unlink()
            (path / "inner").mkdir(parents=True)
            (path / "inner" / "notes.txt").write_text("not neuroflow's")
            # a folder holding files is not deleted to make room: one clear error, the folder left as it is
            with pytest.raises(IntegrityError, match="a folder with files in it stands where neuroflow keeps"):
                _source(src, tmp_path).fetch(KEY)
            assert (path / "inner" / "notes.txt").read_text() == "not neuroflow's"
            (path / "inner" / "notes.txt").unlink()
            (path / "inner").rmdir()  # an empty folder in its place is simply replaced
        assert _source(src, tmp_path).fetch(KEY).read_bytes() == data


@pytest.mark.parametrize("target", ["/etc/passwd", "same-size file of the user's"])
def test_a_cached_file_replaced_by_a_link_is_never_followed(blob, tmp_path, ledger, target):
    src, data = blob
    path = _source(src, tmp_path).fetch(KEY)
    outside = Path(target)
    if not target.startswith("/"):
        outside = tmp_path / "user" / "precious.bin"
        outside.parent.mkdir()
        outside.write_bytes(_bytes(9))  # same size as the object: a size check alone would take it
    before = outside.read_bytes()
    with ledger.bad_input(f"cache: cached file replaced by a link to {target}"):
        path.unlink()
        path.symlink_to(outside)
        got = _source(src, tmp_path).fetch(KEY)
        assert not got.is_symlink() and got.read_bytes() == data
        assert outside.read_bytes() == before


def test_links_planted_in_the_cache_folders_are_not_written_through(blob, tmp_path, ledger):
    """A cached folder, a ``.part`` and its ``.json`` replaced by links: the download never writes through them."""
    import shutil

    src, data = blob
    source = _source(src, tmp_path)
    path = source.fetch(KEY)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    with ledger.bad_input("cache: links planted for the folder, .part and .part.json"):
        shutil.rmtree(path.parent)
        path.parent.symlink_to(victim)  # sub-01/func -> the user's folder
        assert _source(src, tmp_path).fetch(KEY).read_bytes() == data
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
        path.unlink()
        part = path.with_name(path.name + ".part")
        part.symlink_to(victim / "keep.txt")
        part.with_name(part.name + ".json").symlink_to(victim / "meta.json")
        assert _source(src, tmp_path).fetch(KEY).read_bytes() == data
        assert (victim / "keep.txt").read_text() == "mine" and not (victim / "meta.json").exists()


def test_two_versions_of_one_dataset_keep_their_own_entries(blob, tmp_path, ledger):
    src, data = blob
    v1 = _source(src, tmp_path, "1.0.0")
    old = v1.fetch(KEY)
    with ledger.bad_input("cache: two versions of one dataset"):
        _put(src, KEY, data[::-1])
        v2 = _source(src, tmp_path, "2.0.0")
        new = v2.fetch(KEY)
        assert new != old and new.read_bytes() == data[::-1]
        assert old.read_bytes() == data  # the 1.0.0 entry was not overwritten by 2.0.0's download


def test_an_unchanged_cached_file_is_not_hashed_again_but_still_verified(blob, tmp_path, monkeypatch):
    """The stat guard (size, mtime_ns, ctime_ns, inode, device) saves re-hashing 8 GB files on every run."""
    import pipelines.ingest as ingest_mod
    import pipelines.storage as storage
    from pipelines.ingest import Ingest

    from .test_ingest import cfg_for

    src, data = blob
    first = Ingest(cfg_for(src, tmp_path), _source(src, tmp_path))
    first.fetch(KEY)
    calls = []
    real = storage.hash_file

    def counting(path, algos=("sha256",)):
        calls.append(str(path))
        return real(path, algos)

    monkeypatch.setattr(storage, "hash_file", counting)
    monkeypatch.setattr(ingest_mod, "hash_file", counting)
    again = Ingest(cfg_for(src, tmp_path), _source(src, tmp_path))
    again.fetch(KEY)
    assert calls == []
    assert again.files_read[KEY].sha256 == hashlib.sha256(data).hexdigest()
    assert again.files_read[KEY].verified == "size+md5 (S3 ETag (MD5))"
    os.utime(again.source.local_path(KEY))  # touched: hashed once more, found unchanged, reused
    third = _source(src, tmp_path)
    assert third.fetch(KEY).read_bytes() == data and len(calls) == 1


def test_fit_cache_key_pairs_files_with_their_digests_and_read_options(tmp_path):
    """Two datasets whose runs' files are swapped, or one read with other options, never share a fit entry."""
    from types import SimpleNamespace

    from pipelines.ingest import ResponseOptions
    from pipelines.steps.fit_subject import responses_key

    def ingest(files: dict[str, str], **opts):
        return SimpleNamespace(files_read={k: SimpleNamespace(sha256=v) for k, v in files.items()},
                               responses=ResponseOptions(**opts))

    a = ingest({"run-1.tsv": "1" * 64, "run-2.tsv": "2" * 64})
    swapped = ingest({"run-1.tsv": "2" * 64, "run-2.tsv": "1" * 64})
    banded = ingest({"run-1.tsv": "1" * 64, "run-2.tsv": "2" * 64}, high_gamma=(60.0, 200.0))
    assert len({responses_key(a), responses_key(swapped), responses_key(banded)}) == 3
    assert responses_key(a) == responses_key(ingest({"run-2.tsv": "2" * 64, "run-1.tsv": "1" * 64}))


# --- item 7: nothing outside the dataset is read ----------------------------------------

def _local(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "sub-01/func").mkdir(parents=True)
    (root / "dataset_description.json").write_text(DESC)
    (root / "CHANGES").write_text("1.0.0 2024-01-01\n  - first\n")
    (root / KEY).write_bytes(b"inside" * 10)
    return root


def _secret(tmp_path: Path, name: str = "secret.txt") -> Path:
    path = tmp_path / "outside" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


@pytest.mark.parametrize("value", ["/etc/passwd", "../../../../etc/passwd", "code/../../secret.txt",
                                   "....//etc/passwd", "./CHANGES", "code/", "code//x.tsv"])
def test_checksums_that_could_leave_the_dataset_are_refused_before_reading(tmp_path, ledger, value):
    from pipelines.ingest import open_dataset

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    with ledger.bad_input(f"dataset.checksums {value!r}"):
        with pytest.raises(ConfigError, match=r"dataset\.checksums") as err:
            cfg_for(str(root), tmp_path, checksums=value)
        assert "root:" not in str(err.value)
        with pytest.raises(ConfigError, match=r"dataset\.checksums"):  # the library refuses it too
            open_dataset(cfg_for(str(root), tmp_path), tmp_path / "cache", checksums=value)


def test_checksums_never_read_from_the_working_directory(tmp_path, monkeypatch, ledger):
    """A relative name is a file of the dataset, not of wherever the command runs."""
    from pipelines.ingest import open_dataset

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    cwd = tmp_path / "cwd"
    (cwd / "code").mkdir(parents=True)
    (cwd / "code/checksums.tsv").write_text(f"path\tmd5\n{KEY}\t{'0' * 32}\n")
    monkeypatch.chdir(cwd)
    with ledger.bad_input("dataset.checksums naming a file of the working directory"):
        with pytest.raises(DatasetError, match=r"no checksum table 'code/checksums\.tsv'"):
            open_dataset(cfg_for(str(root), tmp_path, checksums="code/checksums.tsv"), tmp_path / "cache")


def test_a_checksum_table_link_out_of_the_dataset_is_refused_without_echo(tmp_path, ledger):
    from pipelines.ingest import open_dataset

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    (root / "code").mkdir()
    (root / "code/checksums.tsv").symlink_to(_secret(tmp_path))
    (root / "code/junk.tsv").write_text(SECRET)  # the dataset's own, but not a checksum table
    with ledger.bad_input("dataset.checksums: a link in the dataset to a file outside"):
        with pytest.raises(DatasetError, match=r"checksums\.tsv: a symbolic link out of the dataset") as err:
            open_dataset(cfg_for(str(root), tmp_path, checksums="code/checksums.tsv"), tmp_path / "cache")
        assert "SECRET" not in str(err.value) and "root:" not in str(err.value)
    with ledger.bad_input("dataset.checksums: a file that is not a checksum table (content not echoed)"):
        with pytest.raises(DatasetError, match=r"junk\.tsv: a checksum table needs columns") as err:
            open_dataset(cfg_for(str(root), tmp_path, checksums="code/junk.tsv"), tmp_path / "cache")
        assert "SECRET" not in str(err.value) and "root:" not in str(err.value)


def _annex_key(data: bytes) -> str:
    return f"MD5E-s{len(data)}--{hashlib.md5(data).hexdigest()}.gz"


@pytest.mark.parametrize("kind", ["file outside", "fake annex outside", "chain", "chain to fake annex",
                                  ".git is a link", "absolute link to itself via /proc"])
def test_links_out_of_a_local_dataset_are_refused(tmp_path, ledger, kind):
    from pipelines.ingest import Ingest

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    secret = _secret(tmp_path)
    data = secret.read_bytes()
    link = root / "sub-01/func/sub-01_task-x_events.tsv"
    if kind == "file outside":
        link.symlink_to(secret)
    elif kind in ("fake annex outside", "chain to fake annex"):
        key = _annex_key(data)
        obj = tmp_path / "x/annex/objects/Ab/Cd" / key / key
        obj.parent.mkdir(parents=True)
        obj.write_bytes(data)
        if kind == "fake annex outside":
            link.symlink_to(obj)
        else:
            (root / "hop").symlink_to(obj)
            link.symlink_to("../../hop")
    elif kind == "chain":
        (root / "hop1").symlink_to(secret)
        (root / "hop2").symlink_to("hop1")
        link.symlink_to("../../hop2")
    elif kind == ".git is a link":
        key = _annex_key(data)
        elsewhere = tmp_path / "elsewhere-git"
        obj = elsewhere / "annex/objects/Ab/Cd" / key / key
        obj.parent.mkdir(parents=True)
        obj.write_bytes(data)
        (root / ".git").symlink_to(elsewhere)
        link.symlink_to(os.path.relpath(root / ".git/annex/objects/Ab/Cd" / key / key, link.parent))
    else:
        link.symlink_to(f"/proc/self/root{secret}")
    source = _source(str(root), tmp_path / "cache")
    ingest = Ingest(cfg_for(str(root), tmp_path), source)
    with ledger.bad_input(f"local dataset: symlink out of it ({kind})"):
        with pytest.raises(DatasetError, match=r"events\.tsv: a symbolic link out of the dataset folder") as err:
            ingest.fetch("sub-01/func/sub-01_task-x_events.tsv")
        assert "SECRET" not in str(err.value)
        assert source.list_files()["sub-01/func/sub-01_task-x_events.tsv"].size == 0  # not even stat'ed


def test_a_folder_link_out_of_a_local_dataset_is_not_listed(tmp_path, ledger):
    from pipelines.ingest import Ingest

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    _secret(tmp_path, "sub-02_task-x_events.tsv")
    (root / "sub-02").symlink_to(tmp_path / "outside")
    ingest = Ingest(cfg_for(str(root), tmp_path), _source(str(root), tmp_path / "cache"))
    with ledger.bad_input("local dataset: a folder link out of it"):
        assert not [k for k in ingest.listing if k.startswith("sub-02")]
        with pytest.raises(DatasetError, match=r"not in dataset version"):
            ingest.fetch("sub-02/sub-02_task-x_events.tsv")


def test_links_that_stay_inside_the_dataset_and_its_own_annex_are_read(tmp_path):
    """The control: a link chain inside the dataset and a file in its own .git/annex are read as before."""
    from pipelines.ingest import Ingest

    from .test_ingest import cfg_for

    root = _local(tmp_path)
    data = b"annexed content" * 50
    key = _annex_key(data)
    obj = root / ".git/annex/objects/Ab/Cd" / key / key
    obj.parent.mkdir(parents=True)
    obj.write_bytes(data)
    annexed = root / "sub-01/func/annexed.tsv.gz"
    annexed.symlink_to(os.path.relpath(obj, annexed.parent))
    (root / "sub-01/func/alias.nii.gz").symlink_to("sub-01_task-x_bold.nii.gz")
    ingest = Ingest(cfg_for(str(root), tmp_path), _source(str(root), tmp_path / "cache"))
    assert ingest.fetch("sub-01/func/annexed.tsv.gz").read_bytes() == data
    assert ingest.files_read["sub-01/func/annexed.tsv.gz"].verified == "size+md5 (git-annex key)"
    assert ingest.fetch("sub-01/func/alias.nii.gz").read_bytes() == b"inside" * 10


def test_watch_reads_a_local_dataset_through_the_same_checks(tmp_path, ledger):
    from pipelines.watch import read_snapshot

    root = _local(tmp_path)
    (root / "CHANGES").unlink()
    secret = _secret(tmp_path, "CHANGES")
    secret.write_text("9.9.9 SECRET\n")
    (root / "CHANGES").symlink_to(secret)
    with ledger.bad_input("watch: a local dataset's CHANGES linking out of it"):
        with pytest.raises(DatasetError, match=r"CHANGES: a symbolic link out of the dataset") as err:
            read_snapshot(str(root))
        assert "SECRET" not in str(err.value)


# --- end to end through the command line ------------------------------------------------

def _cli_config(tmp_path: Path, source: str, **dataset) -> Path:
    cfg = demo_config(tmp_path, "s3://unused")
    cfg["dataset"]["source"] = source
    cfg["dataset"].update(dataset)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_checksums_etc_passwd_is_one_clear_error(tmp_path, ledger):
    box = Sandbox(tmp_path / "box").seed()
    root = _local(tmp_path)
    with ledger.bad_input("CLI: dataset.checksums /etc/passwd") as scope:
        proc = run_cli(scope, box, "validate", str(_cli_config(tmp_path, str(root), checksums="/etc/passwd")))
        assert_one_clear_error(proc, "dataset.checksums", "absolute")
        assert "root:" not in proc.stderr + proc.stdout and proc.touched == []


def test_cli_local_dataset_linking_out_is_one_clear_error(tmp_path, ledger):
    box = Sandbox(tmp_path / "box").seed()
    root = _local(tmp_path)
    (root / "CHANGES").unlink()
    (root / "CHANGES").symlink_to(_secret(tmp_path, "CHANGES"))
    with ledger.bad_input("CLI: a local dataset file linking out of the dataset") as scope:
        proc = run_cli(scope, box, "validate", str(_cli_config(tmp_path, str(root))))
        assert_one_clear_error(proc, "CHANGES", "symbolic link out of the dataset folder")
        assert "SECRET" not in proc.stderr + proc.stdout and proc.touched == []
