"""`neuroflow init SOURCE --output s3://... -o cfg.yaml` then `neuroflow run cfg.yaml`, with no edits.

On every layout the tests build that has responses: the seed datasets' real metadata with their
synthetic (or, for Alice, real) recordings, staged on the real S3 server by the dataset tests'
fixtures. Where a fixture plants bad files on purpose (LeBel's truncated and short HDF5,
Narratives' broken GIFTI and the story without a transcript), the run is made on a copy of the
layout without them, as a dataset whose files are all good is (``clean_copy``): the layout and its
files are the fixture's, only the broken ones are left out. Each test checks a complete manifest
with every subject that has responses and, where the layout plants a signal, that the planted
targets score higher than the others.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.consume import PublishedAnalysis

from .datasets import stage
from .test_init import init
# the layouts the dataset tests build (module-scoped fixtures, staged once on the session's S3 server)
from .test_datasets_alice import SOURCE as ALICE
from .test_datasets_alice import alice  # noqa: F401
from .test_datasets_lebel import lebel  # noqa: F401
from .test_datasets_lebel import PLANTED as LEBEL_PLANTED
from .test_datasets_lebel import SOURCE as LEBEL
from .test_datasets_lebel import STORIES as LEBEL_STORIES
from .test_datasets_megmasc import megmasc  # noqa: F401
from .test_datasets_megmasc import SOURCE as MEGMASC
from .test_datasets_narratives import narratives  # noqa: F401
from .test_datasets_narratives import FS6
from .test_datasets_narratives import PLANTED as NARRATIVES_PLANTED
from .test_datasets_narratives import SOURCE as NARRATIVES
from .test_datasets_podcast import podcast  # noqa: F401
from .test_datasets_podcast import HG_KEY as PODCAST_HG
from .test_datasets_podcast import SOURCE as PODCAST

pytestmark = pytest.mark.integration


def clean_copy(source: str, dest: str, leave_out: str, moves: dict[str, str] | None = None) -> str:
    """Copy the layout staged at `source` to `dest`, without the keys matching the regex `leave_out`;
    ``moves`` (new key -> key in `source`) puts a staged file at another path of the copy."""
    from pipelines.s3 import client_for, endpoint_url, split_s3_uri

    bucket, prefix = split_s3_uri(source)
    client = client_for(False, endpoint_url())

    def body(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    files = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            key = obj["Key"][len(prefix) + 1:]
            if not re.search(leave_out, key):
                files[key] = body(key)
    files.update({new: body(old) for new, old in (moves or {}).items()})
    return stage(dest, files)


def init_then_run(tmp_path, capsys, source: str, output: str) -> tuple[dict, PublishedAnalysis]:
    """The two commands, the config as written: (config, the published analysis)."""
    cfg, _, path = init(tmp_path, source, output)
    capsys.readouterr()
    rc = main(["run", str(path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0 and "Traceback" not in out.err, out.err
    published = PublishedAnalysis(out.out.strip().splitlines()[-1], cache_dir=tmp_path / "maps")
    assert published.manifest["status"] == "complete"
    assert published.manifest["dataset"]["source"] == source
    return cfg, published


def r_of(published: PublishedAnalysis, subject: str) -> np.ndarray:
    """Held-out r per target, in the targets' order."""
    return published.load_map(subject, "wordrate", "r")["r"].to_numpy(float)


def planted_found(r: np.ndarray, planted: list[int], floor: float = 0.5) -> bool:
    """Every planted target scores above `floor` and above every other target."""
    others = np.delete(r, planted)
    return bool(np.nanmin(r[planted]) > max(floor, np.nanmax(others)))


