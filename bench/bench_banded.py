"""Banded ridge: neuroflow's fit against a minimal solver and himalaya (`make bench`).

On the same synthetic data (two bands of delayed features, runs z-scored, a planted
mixture of both bands in every target), with the same search budget (himalaya's
``n_iter`` band-weight draws, same seed, the same alphas, leave-one-run-out inner
splits in each outer training set, the same held-out runs), this times:

* **neuroflow** :func:`pipelines.fit.fit_banded_encoding` (numpy backend): one
  eigendecomposition of each outer training set's scaled Gram per draw, every inner split,
  alpha and target from it (inner fits by deletion of the split's rows,
  :mod:`pipelines.fit.banded`);
* a **minimal solver** written here in plain numpy: the same grid (draws x alphas), for
  each outer fold, inner split and draw one ``eigh`` of the scaled centred Gram, every
  alpha and target by matrix products, best (draw, alpha) per target by mean inner squared
  error, refit, held-out prediction split per band;
* **himalaya** ``BandedRidgeCV`` (numpy backend), called as its documentation does, on the
  outer training set (centred), with ``cv`` the inner splits, ``solver_params`` holding
  ``n_iter`` and ``alphas``, the held-out
  prediction split per band from ``coef_`` (``predict(split=True)`` refuses ``fit_intercept``).

Every row's R² split is compared with himalaya's (largest absolute difference), and the
share of the planted targets whose larger split is the band that carries more signal.
All rows run in this process, one after the other, with the BLAS on ``--threads``
threads; the load average is recorded (the machine is shared), and each row's CPU time
beside its wall time: with one BLAS thread the CPU time is the row's own work, which other
jobs on the machine do not inflate; the ratios are taken on it.

Usage::

    python bench/bench_banded.py --out bench/results/banded.md      # 3-6 minutes on 2 cores
    python bench/bench_banded.py --sizes wide --out /tmp/banded.md
    python bench/bench_banded.py --quick --out /tmp/banded.md        # seconds, meaningless timings
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "banded.md"))
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: every row, no meaningful timing")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads for every row")
    parser.add_argument("--sizes", default="default,wide", help="comma-separated: default, wide (see SIZES)")
    return parser.parse_args()


#: name -> (samples, runs, targets, features per band before delays, delays, n_iter, outer folds timed)
SIZES = {
    "default": (3000, 10, 1000, (20, 100), 4, 10, 2),
    "wide": (3000, 10, 250, (50, 300), 4, 5, 1),
    "quick": (400, 4, 20, (3, 6), 4, 3, 1),
}
ARGS = _parse()
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from himalaya.backend import set_backend  # noqa: E402
from himalaya.ridge import BandedRidgeCV  # noqa: E402
from himalaya.scoring import r2_score_split  # noqa: E402

from pipelines.fit import fit_banded_encoding, zscore_by_group  # noqa: E402
from pipelines.fit.banded import band_weight_draws  # noqa: E402
from pipelines.fit.splits import nested_group_splits  # noqa: E402


def make_data(rng: np.random.Generator, n: int, runs: int, widths: list[int], delays: int, n_targets: int):
    """Delayed random features per band, runs z-scored, targets mixing the bands with noise."""
    groups = np.repeat(np.arange(runs), n // runs)
    bands = []
    for w in widths:
        F = rng.standard_normal((groups.size, w))
        bands.append(zscore_by_group(np.hstack([np.roll(F, d, 0) for d in range(delays)]), groups)
                     .astype(np.float32))
    share = rng.uniform(0, 1, n_targets)  # the first band's share of the signal
    signal = sum(np.sqrt(s) * (X @ rng.standard_normal((X.shape[1], n_targets)) / np.sqrt(X.shape[1]))
                 for X, s in zip(bands, (share, 1 - share)))
    Y = zscore_by_group(signal + 1.5 * rng.standard_normal(signal.shape), groups).astype(np.float32)
    return bands, Y, groups, share


def _split(y_test: np.ndarray, parts: np.ndarray) -> np.ndarray:
    yc = y_test.astype(np.float64) - y_test.mean(0)
    pc = parts.astype(np.float64) - parts.mean(1, keepdims=True)
    return r2_score_split(yc, pc, include_correlation=True)


def minimal(bands, Y, splits, alphas, n_iter, seed):
    """The same grid in plain numpy: per outer fold, inner split and draw one eigh; R² split per band."""
    X = np.concatenate(bands, 1)
    band_of = np.repeat(np.arange(len(bands)), [b.shape[1] for b in bands])
    scales = np.sqrt(band_weight_draws(len(bands), n_iter, seed).astype(np.float64))[:, band_of]
    out = []
    for split in splits:
        scores = np.zeros((len(scales), alphas.size, Y.shape[1]))
        for tr, va in split.inner:
            t, v = split.train[tr], split.train[va]
            mu, nu = X[t].mean(0), Y[t].mean(0)
            Xt, Xv, Yt, Yv = X[t] - mu, X[v] - mu, Y[t] - nu, Y[v] - nu
            C, H = Xt.T.astype(np.float64) @ Xt, Xt.T @ Yt
            for i, s in enumerate(scales):
                lam, V = np.linalg.eigh(C * np.outer(s, s))
                V = V.astype(np.float32)
                Z, B = V.T @ (H * s[:, None].astype(np.float32)), (Xv * s.astype(np.float32)) @ V
                for a, alpha in enumerate(alphas):
                    R = Yv - (B / (np.maximum(lam, 0) + alpha).astype(np.float32)) @ Z
                    scores[i, a] -= (R ** 2).mean(0)
        flat = scores.reshape(-1, Y.shape[1]).argmax(0)
        best_i, best_a = np.unravel_index(flat, scores.shape[:2])
        t = split.train
        mu, nu = X[t].mean(0), Y[t].mean(0)
        Xt, Xte = X[t] - mu, X[split.test] - mu
        C, H = Xt.T.astype(np.float64) @ Xt, Xt.T @ (Y[t] - nu)
        coef = np.zeros((X.shape[1], Y.shape[1]), dtype=np.float32)
        for i in np.unique(best_i):
            cols = np.flatnonzero(best_i == i)
            s = scales[i]
            lam, V = np.linalg.eigh(C * np.outer(s, s))
            V = V.astype(np.float32)
            d = (1 / (np.maximum(lam, 0)[None, :] + alphas[best_a[cols], None])).astype(np.float32)
            coef[:, cols] = (V @ ((V.T @ (H[:, cols] * s[:, None].astype(np.float32))) * d.T)) * s[:, None]
        parts = np.stack([Xte[:, band_of == b] @ coef[band_of == b] for b in range(len(bands))])
        out.append(_split(Y[split.test], parts))
    return np.mean(out, 0)


def himalaya_banded(bands, Y, splits, alphas, n_iter, seed):
    """himalaya ``BandedRidgeCV`` per outer fold; R² split per band of the held-out prediction."""
    out = []
    for split in splits:
        t = split.train
        mus = [b[t].mean(0) for b in bands]
        nu = Y[t].mean(0)
        model = BandedRidgeCV(groups="input", cv=split.inner, fit_intercept=True, random_state=seed,
                              solver_params=dict(alphas=alphas, n_iter=n_iter, progress_bar=False))
        model.fit([b[t] - m for b, m in zip(bands, mus)], Y[t] - nu)
        # predict(split=True) refuses fit_intercept=True: split the product with coef_ by band
        coef, edges = np.asarray(model.coef_), np.cumsum([0] + [b.shape[1] for b in bands])
        parts = np.stack([(b[split.test] - m) @ coef[edges[i]:edges[i + 1]]
                          for i, (b, m) in enumerate(zip(bands, mus))])
        out.append(_split(Y[split.test], parts))
    return np.mean(out, 0)


def run_size(name: str) -> list[str]:
    """The three rows of one size, as markdown table lines."""
    n, runs, n_targets, widths, delays, n_iter, n_test = SIZES[name]
    rng = np.random.default_rng(0)
    bands, Y, groups, share = make_data(rng, n, runs, list(widths), delays, n_targets)
    alphas = np.logspace(-1, 6, 8).astype(np.float32)
    test_groups = list(range(n_test))
    splits = nested_group_splits(groups, test_groups=test_groups)
    rows = []

    def timed(solver, fit):
        t0, c0 = time.perf_counter(), time.process_time()
        split = fit()
        rows.append((solver, time.perf_counter() - t0, time.process_time() - c0, split))

    timed("neuroflow fit_banded_encoding (numpy)",
          lambda: fit_banded_encoding(list(bands), Y, groups, alphas, n_iter=n_iter, backend="numpy",
                                      test_groups=test_groups, return_predictions=False).r2_split)
    timed("minimal numpy solver (one eigh per draw and inner split)",
          lambda: minimal(bands, Y, splits, alphas, n_iter, 0))
    timed("himalaya BandedRidgeCV (numpy)", lambda: himalaya_banded(bands, Y, splits, alphas, n_iter, 0))
    reference = rows[-1][3]
    strong = np.abs(share - 0.5) > 0.3  # targets with a clearly larger band
    size = (f"{name}: {n:,} samples, {runs} runs, {n_targets:,} targets, {sum(widths) * delays} features "
            f"(({' + '.join(str(w) for w in widths)}) x {delays} delays), n_iter {n_iter}, {n_test} outer fold"
            f"{'s' if n_test > 1 else ''}")
    lines = []
    for solver, wall, cpu, split in rows:
        right = ((split[0] > split[1]) == (share > 0.5))[strong].mean()
        lines.append(f"| {size} | {solver} | {wall:.2f} | {cpu:.2f} | {cpu / rows[1][2]:.2f} | "
                     f"{rows[2][2] / cpu:.1f} | {np.abs(split - reference).max():.1e} | "
                     f"{right:.0%} of {strong.sum()} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    sizes = ["quick"] if ARGS.quick else ARGS.sizes.split(",")
    set_backend("numpy")
    load_start = os.getloadavg()
    lines = [
        "# Banded ridge: neuroflow vs a minimal solver vs himalaya",
        "",
        f"`python bench/bench_banded.py{' --quick' if ARGS.quick else ''}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, BLAS threads {ARGS.threads}; "
        f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_start)}, at the end LOAD_END.",
        "",
        "Same search in every row: himalaya's n_iter band-weight draws (seed 0) x 8 alphas (0.1..1e6), "
        "leave-one-run-out inner splits (one per training run) of z-scored runs; the first runs held out "
        "as the outer folds timed. Two bands of delayed Gaussian features; every target mixes them "
        "(the first band's share of the signal uniform in 0..1) under noise of 1.5x the signal's scale. "
        "Split diff: largest absolute difference of the held-out R² split from himalaya's; planted: share "
        "of the targets with a clearly larger band (share < 0.2 or > 0.8) whose larger split is that band. "
        "CPU s: the process's CPU time (BLAS on one thread), the fair figure on a shared machine where "
        "the wall time also counts the other engineers' jobs; the ratios are of CPU times.",
        "",
        "| size | solver | wall s | CPU s | CPU x minimal | himalaya CPU / this | split diff vs himalaya "
        "| planted band larger |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in sizes:
        lines += run_size(name)
    text = "\n".join(lines).replace("LOAD_END", str(tuple(round(x, 2) for x in os.getloadavg()))) + "\n"
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ARGS.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
