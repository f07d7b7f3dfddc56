"""ds002345 (Narratives, Nastase et al. 2021): story-level events.tsv, gentle transcripts, fsaverage6.

Layout in ``s3://openneuro.org/ds002345``: the real metadata of v1.1.4 (top-level files and the
sidecars/events of sub-001..005 and sub-022; the other 339 subjects are left out to keep the test
fast), plus synthetic files. At real annexed paths: ``sub-002/func/sub-002_task-pieman_run-1_bold.nii.gz``
(a small 4-D NIfTI). At the paths the Narratives derivatives use (this snapshot carries no
derivatives and no ``stimuli/gentle``, so they are not in ANNEXED_FILES.tsv): gentle
``stimuli/gentle/<story>/align.json`` and surface time series on fsaverage6 (40962 vertices per
hemisphere), named as fMRIPrep >= 20.2 (``*_hemi-L_space-fsaverage6_bold.func.gii``) and as the
dataset's AFNI derivatives (``*_space-fsaverage6_hemi-L_desc-clean.func.gii``).

Clock: a story's audio file starts at the earliest events.tsv onset that names it: ``pieman_audio.wav``
holds the music at 0 s and the story at 15 s (450 s = the whole run); ``lucy_audio.wav`` starts at
3 s. gentle times are on the audio file's clock; the planted vertices follow the word rate on the
run's clock.
"""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipelines.config import parse_config
from pipelines.errors import DatasetError
from pipelines.ingest import (
    check_run_timing,
    load_run_words,
    load_subject,
    open_dataset,
    stimulus_from_events,
)

from .conftest import demo_config
from .datasets import (
    annexed,
    corr,
    gentle_bytes,
    gifti_bytes,
    metadata_files,
    nifti_bytes,
    planted,
    stage,
    synthetic_words,
    word_rate,
)

pytestmark = pytest.mark.integration

NAME = "ds002345_narratives_meta"
SOURCE = "s3://openneuro.org/ds002345"
SUBJECTS = ("001", "002", "003", "004", "005", "022")
FS6 = 40962
TR = 1.5
PLANTED = [0, 1, 2, 3, 4]
RESPONSES = {"kind": "gifti", "derivatives": ["derivatives/fmriprep", "derivatives/afni-nosmooth"],
             "space": "fsaverage6", "story_from": "events"}
WORDS = {"format": "gentle", "files": {}, "pattern": "stimuli/gentle/{story}/align.json", "onset_from_events": True}
FMRIPREP = "derivatives/fmriprep/sub-{s}/func/sub-{s}_task-pieman_run-{r}_hemi-{h}_space-fsaverage6_bold.func.gii"
AFNI = "derivatives/afni-nosmooth/sub-{s}/func/sub-{s}_task-{t}_space-fsaverage6_hemi-{h}_desc-clean.func.gii"


def config(tmp_path, subjects=("001",), task="pieman"):
    cfg = demo_config(tmp_path, "s3://unused", subjects=subjects)
    cfg["dataset"].update(source=SOURCE, version="1.1.4", task=task,
                          word_timings={"format": "textgrid", "files": {task: "unused"}})
    cfg["dataset"]["responses"] = {}
    return parse_config(cfg)


def surface(rng, signal, n_vertices=FS6):
    """[T, n_vertices]: planted vertices, a few noise vertices, zeros elsewhere (the medial wall)."""
    data = np.zeros((len(signal), n_vertices), np.float32)
    data[:, :20] = planted(rng, signal, 20, PLANTED)
    return data


