"""Issue 14 items 3 and 4: one bad value fails one subject; no file makes neuroflow allocate without bound.

Each hostile file is built for real (a NIfTI header claiming 10000^3 x 372 voxels, a multi-GB gzip
bomb of a few MB, a 10-million-column TSV, an HDF5 dataset declaring 4 TB, a GIFTI whose arrays
claim terabytes or inflate past their size). Library functions are called directly where that
suffices; the command line runs the end-to-end cases (partial manifest, exit 3, bounded memory).
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.errors import DatasetError
from pipelines.ingest import load_subject, open_dataset, sidecar_number, stimulus_from_events
from pipelines.steps import prepare

from .conftest import REPO, demo_config
from .hostile import Sandbox, run_cli

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

ROI = "derivatives/brennan2016roi/sub-{s}/func/sub-{s}_task-alice_desc-roi6mm_timeseries"
BOLD = "sub-sim01/func/sub-sim01_task-alice_space-MNI152NLin2009cAsym_bold.nii.gz"
PEAK_RSS_LIMIT = 1.5 * (1 << 30)


def tree_copy(demo_tree: Path, tmp_path: Path, with_sim: bool = False) -> Path:
    """A private copy of the demo dataset (a local source), without the simulated subject unless asked."""
    dest = tmp_path / "ds"
    shutil.copytree(demo_tree, dest, ignore=None if with_sim else shutil.ignore_patterns("sub-sim01"))
    return dest


def open_local(tree: Path, tmp_path: Path, subjects=("22", "23")):
    cfg = demo_config(tmp_path, "s3://unused", subjects=subjects)
    cfg["dataset"]["source"] = str(tree)
    return open_dataset(parse_config(cfg), tmp_path / "cache")


# --- item 3: one bad value in one subject's sidecar ---------------------------------------------

BAD_SIDECARS = {
    'TR "2" (a string)': ('"RepetitionTime": "2"', "RepetitionTime", "without quotes"),
    "TR [2] (a list)": ('"RepetitionTime": [2]', "RepetitionTime", "JSON array"),
    "TR Infinity": ('"RepetitionTime": Infinity', "RepetitionTime", "must be a number"),
    "TR 1e308": ('"RepetitionTime": 1e308', "RepetitionTime", "<= 100"),
    "TR 1e999 (overflows to inf)": ('"RepetitionTime": 1e999', "RepetitionTime", "must be a number"),
    "TR a 400-digit integer": ('"RepetitionTime": 1' + "0" * 400, "RepetitionTime", "must be a number"),
    "TR negative": ('"RepetitionTime": -2', "RepetitionTime", "> 0"),
    "TR zero": ('"RepetitionTime": 0', "RepetitionTime", "> 0"),
    "TR true": ('"RepetitionTime": true', "RepetitionTime", "JSON boolean"),
    "TR in milliseconds": ('"RepetitionTime": 2000', "RepetitionTime", "<= 100 seconds"),
    "StartTime NaN": ('"RepetitionTime": 2, "StartTime": NaN', "StartTime", "must be a number"),
    'StartTime "abc"': ('"RepetitionTime": 2, "StartTime": "abc"', "StartTime", "JSON string"),
    "StartTime {}": ('"RepetitionTime": 2, "StartTime": {}', "StartTime", "JSON object"),
    "duplicate key": ('"RepetitionTime": 2, "RepetitionTime": 3', "RepetitionTime", "appears twice"),
}
BAD_SIDECAR_FILES = {
    "a JSON list": (b'[{"RepetitionTime": 2}]', "JSON array"),
    "truncated JSON": (b'{"RepetitionTime": 2, "Sta', "not valid JSON"),
    "non-UTF-8 bytes": (b'{"RepetitionTime": 2, "Description": "\xff\xfe caf\xe9"}', "not valid JSON"),
    "nested 100k deep": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "empty file": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_SIDECARS))
def test_a_bad_sidecar_value_fails_its_subject_only(name, demo_tree, tmp_path, ledger):
    fields, field, fix = BAD_SIDECARS[name]
    with ledger.bad_input(f"sidecar {name} in one subject"):
        tree = tree_copy(demo_tree, tmp_path)
        key = ROI.format(s="23") + ".json"
        (tree / key).write_text("{" + fields + "}")
        ingest = open_local(tree, tmp_path)
        with pytest.raises(DatasetError) as err:
            load_subject(ingest, "23")
        message = str(err.value)
        assert key in message and field in message and fix in message, message
        assert "\n" not in message
        assert load_subject(ingest, "22").runs[0].data.shape == (362, 6)  # the other subject reads


@pytest.mark.parametrize("name", sorted(BAD_SIDECAR_FILES))
def test_a_malformed_sidecar_file_fails_its_subject_only(name, demo_tree, tmp_path, ledger):
    content, fragment = BAD_SIDECAR_FILES[name]
    with ledger.bad_input(f"sidecar file {name}"):
        tree = tree_copy(demo_tree, tmp_path)
        key = ROI.format(s="23") + ".json"
        (tree / key).write_bytes(content)
        ingest = open_local(tree, tmp_path)
        with pytest.raises(DatasetError, match=fragment) as err:
            load_subject(ingest, "23")
        assert key in str(err.value) and len(str(err.value)) < 600
        assert load_subject(ingest, "22").runs[0].data.shape == (362, 6)


def test_sidecar_that_is_too_big_is_refused_before_parsing(demo_tree, tmp_path, monkeypatch, ledger):
    with ledger.bad_input("sidecar over the text-size cap"):
        tree = tree_copy(demo_tree, tmp_path)
        key = ROI.format(s="23") + ".json"
        (tree / key).write_text(json.dumps({"RepetitionTime": 2, "Description": "x" * (3 << 20)}))
        monkeypatch.setenv("NEUROFLOW_MAX_TEXT_BYTES", "1M")
        ingest = open_local(tree, tmp_path)
        with pytest.raises(DatasetError, match=r"over the 1\.0 MB limit.*NEUROFLOW_MAX_TEXT_BYTES"):
            load_subject(ingest, "23")


@pytest.mark.parametrize("value, fragment", [
    ("abc", "JSON string"), ([1000], "JSON array"), (True, "JSON boolean"), (float("nan"), "must be a number"),
    (-1000.0, "> 0"), (0, "> 0"), (1e7, r"<= 1e\+06 Hz"), (float("inf"), "must be a number"),
])
def test_sampling_frequency_of_meg_and_ecog_sidecars_is_validated(value, fragment):
    side = {"SamplingFrequency": value}
    with pytest.raises(DatasetError, match=fragment) as err:
        sidecar_number(side, "SamplingFrequency", "sub-01/meg/sub-01_task-x_meg.json")
    assert "sub-01_task-x_meg.json: SamplingFrequency" in str(err.value)
    assert sidecar_number({"SamplingFrequency": 1000}, "SamplingFrequency", "k") == 1000.0
    assert sidecar_number({"SamplingFrequency": "n/a"}, "SamplingFrequency", "k") is None


def test_the_error_names_the_inherited_sidecar_that_gave_the_value(demo_tree, tmp_path):
    tree = tree_copy(demo_tree, tmp_path)
    top = "derivatives/brennan2016roi/task-alice_desc-roi6mm_timeseries.json"
    (tree / top).write_text('{"RepetitionTime": "2"}')
    sub = tree / (ROI.format(s="23") + ".json")
    side = json.loads(sub.read_text())
    side.pop("RepetitionTime")
    sub.write_text(json.dumps(side))
    ingest = open_local(tree, tmp_path)
    with pytest.raises(DatasetError, match=r"task-alice_desc-roi6mm_timeseries\.json: RepetitionTime"):
        load_subject(ingest, "23")


def test_a_tr_that_disagrees_with_the_nifti_header_is_refused(demo_tree, tmp_path, ledger):
    with ledger.bad_input("TR disagrees with the NIfTI header"):
        tree = tree_copy(demo_tree, tmp_path, with_sim=True)
        side = tree / BOLD.replace(".nii.gz", ".json")
        data = json.loads(side.read_text())
        data["RepetitionTime"] = 1.5  # the header says 2 s
        side.write_text(json.dumps(data))
        ingest = open_local(tree, tmp_path, subjects=("22", "sim01"))
        with pytest.raises(DatasetError, match=r"RepetitionTime 1\.5 s but its NIfTI header says 2 s"):
            load_subject(ingest, "sim01")


EVENTS = "onset\tduration\tstim_file\n{onset}\t{duration}\tDownTheRabbitHoleFinal_mono_exp120_NR16_pad.wav\n"


@pytest.mark.parametrize("onset, duration, fragment", [
    ("abc", "748", "onset 'abc'"), ("NaN", "748", "onset"), ("0.28", "-5", "duration '-5'"),
    ("1e308", "748", "onset '1e308'"), ("0.28", "inf", "duration 'inf'"),
])
def test_bad_event_times_fail_the_subject_and_prepare_goes_on(onset, duration, fragment, demo_tree, tmp_path, s3_url,
                                                              ledger):
    with ledger.bad_input(f"events.tsv onset {onset} duration {duration}"):
        tree = tree_copy(demo_tree, tmp_path)
        key = "sub-23/sub-23_task-alice_events.tsv"
        (tree / key).write_text(EVENTS.format(onset=onset, duration=duration))
        ingest = open_local(tree, tmp_path)
        with pytest.raises(DatasetError, match=fragment):
            stimulus_from_events(ingest, key)
        cfg = demo_config(tmp_path, "s3://unused", subjects=("22", "23"))
        cfg["dataset"]["source"] = str(tree)
        cfg["dataset"]["responses"]["story_from"] = "events"
        prepared = _prepare_without_bucket(cfg, tmp_path)
        assert set(prepared["subject_problems"]) == {"23"}, prepared["subject_problems"]
        assert key in prepared["subject_problems"]["23"] and fragment.split()[0] in prepared["subject_problems"]["23"]
        assert prepared["subjects"] == ["22", "23"]


def _prepare_without_bucket(cfg: dict, tmp_path: Path) -> dict:
    """prepare() up to the output bucket (not needed here)."""
    from unittest import mock

    with mock.patch("pipelines.steps.prepare.open_store"):
        return prepare(cfg, cache_dir=tmp_path / "cache")


TEXTGRID_GARBAGE = """File type = "ooTextFile"
Object class = "TextGrid"

