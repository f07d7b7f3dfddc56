"""Choose and scope himalaya's compute backend (numpy, torch, torch on CUDA...).

himalaya keeps its backend in a module-level global; :func:`use_backend` sets it for
the duration of a ``with`` block and always puts the previous one back, so a fit
never leaks its backend into the rest of the process (or into the next task run by
the same dask worker).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

from himalaya import backend as hb

from .errors import ConfigError

__all__ = [
    "BACKENDS",
    "addcmul_",
    "blas_threads",
    "choose_backend",
    "column_sq_norms",
    "describe_device",
    "eigh_float64",
    "float32_like",
    "float64_of",
    "gemm",
    "index_array",
    "irfft",
    "memory_budget_bytes",
    "rfft",
    "take_columns",
    "take_rows",
    "use_backend",
]

#: Names accepted by :func:`choose_backend` besides ``"auto"`` (himalaya's own list).
BACKENDS: tuple[str, ...] = tuple(hb.ALL_BACKENDS)

#: Backends whose arrays live on a GPU.
GPU_BACKENDS: tuple[str, ...] = ("torch_cuda", "cupy")


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _cuda_available() -> bool:
    if not _has_module("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def _mps_available() -> bool:
    if not _has_module("torch"):
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


# What each backend needs in order to run, and the hint printed when it is missing.
_REQUIREMENTS: dict[str, tuple[Callable[[], bool], str]] = {
    "numpy": (lambda: True, ""),
    "torch": (lambda: _has_module("torch"), "torch is not installed; use 'numpy'"),
    "torch_cuda": (_cuda_available, "no CUDA device is available; use 'auto' or 'torch'"),
    "torch_mps": (_mps_available, "no Apple MPS device is available; use 'auto' or 'torch'"),
    "cupy": (lambda: _has_module("cupy"), "cupy is not installed; use 'auto' or 'torch_cuda'"),
}


def choose_backend(requested: str = "auto") -> str:
    """Resolve a backend request to a himalaya backend name usable on this machine.

    Parameters
    ----------
    requested : str
        ``"auto"`` or one of :data:`BACKENDS`. ``"auto"`` picks ``"torch_cuda"`` when
        torch sees a CUDA device, else ``"numpy"``: on a CPU, numpy fits faster and with less
        memory than torch (a whole fit at ``bench_fit.py``'s default size, 3 pairs: 15.1 s and
        1.0 GB against 19.4 s and 1.3 GB, ratio 0.80). ``"torch"`` stays available by name.

    Returns
    -------
    name : str
        A name accepted by ``himalaya.backend.set_backend``.

    Raises
    ------
    ConfigError
        If the name is unknown, or names a backend this machine cannot run.
    """
    if requested == "auto":
        if _cuda_available():
            return "torch_cuda"
        return "numpy"
    if requested not in _REQUIREMENTS:
        valid = ", ".join(("auto",) + BACKENDS)
        raise ConfigError(f"'model.backend' must be one of {valid}; got {requested!r}.")
    available, hint = _REQUIREMENTS[requested]
    if not available():
        raise ConfigError(f"'model.backend' is {requested!r} but {hint}.")
    return requested


@contextmanager
def use_backend(name: str) -> Iterator[ModuleType]:
    """Set himalaya's backend inside a ``with`` block, restoring the previous one after.

    Parameters
    ----------
    name : str
        A himalaya backend name (see :func:`choose_backend`).

    Yields
    ------
    backend : module
        The himalaya backend module (``asarray``, ``to_numpy``...).

    Notes
    -----
    The previous backend is restored in a ``finally`` clause, also when the block
    raises. himalaya's backend is process-global: do not run fits with *different*
    backends concurrently in threads of one process.
    """
    previous = hb.get_backend().name
    try:
        module = hb.set_backend(name, on_error="raise")
        yield module
    finally:
        hb.set_backend(previous, on_error="raise")


def describe_device(name: str) -> str:
    """A short human-readable name of the device a backend computes on.

    Parameters
    ----------
    name : str
        A himalaya backend name.

    Returns
    -------
    device : str
        ``"cpu"`` for CPU backends, ``"mps"`` for Apple GPUs, else the CUDA device
        name (e.g. ``"NVIDIA H100 80GB HBM3"``).
    """
    if name == "torch_cuda":
        import torch

        return str(torch.cuda.get_device_name(torch.cuda.current_device()))
    if name == "cupy":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        device = props["name"]
        return device.decode() if isinstance(device, bytes) else str(device)
    if name == "torch_mps":
        return "mps"
    return "cpu"


# --------------------------------------------------------------------------- memory


#: Bounds of the per-task memory budget derived by :func:`memory_budget_bytes`.
MIN_BUDGET_BYTES: int = 64 * 2**20
MAX_BUDGET_BYTES: int = 8 * 2**30


def memory_budget_bytes(name: str, n_tasks: int = 1, fraction: float = 0.5) -> int:
    """Memory one task may use for its target-dependent arrays, from what is free now.

    Parameters
    ----------
    name : str
        A himalaya backend name. For GPU backends the free device memory counts too
        (the smaller of host and device share is returned): a chunk lives on the device.
    n_tasks : int
        Tasks expected to run at the same time in this process or machine (e.g. the
        threads of a dask worker); the free memory is shared between them.
    fraction : float
        Share of the free memory given to all tasks together.

    Returns
    -------
    budget : int
        Bytes, clipped to [:data:`MIN_BUDGET_BYTES`, :data:`MAX_BUDGET_BYTES`].
    """
    import psutil

    free = psutil.virtual_memory().available
    if name == "torch_cuda":
        import torch

        free = min(free, torch.cuda.mem_get_info()[0])
    elif name == "cupy":
        import cupy

        free = min(free, cupy.cuda.runtime.memGetInfo()[0])
    budget = int(free * fraction / max(1, n_tasks))
    return int(min(max(budget, MIN_BUDGET_BYTES), MAX_BUDGET_BYTES))


# --------------------------------------------------------------------------- kernels
# Small numerical kernels that himalaya's flat backend API lacks. Algorithm code calls
# them with the backend module; the library-specific choice is made here only.


def _is_torch(bk: ModuleType) -> bool:
    return bk.name.startswith("torch")


def eigh_float64(bk: ModuleType, A):
    """Eigendecomposition of a symmetric matrix, in float64.

    Parameters
    ----------
    bk : module
        The himalaya backend module in use.
    A : backend array of shape (m, m), float64
        Symmetric matrix.

    Returns
    -------
    eigenvalues : backend array of shape (m,), float64, ascending
    eigenvectors : backend array of shape (m, m), float64, one per column

    Notes
    -----
    On CUDA the backend's own solver runs on the device. On CPU, LAPACK through numpy
    (``syevd``) is used also for the torch backend: torch's CPU ``eigh`` is several
    times slower here (0.35 s vs 0.17 s at m=1024, 10 s vs 1.2 s at m=2400).
    """
    if bk.name in GPU_BACKENDS:
        lib = __import__("torch") if bk.name == "torch_cuda" else __import__("cupy")
        return lib.linalg.eigh(A)
    import numpy as np

    w, v = np.linalg.eigh(bk.to_numpy(A))
    device = getattr(A, "device", None)
    if _is_torch(bk):
        import torch

        return torch.from_numpy(w).to(device), torch.from_numpy(v).to(device)
    return w, v


def float64_of(bk: ModuleType, A):
    """``A`` as float64 on the device that computes in float64 (CPU for Apple MPS)."""
    if bk.name == "torch_mps":
        return A.to("cpu", dtype=__import__("torch").float64)
    if _is_torch(bk):
        return A.to(dtype=__import__("torch").float64)
    return bk.asarray(A, dtype="float64") if bk.name == "cupy" else A.astype("float64")


def float32_like(bk: ModuleType, A, ref):
    """``A`` as float32 on the device of ``ref``."""
    if _is_torch(bk):
        return A.to(device=ref.device, dtype=__import__("torch").float32)
    return A.astype("float32")


def gemm(bk: ModuleType, A, B, C=None, alpha: float = 1.0, out=None):
    """``C + alpha * A @ B`` (or ``alpha * A @ B``), in one BLAS call where the library allows.

    ``out`` (optional) is a preallocated result of the right shape and dtype; ``A`` and
    ``B`` may be strided views (row or column slices), as BLAS reads them in place.
    """
    if _is_torch(bk):
        import torch

        if C is None:
            if alpha == 1.0:
                return torch.mm(A, B, out=out) if out is not None else torch.mm(A, B)
            return torch.mm(A, B).mul_(alpha)
        if out is not None:
            return torch.addmm(C, A, B, beta=1.0, alpha=alpha, out=out)
        return torch.addmm(C, A, B, beta=1.0, alpha=alpha)
    import numpy as np

    res = np.matmul(A, B, out=out)
    if alpha != 1.0:
        res *= alpha
    if C is not None:
        res += C
    return res


def addcmul_(bk: ModuleType, C, A, B):
    """``C += A * B`` in place (broadcasting), without a temporary where the library allows."""
    if _is_torch(bk):
        return C.addcmul_(A, B)
    C += A * B
    return C


def column_sq_norms(bk: ModuleType, R):
    """Squared Euclidean norm of each column of ``R`` (float32 in, float32 out), no copy."""
    if _is_torch(bk):
        import torch

        return torch.linalg.vector_norm(R, dim=0).square_()
    import numpy as np

    return np.einsum("ij,ij->j", R, R)


def take_rows(bk: ModuleType, A, rows):
    """``A[rows]`` for sorted integer ``rows`` (numpy): a view when they are contiguous."""
    import numpy as np

    rows = np.asarray(rows)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:
        return A[int(rows[0]):int(rows[-1]) + 1]
    if _is_torch(bk):
        import torch

        return A[torch.from_numpy(rows.astype(np.int64)).to(A.device)]
    return A[rows]


def take_columns(bk: ModuleType, A, cols):
    """``A[:, cols]`` for sorted integer ``cols`` (numpy): a view when they are contiguous."""
    import numpy as np

    cols = np.asarray(cols)
    if cols.size and cols[-1] - cols[0] + 1 == cols.size:
        return A[:, int(cols[0]):int(cols[-1]) + 1]
    if _is_torch(bk):
        import torch

        return A[:, torch.from_numpy(cols.astype(np.int64)).to(A.device)]
    return A[:, cols]


def index_array(bk: ModuleType, idx, ref):
    """Integer indices (numpy) usable to index ``ref``'s library and device."""
    import numpy as np

    idx = np.asarray(idx, dtype=np.int64)
    if _is_torch(bk):
        import torch

        return torch.from_numpy(idx).to(ref.device)
    return idx


def rfft(bk: ModuleType, A, n: int):
    """Real FFT along axis 0 (time), length ``n``."""
    if _is_torch(bk):
        import torch

        return torch.fft.rfft(A, n=n, dim=0)
    import numpy as np

    return np.fft.rfft(A, n=n, axis=0)


def irfft(bk: ModuleType, F, n: int):
    """Inverse of :func:`rfft` along axis 0."""
    if _is_torch(bk):
        import torch

        return torch.fft.irfft(F, n=n, dim=0)
    import numpy as np

    return np.fft.irfft(F, n=n, axis=0)


@contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Limit BLAS / torch intra-op threads to ``n`` inside the block (None: unchanged).

    A dask worker with ``k`` threads runs ``k`` tasks at once; each task's BLAS must not
    spawn more threads than the share it was given, or the cores are oversubscribed.
    """
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    torch = __import__("torch") if _has_module("torch") else None
    previous = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=int(n)):
            if torch is not None:
                torch.set_num_threads(int(n))
            yield
    finally:
        if torch is not None and previous is not None:
            torch.set_num_threads(previous)
