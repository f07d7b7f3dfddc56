"""`neuroflow init` then `neuroflow validate` (and `neuroflow run`) with no edits, on every layout the tests build.

The layouts are the real metadata of the seed datasets (``../shared/realdata``) with synthetic
recordings at their real paths (``tests/datasets``, staged on the real S3 server), the bundled
demo dataset, and a lab's own layout. Each config is written by ``neuroflow init`` from the
dataset alone; the tests check what it detected, that ``validate`` accepts it as written, and, on
the demo and the lab layout, that ``run`` publishes a complete result from it (on the seed
layouts: ``tests/test_init_run.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.consume import read_manifest

from .datasets import REALDATA, realdata
# the layouts the dataset tests build (module-scoped fixtures, staged once on the session's S3 server)
from .test_datasets_alice import alice  # noqa: F401
from .test_datasets_lab import lab  # noqa: F401
from .test_datasets_lebel import lebel  # noqa: F401
from .test_datasets_megmasc import megmasc  # noqa: F401
from .test_datasets_narratives import narratives  # noqa: F401
from .test_datasets_podcast import podcast  # noqa: F401

pytestmark = pytest.mark.integration


def init(tmp_path, source, output, *extra) -> tuple[dict, str, Path]:
    """`neuroflow init SOURCE --output OUTPUT -o FILE`: (config as read, its text, its path)."""
    path = tmp_path / f"init-{len(list(tmp_path.glob('init-*.yaml')))}.yaml"
    assert main(["init", source, "--output", output, "-o", str(path), "--cache-dir", str(tmp_path / "cache"),
                 *extra]) == 0
    text = path.read_text()
    return yaml.safe_load(text), text, path


def validate(path, tmp_path, capsys) -> str:
    capsys.readouterr()
    rc = main(["validate", str(path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "ok: " in out.out and "Traceback" not in out.err
    return out.out


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """validate's table: (subject, story) -> [runs, samples, words, timing]."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].startswith("sub-") and len(cells) >= 6 and cells[2].isdigit():
            rows[(cells[0][4:], cells[1])] = cells[2:6]
    return rows


