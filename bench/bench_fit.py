"""Ridge with one alpha per target: neuroflow's fit against its peers (`make bench`).

On the same synthetic data, in one run, this times:

* **neuroflow** :func:`pipelines.fit.fit_encoding` with a held-out test set
  (``test_groups``): alphas chosen by leave-one-group-out over the training runs, refit,
  held-out predictions and their r / R² (auto backend, i.e. numpy on a CPU; and the
  numpy backend);
* a **reference solver** written here: the minimal fast method, one SVD of each
  training fold, then every alpha from it (``U^T Y`` once per fold, one product per
  alpha), numpy float32;
* **himalaya** ``RidgeCV`` (torch and numpy backends) and ``KernelRidgeCV`` (linear
  kernel, torch) as their documentation calls them, with the same grouped folds;
* **scikit-learn** ``RidgeCV(alpha_per_target=True)``, which only does efficient
  leave-one-out (generalised cross-validation) with one alpha per target;
* neuroflow on **dask**: 1 and 2 worker processes of one thread each (scaling efficiency
  ``T1 / (2 T2)``), the cluster started before the clock;
* the **permutation test** (:func:`pipelines.stats.permutation_test`): seconds per 1,000
  permutations of every target.

Each row runs in its own process (data loaded from ``.npy`` files, libraries warmed up
on a small fit first), so its peak memory is its own: the growth of the process's peak
resident set (``VmHWM``, reset before the clock) over what it held before the fit, i.e.
what the fit allocated, compared with the size of ``X`` and ``Y``. The BLAS roofline is
the reference solver's matrix-product flops over this machine's float32 matmul rate,
measured at the start (best of numpy and torch on a product of the solver's shape).
Chosen alphas and held-out r of every row are compared with himalaya ``RidgeCV`` (same
folds), so the table also shows that the rows solve the same problem.

The machine is shared with other engineers' test runs: ``os.getloadavg()`` is recorded
in the header and on every row, and timings taken under load are slower than on a quiet
machine (the CPU pressure stall, from ``/proc/pressure/cpu``, is recorded too).

Usage::

    python bench/bench_fit.py              # default and large sizes (about 20-40 min on 2 cores)
    python bench/bench_fit.py --quick      # a tiny smoke run (seconds): every row, meaningless timings
    python bench/bench_fit.py --sizes default --out /tmp/fit.md
    python bench/bench_fit.py --gpu --sizes default,large,lebel --out bench/results/fit-gpu.md   # on a CUDA machine

With ``--gpu`` the rows are the CUDA ones: neuroflow (auto backend: ``torch_cuda``), the
reference solver in torch on the GPU, himalaya ``RidgeCV`` and ``KernelRidgeCV`` on
``torch_cuda``, and neuroflow with torch on the machine's CPU cores for comparison; peak
memory is then the GPU's (``torch.cuda.max_memory_allocated``) and the roofline uses the
GPU's float32 matmul rate (TF32 off, torch's default).
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

SIZES = {
    # n_groups training runs of run_length samples, one test run of n_test samples
    "quick": dict(n_groups=5, run_length=40, n_test=40, n_features=16, n_targets=100, n_alphas=11),
    "default": dict(n_groups=5, run_length=600, n_test=300, n_features=1024, n_targets=20000, n_alphas=11),
    "large": dict(n_groups=5, run_length=1200, n_test=600, n_features=2048, n_targets=20000, n_alphas=11),
    # one LeBel subject: ~9,000 training TRs, 3,072 delayed features, 80,000 cortical voxels (GPU)
    "lebel": dict(n_groups=5, run_length=1800, n_test=300, n_features=3072, n_targets=80000, n_alphas=11),
}

METHODS = [
    ("neuroflow", "neuroflow fit_encoding (auto: numpy)"),
    ("neuroflow_torch", "neuroflow fit_encoding (torch)"),
    ("reference", "reference solver (SVD per fold, numpy)"),
    ("himalaya_torch", "himalaya RidgeCV (torch)"),
    ("himalaya_numpy", "himalaya RidgeCV (numpy)"),
    ("kernel_torch", "himalaya KernelRidgeCV (torch)"),
    ("sklearn", "scikit-learn RidgeCV (leave-one-out)"),
    ("dask1", "neuroflow on dask, 1 worker x 1 thread"),
    ("dask2", "neuroflow on dask, 2 workers x 1 thread"),
]

GPU_METHODS = [
    ("neuroflow", "neuroflow fit_encoding (auto: torch_cuda)"),
    ("reference_cuda", "reference solver (SVD per fold, torch CUDA)"),
    ("himalaya_cuda", "himalaya RidgeCV (torch_cuda)"),
    ("kernel_cuda", "himalaya KernelRidgeCV (torch_cuda)"),
    ("neuroflow_cpu", "neuroflow fit_encoding (torch, CPU cores)"),
]
GPU_ROWS = {"reference_cuda", "himalaya_cuda", "kernel_cuda"}


# --------------------------------------------------------------------------- data


def make_data(size: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Features, responses with varied SNR (a third of the targets pure noise), runs."""
    rng = np.random.default_rng(seed)
    n_train = size["n_groups"] * size["run_length"]
    n = n_train + size["n_test"]
    p, t = size["n_features"], size["n_targets"]
    groups = np.concatenate([np.repeat(np.arange(size["n_groups"]), size["run_length"]),
                             np.full(size["n_test"], size["n_groups"])])
    X = rng.standard_normal((n, p), dtype=np.float32)
    Y = rng.standard_normal((n, t), dtype=np.float32)
    for start in range(0, t, 2048):  # signal in two thirds of the targets, in slices (bounded memory)
        cols = slice(start, min(start + 2048, t))
        k = cols.stop - cols.start
        scale = np.where(np.arange(start, cols.stop) % 3 == 2, 0.0, rng.uniform(0.005, 0.05, k)).astype(np.float32)
        Y[:, cols] += X @ (rng.standard_normal((p, k), dtype=np.float32) * scale)
    alphas = np.logspace(-1, 5, size["n_alphas"]).astype(np.float32)
    return {"X": X, "Y": Y, "groups": groups, "alphas": alphas}


