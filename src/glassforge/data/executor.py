"""Where the data stage's tasks run: in this process, in local worker processes, or on a Ray cluster.

One interface, `Executor.map(fn, tasks)`: the results of `fn(task)` for every
task, yielded in task order whatever order the workers finish in. The data
stage defines its tasks by the data (parts of the sorted input listing, LSH
bands), never by the number of workers, and merges results in task order, so
its output is the same bytes on every executor and at every worker count.

- `inprocess`: a plain loop; the default, nothing to install.
- `processes`: a `ProcessPoolExecutor` of `workers` processes (0: one per
  core), started by forkserver so that no worker inherits a torch thread pool
  or an open dataset stream.
- `ray`: Ray tasks (`pip install glassforge[ray]`), on the cluster at
  `address` or, with no address, on a cluster started for this process. Each
  task is retried by Ray up to `RAY_RETRIES` times, when its worker dies
  (a killed process, a lost node) or when it raises; tasks write their files
  under temporary names and rename them into place, so a retried task
  replaces, never duplicates, what a failed attempt began. Results are
  gathered in submission order, at most `2 x CPUs` tasks in flight, so the
  driver's memory stays bounded.

A Ray address is checked with a plain TCP connection before anything else, so a
cluster that does not answer is a one-line error before any work starts, not a
minute of retries inside `ray.init`.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

from glassforge.core.errors import UserError

EXECUTORS = ("inprocess", "processes", "ray")
RAY_RETRIES = 3
_CONNECT_TIMEOUT_S = 5.0

T = TypeVar("T")
R = TypeVar("R")


class Executor:
    """Runs tasks in this process, in order."""

    name = "inprocess"
    workers = 1

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            yield fn(task)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProcessExecutor(Executor):
    """Local worker processes; results in task order."""

    name = "processes"

    def __init__(self, workers: int = 0):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers or os.cpu_count() or 1
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context(method))

    def map(self, fn, tasks):
        futures: deque = deque()
        it = iter(tasks)
        for task in it:
            futures.append(self._pool.submit(fn, task))
            if len(futures) >= 2 * self.workers:
                yield futures.popleft().result()
        while futures:
            yield futures.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_ray_address(address: str) -> None:
    """A one-line UserError unless something accepts TCP connections at a Ray address (host:port)."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--address / data.ray_address: '{address}' is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise UserError(f"Ray cluster at '{address}' does not answer ({e.strerror or type(e).__name__}); "
                        "start it with `ray start --head` or give the right --address") from None


class RayExecutor(Executor):
    """Ray tasks, retried on worker death and on exceptions; results in submission order."""

    name = "ray"

    def __init__(self, address: str = "", workers: int = 0):
        try:
            import ray
        except ImportError:
            raise UserError("executor 'ray' needs Ray: pip install 'glassforge[ray]'") from None
        if address and address != "auto":
            check_ray_address(address)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if address:
                ray.init(address=address, **kwargs)
            else:
                ray.init(num_cpus=workers or os.cpu_count() or 1, object_store_memory=256 << 20, **kwargs)
        self.workers = workers or int(ray.cluster_resources().get("CPU", 1))
        self._remote = ray.remote(max_retries=RAY_RETRIES, retry_exceptions=True, num_cpus=1)(_call)

    def map(self, fn, tasks):
        ray = self._ray
        fn_ref = ray.put(fn)
        pending: deque = deque()
        for task in tasks:
            pending.append(self._remote.remote(fn_ref, task))
            if len(pending) >= 2 * self.workers:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()


def _call(fn, task):
    return fn(task)


def make_executor(name: str = "inprocess", workers: int = 0, address: str = "") -> Executor:
    """The executor a recipe or the command line asks for; a one-line error for an unknown one."""
    if name == "inprocess":
        return Executor()
    if name == "processes":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(address, workers)
    raise UserError(f"data.executor: unknown executor '{name}' (known: {', '.join(EXECUTORS)})")