def run_publishes(path, tmp_path, capsys) -> dict:
    capsys.readouterr()
    rc = main(["run", str(path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    manifest = read_manifest(out.out.strip().splitlines()[-1])
    assert manifest["status"] == "complete"
    return manifest


# --- run: two small layouts ---------------------------------------------------------

@pytest.mark.slow
def test_demo_dataset_from_a_local_folder_publishes(demo_tree, results_bucket, tmp_path, capsys):
    """The Alice demo: ROI derivative for three listeners, raw bold for the simulated one (kind auto)."""
    cfg, text, path = init(tmp_path, str(demo_tree), results_bucket)
    ds = cfg["dataset"]
    assert ds["source"] == str(demo_tree) and ds["version"] == "1.0.4" and ds["task"] == "alice"
    assert ds["subjects"] == ["18", "22", "23", "sim01"]
    assert ds["responses"] == {"kind": "auto", "derivatives": ["derivatives/brennan2016roi"]}
    assert ds["word_timings"] == {"format": "textgrid", "tier": "word",
                                  "files": {"alice": "stimuli/DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"}}
    assert cfg["model"]["cv"] == "contiguous_blocks"  # one run per subject
    assert "recognised: The Alice Dataset" in text and "sub-sim01 only have raw bold" in text
    out = validate(path, tmp_path, capsys)
    rows = table_rows(out)
    assert {s for s, _ in rows} == {"18", "22", "23", "sim01"}
    assert all(r[2] == "2127" for r in rows.values())  # every run hears the 2127 words of chapter 1
    manifest = run_publishes(path, tmp_path, capsys)
    assert sorted(manifest["subjects"]) == ["18", "22", "23", "sim01"]
    assert manifest["metrics"]["sim01"]["wordrate"]["max_r"] > 0.3  # the planted voxels are found


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_lab_layout_with_a_story_per_run_publishes(lab, results_bucket, tmp_path, capsys, where):
    """One task, three runs, each its own story (events.tsv stim_file), word tables per story."""
    cfg, text, path = init(tmp_path, lab[where], results_bucket)
    ds = cfg["dataset"]
    assert ds["subjects"] == ["01"] and ds["task"] == "stories" and ds["version"] == "1.2.0"
    assert ds["responses"] == {"kind": "bold", "story_from": "events"}
    assert ds["word_timings"] == {"format": "words_tsv", "pattern": "stimuli/{story}_words.tsv",
                                  "onset_from_events": True}
    assert cfg["model"]["cv"] == "leave_one_run_out"
    rows = table_rows(validate(path, tmp_path, capsys))
    assert set(rows) == {("01", "harbour"), ("01", "lighthouse"), ("01", "ferry")}
    assert all(int(r[2]) == len(lab["words"][story]) for (_, story), r in rows.items())
    manifest = run_publishes(path, tmp_path, capsys)
    assert manifest["subject_info"]["01"]["stories"] == ["ferry", "harbour", "lighthouse"]
    assert manifest["dataset"]["source"] == lab[where]


# --- validate: every seed layout -----------------------------------------------------

def test_lebel_is_recognised_with_its_trimming(lebel, results_bucket, tmp_path, capsys):
    cfg, text, path = init(tmp_path, "s3://openneuro.org/ds003020", results_bucket)
    ds = cfg["dataset"]
    assert ds["version"] == "3.1.0" and ds["task"] == "stories"
    assert ds["responses"] == {"kind": "hdf5", "files": "derivative/preprocessed_data/{subject}/{story}.hf5",
                               "start_time": 10.0, "tr_counts": "derivative/respdict.json", "tr_counts_trim": 20}
    assert ds["word_timings"] == {"format": "textgrid", "pattern": "derivative/TextGrids/{story}.TextGrid",
                                  "tier": "word"}
    assert {"UTS01", "UTS05", "UTS06"} <= set(ds["subjects"])
    assert "recognised: LeBel et al. 2023" in text and "TR 2 s" in text
    assert "# test_stories: [wheretheressmoke]" in text  # not every subject heard it: left as a comment
    out = validate(path, tmp_path, capsys)
    rows = table_rows(out)
    assert rows[("UTS01", "inamoment")][:2] == ["1", str(lebel["respdict"]["inamoment"] - 20)]
    assert rows[("UTS01", "inamoment")][2] == str(len(lebel["words"]["inamoment"]))
    assert rows[("UTS05", "life")][3] == "UNMATCHED"  # the staged UTS05 story has no TextGrid
    assert "sub-UTS05 story life: no timing file derivative/TextGrids/life.TextGrid" in out


def test_narratives_is_recognised_with_events_and_gentle(narratives, results_bucket, tmp_path, capsys):
    cfg, text, path = init(tmp_path, "s3://openneuro.org/ds002345", results_bucket)
    ds = cfg["dataset"]
    resp = ds["responses"]
    assert resp["derivatives"] == ["derivatives/afni-nosmooth"] and resp["space"] == "fsaverage6"
    assert resp["story_from"] == "events" and resp["tasks"] == ["*"]
    assert ds["word_timings"] == {"format": "gentle", "pattern": "stimuli/gentle/{story}/align.json",
                                  "onset_from_events": True}
    # the other derivative is written as a comment, and the choice is said
    assert "# also in the dataset: gifti in derivatives/fmriprep, space fsaverage6" in text
    assert "other source(s) written as comments" in text
    assert ds["task"] == "stories"  # a label: the runs' three tasks are read, each with its story
    out = validate(path, tmp_path, capsys)
    rows = table_rows(out)
    assert rows[("022", "lucy")][2] == str(len(narratives["lucy"]))
    assert rows[("001", "tunnel")][3] == "UNMATCHED"


def test_alice_mirror(alice, results_bucket, tmp_path, capsys):
    cfg, _, path = init(tmp_path, "s3://openneuro-mirror/ds002322", results_bucket)
    assert cfg["dataset"]["responses"] == {"kind": "timeseries", "derivatives": ["derivatives/brennan2016roi"]}
    assert cfg["dataset"]["subjects"] == ["18", "22", "23"]
    rows = table_rows(validate(path, tmp_path, capsys))
    assert len(rows) == 3 and all(r[3].endswith(".TextGrid") for r in rows.values())


@pytest.mark.slow
def test_megmasc_words_from_events(megmasc, results_bucket, tmp_path, capsys):
    cfg, text, path = init(tmp_path, "s3://lab-megmasc/nm000229", results_bucket)
    ds = cfg["dataset"]
    assert ds["version"] == "1.0.1" and ds["task"] == "0"  # tasks 1-3 are git-annex pointers here
    assert ds["responses"] == {"kind": "meg", "sessions": ["0"], "story_from": "events", "sfreq": 10.0,
                               "h_freq": 4.0}  # from the sidecar's 25 Hz
    assert ds["word_timings"] == {"format": "events"}
    assert "git-annex pointers" in text and "recognised: MEG-MASC" in text
    assert cfg["model"]["tmin"] == -0.2 and cfg["model"]["tmax"] == 0.6
    rows = table_rows(validate(path, tmp_path, capsys))
    assert list(rows) == [("01", "lw1")] and int(rows[("01", "lw1")][2]) > 500


@pytest.mark.slow
def test_podcast_two_sources_of_each(podcast, results_bucket, tmp_path, capsys):
    cfg, text, path = init(tmp_path, "s3://openneuro.org/ds005574", results_bucket)
    ds = cfg["dataset"]
    assert ds["task"] == "podcast" and ds["version"] == "1.0.2"
    # the preprocessed high-gamma derivative wins over the raw EDF; the raw is a comment
    assert ds["responses"] == {"kind": "ieeg", "derivatives": ["derivatives/ecogprep"], "desc": "highgamma"}
    raw = next(ln for ln in text.splitlines() if "# also in the dataset: ieeg in the raw tree (1 subject)" in ln)
    assert '"high_gamma": [70.0, 150.0]' in raw  # with the settings the field uses for the raw recordings
    assert ds["word_timings"] == {"format": "words_tsv",
                                  "files": {"podcast": "stimuli/whisper-medium/transcript.tsv"}}
    assert "stimuli/gpt2-xl/transcript.tsv" in text  # the other transcripts, as comments
    assert cfg["model"]["cv"] == "contiguous_blocks"
    rows = table_rows(validate(path, tmp_path, capsys))
    assert rows[("01", "podcast")][3] == "stimuli/whisper-medium/transcript.tsv"


# --- what init refuses, and validate's fixes ---------------------------------------------

@pytest.mark.parametrize("name", ["haxby2001_pymvpa", "nitime_fmri_examples", "alice_brennan2016_roi"])
def test_folders_that_are_not_bids_are_refused_in_one_line(name, tmp_path, capsys):
    rc = main(["init", str(realdata(name)), "--output", "s3://x-results", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no dataset_description.json" in err[0] and "BIDS" in err[0]


def test_metadata_only_snapshots_say_what_is_missing(tmp_path, capsys):
    """The real snapshots without their annexed recordings: pointers are named, not analysed."""
    rc = main(["init", str(realdata("nm000229_megmasc_meta") / "bids"), "--output", "s3://x-results",
               "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "git-annex pointers" in err[0] and "datalad get" in err[0]
    rc = main(["init", str(REALDATA / "ds002322_alice_bids_meta" / "bids"), "--output", "s3://x-results",
               "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no response data found" in err[0]


def test_version_and_output_file_rules(lab, tmp_path, capsys):
    tree = tmp_path / "stories"
    shutil.copytree(lab["local"], tree)
    (tree / "CHANGES").unlink()
    rc = main(["init", str(tree), "--output", "s3://x-results", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "states no version" in err and "--version" in err
    cfg, text, path = init(tmp_path, str(tree), "s3://x-results", "--version", "2.0.0")
    assert cfg["dataset"]["version"] == "2.0.0" and "given with --version" in text
    before = path.read_text()
    rc = main(["init", str(tree), "--output", "s3://x-results", "--version", "2.0.0", "-o", str(path),
               "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "never replaces a file" in capsys.readouterr().err and path.read_text() == before
    rc = main(["init", lab["local"], "--output", "s3://x-results", "--version", "9.9.9",
               "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "holds version 1.2.0, not 9.9.9" in capsys.readouterr().err


def test_validate_names_the_closest_timing_files(lab, results_bucket, tmp_path, capsys):
    cfg, _, path = init(tmp_path, lab["local"], results_bucket)
    cfg["dataset"]["word_timings"]["pattern"] = "stimuli/{story}.tsv"  # a common slip: the suffix left out
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["validate", str(path), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.err
    assert "sub-01 story harbour: no timing file stimuli/harbour.tsv" in out.out
    assert "fix: closest timing files: stimuli/harbour_words.tsv" in out.out


def test_the_command_prints_the_config_when_no_file_is_given(lab):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "init", lab["local"], "--output", "s3://x-res"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["dataset"]["source"] == lab["local"] and cfg["output"] == "s3://x-res"
    assert json.loads(json.dumps(cfg))["features"] == [{"name": "wordrate", "kind": "word_rate"}]


@pytest.mark.parametrize("args, fragment", [(["/", "--output", "s3://x-results"], "SOURCE"),
                                            (["", "--output", "s3://x-results"], "SOURCE"),
                                            (["DATASET", "--output", "my-results"], "--output")])
def test_bad_arguments_are_refused_before_anything_is_listed(lab, args, fragment, tmp_path, capsys):
    args = [lab["local"] if a == "DATASET" else a for a in args]
    rc = main(["init", *args, "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "c").exists()  # nothing listed, nothing cached


def test_names_from_the_dataset_cannot_write_settings(lab, tmp_path):
    """A dataset's Name with line breaks and control characters stays inside its comment."""
    tree = tmp_path / "stories"
    shutil.copytree(lab["local"], tree)
    (tree / "dataset_description.json").write_text(json.dumps(
        {"Name": "lab\noutput: s3://evil\r\n\u2028name: evil\x1b[31m", "BIDSVersion": "1.8.0"}))
    cfg, text, _ = init(tmp_path, str(tree), "s3://x-results")
    assert cfg["output"] == "s3://x-results" and cfg["name"] == "stories"
    assert "\x1b" not in text and "\\x1b[31m" in text


def test_validate_lists_the_dataset_and_plans_each_subjects_runs_once(lab, results_bucket, tmp_path):
    """prepare and validate's table share one opened dataset: the table reuses prepare's plans."""
    from pipelines.config import load_config
    from pipelines.ingest import open_dataset
    from pipelines.scaffold import survey
    from pipelines.steps import prepare

    _, _, path = init(tmp_path, lab["local"], results_bucket)
    cfg = load_config(str(path))
    ingest = open_dataset(cfg, tmp_path / "cache")
    info = prepare(cfg, cache_dir=tmp_path / "cache", ingest=ingest)
    plans = dict(ingest.plan_cache)
    assert sorted(plans) == info["subjects"] == ["01"]
    rows = survey(cfg, tmp_path / "cache", ingest)
    assert {r.story for r in rows} == {"harbour", "lighthouse", "ferry"} and all(r.matched for r in rows)
    assert all(ingest.plan_cache[s] is plans[s] for s in plans)  # planned once, not again for the table