def inner_cv(groups: np.ndarray, test_label: int) -> list[tuple[np.ndarray, np.ndarray]]:
    g = groups[groups != test_label]
    return [(np.flatnonzero(g != lab), np.flatnonzero(g == lab)) for lab in np.unique(g)]


# --------------------------------------------------------------------------- solvers


def reference_solver(X, Y, groups, test_label, alphas):
    """The minimal fast grouped-CV ridge: one SVD per fold, every alpha from it."""
    train = groups != test_label
    Xtr, Ytr = X[train], Y[train]
    losses = np.zeros((alphas.size, Y.shape[1]))
    for tr, va in inner_cv(groups, test_label):
        mx, my = Xtr[tr].mean(0), Ytr[tr].mean(0)
        U, s, Vt = np.linalg.svd(Xtr[tr] - mx, full_matrices=False)
        UtY = U.T @ (Ytr[tr] - my)
        A = (Xtr[va] - mx) @ Vt.T
        Yv = Ytr[va] - my
        for a, alpha in enumerate(alphas):
            d = (s / (s ** 2 + alpha))[:, None]
            losses[a] += ((Yv - A @ (d * UtY)) ** 2).mean(0)
    best = losses.argmin(0)
    mx, my = Xtr.mean(0), Ytr.mean(0)
    U, s, Vt = np.linalg.svd(Xtr - mx, full_matrices=False)
    UtY = U.T @ (Ytr - my)
    A = (X[~train] - mx) @ Vt.T
    pred = np.empty((A.shape[0], Y.shape[1]), dtype=np.float32)
    for a in np.unique(best):
        cols = np.flatnonzero(best == a)
        pred[:, cols] = A @ ((s / (s ** 2 + alphas[a]))[:, None] * UtY[:, cols]) + my[cols]
    return alphas[best], pred


