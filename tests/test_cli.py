"""The command line as a user meets it: one-line errors, no traceback, nothing published."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from pipelines.devserver import free_port
from pipelines.resultstore import ResultStore

from .conftest import demo_config

pytestmark = pytest.mark.integration


def neuroflow(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def write(tmp_path, cfg) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("neuroflow: error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_published(bucket_uri):
    assert ResultStore(bucket_uri).list() == []


def test_bad_config_key(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket)
    cfg["model"]["alpahs"] = [1, 10]
    proc = neuroflow("run", write(tmp_path, cfg))
    assert_one_line_error(proc, "config.yaml", "model.alpahs", "Did you mean 'alphas'")
    assert_nothing_published(results_bucket)


def test_missing_dataset(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket)
    cfg["dataset"]["source"] = "s3://openneuro.org/ds000000"
    proc = neuroflow("run", write(tmp_path, cfg), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(proc, "s3://openneuro.org/ds000000", "dataset.source")
    assert_nothing_published(results_bucket)


def test_unreachable_bucket(tiny_bert_dir, tmp_path, s3_url):
    cfg = demo_config(tiny_bert_dir, "s3://neuroflow-results")
    dead = f"http://127.0.0.1:{free_port()}"
    proc = neuroflow("run", write(tmp_path, cfg), "--cache-dir", str(tmp_path / "c"),
                     env={"AWS_ENDPOINT_URL": dead})
    assert_one_line_error(proc, "cannot reach the S3 endpoint", dead, "AWS_ENDPOINT_URL")


def test_missing_output_bucket(openneuro_demo, tiny_bert_dir, tmp_path):
    cfg = demo_config(tiny_bert_dir, "s3://no-such-results-bucket")
    proc = neuroflow("validate", write(tmp_path, cfg), "--cache-dir", str(tmp_path / "c"))
    assert_one_line_error(proc, "s3://no-such-results-bucket", "bucket does not exist")


def test_set_override_is_validated(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket)
    proc = neuroflow("validate", write(tmp_path, cfg), "--set", "model.alphas=[-1, 10]")
    assert_one_line_error(proc, "'model.alphas' must be positive")


@pytest.mark.slow
def test_run_prints_summary_and_manifest_uri_last(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path):
    cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
    path = write(tmp_path, cfg)
    ok = neuroflow("validate", path, "--cache-dir", str(tmp_path / "c"))
    assert ok.returncode == 0 and "ok: ds002322 1.0.4, subjects 22, 2127 words" in ok.stdout
    proc = neuroflow("run", path, "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    # not a terminal: plain progress lines on stderr, one per stage, and nothing from the libraries
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert [ln for ln in err if not re.match(r"\d\d:\d\d:\d\d neuroflow: ", ln)] == [], proc.stderr
    stages = [re.search(r"stage (\d/\d): (\w+)", ln).groups() for ln in err if " neuroflow: stage " in ln]
    assert stages == [("1/4", "features"), ("2/4", "features"), ("3/4", "fit"), ("4/4", "publish"),
                      ("4/4", "done")]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith(f"{results_bucket}/ds002322/1.0.4/alice-demo-") and lines[-1].endswith("/manifest.json")
    assert any(ln.startswith("sub-22") and "wordrate" in ln for ln in lines)
    assert lines[-2].startswith("report: ") and os.path.isfile(lines[-2][8:])
    listed = neuroflow("maps", "list", results_bucket)
    assert listed.returncode == 0 and "ds002322" in listed.stdout and lines[-1] in listed.stdout
    shown = neuroflow("maps", "show", lines[-1])
    assert shown.returncode == 0 and "sub-22 wordrate: mean r" in shown.stdout and "report.html" in shown.stdout
    got = neuroflow("maps", "get", lines[-1], "report.html", str(tmp_path / "r.html"))
    assert got.returncode == 0 and (tmp_path / "r.html").read_bytes().startswith(b"<!DOCTYPE html")
