"""Hostile configs (YAML bombs, duplicate keys, deep nesting, bad encodings), hostile published
manifests read by `neuroflow maps`, credentials in the endpoint URL and formula-like names in TSVs.

Each case runs the real command line in a sandbox seeded with a user's files (tests/hostile.py):
one clear error line, no traceback, no user file touched, memory bounded.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pandas as pd
import pytest
import yaml

from pipelines.maps import spreadsheet_safe, write_target_table
from pipelines.s3 import redact_url
from pipelines.resultstore import ResultStore, copy_tree_to_s3

from .conftest import REPO, demo_config, make_bucket
from .hostile import Sandbox, assert_one_clear_error, run_cli
from .test_gallery import manifest as valid_manifest
from .test_gallery import publish_fake

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

MEMORY_BOUND_KB = 700 * 1024  # a child that parsed a bomb would hold gigabytes


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    return Sandbox(tmp_path / "sandbox").seed()


def demo_yaml() -> str:
    return (REPO / "configs" / "demo.yaml").read_text()


# --- configs ---------------------------------------------------------------------------

def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HOSTILE_CONFIGS = {
    # name: (file bytes, fragment of the one error line)
    "YAML alias bomb (1 KB, 387 million values)": (_alias_bomb().encode(), "expands to more than"),
    "alias bomb of mappings with merge keys": (
        ("m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}\n" + "".join(
            f"m{i}: &m{i} [" + ", ".join([f"*m{i - 1}"] * 12) + "]\n" for i in range(1, 8))).encode(),
        "expands to more than"),
    "self-referencing alias": (b"dataset: &d {source: s3://openneuro.org/ds1, loop: *d}\n", "refers to the value"),
    "duplicate top-level key": (demo_yaml().encode() + b"output: s3://elsewhere\n", "appears twice"),
    "duplicate nested key": (demo_yaml().replace("model:\n", "model:\n  alphas: [1]\n", 1).encode(),
                             "'alphas' appears twice"),
    "100,000-deep nested list": (b"a: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested more than"),
    "100,000-deep nested mapping": (b"a: " + b"{b: " * 100_000 + b"1" + b"}" * 100_000 + b"\n",
                                    "nested more than"),
    "Latin-1 config": ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8 text"),
    "UTF-16 config": (demo_yaml().encode("utf-16"), "not UTF-8 text"),
    "config of 2 MB": (demo_yaml().encode() + b"# padding\n" * 220_000, "over 1024 KiB"),
    "python object tag": (b"dataset: !!python/object/apply:os.system ['touch pwned']\n", "not valid YAML"),
    "set and binary values": (b"name: !!set {a, b}\n", "not a config value"),
    "unhashable key": (b"[a, b]: 1\n", "not valid YAML"),
    "config that is a list": (b"- a\n- b\n", "must be a mapping"),
    "empty config": (b"", "dataset"),
    "dataset.source: / (the whole file system)": (demo_yaml().replace(
        "source: s3://openneuro.org/ds002322", "source: /").encode(), "dataset.source"),
    "dataset.source: '' (the working directory)": (demo_yaml().replace(
        "source: s3://openneuro.org/ds002322", "source: ''").encode(), "dataset.source"),
    "dataset.source: .. (a parent folder)": (demo_yaml().replace(
        "source: s3://openneuro.org/ds002322", "source: ../..").encode(), "dataset.source"),
    "dataset.source: ~ (the home folder)": (demo_yaml().replace(
        "source: s3://openneuro.org/ds002322", "source: '~'").encode(), "dataset.source"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_a_hostile_config_is_refused_in_one_line(name, sandbox, ledger):
    body, fragment = HOSTILE_CONFIGS[name]
    with ledger.bad_input(f"config: {name}") as scope:
        path = sandbox.root / "hostile.yaml"
        path.write_bytes(body)
        proc = run_cli(scope, sandbox, "validate", str(path))
        assert_one_clear_error(proc, fragment)
        assert proc.touched == [] and not (sandbox.cwd / "pwned").exists()
        assert proc.peak_rss_kb < MEMORY_BOUND_KB


@pytest.mark.parametrize("target", ["/dev/zero", "folder", "missing.yaml"])
def test_a_config_that_is_not_a_file_is_refused(target, sandbox, ledger):
    with ledger.bad_input(f"config path: {target}") as scope:
        path = target if target.startswith("/") else str(sandbox.root / target)
        if target == "folder":
            (sandbox.root / "folder").mkdir()
        proc = run_cli(scope, sandbox, "validate", path, timeout=60)
        assert_one_clear_error(proc, path)
        assert proc.touched == []


def test_hostile_overrides_are_refused(sandbox, ledger):
    with ledger.bad_input("--set with an alias bomb, duplicate keys, too many overrides") as scope:
        path = sandbox.root / "c.yaml"
        path.write_text(demo_yaml())
        bomb = "{" + _alias_bomb().replace("\n", ", ").rstrip(", ") + "}"
        proc = run_cli(scope, sandbox, "validate", str(path), "--set", f"name={bomb}")
        assert_one_clear_error(proc, "--set name", "expands to more than")
        assert proc.peak_rss_kb < MEMORY_BOUND_KB
        assert_one_clear_error(run_cli(scope, sandbox, "validate", str(path), "--set", "model={a: 1, a: 2}"),
                               "--set model", "appears twice")
        many = [arg for i in range(300) for arg in ("--set", f"name=n{i}")]
        assert_one_clear_error(run_cli(scope, sandbox, "validate", str(path), *many), "at most 256")


def test_a_date_like_version_is_read_as_text():
    from pipelines.config import apply_overrides, safe_yaml_load

    data = safe_yaml_load("dataset: {version: 2024-01-31}\n", "c.yaml")
    assert apply_overrides(data, ["dataset.task=2024-02-01"]) == {
        "dataset": {"version": "2024-01-31", "task": "2024-02-01"}}


# --- credentials in the endpoint URL -------------------------------------------------------

def test_redact_url_hides_user_password_and_query():
    assert redact_url("http://AKIA:secret@127.0.0.1:9000/") == "http://***@127.0.0.1:9000/"
    assert redact_url("https://s3.lab.org/?X-Amz-Credential=AKIA%2Fsecret") == "https://s3.lab.org/?***"
    assert redact_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert "secret" not in redact_url("http://u:secret@[::1")


@pytest.mark.parametrize("endpoint", [
    "http://AKIAEXAMPLE:topsecret@127.0.0.1:9/",     # nothing listens on port 9: connection refused
    "http://AKIAEXAMPLE:topsecret@[::1",             # not a URL boto3 accepts
    "http://127.0.0.1:9/?X-Amz-Credential=topsecret",
])
def test_credentials_in_the_endpoint_url_never_reach_the_output(endpoint, sandbox, ledger):
    with ledger.bad_input(f"credentials in AWS_ENDPOINT_URL ({endpoint.split('@')[-1][:20]})") as scope:
        path = sandbox.root / "c.yaml"
        path.write_text(demo_yaml())
        proc = run_cli(scope, sandbox, "-v", "validate", str(path),
                       env={"AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "topsecret" not in proc.stderr + proc.stdout
        assert "Traceback" not in proc.stderr


# --- formula-like names in published TSVs ------------------------------------------------

def test_spreadsheet_safe_cells():
    assert spreadsheet_safe('=HYPERLINK("http://x","y")') == "'=HYPERLINK(\"http://x\",\"y\")"
    assert spreadsheet_safe("+1+cmd|' /C calc'!A0") == "'+1+cmd|' /C calc'!A0"
    assert spreadsheet_safe("@SUM(A1:A9)") == "'@SUM(A1:A9)"
    assert spreadsheet_safe("-2+3") == "'-2+3"
    assert spreadsheet_safe("\t=1") == "' =1"
    assert spreadsheet_safe("a\tb\nc") == "a b c"  # one cell stays one cell
    assert spreadsheet_safe("-0.5") == "-0.5" and spreadsheet_safe("+1e3") == "+1e3"  # numbers stay numbers
    assert spreadsheet_safe("LH_IFG") == "LH_IFG"


def test_target_table_neutralises_formulas_in_names_and_text_columns(tmp_path):
    import numpy as np

    names = ['=HYPERLINK("http://evil","click")', "@cmd", "LATL"]
    path = write_target_table({"r": np.array([0.1, 0.2, 0.3]), "hemi": np.array(["=1+1", "L", "R"])},
                              names, tmp_path / "t.tsv")
    table = pd.read_csv(path, sep="\t", dtype=str)
    assert not any(str(v).startswith(("=", "+", "@")) for v in table.to_numpy().ravel())
    assert list(table["target"]) == ["'" + names[0], "'@cmd", "LATL"]
    assert list(table["hemi"]) == ["'=1+1", "L", "R"]


@pytest.mark.slow
def test_formula_headers_of_a_dataset_are_not_published_verbatim(demo_tree, tiny_bert_dir, results_bucket,
                                                                 tmp_path, ledger):
    with ledger.bad_input("formula-like ROI names in a dataset's TSV header") as scope:
        tree = tmp_path / "ds"
        shutil.copytree(demo_tree, tree)
        tsv = tree / "derivatives/brennan2016roi/sub-22/func/sub-22_task-alice_desc-roi6mm_timeseries.tsv"
        lines = tsv.read_text().splitlines()
        header = lines[0].split("\t")
        header[0] = '=HYPERLINK("http://evil.example","open")'
        header[1] = "@SUM(1+1)"
        tsv.write_text("\n".join(["\t".join(header), *lines[1:]]) + "\n")
        make_bucket("formula-src")
        copy_tree_to_s3(tree, "s3://formula-src/ds002322")
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        cfg["dataset"]["source"] = "s3://formula-src/ds002322"
        box = Sandbox(tmp_path / "sandbox").seed()
        path = box.root / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = run_cli(scope, box, "run", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.touched == []
        from pipelines.consume import PublishedAnalysis

        analysis = PublishedAnalysis(proc.stdout.strip().splitlines()[-1], cache_dir=tmp_path / "maps")
        tsvs = [a["path"] for a in analysis.artifacts(kind="statmap_tsv")]
        assert tsvs
        for rel in tsvs:
            table = pd.read_csv(analysis.fetch(rel), sep="\t", dtype=str)
            cells = [*table.columns, *table.to_numpy().ravel()]
            assert not any(str(c).startswith(("=", "@")) for c in cells), rel
            assert "'" + header[0] in set(table["target"])


# --- hostile manifests read by `neuroflow maps` ---------------------------------------------

def _put(output: str, rel: str, body: bytes) -> str:
    ResultStore(output).put_bytes(body, rel)
    return f"{output}/{rel}"


def _bad_manifests() -> dict[str, tuple[bytes, str]]:
    good = valid_manifest()
    missing = {k: v for k, v in good.items() if k != "artifacts"}
    escape = json.loads(json.dumps(good))
    escape["artifacts"][0]["path"] = "../../../home/user/.bashrc"
    wrong_type = json.loads(json.dumps(good))
    wrong_type["metrics"]["18"]["wordrate"]["mean_r"] = "0.9; rm -rf /"
    return {
        "not JSON": (b"{this is not json", "not valid JSON"),
        "not UTF-8": (b'{"a": "\xff\xfe"}', "not UTF-8"),
        "a JSON list": (b"[1, 2, 3]", "not a valid neuroflow manifest"),
        "JSON nested 100,000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        "a required key missing": (json.dumps(missing).encode(), "'artifacts' is a required property"),
        "an artifact path escaping its folder": (json.dumps(escape).encode(), "artifacts/0/path"),
        "a metric of the wrong type": (json.dumps(wrong_type).encode(), "mean_r"),
    }


@pytest.mark.parametrize("name", sorted(_bad_manifests()))
def test_maps_show_refuses_a_bad_manifest_in_one_line(name, results_bucket, sandbox, ledger):
    body, fragment = _bad_manifests()[name]
    with ledger.bad_input(f"maps show: manifest {name}") as scope:
        uri = _put(results_bucket, "ds1/1.0.0/a-0123456789ab/manifest.json", body)
        assert_one_clear_error(run_cli(scope, sandbox, "maps", "show", uri), uri, fragment)
        assert_one_clear_error(run_cli(scope, sandbox, "maps", "get", uri, "report.html"), fragment)
        assert sorted(p.name for p in sandbox.cwd.iterdir()) == sorted({"notes.txt", "analysis", "data",
                                                                        ".hidden"})


def test_maps_show_refuses_a_huge_object_without_reading_it(results_bucket, sandbox, ledger):
    with ledger.bad_input("maps show: a 40 MB object named manifest.json") as scope:
        uri = _put(results_bucket, "ds1/1.0.0/a-0123456789ab/manifest.json", b" " * (40 * 1024 * 1024))
        proc = run_cli(scope, sandbox, "maps", "show", uri, env={"NEUROFLOW_MAX_MANIFEST_BYTES": str(1 << 20)})
        assert_one_clear_error(proc, uri, "41,943,040 bytes")
        assert len(proc.stdout) < 1000
        assert proc.peak_rss_kb < MEMORY_BOUND_KB


def test_maps_show_prints_no_terminal_escape_sequences(results_bucket, sandbox, ledger):
    with ledger.bad_input("maps show/list: escape sequences in a manifest's text") as scope:
        m = valid_manifest()
        m["dataset"]["source"] = "s3://x/\x1b]0;pwned\x07\x1b[2J"
        m["subjects"] = ["18\x1b[31m"]
        rel = publish_fake(results_bucket, m)
        shown = run_cli(scope, sandbox, "maps", "show", f"{results_bucket}/{rel}")
        listed = run_cli(scope, sandbox, "maps", "list", results_bucket)
        assert shown.returncode == 0 and listed.returncode == 0, shown.stderr + listed.stderr
        assert "\x1b" not in shown.stdout + listed.stdout and "\\x1b" in shown.stdout


def test_maps_list_names_a_bad_manifest_and_lists_the_others(results_bucket, sandbox, ledger):
    with ledger.bad_input("maps list: one invalid manifest among good ones") as scope:
        good = [publish_fake(results_bucket, valid_manifest(n=i)) for i in range(2)]
        bad = _put(results_bucket, "ds9/1.0.0/broken-0123456789ab/manifest.json", b"{not json")
        proc = run_cli(scope, sandbox, "maps", "list", results_bucket)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        for rel in good:
            assert f"{results_bucket}/{rel}" in proc.stdout
        warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("neuroflow: warning:")]
        assert len(warnings) == 1 and bad in warnings[0] and "not valid JSON" in warnings[0]


@pytest.mark.parametrize("uri", ["results/relative", "/no/such/results/folder", "s3://Not_A_Bucket",
                                 "http://127.0.0.1:1/x"])
def test_maps_list_refuses_a_uri_that_is_not_s3_nor_a_folder(uri, sandbox, ledger):
    with ledger.bad_input(f"maps list {uri}") as scope:
        assert_one_clear_error(run_cli(scope, sandbox, "maps", "list", uri), uri)


def test_maps_get_works_for_a_manifest_at_a_bucket_root(s3_url, sandbox, ledger):
    with ledger.bad_input("maps get: a manifest at a bucket's root") as scope:
        make_bucket("root-manifest")
        store = ResultStore("s3://root-manifest")
        store.put_bytes(b"<html>report</html>", "report.html")
        store.put_bytes(json.dumps(valid_manifest()).encode(), "manifest.json")
        sandbox.allowed.append(sandbox.cwd / "got.html")  # the file the user asks for
        proc = run_cli(scope, sandbox, "maps", "get", "s3://root-manifest/manifest.json", "report.html",
                       "got.html")
        assert proc.touched == []
        assert proc.returncode == 0, proc.stderr
        assert (sandbox.cwd / "got.html").read_bytes() == b"<html>report</html>"
        listed = run_cli(scope, sandbox, "maps", "list", "s3://root-manifest")
        assert "s3://root-manifest/manifest.json" in listed.stdout


def test_maps_get_never_overwrites_a_users_file(results_bucket, sandbox, ledger):
    with ledger.bad_input("maps get onto an existing file of the user's") as scope:
        m = valid_manifest()
        m["artifacts"][0]["path"] = "notes.txt"
        m["artifacts"][0]["kind"] = "config_yaml"
        body = b"published notes"
        m["artifacts"][0]["bytes"] = len(body)
        m["artifacts"][0]["sha256"] = hashlib.sha256(body).hexdigest()
        prefix = f"ds002322/1.0.4/{m['analysis_id']}"
        ResultStore(results_bucket).put_bytes(body, f"{prefix}/notes.txt")
        uri = _put(results_bucket, f"{prefix}/manifest.json", json.dumps(m).encode())
        refused = run_cli(scope, sandbox, "maps", "get", uri, "notes.txt")  # default dest: ./notes.txt
        assert_one_clear_error(refused, "notes.txt", "already exists", "--overwrite")
        assert (sandbox.cwd / "notes.txt").read_text() == "my lab notes\n"
        assert_one_clear_error(run_cli(scope, sandbox, "maps", "get", uri, "notes.txt", "data"), "is a folder")
        assert scope.touched == 0
        sandbox.allowed.append(sandbox.cwd / "notes.txt")  # the user asks for it to be replaced below
        forced = run_cli(scope, sandbox, "maps", "get", uri, "notes.txt", "--overwrite")
        assert forced.returncode == 0, forced.stderr
        assert (sandbox.cwd / "notes.txt").read_bytes() == body


def test_maps_get_refuses_an_artifact_larger_than_the_manifest_says(results_bucket, sandbox, ledger):
    with ledger.bad_input("maps get: artifact object larger than its manifest entry") as scope:
        m = valid_manifest()
        prefix = f"ds002322/1.0.4/{m['analysis_id']}"
        ResultStore(results_bucket).put_bytes(b"x" * (8 * 1024 * 1024), f"{prefix}/report.html")
        uri = _put(results_bucket, f"{prefix}/manifest.json", json.dumps(m).encode())
        proc = run_cli(scope, sandbox, "maps", "get", uri, "report.html", "r.html")
        assert_one_clear_error(proc, "report.html", "8,388,608 bytes")
        assert not (sandbox.cwd / "r.html").exists() and proc.touched == []