def reference_solver_cuda(X, Y, groups, test_label, alphas, device: str = "cuda"):
    """:func:`reference_solver` in torch on the GPU (float32, TF32 off)."""
    import torch

    dev = torch.device(device)
    train = groups != test_label
    Xtr, Ytr = torch.from_numpy(X[train]).to(dev), torch.from_numpy(Y[train]).to(dev)
    losses = torch.zeros((alphas.size, Y.shape[1]), dtype=torch.float64, device=dev)
    for tr, va in inner_cv(groups, test_label):
        tr_t, va_t = torch.from_numpy(tr).to(dev), torch.from_numpy(va).to(dev)
        Xf, Yf = Xtr[tr_t], Ytr[tr_t]
        mx, my = Xf.mean(0), Yf.mean(0)
        U, s, Vt = torch.linalg.svd(Xf - mx, full_matrices=False)
        UtY = U.T @ (Yf - my)
        del Xf, Yf
        A = (Xtr[va_t] - mx) @ Vt.T
        Yv = Ytr[va_t] - my
        for a, alpha in enumerate(alphas):
            d = (s / (s ** 2 + float(alpha)))[:, None]
            losses[a] += ((Yv - A @ (d * UtY)) ** 2).mean(0)
    best = losses.argmin(0).cpu().numpy()
    mx, my = Xtr.mean(0), Ytr.mean(0)
    U, s, Vt = torch.linalg.svd(Xtr - mx, full_matrices=False)
    UtY = U.T @ (Ytr - my)
    A = (torch.from_numpy(X[~train]).to(dev) - mx) @ Vt.T
    pred = np.empty((A.shape[0], Y.shape[1]), dtype=np.float32)
    for a in np.unique(best):
        cols = torch.from_numpy(np.flatnonzero(best == a)).to(dev)
        block = A @ ((s / (s ** 2 + float(alphas[a])))[:, None] * UtY[:, cols]) + my[cols]
        pred[:, cols.cpu().numpy()] = block.cpu().numpy()
    return alphas[best], pred


def reference_flops(size: dict) -> float:
    """Matrix-product flops of :func:`reference_solver` (the SVDs left out)."""
    n_val, n_groups, p = size["run_length"], size["n_groups"], size["n_features"]
    n_tr, n_train = n_val * (n_groups - 1), n_val * n_groups
    per_target = n_groups * (2 * n_tr * p + size["n_alphas"] * 2 * n_val * p) + 2 * n_train * p + 2 * size["n_test"] * p
    return float(per_target) * size["n_targets"]


def himalaya_flops(size: dict) -> float:
    """Flops of himalaya RidgeCV's products with Y: an (n_val x n_train) matrix per alpha and fold."""
    n_val, n_groups, p = size["run_length"], size["n_groups"], size["n_features"]
    n_tr, n_train = n_val * (n_groups - 1), n_val * n_groups
    per_target = n_groups * size["n_alphas"] * 2 * n_val * n_tr + 2 * n_train * p + 2 * size["n_test"] * p
    return float(per_target) * size["n_targets"]


def run_method(method: str, data: dict, test_label: int):
    """Fit, predict the test run; returns (alphas per target, test predictions or r)."""
    X, Y, groups, alphas = data["X"], data["Y"], data["groups"], data["alphas"]
    train, test = groups != test_label, groups == test_label
    if method in ("neuroflow", "neuroflow_numpy", "neuroflow_torch", "neuroflow_cpu"):
        from pipelines.fit import fit_encoding

        backend = {"neuroflow_numpy": "numpy", "neuroflow_torch": "torch", "neuroflow_cpu": "torch"}.get(method, "auto")
        res = fit_encoding(X, Y, groups, alphas, test_groups=[test_label], return_predictions=False, backend=backend)
        return res.alpha, res.r
    if method == "reference":
        best, pred = reference_solver(X, Y, groups, test_label, alphas)
        return best, pred
    if method == "reference_cuda":
        return reference_solver_cuda(X, Y, groups, test_label, alphas)
    if method.startswith("himalaya") or method.startswith("kernel"):
        from himalaya.backend import set_backend
        from himalaya.kernel_ridge import KernelRidgeCV
        from himalaya.ridge import RidgeCV

        name = {"himalaya_numpy": "numpy", "himalaya_cuda": "torch_cuda", "kernel_cuda": "torch_cuda"}.get(method, "torch")
        bk = set_backend(name, on_error="raise")
        cv = inner_cv(groups, test_label)
        if method.startswith("kernel"):
            model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=cv, fit_intercept=True)
        else:
            model = RidgeCV(alphas=alphas, cv=cv, fit_intercept=True)
        model.fit(X[train], Y[train])
        return bk.to_numpy(model.best_alphas_), bk.to_numpy(model.predict(X[test]))
    if method == "sklearn":
        from sklearn.linear_model import RidgeCV as SkRidgeCV

        model = SkRidgeCV(alphas=alphas.astype(np.float64), alpha_per_target=True).fit(X[train], Y[train])
        return np.asarray(model.alpha_), model.predict(X[test]).astype(np.float32)
    if method in ("dask1", "dask2"):
        raise AssertionError("dask rows run in child_dask")
    raise ValueError(f"unknown method {method!r}")


