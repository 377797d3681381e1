"""The libraries a user would otherwise pick, each behind the same small ``Backend`` interface.

A backend starts its pool in ``open()``, runs a batch of calls side by side in ``gather()`` and
one call in ``call()``, and releases everything in ``close()``. Every suite drives statepool
(``benchmarks.cases``) and these baselines through that one interface, so that the work measured
is the same on both sides.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any

from . import work
from .harness import NotAvailable

__all__ = [
    "AioMPApply",
    "AioMPMap",
    "AsyncioGather",
    "AsyncioQueue",
    "Backend",
    "DaskClient",
    "Joblib",
    "RunInExecutor",
    "Serial",
    "baseline_factories",
    "dask_security",
    "dask_tcp",
    "has_dask",
    "shutdown_joblib",
]

Args = tuple[Any, ...]


def has_dask() -> bool:
    return importlib.util.find_spec("distributed") is not None


class Backend(abc.ABC):
    """A pool of some kind that runs the functions of ``benchmarks.work`` by name."""

    label: str = "backend"
    kind: str = "baseline"
    coro: bool = False  # runs the coroutine form of each task
    remote: bool = False  # runs the calls in other processes

    def __init__(self, workers: int) -> None:
        self.workers = workers

    async def open(self) -> None:  # noqa: B027 - most pools start lazily
        """Start the pool (may be lazy: the first call then pays the start)."""

    async def close(self) -> None:  # noqa: B027
        """Shut the pool down and wait for its workers to exit."""

    @abc.abstractmethod
    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        """Run ``task(name)(*a)`` for every ``a`` side by side; answer the results in order."""

    async def call(self, name: str, *args: Any, lazy: bool = False) -> Any:
        """One round trip."""
        return (await self.gather(name, [args], lazy=lazy))[0]

    async def check_placement(self) -> None:
        """Fail unless the calls run where this backend says (another process or this one)."""
        pids = set(await self.gather("where", [()] * (2 * self.workers)))
        elsewhere = os.getpid() not in pids
        if elsewhere != self.remote:
            raise RuntimeError(f"{self.label}: calls ran in processes {sorted(pids)}; expected "
                               f"{'other processes' if self.remote else 'this process'}")

    def fn(self, name: str) -> Callable[..., Any]:
        return work.task(name, coro=self.coro)

    async def __aenter__(self) -> Backend:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class Serial(Backend):
    """The reference for speedups: every call in turn, in this process."""

    label = "serial (one process)"

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        fn = self.fn(name)
        return [fn(*a) for a in args]


class AsyncioGather(Backend):
    label = "asyncio gather(create_task)"
    coro = True

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        fn = self.fn(name)
        return list(await asyncio.gather(*[asyncio.create_task(fn(*a)) for a in args]))

    async def call(self, name: str, *args: Any, lazy: bool = False) -> Any:
        return await asyncio.create_task(self.fn(name)(*args))


class AsyncioQueue(Backend):
    """One consumer task awaiting the calls put on an ``asyncio.Queue``: the floor of a queue."""

    label = "asyncio.Queue consumer"
    coro = True

    async def open(self) -> None:
        self._queue: asyncio.Queue[tuple[Callable[..., Any], Args]] = asyncio.Queue()
        self._results: list[Any] = []
        self._consumer = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        queue, results = self._queue, self._results
        while True:
            fn, args = await queue.get()
            results.append(await fn(*args))
            queue.task_done()

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        fn, put = self.fn(name), self._queue.put_nowait
        self._results.clear()
        for a in args:
            put((fn, a))
        await self._queue.join()
        return list(self._results)

    async def close(self) -> None:
        self._consumer.cancel()
        await asyncio.gather(self._consumer, return_exceptions=True)


class RunInExecutor(Backend):
    """``loop.run_in_executor`` on a ``concurrent.futures`` executor owned by the backend."""

    def __init__(self, workers: int, label: str, make: Callable[[int], Any],
                 remote: bool) -> None:
        super().__init__(workers)
        self.label, self._make, self.remote = label, make, remote

    async def open(self) -> None:
        self._pool = self._make(self.workers)

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        loop, fn, pool = asyncio.get_running_loop(), self.fn(name), self._pool
        return list(await asyncio.gather(*[loop.run_in_executor(pool, fn, *a) for a in args]))

    async def close(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)


def _loky_pool(workers: int) -> Any:
    try:
        import loky
    except ImportError as exc:
        raise NotAvailable(f"loky not installed: {exc}") from exc
    return loky.ProcessPoolExecutor(max_workers=workers)


class AioMPApply(Backend):
    """``aiomultiprocess.Pool.apply`` per call: what a user of that library writes by hand."""

    label = "aiomultiprocess apply"
    coro = True
    remote = True

    async def open(self) -> None:
        try:
            import aiomultiprocess
        except ImportError as exc:
            raise NotAvailable(f"aiomultiprocess not installed: {exc}") from exc
        self._pool = aiomultiprocess.Pool(processes=self.workers)

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        fn, pool = self.fn(name), self._pool
        return list(await asyncio.gather(*[pool.apply(fn, a) for a in args]))

    async def close(self) -> None:
        self._pool.close()
        await self._pool.join()
        _stop_aiomp_manager()


def _stop_aiomp_manager() -> None:
    """aiomultiprocess starts a process-wide ``SyncManager`` process and never stops it."""
    from aiomultiprocess import core

    manager, core._manager = core._manager, None
    if manager is not None:
        manager.shutdown()


class AioMPMap(AioMPApply):
    """``aiomultiprocess.Pool.starmap``: one batch for all calls (a reference, not a peer)."""

    label = "aiomultiprocess starmap"

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        return list(await self._pool.starmap(self.fn(name), args))


def dask_tcp() -> bool:
    """``BENCH_DASK_TCP=1``: both Dask rows on plain TCP; by default both on TLS with temporary
    credentials, as statepool's ``DaskExecutor`` starts its own cluster (where ``cryptography``
    is installed)."""
    return os.environ.get("BENCH_DASK_TCP", "") not in ("", "0")


def dask_security() -> Any:
    """The ``security`` of the baseline's cluster: the one statepool's row has (TLS with
    temporary credentials unless ``dask_tcp()``, or where ``cryptography`` is missing)."""
    if dask_tcp() or importlib.util.find_spec("cryptography") is None:
        return None
    from distributed import Security

    return Security.temporary()  # type: ignore[no-untyped-call]


class DaskClient(Backend):
    """``Client.submit`` on a ``LocalCluster`` of one-threaded worker processes, on loopback,
    with the options statepool's own ``DaskExecutor`` gives its cluster (TLS included: see
    ``dask_security``)."""

    label = "dask Client.submit"
    remote = True

    async def open(self) -> None:
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise NotAvailable(f"distributed not installed: {exc}") from exc
        quiet_dask()
        self._cluster = await LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, asynchronous=True, silence_logs=logging.ERROR,
            # the scheduler serves its HTTP routes on 8787 even without a dashboard
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, security=dask_security(),
        )
        self._client = await Client(  # type: ignore[no-untyped-call]
            self._cluster, asynchronous=True)

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        fn, client = self.fn(name), self._client
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "large object in task graph" for the payloads
            futures = [client.submit(fn, *a, pure=False) for a in args]
        return list(await client.gather(futures))

    async def close(self) -> None:
        await self._client.close()
        await self._cluster.close()  # type: ignore[misc]


def quiet_dask() -> None:
    """Keep distributed's INFO and shutdown chatter off the terminal."""
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Joblib(Backend):
    """``joblib.Parallel(n_jobs=workers)``: synchronous, auto-batching; a reference point."""

    label = "joblib.Parallel (sync)"
    remote = True

    async def open(self) -> None:
        try:
            import joblib
        except ImportError as exc:
            raise NotAvailable(f"joblib not installed: {exc}") from exc
        self._joblib = joblib

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        jl, fn = self._joblib, self.fn(name)
        return list(jl.Parallel(n_jobs=self.workers)(jl.delayed(fn)(*a) for a in args))

    async def close(self) -> None:
        """joblib keeps its worker pool for the life of the process, as it does for a user;
        ``shutdown_joblib()`` stops it at the end of the run."""


