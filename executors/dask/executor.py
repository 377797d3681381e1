"""``"dask"``: states run on a Dask cluster through ``distributed.Client(asynchronous=True)``.

With no ``address`` the executor starts its own ``LocalCluster`` of worker processes on loopback,
with no dashboard, and closes it at shutdown; with an ``address`` it connects to that scheduler
(TLS through ``security``) and, at shutdown, closes only its client.

What Dask can and cannot stop. Up to ``max_in_flight`` calls are in Dask at once (``PIPELINE``
per cluster thread by default: Dask batches its messages, a thread given one task at a time
idles for each round trip); the others wait in the parent, and a state cancelled there never
reaches Dask. Its timeout starts when it is sent. A sent call that is cancelled is marked
cancelled on every worker before Dask cancels it (``support.cancel_mark``): if it had not
started it never will. A task that already runs cannot be interrupted: Dask only drops its
result. With ``kill_on_cancel`` (the default for a cluster the executor started) the worker
process running it (the mark says which) is killed, with what it started, and its nanny starts a
fresh one, so the CPU work stops too: by this process for a cluster of its own (the workers are
its children), by the worker's nanny otherwise; neither waits on the worker itself, whose task
may hold the GIL (its event loop then answers late).
Execution is at least once: when a worker dies, Dask runs the tasks it held again elsewhere, up
to ``allowed_failures`` times, then fails them with ``KilledWorker`` (a ``WorkerCrashedError``
here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from typing import Any

import distributed
import psutil

from .._wire import lifeline
from ..base import Executor, PreparedCall
from .scatter import ScatterCache
from .slots import Slots
from .support import (
    Lifeline,
    cancel_mark,
    hard_exit,
    kill_worker_tree,
    local_security,
    serialization_error,
    task_function,
    translate_error,
)

__all__ = ["DaskExecutor"]

logger = logging.getLogger(__name__)

# distributed's annotations are partial (untyped functions, optional awaitables): use it untyped
_dd: Any = distributed

#: Arguments whose estimated size reaches this many bytes are scattered ahead of the task.
SCATTER_THRESHOLD = 1_000_000
#: Calls in Dask at once per worker thread, unless ``max_in_flight`` says otherwise: Dask batches
#: its messages (a round trip takes 10-15 ms), so a thread with one call at a time idles.
PIPELINE = 4
#: How long a cancel waits for the workers' answers to its cancel mark (see ``_running_on``).
MARK_TIMEOUT_S = 5.0
_WRAPPED_MAX = 256  # functions whose Dask wrapper is kept (Dask caches a function it saw)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


class DaskExecutor(Executor):
    """Runs each call as one Dask task; a ``LocalCluster`` of its own unless given ``address``."""

    name = "dask"

    def __init__(
        self,
        address: str | None = None,
        n_workers: int | None = None,
        security: distributed.Security | None = None,
        *,
        threads_per_worker: int = 1,
        dashboard_address: str | None = None,
        kill_on_cancel: bool | None = None,
        allowed_failures: int = 1,
        max_in_flight: int | None = None,
        scatter_threshold: int | None = SCATTER_THRESHOLD,
        cluster_kwargs: Mapping[str, Any] | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if address is not None and n_workers is not None:
            raise ValueError("DaskExecutor: give either 'address' or 'n_workers', not both")
        for field, value in (("n_workers", n_workers), ("max_in_flight", max_in_flight)):
            if value is not None and value < 1:
                raise ValueError(f"DaskExecutor: {field!r} must be >= 1, got {value!r}")
        if threads_per_worker < 1:
            raise ValueError(
                f"DaskExecutor: 'threads_per_worker' must be >= 1, got {threads_per_worker!r}")
        if allowed_failures < 0:
            raise ValueError(
                f"DaskExecutor: 'allowed_failures' must be >= 0, got {allowed_failures!r}")
        if address is None and n_workers is None:
            n_workers = _default_workers()
        self.address = address
        self.n_workers = n_workers
        self.security = security
        self.threads_per_worker = threads_per_worker
        self.dashboard_address = dashboard_address
        self.kill_on_cancel = address is None if kill_on_cancel is None else kill_on_cancel
        self.allowed_failures = allowed_failures
        self.max_in_flight = max_in_flight
        self.cluster_kwargs = dict(cluster_kwargs or {})
        self.client_kwargs = dict(client_kwargs or {})
        # to a LocalCluster of its own, large arguments go straight to a worker: through the
        # scheduler (which runs in this process) they would cross this process's TLS twice more
        self._scatter = ScatterCache(scatter_threshold, direct=True if address is None else None)
        self._client: Any = None
        self._cluster: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._starting: asyncio.Task[None] | None = None
        self._slots = Slots(self._capacity)
        self._in_flight: set[Any] = set()
        self._wrapped: dict[Any, Any] = {}  # fn -> its task_function, reused
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` once started (for ``client.upload_file`` and the like)."""
        return self._client

    async def start(self) -> None:
        """Start the cluster (none when given ``address``) and connect the client."""
        await self._ensure_client()

    async def _ensure_client(self) -> Any:
        if self._closed:
            raise RuntimeError("the dask executor is shut down")
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("the dask executor belongs to the event loop that started it")
        if self._client is not None:
            return self._client
        if self._starting is None:
            self._loop = loop
            self._starting = loop.create_task(self._connect())
        starting = self._starting
        try:
            # shielded: a state cancelled while the cluster starts does not abort the start
            # half way (that would leave worker processes behind); shutdown() waits for it
            await asyncio.shield(starting)
        except Exception:
            if self._starting is starting:
                self._starting = None  # the next call tries again
            raise
        if self._client is None:  # shut down while starting
            raise RuntimeError("the dask executor is shut down")
        return self._client

    async def _connect(self) -> None:
        cluster = None
        try:
            if self.address is None:
                cluster = await _dd.LocalCluster(**self._local_cluster_options())
                target: Any = cluster
            else:
                target = self.address
            client = await _dd.Client(target, asynchronous=True, security=self.security,
                                      **self.client_kwargs)  # None: the cluster's own
            if cluster is not None:  # its workers die with this process (support.Lifeline)
                await client.register_plugin(Lifeline(os.getpid()))
        except BaseException:
            if cluster is not None:
                await cluster.close()
            raise
        if self._closed:  # shutdown() came while the cluster started
            await client.close()
            if cluster is not None:
                await cluster.close()
            return
        self._cluster, self._client = cluster, client
        logger.debug("dask executor connected to %s", client.scheduler.address)

    def _local_cluster_options(self) -> dict[str, Any]:
        scheduler_kwargs: dict[str, Any] = {"allowed_failures": self.allowed_failures}
        if self.dashboard_address is None:
            # the scheduler serves its HTTP routes (health, metrics) even without a dashboard,
            # on 8787 by default: keep them on a free loopback port
            scheduler_kwargs["dashboard_address"] = "127.0.0.1:0"
        options: dict[str, Any] = {
            "n_workers": self.n_workers,
            "threads_per_worker": self.threads_per_worker,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": self.dashboard_address,
            "asynchronous": True,
            "security": self.security if self.security is not None else local_security(),
            "silence_logs": logging.CRITICAL,  # failures reach the engine's log, once
        }
        options.update(self.cluster_kwargs)
        scheduler_kwargs.update(options.pop("scheduler_kwargs", None) or {})
        options["scheduler_kwargs"] = scheduler_kwargs
        return options

    async def shutdown(self, *, cancel: bool) -> None:
        """Close the client, and the cluster if this executor started it. Safe to call twice.

        ``cancel=True`` cancels the tasks in flight (running ones on a cluster the executor
        started end with it); ``cancel=False`` waits for them first.
        """
        self._closed = True
        starting = self._starting
        if starting is not None and not starting.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(starting)  # it closes what it started, seeing _closed
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        futures = list(self._in_flight)
        try:
            if client is not None and futures:
                if cancel:
                    await client.cancel(futures, reason="statepool executor shutdown")
                else:
                    await _dd.wait(futures)
        finally:
            self._scatter.clear()
            if client is not None:
                await client.close()
            if cluster is not None:
                await cluster.close()
                logger.debug("dask executor closed its LocalCluster")

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes of the ``LocalCluster`` this executor started."""
        cluster = self._cluster
        if cluster is None:
            return []
        pids = (getattr(worker, "pid", None) for worker in list(cluster.workers.values()))
        return sorted(pid for pid in pids if isinstance(pid, int) and _alive(pid))

    def __repr__(self) -> str:
        where = self.address or f"LocalCluster({self.n_workers} workers)"
        state = "closed" if self._closed else "connected" if self._client else "not started"
        return f"<DaskExecutor {where} {state}>"

    # -- running -----------------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        """Submit ``call`` as one Dask task and return its result."""
        client = self._client
        if client is None or self._closed:
            client = await self._ensure_client()
        slots = self._slots
        await slots.acquire()
        held: list[int] = []
        try:
            try:
                args, kwargs = call.args, call.kwargs
                if args or kwargs:
                    args, kwargs = await self._scatter.swap_in(client, args, kwargs, held)
                fut = client.submit(self._task(call.fn), *args,
                                    key=f"{call.state_name}-{uuid.uuid4().hex}",
                                    pure=False, **kwargs)
            except Exception as exc:
                error = serialization_error(exc, call)
                if error is None:
                    raise
                raise error from exc
            return await self._result(client, fut, call)
        finally:
            if held:
                self._scatter.release(held)
            slots.release()

    def _task(self, fn: Any) -> Any:
        """The Dask task function of ``fn``, the same object each time for the same ``fn``
        (Dask then pickles it once, and its workers unpickle it once)."""
        try:
            return self._wrapped[fn]
        except KeyError:
            pass
        except TypeError:  # not hashable
            return task_function(fn)
        if len(self._wrapped) >= _WRAPPED_MAX:
            self._wrapped.clear()
        wrapped = self._wrapped[fn] = task_function(fn)
        return wrapped

    def capacity(self) -> int | None:
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self.n_workers is not None:
            return self.n_workers * self.threads_per_worker * PIPELINE
        return None

    def _capacity(self) -> int:
        """How many calls may be in Dask at once: ``max_in_flight``, or ``PIPELINE`` per thread
        of the cluster."""
        if self._closed:
            raise RuntimeError("the dask executor is shut down")
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self._cluster is not None:  # our LocalCluster's scheduler runs in this process
            return int(self._cluster.scheduler.total_nthreads) * PIPELINE
        if self._client is None:
            return 0
        # the client's view, refreshed every 2 s (distributed.client.scheduler-info-interval)
        return int(self._client.scheduler_info().get("total_threads", 0)) * PIPELINE

    async def _result(self, client: Any, fut: Any, call: PreparedCall) -> Any:
        self._in_flight.add(fut)
        call.started()
        try:
            try:
                call.worker, call.ran_s, result = await fut  # see task_function
                return result
            except asyncio.CancelledError:
                # the state was cancelled or timed out: stop the task, whatever comes next
                await asyncio.shield(asyncio.ensure_future(self._stop(client, fut, call)))
                raise
            except Exception as exc:
                error = translate_error(exc, call)
                raise error from error.__cause__
        finally:
            self._in_flight.discard(fut)
            fut.release()

    async def _stop(self, client: Any, fut: Any, call: PreparedCall) -> None:
        """Cancel ``fut`` exactly: every worker marks its key cancelled first (a task that has
        not started there never will, see ``support.task_function``) and says whether it runs
        it; then Dask cancels it; with ``kill_on_cancel`` the worker running it is ended."""
        running = await self._running_on(client, fut, call) if not fut.done() else []
        try:
            await client.cancel([fut], reason=f"state {call.state_name!r} cancelled")
            if running and self.kill_on_cancel:
                logger.warning("state %r (%s) cancelled while running: ending its Dask worker %s",
                               call.state_name, call.func_name, ", ".join(running))
                await self._end_workers(client, running)
        except Exception:
            logger.warning("state %r: could not stop its Dask task", call.state_name,
                           exc_info=True)

    async def _running_on(self, client: Any, fut: Any, call: PreparedCall) -> list[str]:
        """Mark ``fut``'s key cancelled on every worker; answer those that run it.

        A worker whose task holds the GIL answers slowly; after ``MARK_TIMEOUT_S`` the scheduler
        of a cluster of our own (it runs in this process) says which worker the task is on."""
        try:
            marks = await asyncio.wait_for(
                client.run(cancel_mark(fut.key), on_error="return"), MARK_TIMEOUT_S)
            return [addr for addr, started in marks.items() if started is True]
        except asyncio.TimeoutError:
            logger.warning("state %r: its Dask workers did not answer the cancel mark within "
                           "%.0f s", call.state_name, MARK_TIMEOUT_S)
        except Exception:
            logger.debug("state %r: no cancel mark on the Dask workers", call.state_name,
                         exc_info=True)
        task = self._cluster.scheduler.tasks.get(fut.key) if self._cluster is not None else None
        worker = getattr(task, "processing_on", None)
        return [] if worker is None else [str(worker.address)]

    async def _end_workers(self, client: Any, addresses: list[str]) -> None:
        """SIGKILL the worker processes at ``addresses`` and what they started; their nannies
        start new ones. Nothing waits on those workers: one whose task holds the GIL would
        answer late (its event loop waits for the GIL at each step).

        The worker processes of our own cluster are our children: killed from here. Others by
        their nanny (``support.kill_worker_tree``); a worker with no nanny ends itself."""
        rest: list[str] = []
        for address in addresses:
            pid = self._own_worker_pid(address)
            if pid is None:
                rest.append(address)
            else:
                lifeline.kill_tree(pid)
        if not rest:
            return
        workers = client.scheduler_info().get("workers", {})
        nannies = {a: workers[a]["nanny"] for a in rest if (workers.get(a) or {}).get("nanny")}
        if nannies:
            killed = await client.run(kill_worker_tree(), workers=list(nannies), nanny=True,
                                      on_error="return")
            done = {nanny for nanny, pid in killed.items() if isinstance(pid, int)}
            rest = [a for a in rest if nannies.get(a) not in done]
        if rest:
            await client.run(hard_exit(), workers=rest, wait=False)

    def _own_worker_pid(self, address: str) -> int | None:
        """The PID of the worker at ``address`` if it is a process of our own cluster (a child
        of this process, its nannies running here)."""
        cluster = self._cluster
        worker = cluster.scheduler.workers.get(address) if cluster is not None else None
        pid = getattr(worker, "pid", None)
        if not isinstance(pid, int) or pid <= 0:
            return None
        try:
            return pid if psutil.Process(pid).ppid() == os.getpid() else None
        except psutil.Error:
            return None
