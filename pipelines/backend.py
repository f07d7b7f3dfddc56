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

__all__ = ["BACKENDS", "choose_backend", "describe_device", "use_backend"]

#: Names accepted by :func:`choose_backend` besides ``"auto"`` (himalaya's own list).
BACKENDS: tuple[str, ...] = tuple(hb.ALL_BACKENDS)


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
        torch sees a CUDA device, else ``"torch"`` when torch is importable, else
        ``"numpy"``.

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
        return "torch" if _has_module("torch") else "numpy"
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