@pytest.mark.slow
def test_lebel(lebel, results_bucket, tmp_path, capsys):
    """HDF5 per story, as on OpenNeuro: UTS01 heard three stories and the test story (3 repeats, UTS06's
    file moved to UTS01); UTS03's git-annex pointer stays, and is left out by init."""
    test_story = "derivative/preprocessed_data/{}/wheretheressmoke.hf5"
    # every subject but UTS01 and UTS03's pointer (other tests stage more subjects into the same layout)
    source = clean_copy(LEBEL, "s3://init-run/ds003020", r"preprocessed_data/UTS(?!0[13]/)\d+/",
                        moves={test_story.format("UTS01"): test_story.format("UTS06")})
    cfg, published = init_then_run(tmp_path, capsys, source, results_bucket)
    assert cfg["dataset"]["subjects"] == published.subjects == ["UTS01"]
    # LeBel's own evaluation: leave one story out for alphas, scored on the repeated test story
    assert cfg["model"]["cv"] == "leave_one_run_out" and cfg["model"]["test_stories"] == ["wheretheressmoke"]
    info = published.manifest["subject_info"]["UTS01"]
    assert info["stories"] == sorted(LEBEL_STORIES + ["wheretheressmoke"])
    assert planted_found(r_of(published, "UTS01"), LEBEL_PLANTED)


@pytest.mark.slow
def test_narratives(narratives, results_bucket, tmp_path, capsys):
    """Three subjects, three sources: sub-022 in afni-nosmooth (the field's), sub-001 only in fmriprep,
    sub-002 only raw bold; each run's story from its events.tsv, gentle transcripts."""
    source = clean_copy(NARRATIVES, "s3://init-run/ds002345", r"sub-00[345]_.*func\.gii|task-tunnel_.*func\.gii")
    cfg, published = init_then_run(tmp_path, capsys, source, results_bucket)
    resp = cfg["dataset"]["responses"]
    assert resp["kind"] == "auto" and resp["derivatives"] == ["derivatives/afni-nosmooth", "derivatives/fmriprep"]
    assert cfg["dataset"]["subjects"] == sorted(published.subjects) == ["001", "002", "022"]
    assert published.manifest["subject_info"]["001"]["stories"] == ["pieman"]
    assert published.manifest["subject_info"]["022"]["stories"] == ["lucy"]
    assert published.manifest["subject_info"]["002"]["stories"] == ["pieman"]
    for subject in ("001", "022"):  # both hemispheres: the first vertices of each are planted
        r = r_of(published, subject)
        assert len(r) == 2 * FS6
        assert planted_found(r, NARRATIVES_PLANTED + [FS6 + v for v in NARRATIVES_PLANTED]), subject
    volume = np.asarray(published.load_map("002", "wordrate", "r").dataobj)
    planted = min(volume[1, 1, 1], volume[2, 2, 2], volume[3, 3, 3])
    assert planted > max(0.5, volume[4, 4, 0])  # the planted voxels, then a noise voxel


def test_alice(alice, results_bucket, tmp_path, capsys):
    """Real ROI time series of three listeners (no planted signal): every subject's six ROIs scored."""
    cfg, published = init_then_run(tmp_path, capsys, ALICE, results_bucket)
    assert cfg["dataset"]["subjects"] == sorted(published.subjects) == ["18", "22", "23"]
    for subject in ("18", "22", "23"):
        assert published.manifest["subject_info"][subject]["stories"] == ["alice"]
        r = r_of(published, subject)
        assert len(r) == 6 and np.isfinite(r).all()


def _inputs(published: PublishedAnalysis) -> set[str]:
    return {i["key"] for i in published.manifest["inputs"]}


@pytest.mark.slow
def test_megmasc(megmasc, results_bucket, tmp_path, capsys):
    """MEG, words from events.tsv: session 0's story lw1 only (session 1 is left out, the others are pointers)."""
    cfg, published = init_then_run(tmp_path, capsys, MEGMASC, results_bucket)
    assert published.subjects == ["01"] and published.manifest["subject_info"]["01"]["stories"] == ["lw1"]
    assert not any("ses-1" in key for key in _inputs(published))
    r = r_of(published, "01")
    assert len(r) == 208 and planted_found(r, [0, 1, 2, 3, 4])  # the gradiometers; five follow the words


@pytest.mark.slow
def test_podcast(podcast, results_bucket, tmp_path, capsys):
    """ECoG: the high-gamma derivative (not the raw EDF), words from the whisper-medium transcript."""
    cfg, published = init_then_run(tmp_path, capsys, PODCAST, results_bucket)
    assert published.subjects == ["01"]
    assert PODCAST_HG in _inputs(published) and not any(k.endswith(".edf") for k in _inputs(published))
    r = r_of(published, "01")
    assert len(r) == 99 and planted_found(r, [0, 1, 2, 3, 4])  # the good channels; five follow the words
