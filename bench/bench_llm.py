"""Language models at the size the field uses: words/s, token passes and memory (`make bench`, issue 17).

For each model (random weights built from a config, nothing downloaded; a byte-level BPE
trained on the demo story, about 1.3 tokens per word), on one story, this measures in one run:

* **one pass**: every token of the story through the model once, in chunks of the model's
  longest input, all hidden states returned: the floor of a sweep;
* **one pass to layer L**: the same through the model's first L blocks only (the rest removed
  for the run), the floor for one layer L: a single layer is extracted from passes stopped
  after its block (:mod:`pipelines.features.layer_taps`);
* **strided**: :func:`pipelines.features.language_model.extract_word_features` (all hidden
  states, a full layer sweep) at each context, with the default stride (``context_words`` new
  words per window: each token through the model about twice) and with ``stride_words: fill``
  (windows as long as the model takes); timed alternately with one pass, best of three each;
  *token passes* is how many times the windows run each story token, *vs one pass* the time
  ratio, and *overhead* the ratio over token passes (1.0x = no work besides the model);
* **sweep, streamed**: :func:`~pipelines.features.language_model.stream_word_features` writing
  every hidden state to its file: peak GPU memory (``torch.cuda.max_memory_allocated``) and
  the process's resident growth;
* **memory**: GPU memory of the weights after loading, in the dtype of the row (and in 8-bit
  through bitsandbytes with ``--quantization 8bit``).

Models: ``gpt2-small`` (12 x 768, 124 M), ``llama-7b`` (LLaMA-2-7B's shape: 32 x 4096,
intermediate 11008, 32 heads, vocabulary 32000, 4096 positions; 6.7 B parameters, 13.5 GB in
bfloat16), ``llama-tiny`` (the same code path at 2 x 64, for the smoke test).

Usage::

    python bench/bench_llm.py --device cpu --models gpt2-small --words 1500 --out bench/results/llm.md
    python bench/bench_llm.py --device cuda --models gpt2-small llama-7b --quantization 8bit \\
        --out bench/results/llm-gpu.md                                   # on a GPU machine
    python bench/bench_llm.py --device cpu --models llama-tiny --words 300 --contexts 8 --out /tmp/llm.md  # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.features.language_model import (  # noqa: E402
    LoadedModel,
    extract_word_features,
    load_language_model,
    stream_word_features,
    word_token_counts,
)
from pipelines.features.layer_files import LayerFiles  # noqa: E402
from pipelines.features.lm_windows import strided_plan  # noqa: E402

TEXTGRID = REPO / "data" / "ds002322-demo" / "stimuli" / "DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"

#: name -> (config class, config keys, dtype on a GPU)
SHAPES = {
    "gpt2-small": ("GPT2", dict(), "float32"),
    "llama-7b": ("Llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                               max_position_embeddings=4096), "bfloat16"),
    "llama-tiny": ("Llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096), "bfloat16"),
}


def story_words(n_words: int) -> list[str]:
    from praatio import textgrid

    tg = textgrid.openTextgrid(str(TEXTGRID), includeEmptyIntervals=False)
    words = [e.label.strip() for e in tg.getTier(tg.tierNames[0]).entries if e.label.strip()]
    return [words[i % len(words)] for i in range(n_words)]


def model_folder(name: str, dest: Path, device: str) -> str:
    """Random weights of the shape ``name`` and a BPE trained on the story, saved as a folder."""
    import torch
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    if (dest / "config.json").is_file():
        return str(dest)
    dest.mkdir(parents=True, exist_ok=True)
    kind, keys, gpu_dtype = SHAPES[name]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(story_words(3000))], vocab_size=800, min_frequency=2,
                            special_tokens=["<|endoftext|>"])
    tok = tf.GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                               eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.model_max_length = keys.get("max_position_embeddings", 1024)
    tok.save_pretrained(dest)
    config = getattr(tf, f"{kind}Config")(**keys)
    torch.manual_seed(0)
    dtype = getattr(torch, gpu_dtype) if device.startswith("cuda") else torch.float32
    build = torch.device(device if device.startswith("cuda") else "cpu")
    with build:  # initialised where it will run: 6.7 B parameters initialise in seconds on a GPU
        net = getattr(tf, f"{kind}Model")(config).to(dtype)
    net.save_pretrained(dest, safe_serialization=True, max_shard_size="20GB")
    del net
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return str(dest)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def first_blocks(lm: LoadedModel, keep: int):
    """The model with only its first ``keep`` blocks for the duration (the minimal pass to a layer)."""
    import torch

    name = next(n for n, m in lm.model.named_modules()
                if isinstance(m, torch.nn.ModuleList) and len(m) == lm.n_layers)
    parent_name, _, attr = name.rpartition(".")
    parent = lm.model.get_submodule(parent_name)
    blocks = getattr(parent, attr)
    setattr(parent, attr, blocks[:keep])
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def one_pass(lm: LoadedModel, ids: "object", device: str, to_host: bool = False, blocks: int | None = None) -> float:
    """Seconds to run every token through the model once (all hidden states); ``to_host``: and
    copy every hidden state to the host as float32 (what a layer sweep must hand on); ``blocks``:
    through the first ``blocks`` blocks only."""
    import torch

    extra = {"use_cache": False} if lm.is_causal else {}
    t0 = time.perf_counter()
    with torch.inference_mode(), (first_blocks(lm, blocks) if blocks is not None else contextlib.nullcontext()):
        for lo in range(0, ids.numel(), lm.max_tokens):
            out = lm.model(input_ids=ids[None, lo: lo + lm.max_tokens].to(lm.device), output_hidden_states=True,
                           **extra)
            if to_host:
                torch.stack([h[0].float() for h in out.hidden_states]).cpu()
            del out
    sync(device)
    return time.perf_counter() - t0


def token_passes(lm: LoadedModel, words: list[str], context: int, stride: int | None) -> float:
    counts, n_special = word_token_counts(words, lm)
    plan = strided_plan(len(words), context, counts, lm.max_tokens - n_special, stride)
    return sum(int(counts[s:e].sum()) for s, _, e in plan) / int(counts.sum())


def gpu_gb(kind: str = "max") -> float:
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    value = torch.cuda.max_memory_allocated() if kind == "max" else torch.cuda.memory_allocated()
    return value / 1e9


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def bench_loaded(rows: list[list[str]], label: str, lm: LoadedModel, words: list[str], contexts: list[int],
                 device: str, tmp: Path, sweep: bool, layer_only: bool = False) -> None:
    import torch

    layers = list(range(lm.n_layers + 1))
    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    n = len(words)
    extract_word_features(words[:200], lm, layers, 8)  # warm-up: kernels chosen, allocator filled
    one_pass(lm, ids[: lm.max_tokens], device)
    t_pass = min(one_pass(lm, ids, device) for _ in range(3))
    rows.append([label, "whole story", "one pass", f"{n / t_pass:,.0f}", "1.00", "1.00x", "", "", "",
                 f"{ids.numel() / n:.2f} tokens/word, chunks of {lm.max_tokens} tokens"])
    print(rows[-1], flush=True)
    middle = [lm.n_layers // 2]
    one_pass(lm, ids[: lm.max_tokens], device, blocks=middle[0])
    t_to = min(one_pass(lm, ids, device, blocks=middle[0]) for _ in range(3))
    rows.append([label, "whole story", f"one pass to layer {middle[0]}", f"{n / t_to:,.0f}", "1.00",
                 f"{t_to / t_pass:.2f}x", "", "1.00x", "", f"the first {middle[0]} of {lm.n_layers} blocks"])
    print(rows[-1], flush=True)
    t_copy = float("nan")
    if not layer_only:
        t_copy = min(one_pass(lm, ids, device, to_host=True) for _ in range(3))
        rows.append([label, "whole story", "one pass, every hidden state to the host", f"{n / t_copy:,.0f}", "1.00",
                     f"{t_copy / t_pass:.2f}x", "", "", "", f"{len(layers)} x {n} tokens x {lm.hidden_size} float32 "
                     f"({len(layers) * ids.numel() * lm.hidden_size * 4 / 1e9:.2f} GB) copied: the floor of a full "
                     "sweep"])
        print(rows[-1], flush=True)
    plan = [] if layer_only else [(c, stride, layers, "sweep") for c in contexts for stride in (None, "fill")]
    plan += [(c, stride, middle, f"layer {middle[0]}") for c in contexts for stride in (None, "fill")]
    for c, stride, which, what in plan:
        passes = token_passes(lm, words, c, None if stride is None else n)
        t_local = t_run = t_layer = float("inf")
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            t_local = min(t_local, one_pass(lm, ids, device))
            if what != "sweep":
                t_layer = min(t_layer, one_pass(lm, ids, device, blocks=which[0]))
            t0 = time.perf_counter()
            extract_word_features(words, lm, which, c, stride_words=stride)
            sync(device)
            t_run = min(t_run, time.perf_counter() - t0)
        ratio = t_run / t_local
        note = f"one pass alongside {t_local:.2f} s, strided {t_run:.2f} s"
        if what == "sweep":
            note += f"; {t_run / t_copy:.2f}x one pass with every hidden state copied"
        else:
            note += f", one pass to the layer {t_layer:.2f} s"
        rows.append([label, str(c), f"strided {what}, stride {'fill' if stride else 'default'}", f"{n / t_run:,.0f}",
                     f"{passes:.2f}", f"{ratio:.2f}x", f"{ratio / passes:.2f}x",
                     "" if what == "sweep" else f"{t_run / t_layer:.2f}x",
                     f"{gpu_gb():.1f}" if device.startswith("cuda") else "", note])
        print(rows[-1], flush=True)
    if sweep and not layer_only:
        spaces = {k: f"layer{k}" for k in layers}
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        rss0 = rss_gb()
        c = contexts[-1]
        t0 = time.perf_counter()
        with LayerFiles(tmp, list(spaces.values()), n, lm.hidden_size) as files:
            stream_word_features(words, lm, layers, c, files, spaces, stride_words="fill")
            sync(device)
            seconds = time.perf_counter() - t0
            first = np.load(files.paths["layer0"], mmap_mode="r")
            assert np.isfinite(first[:: max(1, n // 50)]).all()
        size = len(layers) * n * lm.hidden_size * 4 / 1e9
        rows.append([label, str(c), f"sweep of {len(layers)} hidden states, streamed (fill)", f"{n / seconds:,.0f}",
                     "", "", "", "", f"{gpu_gb():.1f}" if device.startswith("cuda") else "",
                     f"{size:.2f} GB of float32 features written; resident growth {rss_gb() - rss0:.2f} GB"])
        print(rows[-1], flush=True)


def table(args: argparse.Namespace, device: str, rows: list[list[str]], memory: list[str]) -> list[str]:
    import torch
    import transformers

    head = ["model", "context (words)", "extractor", "words/s", "token passes", "vs one pass", "overhead",
            "vs one pass to the layer", "peak GPU GB", "note"]
    return [
        "# Language models at scale: words/s, token passes and memory",
        "",
        f"Written by `bench/bench_llm.py` on {time.strftime('%Y-%m-%d %H:%M:%S')} ({platform.node()}): {device}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Story: {args.words} words of the demo's "
        f"Alice, continued from its start. {'One layer requested (the middle one)' if args.layer_only else 'Sweep rows request every hidden state; layer rows the middle one'}. Load average "
        f"{os.getloadavg()[0]:.2f} when written.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * 6 + ["---"]) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "`token passes`: tokens the windows hold over the story's tokens (the least any extractor with that "
        "context and stride must run). `vs one pass`: time over one pass's (best of three each, alternately). "
        "`overhead`: `vs one pass` over `token passes`, i.e. time spent besides running the windows' tokens "
        "(1.00x = none). `vs one pass to the layer`: time over one pass through the model's first L blocks only "
        "(the least work a layer-L extractor must do at one token pass).",
        "",
        "Memory:",
        *memory,
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["gpt2-small"], choices=sorted(SHAPES))
    parser.add_argument("--words", type=int, default=3000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--quantization", choices=["8bit", "4bit"], default=None,
                        help="also load the largest model this way (bitsandbytes, CUDA only)")
    parser.add_argument("--workdir", default=None, help="where model folders are written (default: a temp dir)")
    parser.add_argument("--layer-only", action="store_true", help="only the single-layer rows (no sweep)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch

    words = story_words(args.words)
    rows: list[list[str]] = []
    memory: list[str] = []
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-llm-"))
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"

    def write() -> None:  # after every model: a run cut short keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(table(args, device, rows, memory)))

    for name in args.models:
        t0 = time.perf_counter()
        folder = model_folder(name, work / name, args.device)
        built = time.perf_counter() - t0
        dtype = SHAPES[name][2] if args.device.startswith("cuda") else "float32"
        variants = [(dtype, None)] + ([(dtype, args.quantization)] if args.quantization and name == args.models[-1]
                                      else [])
        for dt, quant in variants:
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                lm = load_language_model(folder, device=args.device, dtype=dt, quantization=quant)
                loaded = time.perf_counter() - t0
                params = sum(p.numel() for p in lm.model.parameters())
                label = f"{name} ({params / 1e9:.2f} B parameters, {quant or dt})"
                memory.append(f"- {label}: weights on the GPU {gpu_gb('now'):.2f} GB; built in {built:.0f} s, "
                              f"loaded in {loaded:.0f} s" if args.device.startswith("cuda") else
                              f"- {label}: loaded in {loaded:.0f} s")
                print(memory[-1], flush=True)
                with tempfile.TemporaryDirectory(dir=work) as tmp:
                    bench_loaded(rows, label, lm, words, args.contexts if quant is None else args.contexts[-1:],
                                 args.device, Path(tmp), sweep=quant is None, layer_only=args.layer_only)
                del lm
            except Exception as err:  # noqa: BLE001  one variant failing (e.g. bitsandbytes) keeps the others
                memory.append(f"- {name} ({quant or dt}): FAILED: {type(err).__name__}: {str(err)[:300]}")
                print(memory[-1], flush=True)
            gc.collect()
            write()
    print("\n".join(table(args, device, rows, memory)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
