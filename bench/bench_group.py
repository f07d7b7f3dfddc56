"""The group level at cohort sizes: sign-flip tests across subjects and inter-subject ceilings.

Sign flips (:func:`pipelines.group.stats.sign_flip_test`) on null r maps (subjects x targets, r
noise around 0): wall time and the share of null targets with p < 0.05 (exact: 5%). Inter-subject
ceilings (:func:`pipelines.group.isc.intersubject_ceiling`) on planted data (shared AR(1) signal
with a ceiling of 0.5 on half the targets, noise on the rest): wall time, the mean estimate on the
planted half and the share of noise targets that get a ceiling.

    .venv/bin/python bench/bench_group.py                    # about 2 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.group.isc import intersubject_ceiling  # noqa: E402
from pipelines.group.stats import sign_flip_test  # noqa: E402

FLIPS = ((12, 20_000, 10_000), (26, 5_000, 10_000), (345, 50_000, 10_000))  # subjects, targets, patterns
ISC = ((26, 362, 60), (30, 600, 5_000))  # subjects, samples, targets


def planted(rng: np.random.Generator, n_subjects: int, n_samples: int, n_targets: int, rho: float = 0.5):
    shared = np.zeros((n_samples, n_targets))
    e = rng.standard_normal((n_samples, n_targets))
    for t in range(1, n_samples):
        shared[t] = 0.7 * shared[t - 1] + e[t]
    shared = (shared - shared.mean(0)) / shared.std(0)
    level = np.where(np.arange(n_targets) < n_targets // 2, rho, 0.0)
    return level * shared + np.sqrt(1 - level ** 2) * rng.standard_normal((n_subjects, n_samples, n_targets)), level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", default=",".join("x".join(map(str, d)) for d in FLIPS),
                        help="subjects x targets x patterns, comma-separated (default: %(default)s)")
    parser.add_argument("--isc", default=",".join("x".join(map(str, d)) for d in ISC),
                        help="subjects x samples x targets, comma-separated (default: %(default)s)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "group.md"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["# The group level at cohort sizes", "", f"`bench/bench_group.py`, {time.strftime('%Y-%m-%d')}, "
             "numpy on this machine's CPUs.", "", "## Sign-flip tests across subjects (null r maps)", "",
             "| subjects | targets | sign patterns | exact | seconds | p < 0.05 (exact: 5%) |",
             "|---:|---:|---:|:---|---:|---:|"]
    for spec in args.flips.split(","):
        n_sub, n_tar, n_perm = (int(v) for v in spec.split("x"))
        r = np.tanh(rng.standard_normal((n_sub, n_tar)) * 0.1)
        start = time.perf_counter()
        test = sign_flip_test(r, n_permutations=n_perm)
        took = time.perf_counter() - start
        lines.append(f"| {n_sub} | {n_tar:,} | {test.n_permutations:,} | {'yes' if test.exact else 'drawn'} | "
                     f"{took:.1f} | {np.mean(test.p < 0.05):.2%} |")
    lines += ["", "## Inter-subject ceilings (planted ceiling 0.5 on half the targets)", "",
              "| subjects | samples | targets | seconds | mean r_max, planted | raw LOSO r, planted | noise targets "
              "with a ceiling |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in args.isc.split(","):
        n_sub, n_samp, n_tar = (int(v) for v in spec.split("x"))
        Y, level = planted(rng, n_sub, n_samp, n_tar)
        start = time.perf_counter()
        ceiling = intersubject_ceiling(Y)
        took = time.perf_counter() - start
        on = level > 0
        lines.append(f"| {n_sub} | {n_samp} | {n_tar:,} | {took:.1f} | {np.nanmean(ceiling.r_max[:, on]):.3f} | "
                     f"{np.nanmean(ceiling.r_loso[:, on]):.3f} | {np.mean(np.isfinite(ceiling.r_max[:, ~on])):.1%} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