xmin = 0
xmax = abc
tiers? <exists>
size = 1
item []:
    item [1]:
        class = "IntervalTier"
        name = "word"
        xmin = 0
        xmax = abc
        intervals: size = 1
        intervals [1]:
            xmin = nonsense
            xmax = 1.0
            text = "Alice"
"""


def test_word_timing_readers_refuse_garbage_times(tmp_path):
    from pipelines.wordtimings import read_events_words, read_gentle_words, read_textgrid_words

    tg = tmp_path / "bad.TextGrid"
    tg.write_text(TEXTGRID_GARBAGE)
    with pytest.raises(DatasetError, match="bad.TextGrid: not a readable Praat TextGrid"):
        read_textgrid_words(tg, key="bad.TextGrid")
    gentle = tmp_path / "align.json"
    cases = (([{"word": "a", "case": "success", "start": "abc", "end": 1.0}], "not a time"),
             ([{"word": "a", "case": "success", "start": 1e308, "end": 1e308}], "not a time"),
             ([{"word": "a", "case": "success", "start": 10 ** 400, "end": 1}], "not a time"),
             ([1, 2, 3], r"words\[0\] is a JSON int"))
    for words, fragment in cases:
        gentle.write_text(json.dumps({"words": words}))
        with pytest.raises(DatasetError, match=fragment):
            read_gentle_words(gentle, key="align.json")
    events = tmp_path / "events.tsv"
    for onset, duration in (("abc", "0.3"), ("NaN", "0.3"), ("1.0", "-0.5"), ("-1e300", "0.1")):
        events.write_text(f"onset\tduration\ttrial_type\tword\n0.5\t0.2\tword\tAlice\n{onset}\t{duration}\tword\twas\n")
        with pytest.raises(DatasetError, match="bad words row"):
            read_events_words(events, key="events.tsv")


# --- item 4: nothing allocates without bound -----------------------------------------------------

def nifti_header_gz(path: Path, shape: tuple[int, ...], dtype=np.float32, tr: float = 2.0, data: bytes = b"") -> None:
    """A .nii.gz holding only a header that claims `shape` (no voxel data follows unless given)."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape)
    hdr.set_xyzt_units("mm", "sec")
    hdr["pixdim"][4] = tr
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\x00" * 4 + data)