def shutdown_joblib() -> None:
    """Stop joblib's process-wide worker pool, if it started one. Its memmapping folders stay
    in /dev/shm until its resource tracker removes them when this process exits."""
    import sys

    if "joblib" not in sys.modules:
        return
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    if executor is not None:
        executor.shutdown(wait=True)


def baseline_factories() -> dict[str, Callable[[int], Backend]]:
    """Every baseline by its row label; dask only when ``distributed`` is importable."""
    factories: dict[str, Callable[[int], Backend]] = {
        AsyncioGather.label: AsyncioGather,
        AsyncioQueue.label: AsyncioQueue,
        "ThreadPoolExecutor": lambda w: RunInExecutor(
            w, "ThreadPoolExecutor", lambda n: concurrent.futures.ThreadPoolExecutor(n), False),
        "ProcessPoolExecutor": lambda w: RunInExecutor(
            w, "ProcessPoolExecutor", lambda n: concurrent.futures.ProcessPoolExecutor(n), True),
        "loky (direct)": lambda w: RunInExecutor(w, "loky (direct)", _loky_pool, True),
        AioMPApply.label: AioMPApply,
        AioMPMap.label: AioMPMap,
        Joblib.label: Joblib,
        Serial.label: Serial,
    }
    if has_dask():
        factories[DaskClient.label] = DaskClient
    return factories
