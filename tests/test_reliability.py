"""Faults injected and bad inputs tried: each test asserts the final state, not just "no exception"."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml

from pipelines.config import parse_config
from pipelines.consume import read_manifest
from pipelines.errors import ModelError, TransientIOError
from pipelines.resultstore import ResultStore

from .conftest import demo_config, source_with_a_truncated_subject
from .faultproxy import FaultProxy

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d neuroflow: ")


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def clear_bucket(uri: str) -> None:
    store = ResultStore(uri)
    for obj in store.list():
        store.client.delete_object(Bucket=store.bucket, Key=obj.key)


def strip_times(manifest: dict) -> dict:
    m = json.loads(json.dumps(manifest))
    m["provenance"].pop("started")
    m["provenance"].pop("finished")
    return m


# --- faults -------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_while_uploading_artifacts_then_retry(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path,
                                                       ledger):
    with ledger.fault("SIGKILL during artifact upload, then retry") as scope:
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22", "sim01"])
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        analysis = parse_config(cfg)
        manifest_rel = analysis.publish_prefix[len(results_bucket) + 1:] + "/manifest.json"
        store = ResultStore(results_bucket)

        clean = cli("run", str(path), "--cache-dir", str(tmp_path / "clean"))
        assert clean.returncode == 0, clean.stderr
        clean_manifest = json.loads(store.get_bytes(manifest_rel))
        clear_bucket(results_bucket)

        killed = cli("run", str(path), "--cache-dir", str(tmp_path / "killed"),
                     env={"NEUROFLOW_FAILPOINTS": "publish.upload=5:kill"})
        assert killed.returncode == -signal.SIGKILL
        keys = [o.key for o in store.list()]
        published = [k for k in keys if k.startswith(analysis.publish_prefix[len(results_bucket) + 1:])]
        assert 0 < len(published) and not store.exists(manifest_rel)  # half uploaded, nothing committed

        retry = cli("run", str(path), "--cache-dir", str(tmp_path / "killed"))
        assert retry.returncode == 0, retry.stderr
        final = json.loads(store.get_bytes(manifest_rel))
        assert strip_times(final) == strip_times(clean_manifest)
        prefix = ResultStore(analysis.publish_prefix)
        import hashlib

        lost = sum(hashlib.sha256(prefix.get_bytes(a["path"])).hexdigest() != a["sha256"]
                   for a in final["artifacts"])
        scope.lost = lost
        assert lost == 0


@pytest.mark.slow
def test_dask_worker_killed_during_a_sharded_fit(ledger):
    from dask.distributed import Client, LocalCluster

    from pipelines.fit import fit_encoding

    with ledger.fault("dask worker SIGKILLed mid-fit") as scope:
        rng = np.random.default_rng(0)
        groups = np.repeat(np.arange(4), 150)
        X = rng.standard_normal((600, 60)).astype(np.float32)
        W = rng.standard_normal((60, 3000)).astype(np.float32) * (rng.random(3000) < 0.3)
        Y = (X @ W + 3 * rng.standard_normal((600, 3000))).astype(np.float32)
        alphas = [1.0, 10.0, 100.0, 1000.0]
        reference = fit_encoding(X, Y, groups, alphas, backend="numpy", n_targets_chunk=100)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            pids = list(client.run(os.getpid).values())
            result: dict = {}
            thread = threading.Thread(target=lambda: result.setdefault(
                "fit", fit_encoding(X, Y, groups, alphas, backend="numpy", n_targets_chunk=100, client=client)))
            thread.start()
            deadline = time.monotonic() + 60
            while not any(client.processing().values()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            os.kill(pids[0], signal.SIGKILL)
            thread.join(300)
            assert not thread.is_alive() and "fit" in result
            got = result["fit"]
        np.testing.assert_array_equal(got.alpha, reference.alpha)
        np.testing.assert_allclose(got.r, reference.r, atol=1e-5)
        assert got.r.shape == (3000,) and np.isfinite(got.r).all()  # every target once, none missing
        scope.lost = 0


def _slow_column_sums(offset: float, Y: np.ndarray, n_threads: int | None = None) -> dict:
    """A chunk task slow enough for its worker to die while holding its columns."""
    time.sleep(0.5)
    return {"sums": Y.sum(axis=0) + offset}


@pytest.mark.slow
def test_chunk_columns_lost_with_their_worker_are_sent_again(ledger):
    """A killed worker takes its scattered columns of Y with it: dask cancels the chunks
    that needed them, and neuroflow sends those columns again (each chunk exactly once)."""
    from dask.distributed import Client, LocalCluster

    from pipelines.fit import _run_chunks

    with ledger.fault("dask worker holding chunks' columns of Y SIGKILLed") as scope:
        Y = np.arange(6 * 80, dtype=np.float32).reshape(6, 80)
        chunks = [np.arange(i, i + 4) for i in range(0, 80, 4)]
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            victim = min(client.run(os.getpid).items())

            def kill_when_busy():
                deadline = time.monotonic() + 30
                while not client.processing().get(victim[0]) and time.monotonic() < deadline:
                    time.sleep(0.02)
                os.kill(victim[1], signal.SIGKILL)

            killer = threading.Thread(target=kill_when_busy)
            killer.start()
            parts = _run_chunks(_slow_column_sums, 1.0, Y, chunks, client, 1)
            killer.join()
            assert victim[0] not in client.nthreads()  # the worker did die during the run
        got = np.concatenate([p["sums"] for p in parts])
        np.testing.assert_array_equal(got, Y.sum(axis=0) + 1.0)  # every column once, none missing
        scope.lost = 0


@pytest.fixture
def proxied(s3_url, monkeypatch):
    """The S3 endpoint seen by neuroflow goes through a fault-injecting proxy."""
    with FaultProxy(s3_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.mark.slow
def test_throttling_and_a_short_outage_are_retried(openneuro_demo, tiny_bert_dir, results_bucket, proxied,
                                                   tmp_path, ledger):
    from pipelines.run import run_analysis

    with ledger.fault("S3 throttling (3 x 503 SlowDown) and a 3 s outage"):
        cfg = parse_config(demo_config(tiny_bert_dir, results_bucket, subjects=["22"]))
        proxied.slowdown = 3

        def outage():  # mid-run: once the run has made a few requests past the throttled ones
            deadline = time.monotonic() + 120
            while proxied.counts["requests"] < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            proxied.down_until = time.monotonic() + 3.0

        threading.Thread(target=outage, daemon=True).start()
        result = run_analysis(cfg, cache_dir=tmp_path / "cache")
        assert proxied.counts["slowdown"] == 3 and proxied.counts["reset"] > 0
        manifest = read_manifest(result["manifest_uri"])
        assert manifest["status"] == "complete"


def test_a_persistent_outage_fails_retryably_and_publishes_nothing(openneuro_demo, tiny_bert_dir,
                                                                   results_bucket, proxied, tmp_path,
                                                                   monkeypatch, ledger):
    from pipelines.run import run_analysis

    with ledger.fault("persistent S3 outage"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        cfg = parse_config(demo_config(tiny_bert_dir, results_bucket, subjects=["22"]))
        proxied.down_until = time.monotonic() + 3600
        with pytest.raises(TransientIOError, match="cannot reach the S3 endpoint"):
            run_analysis(cfg, cache_dir=tmp_path / "cache")
        proxied.down_until = 0
        assert not ResultStore(results_bucket).exists(
            cfg.publish_prefix[len(results_bucket) + 1:] + "/manifest.json")


def test_an_outage_while_the_watch_state_is_read_or_written_is_one_retryable_error(results_bucket, proxied,
                                                                                  monkeypatch, ledger):
    """The watch state's conditional read and put go through the result store: an unreachable endpoint
    is one TransientIOError naming the state, and the state is left as it was."""
    from pipelines.watch import WatchState

    with ledger.fault("S3 outage on the watch state"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        state = WatchState(results_bucket, "outage")
        record, etag = state.read()
        assert etag is None and state.write(record, etag)
        record, etag = state.read()
        proxied.down_until = time.monotonic() + 3600
        for attempt in (state.read, lambda: state.write({**record, "seen": ["v2"]}, etag)):
            with pytest.raises(TransientIOError, match=r"cannot reach the S3 endpoint for s3://.*outage\.json"):
                attempt()
        proxied.down_until = 0
        assert state.read() == (record, etag)


def test_a_corrupt_feature_cache_entry_is_recomputed(openneuro_demo, tiny_bert_dir, results_bucket, tmp_path,
                                                     ledger):
    from pipelines.cache import load_npz as _load_npz
    from pipelines.steps import extract_features

    with ledger.fault("corrupt feature cache entry"):
        cfg = parse_config(demo_config(tiny_bert_dir, results_bucket, subjects=["22"]))
        first = extract_features(cfg, "minilmL4", cache_dir=tmp_path)
        store = ResultStore(results_bucket)
        (rel,) = first["entries"].values()  # one story, one cache entry
        good = store.get_bytes(rel)
        store.client.put_object(Bucket=store.bucket, Key=store.key(rel), Body=good[: len(good) // 2])
        again = extract_features(cfg, "minilmL4", cache_dir=tmp_path)
        assert again["computed"] is True and again["key"] == first["key"]
        np.testing.assert_array_equal(_load_npz(store.get_bytes(rel))["values"], _load_npz(good)["values"])
        third = extract_features(cfg, "minilmL4", cache_dir=tmp_path)
        assert third["computed"] is False


@pytest.mark.slow
def test_one_bad_subject_among_good_ones(demo_tree, tiny_bert_dir, results_bucket, tmp_path, ledger):
    with ledger.fault("one bad subject among good ones"):
        source = source_with_a_truncated_subject(demo_tree, tmp_path, "reliability-src")
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22", "23"])
        cfg["dataset"]["source"] = source
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = cli("run", str(path), "--cache-dir", str(tmp_path / "cache"))
        assert proc.returncode == 3, proc.stderr
        assert "sub-23 failed" in proc.stderr and "truncated" in proc.stderr
        manifest = read_manifest(proc.stdout.strip().splitlines()[-1])
        assert manifest["status"] == "partial"
        assert manifest["subject_info"]["22"]["status"] == "ok" and "22" in manifest["metrics"]
        assert manifest["subject_info"]["23"]["status"] == "failed"
        assert "sub-23" in manifest["subject_info"]["23"]["error"] and "23" not in manifest["metrics"]


# --- bad inputs ----------------------------------------------------------------------

BAD_CONFIGS = {
    "unknown key": (lambda c: c.update(modle={}), "unknown key 'modle'"),
    "misspelled nested key": (lambda c: c["model"].update(alpahs=[1]), "Did you mean 'alphas'"),
    "wrong type": (lambda c: c["model"].update(delays="1,2"), "model.delays"),
    "negative alphas": (lambda c: c["model"].update(alphas=[-1, 10]), "'model.alphas' must be positive"),
    "empty alphas": (lambda c: c["model"].update(alphas=[]), "model.alphas"),
    "dataset id with ..": (lambda c: c["dataset"].update(source="s3://openneuro.org/../x"), "contains '..'"),
    "absolute word-timing path": (lambda c: c["dataset"]["word_timings"].update(files={"alice": "/etc/passwd"}),
                                  "is absolute"),
    "// in a key": (lambda c: c["dataset"]["responses"].update(derivatives=["derivatives//x"]), "contains '//'"),
    "NUL in a key": (lambda c: c["dataset"]["word_timings"].update(files={"alice": "a\x00b"}), "control character"),
    "look-alike characters": (lambda c: c["dataset"].update(source="s3://openneuro.org/ds00232\u0430"),
                              "non-ASCII"),
    "private dask address from a trigger": (lambda c: c["compute"].update(dask="http://10.0.0.1:8786"),
                                            "compute.dask"),
    "model URL to a link-local address": (lambda c: c["features"][1].update(
        model="http://169.254.169.254/latest/meta-data"), "URLs are refused"),
    "output neither s3 nor an absolute folder": (lambda c: c.update(output="results/out"), "not an absolute path"),
    "delays beyond 50 TRs": (lambda c: c["model"].update(delays=[60]), "within ±50"),
    "folds shorter than the delays": (lambda c: c["model"].update(delays=[1, 2, 3, 4], n_folds=60),
                                      "too short for delays up to 4"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_cleanly(name, openneuro_demo, tiny_bert_dir, results_bucket, tmp_path, ledger):
    mutate, fragment = BAD_CONFIGS[name]
    with ledger.bad_input(name):
        cfg = demo_config(tiny_bert_dir, results_bucket, subjects=["22"])
        mutate(cfg)
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        proc = cli("run", str(path), "--cache-dir", str(tmp_path / "cache"))
        # progress lines (stage by stage, on stderr) may come before an error found by a later stage
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("neuroflow: error: ")
        if fragment:
            assert fragment in lines[0], lines[0]
        assert [o.key for o in ResultStore(results_bucket).list() if o.key.endswith("manifest.json")] == []


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('NF_SENTINEL', '/tmp/nf-sentinel')}",))


def test_a_pickled_model_is_never_loaded(tmp_path, tiny_bert_dir, monkeypatch, ledger):
    from pipelines.features.language_model import load_language_model

    with ledger.bad_input("model folder holding a code-running pickle"):
        model = tmp_path / "evil"
        model.mkdir()
        for f in tiny_bert_dir.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, model / f.name)
        sentinel = tmp_path / "SENTINEL"
        monkeypatch.setenv("NF_SENTINEL", str(sentinel))
        (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
        with pytest.raises(ModelError, match="safetensors"):
            load_language_model(str(model))
        assert not sentinel.exists()


def test_a_model_asking_for_remote_code_is_refused(tmp_path, tiny_bert_dir, ledger):
    from pipelines.features.language_model import load_language_model

    with ledger.bad_input("model requiring trust_remote_code"):
        model = tmp_path / "remote"
        shutil.copytree(tiny_bert_dir, model)
        cfg = json.loads((model / "config.json").read_text())
        cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
        (model / "config.json").write_text(json.dumps(cfg))
        (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
        with pytest.raises(ModelError, match="never runs remote code"):
            load_language_model(str(model))
        cfg["model_type"] = "evil-custom"  # an architecture transformers does not ship
        (model / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match="remote code|cannot be loaded"):
            load_language_model(str(model))


def test_nan_inf_and_constant_voxels_are_reported_not_fatal(ledger):
    from pipelines.fit import fit_encoding

    with ledger.bad_input("NaN, Inf and constant voxels"):
        rng = np.random.default_rng(1)
        groups = np.repeat(np.arange(4), 80)
        X = rng.standard_normal((320, 8)).astype(np.float32)
        Y = (X @ rng.standard_normal((8, 20)) + rng.standard_normal((320, 20))).astype(np.float32)
        Y[:, 0] = 5.0
        Y[10, 1] = np.nan
        Y[20, 2] = np.inf
        res = fit_encoding(X, Y, groups, [1.0, 10.0, 100.0])
        assert list(np.flatnonzero(~res.valid)) == [0, 1, 2]
        assert np.isnan(res.r[:3]).all() and (res.r[3:] > 0.3).all()
