"""Peak memory of a language-model layer sweep: every layer in memory against streamed (`make bench`).

A sweep of every hidden state of a GPT-2-shaped model with random weights (``--layers`` x
``--hidden``, built from a config, nothing downloaded; a byte-level BPE trained on the demo
story) over stories of several lengths, in two ways, each in a fresh process:

* **in memory** (what the features step did before): :func:`extract_word_features` returns
  every layer, then the cache entry is built in memory (:func:`pipelines.cache.save_npz`);
* **streamed** (what it does now): :func:`stream_word_features` writes each batch's rows of
  each layer to that layer's file, and :func:`pipelines.features.layer_files.write_npz` joins
  the files into the entry block by block.

Peak memory is the process's resident high-water mark (``VmHWM``) after the model is loaded
and warmed up, minus the resident memory then (the high-water mark is reset through
``/proc/self/clear_refs``, Linux only). Both entries are checked to hold the same numbers.
A forward pass's own hidden states (every layer of one batch of ``batch_tokens`` tokens)
are the floor of both ways; the streamed peak should not grow with the story.

Usage::

    python bench/bench_sweep.py --out bench/results/sweep.md
    python bench/bench_sweep.py --words 300 600 --layers 4 --hidden 64 --out /tmp/sweep.md   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTGRID = REPO / "data" / "ds002322-demo" / "stimuli" / "DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"


def story_words(n_words: int) -> list[str]:
    from pipelines.stimulus import read_textgrid_words

    words = list(read_textgrid_words(TEXTGRID)["word"])
    return [words[i % len(words)] for i in range(n_words)]


def model_folder(dest: Path, layers: int, hidden: int) -> str:
    """A GPT-2-shaped model with random weights and a BPE trained on the story."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    if not (dest / "model.safetensors").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([" ".join(story_words(3000))], vocab_size=1500, min_frequency=2,
                                special_tokens=["<|endoftext|>"])
        GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token="<|endoftext|>").save_pretrained(dest)
        torch.manual_seed(0)
        GPT2Model(GPT2Config(n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64))).save_pretrained(
            dest, safe_serialization=True)
    return str(dest)


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    import torch

    from pipelines.cache import save_npz
    from pipelines.features.language_model import extract_word_features, load_language_model, stream_word_features
    from pipelines.features.layer_files import LayerFiles, write_npz

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm = load_language_model(args.model, device="cpu")
    layers = list(range(lm.n_layers + 1))
    words = story_words(args.n)
    extract_word_features(words[:50], lm, layers, args.context)  # warm up (allocator, tokenizer)
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark
    base = _rss_kb("VmRSS")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        entry = Path(tmp) / "entry.npz"
        if args.mode == "in memory":
            feats = extract_word_features(words, lm, layers, args.context)
            arrays = {f"layer{k}": v for k, v in feats.items()}
            arrays["__times"] = np.arange(len(words), dtype=np.float64)
            entry.write_bytes(save_npz(arrays))
            del feats, arrays
        else:
            spaces = {k: f"layer{k}" for k in layers}
            with LayerFiles(tmp, list(spaces.values()), len(words), lm.hidden_size) as files:
                stream_word_features(words, lm, layers, args.context, files, spaces)
            write_npz(entry, files.paths, {"__times": np.arange(len(words), dtype=np.float64)})
        seconds = time.perf_counter() - start
        peak = _rss_kb("VmHWM")
        with np.load(entry) as npz:
            checksum = float(sum(np.float64(npz[f"layer{k}"][:: max(1, args.n // 50)].sum()) for k in layers))
    print(json.dumps({"peak_mb": (peak - base) / 1024, "seconds": seconds, "checksum": checksum,
                      "n_layers": lm.n_layers, "hidden": lm.hidden_size}))


def measure(model: str, mode: str, n: int, context: int, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--n", str(n),
           "--context", str(context), "--workdir", workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--words", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sweep.md")
    ap.add_argument("--workdir", default=None, help="where the layer files and entries go (default: a temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        model = model_folder(Path(tmp) / "model", args.layers, args.hidden)
        rows = []
        for n in args.words:
            got = {mode: measure(model, mode, n, args.context, workdir) for mode in ("in memory", "streamed")}
            a, b = got["in memory"], got["streamed"]
            if not np.isclose(a["checksum"], b["checksum"], rtol=1e-5):
                raise SystemExit(f"the two entries differ at {n} words: {a['checksum']} vs {b['checksum']}")
            one_layer = n * a["hidden"] * 4 / 2**20
            for mode, r in got.items():
                n_states = r["n_layers"] + 1
                rows.append(f"| {mode} | {n:,} | {n_states} x {r['hidden']} | {one_layer * n_states:.0f} "
                            f"| {one_layer:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] / one_layer:.1f} "
                            f"| {r['seconds']:.1f} |")
                print(rows[-1], flush=True)
    lines = [
        "# Layer sweep: peak memory, every layer in memory against streamed",
        "",
        f"`python bench/bench_sweep.py` on {platform.node() or 'this machine'} ({os.cpu_count()} CPUs, "
        f"{platform.python_version()}), {time.strftime('%Y-%m-%d')}. GPT-2-shaped model with random weights, "
        f"every hidden state (embeddings + {args.layers} layers) of {args.hidden} dims, {args.context} words of "
        "context, strided windows, float32, CPU. Peak: resident high-water mark above the warmed-up process "
        "(model loaded), while extracting and writing the cache entry. Both entries hold the same numbers.",
        "",
        "| sweep | words | hidden states | all layers (MB) | one layer (MB) | peak above baseline (MB) "
        "| peak / one layer | time (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "In memory, the peak grows with the story (every layer, then the entry's bytes); streamed, it is the "
        "forward pass's own working set for one batch (``batch_tokens``), whatever the story's length. "
        f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the machine is "
        "shared: times are indicative, peaks are not affected).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