@pytest.fixture(scope="module")
def narratives(s3_url):
    rng = np.random.default_rng(2345)
    files = metadata_files(NAME, lambda k: "/" not in k or k.startswith("stimuli/")
                           or k.split("/")[0] in {f"sub-{s}" for s in SUBJECTS})
    # gentle transcripts on the audio files' clocks
    pieman = synthetic_words(rng, 15.5, 436.0)  # the story part of pieman_audio.wav (music 0-13 s)
    lucy = synthetic_words(rng, 0.5, 540.0)  # lucy_audio.wav is the story alone
    unaligned = (7, 8, 40)
    syn = {"stimuli/gentle/pieman/align.json": gentle_bytes(pieman, unaligned),
           "stimuli/gentle/lucy/align.json": gentle_bytes(lucy)}
    times = TR * np.arange(300)
    for run in ("1", "2"):
        signal = word_rate(pieman, times)
        for h in "LR":
            syn[FMRIPREP.format(s="001", r=run, h=h)] = gifti_bytes(surface(rng, signal))
    lucy_times = TR * np.arange(370)
    for h in "LR":
        # run time t is audio time t - 3 s
        syn[AFNI.format(s="022", t="lucy", h=h)] = gifti_bytes(surface(rng, word_rate(lucy, lucy_times - 3.0)))
    vol = np.zeros((5, 5, 4, 300), np.float32)
    vol[..., :] = 100.0  # constant voxels: outside the computed mask
    sig = planted(rng, word_rate(pieman, times), 3, [0, 1, 2], scale=2.0, base=100.0)
    vol[1, 1, 1], vol[2, 2, 2], vol[3, 3, 3] = sig[:, 0], sig[:, 1], sig[:, 2]
    vol[4, 4, 0] = 100 + rng.standard_normal(300)
    syn["sub-002/func/sub-002_task-pieman_run-1_bold.nii.gz"] = nifti_bytes(vol, TR)
    # bad inputs
    syn[FMRIPREP.format(s="005", r="1", h="L")] = gifti_bytes(surface(rng, times))
    syn[FMRIPREP.format(s="005", r="1", h="R")] = gifti_bytes(surface(rng, times[:-1]))
    for h in "LR":
        syn[FMRIPREP.format(s="004", r="1", h=h)] = gifti_bytes(surface(rng, times, n_vertices=10242))
    good = gifti_bytes(surface(rng, times))
    syn[FMRIPREP.format(s="003", r="1", h="L")] = good
    syn[FMRIPREP.format(s="003", r="1", h="R")] = good[: len(good) // 3]  # truncated
    for h in "LR":  # tunnel: a run whose story has no gentle transcript here
        syn[AFNI.format(s="001", t="tunnel", h=h)] = gifti_bytes(surface(rng, TR * np.arange(12)))
    files.update(syn)
    stage(SOURCE, files)
    return {"pieman": pieman, "lucy": lucy, "unaligned": unaligned, "synthetic": syn}


def test_nifti_sits_at_its_real_annexed_path(narratives):
    real = set(annexed(NAME)["path"])
    assert "sub-002/func/sub-002_task-pieman_run-1_bold.nii.gz" in real


def test_real_events_give_each_story_and_its_audio_onset(narratives, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache")
    pieman = stimulus_from_events(ingest, "sub-001/func/sub-001_task-pieman_run-1_events.tsv")
    assert pieman == {"story": "pieman", "onset": 0.0, "end": 437.0, "stim_file": "pieman_audio.wav"}
    tunnel = stimulus_from_events(ingest, "sub-001/func/sub-001_task-tunnel_events.tsv")
    assert (tunnel["story"], tunnel["onset"], tunnel["end"]) == ("tunnel", 3.0, 1537.0)


def test_surface_runs_are_read_with_story_and_clock(narratives, tmp_path):
    ingest = open_dataset(config(tmp_path), tmp_path / "cache", responses=RESPONSES, words=WORDS)
    subject = load_subject(ingest, "001")
    assert subject.kind == "gifti" and subject.space == "fsaverage6"
    assert [r.label for r in subject.runs] == ["1", "2"]
    assert len(subject.target_names) == 2 * FS6 and subject.target_names[FS6] == "R:0"
    assert list(subject.target_info["hemi"].iloc[[0, FS6]]) == ["L", "R"]
    for run in subject.runs:
        assert run.story == "pieman" and run.tr == TR  # TR from the raw bold.json (derivative has none)
        assert run.data.shape == (300, 2 * FS6) and run.meta["stimulus_onset"] == 0.0
        words = load_run_words(ingest, run)
        assert len(words) == len(narratives["pieman"])  # the 3 unaligned words interpolated, none lost
        assert words.attrs["n_unaligned"] == 3
        check_run_timing(run, words, "001")
        rate = word_rate(words, run.times)
        for v in PLANTED + [FS6 + v for v in PLANTED]:
            assert corr(run.data[:, v], rate) > 0.9
    rec = ingest.files_read[FMRIPREP.format(s="001", r="1", h="L")]
    assert rec.size > 0 and rec.verified.startswith("size+md5")


def test_audio_onset_from_events_moves_the_words(narratives, tmp_path):
    """lucy_audio.wav starts 3 s into the run (real events.tsv): the words move with it."""
    ingest = open_dataset(config(tmp_path, ("022",), task="lucy"), tmp_path / "cache", responses=RESPONSES,
                          words=WORDS)
    run = load_subject(ingest, "022").runs[0]
    assert (run.story, run.meta["stimulus_onset"], run.meta["stimulus_end"]) == ("lucy", 3.0, 545.0)
    words = load_run_words(ingest, run)
    assert words["onset"].iloc[0] == pytest.approx(narratives["lucy"]["onset"].iloc[0] + 3.0, abs=1e-3)
    check_run_timing(run, words, "022")
    right = corr(run.data[:, 0], word_rate(words, run.times))
    unshifted = corr(run.data[:, 0], word_rate(words, run.times + 3.0))
    assert right > 0.9 and unshifted < right - 0.2


def test_raw_nifti_run_is_masked_by_its_own_variance(narratives, tmp_path):
    ingest = open_dataset(config(tmp_path, ("002",)), tmp_path / "cache", responses={"kind": "bold",
                                                                                      "story_from": "events"},
                          words=WORDS)
    subject = load_subject(ingest, "002")
    assert subject.kind == "bold" and len(subject.runs) == 1
    run = subject.runs[0]
    assert run.data.shape == (300, 4)  # 3 planted + 1 noise voxel vary; the rest is constant
    assert int(np.asarray(subject.mask_img.dataobj).sum()) == 4
    words = load_run_words(ingest, run)
    check_run_timing(run, words, "002")
    r = [corr(run.data[:, i], word_rate(words, run.times)) for i in range(4)]
    assert sorted(r)[1] > 0.9 and min(r) < 0.3


@pytest.mark.reliability
def test_bad_inputs_are_refused(narratives, tmp_path, ledger):
    def subject(s, **kw):
        ingest = open_dataset(config(tmp_path, (s,), task=kw.pop("task", "pieman")), tmp_path / "cache",
                              responses={**RESPONSES, **kw}, words=WORDS)
        return ingest, load_subject(ingest, s)

    with ledger.bad_input("Narratives: hemispheres of different lengths"):
        with pytest.raises(DatasetError, match=r"hemi-R_space-fsaverage6_bold\.func\.gii: 299 volumes, but the other "
                                               r"hemisphere has 300"):
            subject("005")
    with ledger.bad_input("Narratives: fsaverage5 data labelled fsaverage6"):
        with pytest.raises(DatasetError, match=r"hemi-L_space-fsaverage6_bold\.func\.gii: 10242 vertices, but "
                                               r"fsaverage6 has 40962"):
            subject("004")
    with ledger.bad_input("Narratives: truncated GIFTI"):
        with pytest.raises(DatasetError, match=r"sub-003_task-pieman_run-1_hemi-R.*corrupt or truncated GIFTI"):
            subject("003")
    with ledger.bad_input("Narratives: story without a transcript"):
        ingest, subj = subject("001", task="tunnel")
        with pytest.raises(DatasetError, match=r"run 1, story 'tunnel'\): no word timings: "
                                               r"stimuli/gentle/tunnel/align\.json is not in dataset version 1\.1\.4"):
            load_run_words(ingest, subj.runs[0])
    with ledger.bad_input("Narratives: run shorter than its story (events.tsv)"):
        ingest, subj = subject("001", task="tunnel")
        run = subj.runs[0]
        from pipelines.wordtimings import read_gentle_words

        words = read_gentle_words(ingest.fetch("stimuli/gentle/lucy/align.json"))  # any words
        with pytest.raises(DatasetError, match=r"12 samples ending at 18\.0 s, but its events\.tsv "
                                               r"\(sub-001/func/sub-001_task-tunnel_events\.tsv\) plays the story "
                                               r"until 1537\.0 s"):
            check_run_timing(run, words[words["offset"] < 20], "001")


def test_gzip_truncation_in_a_nifti_is_named(narratives, tmp_path, s3_url):
    """A truncated .nii.gz at the real path is refused as corrupt, not read short."""
    key = "sub-002/func/sub-002_task-pieman_run-1_bold.nii.gz"
    data = narratives["synthetic"][key]
    assert gzip.decompress(data)  # the good file is a real gzip
    src = stage("s3://lab-narratives/ds002345-broken", {
        **{k: v for k, v in metadata_files(NAME, lambda k: "/" not in k or k.startswith("sub-002/")).items()},
        key: data[: len(data) // 2]})
    cfg = config(tmp_path, ("002",))
    cfg = parse_config({**cfg.to_dict(), "dataset": {**cfg.to_dict()["dataset"], "source": src}})
    ingest = open_dataset(cfg, tmp_path / "cache", responses={"kind": "bold"})
    with pytest.raises(DatasetError, match=r"sub-002_task-pieman_run-1_bold\.nii\.gz: corrupt or truncated NIfTI"):
        load_subject(ingest, "002")


@pytest.mark.slow
def test_the_whole_analysis_on_surfaces_with_an_audio_feature(narratives, tmp_path, results_bucket):
    """pieman runs on fsaverage6, word rate and the sound envelope of the story's WAV: GIFTI maps."""
    import io
    import wave

    import nibabel as nib

    from pipelines.consume import read_manifest
    from pipelines.run import run_analysis
    from pipelines.resultstore import ResultStore

    from .datasets import smooth_rate

    sr, seconds = 4000, 450
    t = np.arange(sr * seconds) / sr
    loud = 0.1 + smooth_rate(narratives["pieman"], t[::40], width=0.3).repeat(40)  # louder while words are spoken
    sound = np.random.default_rng(5).standard_normal(t.size) * loud / loud.max() * 0.3
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(sound, -1, 1) * 32767).astype("<i2").tobytes())
    stage(SOURCE, {"stimuli/pieman_audio.wav": buf.getvalue()})

    cfg = demo_config(tmp_path, results_bucket, subjects=("001",))
    cfg["dataset"].update(source=SOURCE, version="1.1.4", task="pieman", responses={**RESPONSES, "stories": ["pieman"]},
                          word_timings=WORDS)
    cfg["features"] = [{"name": "wordrate", "kind": "word_rate"},
                       {"name": "envelope", "kind": "envelope", "sfreq": 10.0}]
    cfg["model"] = {"cv": "contiguous_blocks", "n_folds": 4, "delays": [0, 1], "alphas": [0.1, 1, 10, 100, 1000]}
    result = run_analysis(parse_config(cfg), cache_dir=tmp_path / "cache")
    assert result["status"] == "complete"
    (fit,) = result["fits"]
    assert fit["kind"] == "gifti" and fit["n_targets"] == 2 * FS6 and fit["n_runs"] == 2
    assert fit["n_constant_targets"] == 2 * (FS6 - 20)  # the all-zero vertices: reported, not fitted
    manifest = read_manifest(result["manifest_uri"])
    gii = [a for a in manifest["artifacts"] if a["kind"] == "statmap_gifti" and a["stat"] == "r"]
    assert sorted(a["path"].split("_hemi-")[1][0] + a["feature_space"] for a in gii) == \
        ["Lenvelope", "Lwordrate", "Renvelope", "Rwordrate"]
    prefix = ResultStore(result["manifest_uri"].rsplit("/", 1)[0])
    for art in gii:
        path = tmp_path / art["path"].rsplit("/", 1)[-1]
        path.write_bytes(prefix.get_bytes(art["path"]))
        r = nib.load(str(path)).darrays[0].data
        assert r.shape == (FS6,) and np.isnan(r[20:]).all()  # unfitted vertices are n/a
        assert r[PLANTED].min() > (0.5 if art["feature_space"] == "wordrate" else 0.3)
    assert any(a["path"].endswith("_surface.png") for a in manifest["artifacts"])
