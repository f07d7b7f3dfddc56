"""How much semantic decoding recovers on small planted data (not a speed: a quality table).

A tiny random GPT-2 (2 layers x 32, word-level tokenizer over a 46-word vocabulary) gives
the features of random word sequences at ~1 word/s (onsets jittered 0.8-1.2 s), resampled
to a 1 s TR grid (Lanczos), delayed 1-3 TRs and mapped by random weights to 40 targets,
plus Gaussian noise of ``noise`` times the signal's standard deviation. An encoding model
(ridge, alpha 10, standardised features) is fitted on ``train words`` of such runs, and
held-out segments of 20 words are decoded (:func:`pipelines.semantic_decoding.decode_segments`,
beam 3) with either every vocabulary word as a candidate (the LM always proposes the true
word) or the LM's 10 likeliest next words (a random LM: the true word is proposed about
10/46 of the time, so the LM, not the brain data, limits recovery). Each row reports the
held-out encoding r (mean over targets), the share of words decoded exactly, the MiniLM
similarity (windows of 10 words) of the decoded to the actual words, the same for the
decodings of time-shifted responses (the null) and the percentile of the former in the
latter. The last rows check the null's level: held-out responses of pure noise (sd 2, no words in
them) under the encoder of the noise-2, 600-word rows; their percentiles should be anywhere in
0-1, not near 1.

Usage::

    python bench/bench_semantic_decoding.py            # the table (about 5 min on 2 loaded cores)
    python bench/bench_semantic_decoding.py --quick    # one small row
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

from pipelines.backend import blas_threads  # noqa: E402
from pipelines.demo import packaged_model_dir  # noqa: E402
from pipelines.features.align import make_delays  # noqa: E402
from pipelines.features.language_model import load_language_model  # noqa: E402
from pipelines.semantic_decoding import decode_segments, fit_semantic_encoder  # noqa: E402
from tests.datasets.planted_decoding import CONTEXT, DELAYS, LAYER, simulated_run  # noqa: E402

TARGETS = 40
VOCAB = sorted(set((
    "alice was beginning to get very tired of sitting by her sister on the bank and "
    "having nothing do once or twice she had peeped into book reading but it no pictures "
    "conversations in what is use a thought without rabbit white pink eyes ran close").split()))


def tiny_causal_lm(path: Path):
    """A random GPT-2 with its LM head and a word-level tokenizer over VOCAB, loaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<unk>"] + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>").save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(path, safe_serialization=True)
    return load_language_model(str(path), device="cpu", head="causal_lm")


def run(lm, rng, n_words, W, noise, scale, planted=True):
    return simulated_run(lm, rng, VOCAB, n_words, W, noise, scale, planted)


def row(lm, embedder, noise: float, train_words: int, candidates: int, n_segments: int, n_null: int, seed: int,
        planted: bool = True):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((len(DELAYS) * lm.hidden_size, TARGETS))
    probe = run(lm, rng, 200, W, 0.0, 1.0)
    scale = float(np.std(make_delays(probe["features"], [len(probe["tr_times"])], DELAYS) @ W))
    runs = [run(lm, rng, 150, W, noise, scale) for _ in range(max(1, train_words // 150))]
    encoder = fit_semantic_encoder([r["features"] for r in runs], [r["responses"] for r in runs], delays=DELAYS,
                                   layer=LAYER, context_words=CONTEXT, alpha=10.0)
    held = [run(lm, rng, 20, W, noise, scale, planted=planted) for _ in range(n_segments)]
    pred = [encoder.predict(s["features"]) for s in held]
    r = np.mean([[np.corrcoef(p[:, k], s["responses"][:, k])[0, 1] for k in range(TARGETS)]
                 for p, s in zip(pred, held)])
    t0 = time.process_time()
    report = decode_segments(encoder, lm, embedder, held, beam=3, candidates=candidates, n_null=n_null)
    cpu = time.process_time() - t0
    acc = np.mean([s.word_accuracy for s in report.segments])
    return r, acc, report, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small row")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "semantic-decoding.md")
    args = ap.parse_args()
    if args.quick:
        grid, n_segments, n_null = [(2.0, 150, "all")], 1, 4
    else:
        grid = [(noise, words, cand) for noise in (0.5, 2.0, 4.0) for words in (150, 600) for cand in ("all", 10)]
        grid += [("noise only", 600, "all"), ("noise only", 600, 10)]
        n_segments, n_null = 3, 20
    load0 = os.getloadavg()
    lines = []
    with tempfile.TemporaryDirectory() as tmp, blas_threads(1):
        lm = tiny_causal_lm(Path(tmp))
        embedder = load_language_model(str(packaged_model_dir()), device="cpu")
        for noise, words, cand in grid:
            k = len(VOCAB) if cand == "all" else int(cand)
            planted = noise != "noise only"
            r, acc, rep, cpu = row(lm, embedder, 2.0 if not planted else noise, words, k, n_segments, n_null, seed=1,
                                   planted=planted)
            null = rep.null_similarity
            example = rep.segments[0]
            lines.append(f"| {noise} | {words} | {cand if cand != 'all' else f'all {k}'} | {r:.2f} | {acc:.0%} | "
                         f"{rep.similarity:.3f} | {null.mean():.3f} ± {null.std():.3f} | {rep.percentile:.2f} | "
                         f"{cpu:.0f} | {' '.join(example.decoded[:8])} / {' '.join(example.actual[:8])} |")
            print(lines[-1], flush=True)
    text = [
        "# Semantic decoding on small planted data: how much it recovers",
        "",
        f"`python bench/bench_semantic_decoding.py{' --quick' if args.quick else ''}` on {platform.machine()}, "
        f"{os.cpu_count()} cores, torch/BLAS threads 1; load average at start {tuple(round(x, 2) for x in load0)}, "
        f"at the end {tuple(round(x, 2) for x in os.getloadavg())}.",
        "",
        __doc__.split("Usage::")[0].strip().split("\n\n", 1)[1].replace("\n", " ").replace("``", "`"),
        f"{n_segments} held-out segment(s) of 20 words per row, {n_null} null decodings each; the word times are "
        "given (not decoded). CPU s: the process CPU time of decoding and scoring every segment and its null.",
        "",
        "| noise / signal sd | train words | candidates | held-out encoding r | words exact | similarity "
        "| null similarity | percentile | CPU s | first 8 decoded / actual words |",
        "|---:|---:|---|---:|---:|---:|---|---:|---:|---|",
        *lines,
        "",
    ]
    args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