# --------------------------------------------------------------------------- measurement


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # pragma: no cover - not Linux
        pass


def cpu_pressure() -> str:
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return line.split()[1].split("=")[1] + "%"
    except (OSError, IndexError):
        return "n/a"


def _gpu_row(method: str) -> bool:
    """Rows that compute on the GPU: the CUDA peers, and neuroflow when its auto backend is CUDA."""
    if method in GPU_ROWS:
        return True
    if method == "neuroflow":
        from pipelines.backend import choose_backend

        return choose_backend("auto") == "torch_cuda"
    return False


def child(method: str, data_dir: Path, out: Path, test_label: int, n_workers: int = 0) -> None:
    """One row, in its own process: load, warm up, reset the peak, time, save."""
    from pipelines.fit import pearson_r

    data = {k: np.load(data_dir / f"{k}.npy") for k in ("X", "Y", "groups", "alphas")}
    X, Y, groups = data["X"], data["Y"], data["groups"]
    small = dict(data, Y=np.ascontiguousarray(Y[:, :64]))
    client = cluster = None
    if method.startswith("dask"):
        from distributed import Client, LocalCluster

        from pipelines.fit import fit_encoding

        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        fit_encoding(X, small["Y"], groups, data["alphas"], test_groups=[test_label], client=client)  # warm workers
    else:
        run_method(method, small, test_label)  # warm up imports, thread pools, BLAS
    load = os.getloadavg()[0]
    gpu = _gpu_row(method)
    if gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    _reset_peak()
    before = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    if client is not None:
        from pipelines.fit import fit_encoding

        res = fit_encoding(X, Y, groups, data["alphas"], test_groups=[test_label], return_predictions=False,
                           client=client)
        alphas, scores = res.alpha, res.r
    else:
        alphas, scores = run_method(method, data, test_label)
    if gpu:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = _proc_status()["VmHWM"] - before
    host_peak = peak
    if gpu:
        peak = torch.cuda.max_memory_allocated() - gpu_before
    test = groups == test_label
    r = scores if scores.ndim == 1 else pearson_r(Y[test], scores)
    np.save(out.with_suffix(".alpha.npy"), np.asarray(alphas, dtype=np.float32))
    np.save(out.with_suffix(".r.npy"), np.asarray(r, dtype=np.float32))
    out.write_text(json.dumps({"wall": wall, "peak": peak, "host_peak": host_peak, "gpu": gpu,
                               "load": [load, os.getloadavg()[0]], "pressure": cpu_pressure()}))
    if client is not None:
        client.close()
        cluster.close()


def child_permutations(data_dir: Path, out: Path, test_label: int) -> None:
    """Seconds per 1,000 permutations: the held-out test run, and every run as a fold."""
    from pipelines.stats import permutation_test

    Y = np.load(data_dir / "Y.npy")
    groups = np.load(data_dir / "groups.npy")
    rng = np.random.default_rng(1)
    P = (Y + 3 * rng.standard_normal(Y.shape, dtype=np.float32)).astype(np.float32)  # any predictions will do
    test_fold = np.where(groups == test_label, 0, -1)
    permutation_test(Y[:, :50], P[:, :50], test_fold, n_permutations=10)  # warm up
    rows = []
    for label, fold, method in (("held-out test run", test_fold, "block"), ("held-out test run", test_fold, "circular"),
                                ("every run a fold (nested CV)", groups, "block")):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        permutation_test(Y, P, fold, n_permutations=1000, method=method)
        rows.append({"what": label, "method": method, "n_samples": int((fold >= 0).sum()),
                     "seconds": time.perf_counter() - t0, "load": [load, os.getloadavg()[0]]})
    out.write_text(json.dumps(rows))


