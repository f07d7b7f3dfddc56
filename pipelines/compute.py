"""The dask cluster the fit shards over: a LocalCluster by default, or an existing one."""
from __future__ import annotations

import atexit
import os
import threading

from .errors import ConfigError, TransientIOError

_lock = threading.Lock()
_clients: dict[str, object] = {}


def get_client(address: str, n_workers: int = 1):
    """A dask.distributed Client for ``compute.dask``.

    ``"none"`` returns None (in-process). ``"local"`` starts one LocalCluster per process
    (``n_workers`` single-threaded worker processes), reused by later calls and closed at
    exit. ``tcp://host:port`` connects to an existing scheduler.
    """
    if address == "none":
        return None
    with _lock:
        client = _clients.get(address)
        if client is not None and getattr(client, "status", "") == "running":
            return client
        from dask.distributed import Client, LocalCluster

        if address == "local":
            threads = max(1, (os.cpu_count() or 1) // n_workers)
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                                   dashboard_address=None, host="127.0.0.1")
            client = Client(cluster)
        else:
            try:
                client = Client(address, timeout="10s")
            except (OSError, TimeoutError) as err:
                raise TransientIOError(f"cannot reach the dask scheduler at {address} ({err}); "
                                       "check 'compute.dask' and that the scheduler is running") from err
        _clients[address] = client
        return client


def close_clients() -> None:
    with _lock:
        for client in _clients.values():
            try:
                cluster = getattr(client, "cluster", None)
                client.close()
                if cluster is not None:
                    cluster.close()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
        _clients.clear()


atexit.register(close_clients)


def check_address(address: str) -> None:
    if address not in ("local", "none") and not address.startswith(("tcp://", "tls://")):
        raise ConfigError(f"'compute.dask' must be 'local', 'none' or tcp://host:port; got {address!r}")
