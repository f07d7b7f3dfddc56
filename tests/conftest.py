"""Shared fixtures: seeded rng, tiny random transformers models saved to disk."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Airflow reads its configuration when first imported: point it at a throwaway home
# (SQLite) and at this repository's dags/ before any test imports it.
_AIRFLOW_HOME = Path(os.environ.get("NEUROFLOW_TEST_AIRFLOW_HOME", "/tmp/neuroflow-test-airflow-%d" % os.getpid()))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(Path(__file__).resolve().parents[1] / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _save_tiny_tokenizer(path: Path, kind: str) -> None:
    """A word-level tokenizer built offline (no hub access) over a small vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        "alice was beginning to get very tired of sitting by her sister on the bank and "
        "having nothing do once or twice she had peeped into book reading but it no pictures "
        "conversations in what is use a thought without rabbit white pink eyes ran close"
    ).split()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<|endoftext|>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                       bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A BERT with random weights (2 layers, hidden 32) saved with safetensors."""
    import torch
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab_size = _save_tiny_tokenizer(path, "bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2 with random weights (2 layers, hidden 32) saved with safetensors."""
    import torch
    from transformers import GPT2Config, GPT2Model

    path = tmp_path_factory.mktemp("tiny-gpt2")
    vocab_size = _save_tiny_tokenizer(path, "gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=1024)
    GPT2Model(cfg).save_pretrained(path, safe_serialization=True)
    return path


# --- a real S3 server over HTTP -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3_url():
    """moto's S3 server in a child process on 127.0.0.1; the AWS env points at it."""
    from pipelines.devserver import aws_env, start_s3_server, stop

    url, proc = start_s3_server()
    old = {k: os.environ.get(k) for k in aws_env(url)}
    os.environ.update(aws_env(url))
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop(proc)


@pytest.fixture
def s3(s3_url):
    """A boto3 client for the test server."""
    from pipelines.s3 import s3_client

    return s3_client("neuroflow-test")


def make_bucket(name: str) -> None:
    from pipelines.devserver import create_public_bucket
    from pipelines.s3 import s3_client

    if name == "openneuro.org":
        create_public_bucket(name)
        return
    client = s3_client(name)
    try:
        client.create_bucket(Bucket=name)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


SIM_RESOLUTION_MM = 8.0


@pytest.fixture(scope="session")
def demo_tree(tmp_path_factory) -> Path:
    """The bundled demo dataset plus a simulated subject driven by word rate only (fast)."""
    import shutil

    from pipelines.demo import DEMO_SOURCE, SIM_N_TRS, SIM_TR, TEXTGRID, write_simulated_subject
    from pipelines.features.align import lanczos_resample
    from pipelines.stimulus import read_textgrid_words

    dest = tmp_path_factory.mktemp("demo") / "ds002322"
    shutil.copytree(DEMO_SOURCE, dest)
    words = read_textgrid_words(dest / TEXTGRID)
    times = SIM_TR * np.arange(SIM_N_TRS)
    mid = ((words["onset"] + words["offset"]) / 2).to_numpy()
    drivers = lanczos_resample(np.ones((len(words), 1), np.float32), mid, times)
    planted = write_simulated_subject(dest, drivers, resolution_mm=SIM_RESOLUTION_MM, snr=0.8)
    np.save(dest.parent / "planted.npy", planted)
    return dest


@pytest.fixture(scope="session")
def openneuro_demo(s3_url, demo_tree) -> str:
    """The demo dataset served as s3://openneuro.org/ds002322 by the test server."""
    from pipelines.resultstore import copy_tree_to_s3

    make_bucket("openneuro.org")
    copy_tree_to_s3(demo_tree, "s3://openneuro.org/ds002322")
    return "s3://openneuro.org/ds002322"


def demo_config(model_dir: Path, output: str, subjects=("18", "sim01"), **overrides) -> dict:
    """The demo config with a tiny model, as a dict."""
    import yaml

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["dataset"]["subjects"] = list(subjects)
    cfg["features"][1]["model"] = str(model_dir)
    cfg["features"][1]["layer"] = 2
    cfg["output"] = output
    cfg["compute"]["dask"] = "none"
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def source_with_a_truncated_subject(demo_tree: Path, tmp_path: Path, bucket: str) -> str:
    """The demo dataset with sub-23's run cut to 150 samples, served as ``s3://<bucket>/ds002322``
    (one bad subject among good ones); returns that source URI."""
    import shutil

    from pipelines.resultstore import copy_tree_to_s3

    tree = tmp_path / "ds"
    shutil.copytree(demo_tree, tree)
    tsv = tree / "derivatives/brennan2016roi/sub-23/func/sub-23_task-alice_desc-roi6mm_timeseries.tsv"
    tsv.write_text("\n".join(tsv.read_text().splitlines()[:150]) + "\n")  # a truncated run
    make_bucket(bucket)
    copy_tree_to_s3(tree, f"s3://{bucket}/ds002322")
    return f"s3://{bucket}/ds002322"


@pytest.fixture
def results_bucket(s3_url, request) -> str:
    """A fresh, empty results bucket per test."""
    import re

    name = "res-" + re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    make_bucket(name)
    return f"s3://{name}"


# --- the reliability ledger: what was broken, and what survived -----------------------

class Ledger:
    """Counts injected faults and bad inputs; `make reliability` prints the table.

    Besides survived / refused, each row carries what an attacker would look for: artifacts
    lost, tracebacks shown to the user, and files touched outside the dataset, the cache and
    the output (see :mod:`tests.hostile`)."""

    def __init__(self):
        self.rows: list[dict] = []

    def record(self, category: str, name: str, ok: bool, lost: int = 0, tracebacks: int = 0,
               touched: int = 0) -> None:
        self.rows.append({"category": category, "name": name, "ok": ok, "lost": lost,
                          "tracebacks": tracebacks, "touched": touched})

    def table(self) -> list[str]:
        faults = [r for r in self.rows if r["category"] == "fault"]
        inputs = [r for r in self.rows if r["category"] == "bad_input"]
        lines = ["| faults injected | survived | bad inputs tried | refused cleanly | artifacts lost "
                 "| tracebacks shown | files touched outside |",
                 "|---:|---:|---:|---:|---:|---:|---:|",
                 f"| {len(faults)} | {sum(r['ok'] for r in faults)} | {len(inputs)} | "
                 f"{sum(r['ok'] for r in inputs)} | {sum(r['lost'] for r in self.rows)} | "
                 f"{sum(r['tracebacks'] for r in self.rows)} | {sum(r['touched'] for r in self.rows)} |"]
        failed = [f"- {r['category']} {r['name']}: NOT survived" for r in self.rows if not r["ok"]]
        return lines + failed


LEDGER = Ledger()


@pytest.fixture
def ledger(request):
    """`with ledger.fault("name")` / `with ledger.bad_input("name")`: survived unless it raises.

    Inside the block, `scope.lost`, `scope.tracebacks` and `scope.touched` may be set (or
    added to by :func:`tests.hostile.run_cli`); they are recorded with the row."""
    from contextlib import contextmanager

    class Scope:
        lost = 0
        tracebacks = 0
        touched = 0

        @contextmanager
        def _track(self, category, name):
            self.lost = self.tracebacks = self.touched = 0
            try:
                yield self
            except BaseException:
                LEDGER.record(category, name, False, self.lost, self.tracebacks, self.touched)
                raise
            LEDGER.record(category, name, True, self.lost, self.tracebacks, self.touched)

        def fault(self, name):
            return self._track("fault", name)

        def bad_input(self, name):
            return self._track("bad_input", name)

    return Scope()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not LEDGER.rows:
        return
    lines = LEDGER.table()
    terminalreporter.write_sep("-", "reliability")
    for line in lines:
        terminalreporter.write_line(line)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability.md").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, one per test module (`tests/browser.py`)."""
    from .browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.fail("Debian's chromium is not installed; `make test` installs it (apt-get install chromium)")
    b = Browser()
    yield b
    b.close()