def matmul_rate_cuda(m: int = 1800, k: int = 3072, n: int = 8192) -> tuple[float, str]:
    """Best float32 GEMM rate (flop/s) of torch on the GPU, TF32 off (torch's default)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    A = torch.randn(m, k, device="cuda")
    B = torch.randn(k, n, device="cuda")
    best = 0.0
    for _ in range(3):
        A @ B
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            A @ B
        torch.cuda.synchronize()
        best = max(best, 5 * 2.0 * m * k * n / (time.perf_counter() - t0))
    return best, f"torch CUDA, {torch.cuda.get_device_name(0)}"


def matmul_rate() -> tuple[float, str]:
    """Best float32 GEMM rate (flop/s) of numpy and torch on a (600 x 1024) @ (1024 x 8192) product."""
    import torch

    best, who = 0.0, ""
    A = np.random.default_rng(0).standard_normal((600, 1024), dtype=np.float32)
    B = np.random.default_rng(1).standard_normal((1024, 8192), dtype=np.float32)
    flops = 2.0 * 600 * 1024 * 8192
    for name, mm, a, b in (("numpy", np.matmul, A, B), ("torch", torch.mm, torch.from_numpy(A), torch.from_numpy(B))):
        mm(a, b)
        for _ in range(5):
            t0 = time.perf_counter()
            mm(a, b)
            rate = flops / (time.perf_counter() - t0)
            if rate > best:
                best, who = rate, name
    return best, who


# --------------------------------------------------------------------------- driver

NOTES = [
    "",
    "Every row: alphas chosen per target by cross-validation over the training runs (leave one run out; "
    "scikit-learn: leave one sample out, the only mode it offers with one alpha per target), refit on all "
    "training runs, prediction of the held-out test run; neuroflow also computes the test r and R². "
    "`vs roofline`: wall time over the reference solver's matrix-product flops at the measured matmul rate "
    "(neuroflow does fewer flops than the reference, so it can go below 1). `peak memory`: what the row's "
    "process allocated for the fit (growth of its peak resident set), and that over the size of X and Y. "
    "`alphas = himalaya RidgeCV`: share of targets given the same alpha as himalaya RidgeCV with the same folds "
    "(ties within float32 rounding can differ); `max abs diff r`: largest difference of held-out r from it. "
    "Dask rows: the same fit, chunks sized by neuroflow (one per worker thread), cluster started before the clock, "
    "run as pairs (1 worker, then 2) one after the other, the pair with the median efficiency shown; their peak "
    "memory is the client's (the workers are processes of their own). "
    "A row `stopped after N s` ran longer than the per-row limit (`--timeout`).",
    "",
    "Goals:",
]


def run_child(args: list[str], timeout: float) -> tuple[dict | None, str]:
    cmd = [sys.executable, str(Path(__file__).resolve())] + args
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None, f"stopped after {timeout:.0f} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return None, f"failed: {tail[0][:160]}"
    return {}, ""


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (CI): every row, no meaningful timing")
    parser.add_argument("--gpu", action="store_true", help="the CUDA rows (on a machine with an NVIDIA GPU)")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes: default,large (default: both)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "fit.md"))
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed per row")
    parser.add_argument("--dask-repeats", type=int, default=3,
                        help="pairs of dask rows (1 worker, then 2) run; the table shows the median pair")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--test-label", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        data_dir, result = Path(args.data), Path(args.result)
        if args.child == "permutations":
            child_permutations(data_dir, result, args.test_label)
        else:
            workers = {"dask1": 1, "dask2": 2}.get(args.child, 0)
            child(args.child, data_dir, result, args.test_label, workers)
        return

    sizes = ["quick"] if args.quick else (args.sizes or "default,large").split(",")
    import torch

    methods = GPU_METHODS if args.gpu else METHODS
    rate, rate_by = matmul_rate_cuda() if args.gpu else matmul_rate()
    device = f"GPU {torch.cuda.get_device_name(0)}" if args.gpu else "no GPU"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_start = os.getloadavg()
    lines: list[str] = []
    goals: list[str] = []

    def write() -> Path:
        header = [
            "# Ridge with one alpha per target: neuroflow vs peers",
            "",
            f"Written by `bench/bench_fit.py{' --quick' if args.quick else ''}` on {started} ({platform.node()}): "
            f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), float32 matmul rate {rate / 1e9:.0f} Gflop/s (best of numpy / torch: "
            f"{rate_by}, measured at the start), {device}. "
            + ("" if args.gpu else "**This machine is shared with other engineers' test runs**: ")
            + f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in load_start)}, when written "
            f"{tuple(round(x, 2) for x in os.getloadavg())}; a 1-minute load above the number of cores, or a CPU "
            "stall share (`/proc/pressure/cpu`, some avg10) above 0, means other work competed for the cores during "
            "that row" + (" (on the GPU machine the CPU row's own torch threads load all cores)." if args.gpu else "."),
        ]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(header + lines + NOTES + goals) + "\n")
        return out

    for size_name in sizes:
        size = SIZES[size_name]
        data = make_data(size)
        test_label = size["n_groups"]
        xy = data["X"].nbytes + data["Y"].nbytes
        ref_flops = reference_flops(size)
        roofline = ref_flops / rate
        lines += ["", f"## {size_name}: {size['n_groups'] * size['run_length']:,} training TRs in {size['n_groups']} runs, "
                  f"{size['n_test']} test TRs, {size['n_features']:,} features, {size['n_targets']:,} targets, "
                  f"{size['n_alphas']} alphas", "",
                  f"X + Y: {fmt_bytes(xy)} (float32). Reference solver: {ref_flops / 1e12:.2f} Tflop of matrix products, "
                  f"BLAS roofline {roofline:.1f} s at {rate / 1e9:.0f} Gflop/s.", "",
                  "| method | wall (s) | targets/s | vs reference | vs roofline | peak memory (x X+Y) | alphas = himalaya RidgeCV | max abs diff r | load 1-min (start / end) | CPU stall |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
            tmp_path = Path(tmp)
            for key in ("X", "Y", "groups", "alphas"):
                np.save(tmp_path / f"{key}.npy", data[key])
            del data
            def run_row(method: str, label: str) -> dict:
                result = tmp_path / f"{method}.json"
                print(f"[{size_name}] {label} ...", flush=True)
                _, error = run_child(["--child", method, "--data", tmp, "--result", str(result),
                                      "--test-label", str(test_label)], args.timeout)
                if error:
                    return {"skip": error}
                info = json.loads(result.read_text())
                info["alpha"] = np.load(result.with_suffix(".alpha.npy"))
                info["r"] = np.load(result.with_suffix(".r.npy"))
                print(f"    {info['wall']:.1f} s, peak {fmt_bytes(info['peak'])}, load {info['load']}", flush=True)
                return info

            for method, label in methods:
                if method == "sklearn" and size_name == "large":
                    results[method] = {"skip": "skipped: leave-one-out on this size needs more memory than the "
                                               "machine has free for it (4 GB at the default size)"}
                elif method == "dask1":
                    # 1 and 2 workers alternately, so each pair sees the same machine; median pair kept
                    pairs = [(run_row("dask1", label), run_row("dask2", dict(methods)["dask2"]))
                             for _ in range(1 if args.quick else args.dask_repeats)]
                    timed = sorted(((a, b) for a, b in pairs if "wall" in a and "wall" in b),
                                   key=lambda ab: ab[0]["wall"] / (2 * ab[1]["wall"]))
                    results["dask_pairs"] = [(a["wall"], b["wall"]) for a, b in timed]
                    results["dask1"], results["dask2"] = timed[len(timed) // 2] if timed else pairs[-1]
                elif method != "dask2":
                    results[method] = run_row(method, label)
            perm_out = tmp_path / "perm.json"
            perm_rows = []
            if size_name not in ("large", "lebel") or (args.gpu and size_name == "lebel"):
                print(f"[{size_name}] permutations ...", flush=True)
                _, error = run_child(["--child", "permutations", "--data", tmp, "--result", str(perm_out),
                                      "--test-label", str(test_label)], args.timeout)
                perm_rows = json.loads(perm_out.read_text()) if not error else [{"error": error}]

        ref = results.get("himalaya_cuda" if args.gpu else "himalaya_torch", {})
        if "alpha" not in ref:
            ref = results.get("himalaya_numpy", {})
        reference_wall = results.get("reference_cuda" if args.gpu else "reference", {}).get("wall")
        for method, label in methods:
            info = results.get(method)
            if info is None:
                continue
            if "skip" in info:
                lines.append(f"| {label} | {info['skip']} | | | | | | | | |")
                continue
            wall = info["wall"]
            same = diff = ""
            if "alpha" in ref and method != "sklearn":
                ok = np.isfinite(ref["alpha"]) & np.isfinite(info["alpha"])
                same = f"{np.mean(np.isclose(info['alpha'][ok], ref['alpha'][ok], rtol=1e-4)):.4f}"
                diff = f"{np.nanmax(np.abs(info['r'] - ref['r'])):.1e}"
            elif "alpha" in ref:
                same = "(leave-one-out)"
                diff = f"{np.nanmax(np.abs(info['r'] - ref['r'])):.1e}"
            vs_ref = f"{wall / reference_wall:.2f}x" if reference_wall else ""
            lines.append(
                f"| {label} | {wall:.1f} | {size['n_targets'] / wall:,.0f} | {vs_ref} | {wall / roofline:.2f}x | "
                f"{'GPU ' if info.get('gpu') else ''}{fmt_bytes(info['peak'])} ({info['peak'] / xy:.2f}) | {same} | {diff} | "
                f"{info['load'][0]:.2f} / {info['load'][1]:.2f} | {info['pressure']} |")
        d1, d2 = results.get("dask1", {}), results.get("dask2", {})
        if "wall" in d1 and "wall" in d2:
            eff = d1["wall"] / (2 * d2["wall"])
            pairs = results.get("dask_pairs", [])
            lines += ["", f"Dask scaling efficiency at 2 workers (T1 / (2 T2)): **{eff:.2f}** "
                          f"({d1['wall']:.1f} s -> {d2['wall']:.1f} s)"
                      + (f", the median of {len(pairs)} pairs of runs taken one after the other (1 worker, then 2): "
                         + ", ".join(f"{a:.1f} -> {b:.1f} s ({a / (2 * b):.2f})" for a, b in pairs) + "."
                         if len(pairs) > 1 else ".")]
            goals.append(f"- {size_name}: dask scaling efficiency {eff:.2f}; >= 0.8: {'yes' if eff >= 0.8 else 'no'}")
        if perm_rows:
            lines += ["", "| permutation test, 1,000 permutations of every target | held-out samples | seconds | load 1-min (start / end) |",
                      "|---|---:|---:|---:|"]
            for row in perm_rows:
                if "error" in row:
                    lines.append(f"| permutations: {row['error']} | | | |")
                    continue
                lines.append(f"| {row['what']}, {row['method']} | {row['n_samples']:,} | {row['seconds']:.1f} | "
                             f"{row['load'][0]:.2f} / {row['load'][1]:.2f} |")
        nf = results.get("neuroflow", {})
        if "wall" in nf:
            if reference_wall:
                ratio = nf["wall"] / reference_wall
                goals.append(f"- {size_name}: neuroflow = {ratio:.2f}x the reference solver; within 1.3x: "
                             f"{'yes' if ratio <= 1.3 else 'no'}")
            peers = {k: v["wall"] for k, v in results.items()
                     if k in ("himalaya_torch", "himalaya_numpy", "kernel_torch", "sklearn", "himalaya_cuda",
                              "kernel_cuda") and "wall" in v}
            if peers:
                fastest = min(peers, key=peers.get)
                goals.append(f"- {size_name}: neuroflow {nf['wall']:.1f} s vs fastest peer {dict(methods)[fastest]} "
                             f"{peers[fastest]:.1f} s; faster than every peer: {'yes' if nf['wall'] < peers[fastest] else 'no'}")
            goals.append(f"- {size_name}: neuroflow peak memory {nf['peak'] / xy:.2f}x X+Y; under 2x: "
                         f"{'yes' if nf['peak'] < 2 * xy else 'no'}")
            if args.gpu and size_name == "lebel":
                goals.append(f"- {size_name}: neuroflow's whole fit with per-voxel alphas on the GPU {nf['wall']:.1f} s; "
                             f"under 60 s: {'yes' if nf['wall'] < 60 else 'no'}")
        write()  # after every size: a partial table survives an interrupted run

    out = write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
