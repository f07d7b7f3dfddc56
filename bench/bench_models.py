"""What publishing the models costs over the fit: the weights' solve, the file, and how exactly they reproduce it.

At ``bench_fit.py``'s default size (3,000 training TRs in 5 runs, a held-out run of 300 TRs, 1,024
features, 20,000 targets, 11 alphas; synthetic float32 data with a planted signal in two thirds of
the targets): the cross-validated fit (``fit_encoding`` with the held-out run as test set, numpy
backend), then :func:`pipelines.models.weights.ridge_weights` on its training rows with its alphas,
the safetensors file (float32 and float16) and the largest difference between the model's prediction
of the held-out run and the fit's own, and between the r they give. Writes ``bench/results/models.md``.

    .venv/bin/python bench/bench_models.py [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.fit import fit_encoding  # noqa: E402
from pipelines.models.export import encode_model  # noqa: E402
from pipelines.models.weights import predict_rows, ridge_weights  # noqa: E402


def data(n_train: int, n_test: int, n_features: int, n_targets: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    X = rng.standard_normal((n, n_features)).astype(np.float32)
    W = np.zeros((n_features, n_targets), np.float32)
    k = 2 * n_targets // 3
    W[:32, :k] = rng.standard_normal((32, k)) * rng.uniform(0.02, 0.3, k)
    Y = (X @ W + rng.standard_normal((n, n_targets))).astype(np.float32)
    groups = np.concatenate([np.repeat(np.arange(5), n_train // 5), np.full(n_test, 5)])
    return X, Y, groups


def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.md"))
    args = ap.parse_args()
    size = (300, 60, 64, 500) if args.quick else (3000, 300, 1024, 20000)
    X, Y, groups = data(*size)
    alphas = np.logspace(-1, 4, 11)
    t0 = time.perf_counter()
    fit = fit_encoding(X, Y, groups, alphas, backend="numpy", test_groups=[5])
    t_fit = time.perf_counter() - t0
    train, test = np.flatnonzero(groups != 5), np.flatnonzero(groups == 5)
    t0 = time.perf_counter()
    W, b = ridge_weights(X, Y, train, fit.alpha.astype(np.float64), fit.valid)
    t_weights = time.perf_counter() - t0
    pred = predict_rows(X[test], W, b)
    d_pred = float(np.abs(pred - fit.predictions[test]).max())
    d_r = float(np.abs(corr(pred, Y[test]) - fit.r).max())
    rows = []
    for dtype in (np.float32, np.float16):
        t0 = time.perf_counter()
        body = encode_model({"weights": W.astype(dtype), "intercept": b.astype(dtype), "alpha": fit.alpha,
                             "valid": fit.valid.astype(np.uint8), "r": fit.r}, {"format": "bench"})
        t_enc = time.perf_counter() - t0
        Wd = W.astype(dtype).astype(np.float32)
        r_d = corr(predict_rows(X[test], Wd, b.astype(dtype)), Y[test])
        rows.append((np.dtype(dtype).name, len(body), t_enc, float(np.abs(r_d - fit.r).max())))
    n_train, n_test, p, t = size
    load = os.getloadavg()
    lines = [
        "# Published models: cost over the fit, and how exactly they reproduce it",
        "",
        f"`bench/bench_models.py{' --quick' if args.quick else ''}` on {platform.node()} "
        f"({os.cpu_count()} CPUs), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min).",
        f"{n_train:,} training TRs in 5 runs, a held-out run of {n_test:,} TRs, {p:,} features, {t:,} targets, "
        f"{alphas.size} alphas, numpy backend.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| cross-validated fit (`fit_encoding`, held-out run) | {t_fit:.1f} |",
        f"| model weights (`ridge_weights`: one eigh, `X^T Y`, per-alpha solve) | {t_weights:.1f} |",
        "",
        f"The model's held-out prediction against the fit's: largest difference {d_pred:.2e} (z units); "
        f"largest difference of r {d_r:.2e}.",
        "",
        "| weights dtype | file bytes | encode seconds | largest r difference from the fit |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {size_b:,} | {t_e:.2f} | {dr:.2e} |" for name, size_b, t_e, dr in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
