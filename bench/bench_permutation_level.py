"""Level of the permutation test on autocorrelated null data: how often p < 0.05 where nothing is there.

Pure-noise responses (AR(1) 0.9, as raw fMRI; z-scored per run) are fitted on slow word-rate-like
features (words at a drifting rate, Lanczos-resampled to TR 2 s, delays 1-4:
``pipelines.simulate.slow_word_features``) by neuroflow's nested leave-one-run-out ridge, and the
held-out correlations are tested with ``pipelines.stats.permutation_test`` (999 permutations, Simes
over folds): fixed blocks of 10 samples (neuroflow's old default), ``block_length="auto"`` (the
default of ``model.permutation_block``) and whole runs (``method="run"``). An exact test gives 5%.

    .venv/bin/python bench/bench_permutation_level.py                 # 4 seeds per design (about 5 min on 2 cores)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.features.align import make_delays  # noqa: E402
from pipelines.fit import fit_encoding, zscore_by_group  # noqa: E402
from pipelines.simulate import ar1_noise, slow_word_features  # noqa: E402
from pipelines.stats import permutation_test  # noqa: E402

DESIGNS = ((5, 300, 2000), (10, 200, 2000), (20, 150, 1000))  # runs, TRs per run, targets
NULLS = (("fixed blocks of 10", {"block_length": 10}), ("auto", {"block_length": "auto"}),
         ("whole runs", {"method": "run"}))


def null_fit(seed: int, n_runs: int, n_trs: int, n_targets: int, phi: float = 0.9):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_runs), n_trs)
    X = np.concatenate([slow_word_features(rng, n_trs) for _ in range(n_runs)])
    X = make_delays(zscore_by_group(X, groups), [n_trs] * n_runs, [1, 2, 3, 4])
    Y = zscore_by_group(ar1_noise(rng, n_runs * n_trs, n_targets, phi).astype(np.float32), groups)
    return Y, fit_encoding(X, Y, groups, [1, 10, 100, 1e3, 1e4, 1e5], backend="numpy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--designs", default=",".join("x".join(map(str, d)) for d in DESIGNS),
                        help="runs x TRs per run x targets, comma-separated (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "permutation-level.md"))
    args = parser.parse_args()
    rows = []
    start = time.time()
    designs = [tuple(int(v) for v in d.split("x")) for d in args.designs.split(",")]
    for n_runs, n_trs, n_targets in designs:
        fractions: dict[str, list[float]] = {name: [] for name, _ in NULLS}
        blocks = []
        for seed in range(args.seeds):
            Y, res = null_fit(seed, n_runs, n_trs, n_targets)
            for name, kwargs in NULLS:
                perm = permutation_test(Y, res.predictions, res.sample_fold, n_permutations=999, backend="numpy",
                                        **kwargs)
                fractions[name].append(float((perm.p_values < 0.05).mean()))
                if name == "auto":
                    blocks.append(perm.block_length)
        cells = [f"{100 * np.mean(v):.1f}% ({100 * min(v):.1f}-{100 * max(v):.1f})" for v in fractions.values()]
        rows.append(f"| {n_runs} x {n_trs} | {n_targets} | {' | '.join(cells)} | {min(blocks)}-{max(blocks)} |")
        print(rows[-1], flush=True)
    header = ["# Level of the permutation test (bench/bench_permutation_level.py)", "",
              "Fraction of pure-noise targets with p < 0.05 (mean over seeds, range); an exact test gives 5%.",
              f"AR(1) 0.9 noise, slow Lanczos word features, delays 1-4, nested leave-one-run-out ridge, "
              f"999 permutations, Simes over folds; {args.seeds} seeds per design; {time.time() - start:.0f} s.", "",
              "| runs x TRs | targets | " + " | ".join(name for name, _ in NULLS) + " | auto block (samples) |",
              "|---|---:|---:|---:|---:|---:|"]
    Path(args.out).write_text("\n".join(header + rows) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