def append_zero_members(path: Path, n_bytes: int, block: int = 16 << 20) -> None:
    """Append gzip members inflating to `n_bytes` zeros, compressing one block once (never GBs in memory)."""
    member = gzip.compress(bytes(block), compresslevel=9)
    with open(path, "ab") as fh:
        for _ in range(n_bytes // block):
            fh.write(member)


def test_a_nifti_header_claiming_10000_cubed_voxels_is_refused_before_allocating(tmp_path, ledger):
    from pipelines.readers.nifti import load_nifti

    with ledger.bad_input("NIfTI header claiming 10000^3 x 372 voxels"):
        path = tmp_path / "huge_bold.nii.gz"
        nifti_header_gz(path, (10000, 10000, 10000, 372))
        assert path.stat().st_size < 200
        with pytest.raises(DatasetError, match=r"huge_bold.nii.gz: its header's 10000 x 10000 x 10000 x 372 voxels"
                                               r".*over the budget.*NEUROFLOW_MEMORY_BUDGET"):
            load_nifti(path, "huge_bold.nii.gz")


CHILD = """
import sys
from pipelines.errors import DatasetError
from pipelines.readers.nifti import load_nifti
try:
    load_nifti(sys.argv[1], "bomb_bold.nii.gz")
    print("READ")
except DatasetError as err:
    print("REFUSED", err)
with open("/proc/self/status") as status:  # VmHWM starts afresh at exec; ru_maxrss keeps the parent's
    print("PEAK", int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024)
"""


@pytest.mark.parametrize("budget, fragment", [(None, "inflates past"), ("1G", "over the budget")])
def test_a_gzip_bomb_is_refused_while_streaming_with_bounded_memory(budget, fragment, tmp_path, ledger):
    with ledger.bad_input(f"NIfTI gzip bomb (budget {budget or 'default'})"):
        path = tmp_path / "bomb_bold.nii.gz"
        if budget is None:  # a small image whose stream goes on inflating 2 GB past it
            nifti_header_gz(path, (8, 8, 8, 10), data=bytes(8 * 8 * 8 * 10 * 4))
        else:  # a header claiming 3.1 GB, over the 1 GB budget: refused before inflating
            nifti_header_gz(path, (100, 100, 100, 775))
        append_zero_members(path, 2 << 30)
        assert path.stat().st_size < 4 << 20
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if budget:
            env["NEUROFLOW_MEMORY_BUDGET"] = budget
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        out = proc.stdout
        assert "REFUSED bomb_bold.nii.gz" in out and fragment in out, out
        peak = int(out.split("PEAK")[1])
        assert peak < PEAK_RSS_LIMIT, peak


def test_a_ten_million_column_tsv_is_refused_before_pandas(tmp_path, ledger):
    from pipelines.readers.timeseries import read_timeseries
    from pipelines.wordtimings import read_events_words, read_words_tsv

    with ledger.bad_input("TSV with 10 million columns"):
        path = tmp_path / "wide.tsv"
        for n_columns, fragment in ((10_000_000, r"the header line of this .* is longer than 8.4 MB"),
                                    (200_000, r"this .* has 200000 columns, over the limit of 100000")):
            with open(path, "w") as fh:
                fh.write("\t".join(["a"] * n_columns) + "\n" + "1\n")
            for reader, kwargs in ((read_timeseries, {"key": "wide.tsv", "tr": 2.0}),
                                   (read_words_tsv, {"key": "wide.tsv"}), (read_events_words, {"key": "wide.tsv"})):
                with pytest.raises(DatasetError, match="wide.tsv: " + fragment):
                    reader(path, **kwargs)


def test_a_header_line_without_end_and_an_oversized_table_are_refused(tmp_path, monkeypatch):
    from pipelines.readers.timeseries import read_timeseries

    path = tmp_path / "long.tsv"
    path.write_bytes(b"x" * (9 << 20))  # one 9 MB "column name", no tab, no newline
    with pytest.raises(DatasetError, match="header line .* is longer than"):
        read_timeseries(path, "long.tsv", tr=2.0)
    monkeypatch.setenv("NEUROFLOW_MAX_TEXT_BYTES", "4M")
    with pytest.raises(DatasetError, match="over the 4.2 MB limit"):
        read_timeseries(path, "long.tsv", tr=2.0)
    monkeypatch.setenv("NEUROFLOW_MAX_TEXT_BYTES", "lots")
    with pytest.raises(Exception, match="NEUROFLOW_MAX_TEXT_BYTES='lots' is not a size"):
        read_timeseries(path, "long.tsv", tr=2.0)


def test_an_hdf5_dataset_declaring_terabytes_is_refused(tmp_path, ledger):
    import h5py

    from pipelines.readers.hdf5 import read_hdf5

    with ledger.bad_input("HDF5 dataset declaring 4 TB"):
        path = tmp_path / "story.hf5"
        with h5py.File(path, "w") as h5:
            h5.create_dataset("data", shape=(1_000_000, 1_000_000), dtype="f4", chunks=(100, 100))
        assert path.stat().st_size < 1 << 20
        with pytest.raises(DatasetError, match=r"story.hf5: array 'data' of shape \(1000000, 1000000\).*budget"):
            read_hdf5(path, "story.hf5", tr=2.0)


def gifti_xml(arrays: list[tuple[dict, str]]) -> str:
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<GIFTI Version="1.0" NumberOfDataArrays="%d">' % len(arrays)]
    for attrs, data in arrays:
        a = " ".join(f'{k}="{v}"' for k, v in attrs.items())
        parts.append(f"<DataArray {a}><MetaData></MetaData><Data>{data}</Data></DataArray>")
    return "\n".join(parts + ["</GIFTI>"])


BASE = {"Intent": "NIFTI_INTENT_TIME_SERIES", "DataType": "NIFTI_TYPE_FLOAT32", "ArrayIndexingOrder": "RowMajorOrder",
        "Dimensionality": "1", "Endian": "LittleEndian", "ExternalFileName": "", "ExternalFileOffset": ""}


def test_gifti_arrays_claiming_terabytes_or_inflating_past_their_size_are_refused(tmp_path, ledger):
    from pipelines.readers.gifti import read_gifti

    with ledger.bad_input("GIFTI declaring terabytes / gzip bomb inside"):
        huge = tmp_path / "huge.func.gii"
        attrs = {**BASE, "Dim0": "1000000000000", "Encoding": "ASCII"}
        huge.write_text(gifti_xml([(attrs, "0")]))
        with pytest.raises(DatasetError, match="huge.func.gii: its data arrays .* over the budget"):
            read_gifti({"L": huge}, {"L": "huge.func.gii"}, tr=2.0)
        bomb = tmp_path / "bomb.func.gii"
        inflater = zlib.compressobj(9)
        payload = b"".join(inflater.compress(bytes(1 << 20)) for _ in range(256)) + inflater.flush()
        attrs = {**BASE, "Dim0": "10", "Encoding": "GZipBase64Binary"}
        bomb.write_text(gifti_xml([(attrs, base64.b64encode(payload).decode())]))
        with pytest.raises(DatasetError, match="bomb.func.gii: a data array inflates past its declared 40 B"):
            read_gifti({"L": bomb}, {"L": "bomb.func.gii"}, tr=2.0)


def test_memory_budget_setting_is_parsed_and_a_bad_one_is_named(monkeypatch):
    from pipelines.errors import ConfigError
    from pipelines.limits import memory_budget

    monkeypatch.setenv("NEUROFLOW_MEMORY_BUDGET", "1.5G")
    assert memory_budget() == int(1.5 * (1 << 30))
    monkeypatch.setenv("NEUROFLOW_MEMORY_BUDGET", "-3")
    with pytest.raises(ConfigError, match="NEUROFLOW_MEMORY_BUDGET='-3' is not a size"):
        memory_budget()
    monkeypatch.delenv("NEUROFLOW_MEMORY_BUDGET")
    assert memory_budget() >= 256 << 20


# --- end to end: bad files in two subjects, the third publishes ----------------------------------

@pytest.mark.slow
def test_bad_values_and_a_huge_header_fail_their_subjects_the_other_publishes(demo_tree, tiny_bert_dir,
                                                                              results_bucket, tmp_path, ledger):
    with ledger.fault("a string TR and a 10000^3-voxel NIfTI in two subjects; the third publishes") as scope:
        sandbox = Sandbox(tmp_path / "sandbox").seed()
        tree = tree_copy(demo_tree, tmp_path, with_sim=True)
        (tree / (ROI.format(s="23") + ".json")).write_text('{"RepetitionTime": "2", "StartTime": 20}')
        nifti_header_gz(tree / BOLD, (10000, 10000, 10000, 372))
        sandbox.allowed.append(tree)
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22", "23", "sim01"])
        cfg["dataset"]["source"] = str(tree)
        cfg["features"] = cfg["features"][:1]  # word rate only: fast
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        # matplotlib writes its font cache under $HOME (a separate finding, reported): kept in the cache here
        proc = run_cli(scope, sandbox, "run", str(path), env={"MPLCONFIGDIR": str(sandbox.cache / "matplotlib")})
        assert proc.returncode == 3, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.touched == []
        assert "sub-23 failed" in proc.stderr and "RepetitionTime" in proc.stderr
        assert "sub-sim01 failed" in proc.stderr and "NEUROFLOW_MEMORY_BUDGET" in proc.stderr
        manifest = read_manifest(proc.stdout.strip().splitlines()[-1])
        assert manifest["status"] == "partial"
        assert manifest["subject_info"]["22"]["status"] == "ok" and "22" in manifest["metrics"]
        for sub in ("23", "sim01"):
            assert manifest["subject_info"][sub]["status"] == "failed" and sub not in manifest["metrics"]
        peak = proc.peak_rss_kb * 1024  # the command's own peak
        assert peak < PEAK_RSS_LIMIT, peak
