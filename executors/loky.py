"""``"process"``: plain and coroutine functions in a loky process pool, one crash costing one state.

The executor keeps its own waiting line and hands loky no more calls than it has workers, each
with a *slot* in which the worker writes its PID (see ``_loky_worker``). That is what makes the
promises below possible on top of a pool that loky breaks as a whole on any crash:

* **Crash isolation.** When a worker dies (``os._exit``, a signal, a segfault, the OOM killer),
  loky fails every in-flight call. The state whose worker died first fails with
  ``WorkerCrashedError`` naming it and the exit code or signal; the others are put back at the
  head of the line and run again on a fresh pool (a call that sees the pool break under it
  ``MAX_BREAKS`` times fails). The pool recovers; later states run.
* **Hard cancel.** Cancelling the task that awaits ``run()`` (a timeout, ``handle.cancel()``)
  kills the worker running the call, so its CPU work stops; the calls that shared the pool run
  again, unseen but for the time. A call still waiting for a worker is dropped locally.
* **Never blocking the loop.** Pickling, ``submit()`` (which may start workers) and pool
  start-up and shutdown run on one private helper thread; outcomes are unpickled on loky's
  thread.
* **Recycling.** ``max_tasks_per_worker`` and ``max_memory`` recycle a worker between calls;
  a call that drives its worker past ``max_memory`` while it runs (RSS polled every
  ``memory_poll_interval`` seconds) has the worker killed and fails with ``WorkerCrashedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import psutil
from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

from engine.errors import WorkerCrashedError

from ._loky_pool import LokyPool, describe_exit, kill_tree
from ._loky_worker import SlotTable, run_call
from ._remote import dumps_call, loads_outcome
from .base import Executor, PreparedCall

__all__ = ["LokyExecutor"]

logger = logging.getLogger("engine")

MAX_BREAKS = 3  # a call the pool breaks under this many times (as an innocent) fails
_START_POLL_S = 0.005  # how often a cancelled call that has not started yet is looked at


class _Phase(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Job:
    """One call on its way through the executor (it may be sent more than once)."""

    __slots__ = ("breaks", "call", "cf", "doom", "fut", "payload", "pool", "rss", "slot",
                 "ticket")

    def __init__(self, call: PreparedCall, fut: asyncio.Future[Any]) -> None:
        self.call = call
        self.fut = fut
        self.payload: bytes | None = None  # pickled once, kept for a re-run
        self.slot: int | None = None  # while handed to loky
        self.pool: LokyPool | None = None
        self.cf: Future[Any] | None = None
        self.ticket = 0  # bumped at every dispatch: callbacks of an earlier one are stale
        self.breaks = 0
        self.doom: str | None = None  # why the executor killed its worker: "cancel", "memory"
        self.rss = 0

    def __repr__(self) -> str:
        return f"<_Job {self.call.state_name!r} slot={self.slot} ticket={self.ticket}>"


class LokyExecutor(Executor):
    """A loky process pool in which a crash, a cancel or a timeout costs only its own state.

    ``max_workers`` defaults to the usable cores. ``max_tasks_per_worker`` recycles a worker
    after that many calls; ``max_memory`` (bytes of RSS per worker) recycles a worker past it
    between calls and kills one that passes it while running (its state fails).
    """

    name = "process"

    def __init__(self, max_workers: int | None = None, *, max_tasks_per_worker: int | None = None,
                 max_memory: int | None = None, memory_poll_interval: float = 0.1) -> None:
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else os.cpu_count() or 1
        for field, value in (("max_workers", max_workers),
                             ("max_tasks_per_worker", max_tasks_per_worker),
                             ("max_memory", max_memory)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"LokyExecutor: {field!r} must be an int >= 1, got {value!r}")
        if memory_poll_interval <= 0:
            raise ValueError("LokyExecutor: 'memory_poll_interval' must be > 0, "
                             f"got {memory_poll_interval!r}")
        self.max_workers: int = max_workers
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_memory = max_memory
        self.memory_poll_interval = memory_poll_interval
        self.pool_breaks = 0  # how many times a pool broke and was replaced
        self.recycled = 0  # how many workers left after max_tasks_per_worker or max_memory
        self._phase = _Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._table: SlotTable | None = None
        self._pool: LokyPool | None = None
        self._pool_starting: asyncio.Future[LokyPool] | None = None
        self._generation = 0
        self._pending: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}  # slot -> job handed to loky
        self._free: list[int] = list(range(max_workers))[::-1]
        self._memory_timer: asyncio.TimerHandle | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._phase is _Phase.NEW:
            self._loop = loop
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="statepool-loky")
            self._table = SlotTable.create(self.max_workers)
            self._phase = _Phase.OPEN
        elif self._phase is not _Phase.OPEN:
            raise RuntimeError(f"the process executor is {self._phase.value}")
        elif loop is not self._loop:
            raise RuntimeError("the process executor is bound to another event loop")
        return loop

    async def start(self) -> None:
        """Start the workers now and wait until one of them answers."""
        self._open()
        pool = self._pool
        if pool is None:
            pool = await asyncio.shield(self._start_pool())
        with contextlib.suppress(BrokenProcessPool):  # a break is handled like any other
            await asyncio.wrap_future(pool.warm)

    def _start_pool(self) -> asyncio.Future[LokyPool]:
        """Build the next pool on the helper thread (one at a time)."""
        if self._pool_starting is None:
            assert self._loop is not None and self._helper is not None and self._table
            self._generation += 1
            make = functools.partial(
                LokyPool, self.max_workers, self._table, max_tasks=self.max_tasks_per_worker,
                max_memory=self.max_memory, generation=self._generation)
            fut = self._pool_starting = self._loop.run_in_executor(self._helper, make)
            fut.add_done_callback(self._pool_started)
        return self._pool_starting

    def _pool_started(self, fut: asyncio.Future[LokyPool]) -> None:
        self._pool_starting = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            logger.error("the process executor cannot start its workers: %s", exc, exc_info=exc)
            while self._pending:
                self._fail(self._pending.popleft(), exc)
            return
        pool = fut.result()
        if self._phase is _Phase.CLOSED:
            self._retire(pool, kill=True)
            return
        self._pool = pool
        pool.warm.add_done_callback(functools.partial(self._threadsafe, self._warmed, pool))
        self._pump()

    def _warmed(self, pool: LokyPool, warm: Future[Any]) -> None:
        if isinstance(warm.exception(), BrokenProcessPool):
            self._pool_broke(pool)

    def _retire(self, pool: LokyPool, *, kill: bool) -> None:
        assert self._helper is not None
        self._helper.submit(pool.close, kill)

    async def shutdown(self, *, cancel: bool) -> None:
        """Stop: ``cancel=False`` lets every call finish first; ``cancel=True`` kills the
        workers and cancels the calls. No worker process is left when it returns."""
        if self._phase is _Phase.NEW:
            self._phase = _Phase.CLOSED
            return
        if self._phase is not _Phase.OPEN:
            return
        loop = self._loop
        assert loop is not None and self._helper is not None and self._table is not None
        self._phase = _Phase.CLOSING
        while not cancel and (waiting := self._unfinished()):
            await asyncio.wait(waiting)
        for fut in self._unfinished():
            fut.cancel()
        kill = cancel or bool(self._running)  # a cancelled call whose kill is still due
        self._pending.clear()
        self._phase = _Phase.CLOSED
        if self._memory_timer is not None:
            self._memory_timer.cancel()
        if self._pool_starting is not None:
            await asyncio.wait([self._pool_starting])  # _pool_started retires it: CLOSED
        pool, self._pool = self._pool, None
        if pool is not None:
            self._retire(pool, kill=kill)
        await loop.run_in_executor(self._helper, _nothing)  # every retired pool is closed
        self._helper.shutdown(wait=True)
        self._running.clear()
        self._table.close()

    def _unfinished(self) -> list[asyncio.Future[Any]]:
        jobs = (*self._pending, *self._running.values())
        return [job.fut for job in jobs if not job.fut.done()]

    # -- running a call ----------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        loop = self._open()
        job = _Job(call, loop.create_future())
        self._pending.append(job)
        self._pump()
        try:
            return await job.fut
        except asyncio.CancelledError:
            self._abandon(job)
            raise

    def _pump(self) -> None:
        """Hand waiting calls to loky while it has a free worker."""
        if not self._pending or self._phase is _Phase.CLOSED:
            return
        pool = self._pool
        if pool is None:
            self._start_pool()
            return
        if pool.broken:
            self._pool_broke(pool)
            return
        assert self._helper is not None and self._table is not None
        while self._pending and self._free:
            job = self._pending.popleft()
            if job.fut.done():
                continue
            slot = job.slot = self._free.pop()
            self._table[slot] = 0
            self._running[slot] = job
            job.pool = pool
            job.ticket += 1
            job.call.started()
            self._helper.submit(self._send, pool, job, slot, job.ticket)
        if self.max_memory is not None and self._memory_timer is None and self._running:
            self._memory_timer = self._loop.call_later(  # type: ignore[union-attr]
                self.memory_poll_interval, self._poll_memory)

    def _send(self, pool: LokyPool, job: _Job, slot: int, ticket: int) -> None:
        """Pickle and submit (helper thread)."""
        if job.fut.done():  # cancelled before it could start: nothing to stop
            self._threadsafe(self._unsent, job, ticket, None)
            return
        try:
            if job.payload is None:
                job.payload = dumps_call(job.call)
            job.cf = pool.executor.submit(run_call, slot, job.payload)
        except BaseException as exc:
            self._threadsafe(self._unsent, job, ticket, exc)
            return
        job.cf.add_done_callback(functools.partial(self._landed, job, ticket))

    def _landed(self, job: _Job, ticket: int, cf: Future[Any]) -> None:
        """Unpickle the outcome (loky's thread), then hand it to the loop."""
        try:
            data, recycled = cf.result()
        except BaseException as exc:
            self._threadsafe(self._lost, job, ticket, exc)
            return
        try:
            value, ok = loads_outcome(data), True
        except BaseException as exc:
            value, ok = exc, False
        self._threadsafe(self._outcome, job, ticket, ok, value, recycled)

    def _threadsafe(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(callback, *args)

    def _current(self, job: _Job, ticket: int) -> bool:
        return job.ticket == ticket and job.slot is not None and self._running.get(job.slot) is job

    def _release(self, job: _Job) -> None:
        slot, job.slot = job.slot, None
        if slot is not None and self._running.get(slot) is job:
            del self._running[slot]
            self._free.append(slot)

    def _outcome(self, job: _Job, ticket: int, ok: bool, value: Any, recycled: bool) -> None:
        if not self._current(job, ticket):
            return
        self.recycled += recycled
        self._release(job)
        if ok:
            self._succeed(job, value)
        else:
            self._fail(job, value)
        self._pump()

    def _unsent(self, job: _Job, ticket: int, exc: BaseException | None) -> None:
        if not self._current(job, ticket):
            return
        pool = job.pool
        if pool is not None and (pool.broken or isinstance(exc, BrokenProcessPool)):
            self._pool_broke(pool)  # the job never ran: it goes back in line
            return
        self._release(job)
        if exc is not None:
            self._fail(job, exc)
        self._pump()

    def _lost(self, job: _Job, ticket: int, exc: BaseException) -> None:
        if not self._current(job, ticket):
            return
        if isinstance(exc, BrokenProcessPool) and job.pool is not None:
            self._pool_broke(job.pool)
            return
        self._release(job)
        if not isinstance(exc, (ShutdownExecutorError, CancelledError)):  # both on purpose
            self._fail(job, exc)
        self._pump()

    @staticmethod
    def _succeed(job: _Job, value: Any) -> None:
        if not job.fut.done():
            job.fut.set_result(value)

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        if not job.fut.done():
            job.fut.set_exception(exc)

    # -- crashes -----------------------------------------------------------------------------

    def _pool_broke(self, pool: LokyPool) -> None:
        """Fail the call whose worker died, put the others back in line, replace the pool."""
        if pool.handled or self._phase is _Phase.CLOSED:
            return
        pool.handled = True
        self.pool_breaks += 1
        if self._pool is pool:
            self._pool = None
        dead = pool.dead or {}
        table = self._table
        assert table is not None
        innocents, culprits, cancelled = [], [], 0
        for slot, job in list(self._running.items()):
            if job.pool is not pool:
                continue
            pid = table[slot]
            self._release(job)
            if job.fut.done():
                cancelled += 1  # its worker was killed on purpose
                continue
            if job.doom == "memory":
                culprits.append(job.call.state_name)
                self._fail(job, self._memory_error(job, pid))
            elif pid > 0 and pid in dead:
                culprits.append(job.call.state_name)
                self._fail(job, self._crash_error(job, pid, dead[pid]))
            elif job.breaks + 1 >= MAX_BREAKS:
                self._fail(job, WorkerCrashedError(
                    f"state {job.call.state_name!r} ({job.call.func_name}): the process pool "
                    f"broke {MAX_BREAKS} times while it ran, each time because of another "
                    "worker; giving up", state_name=job.call.state_name))
            else:
                job.breaks += 1
                innocents.append(job)
        self._pending.extendleft(reversed(innocents))
        logger.log(
            logging.DEBUG if cancelled and not culprits else logging.WARNING,
            "process pool #%d broke (dead workers: %s); failing %s, running %d other state(s) "
            "again on a fresh pool", pool.generation,
            ", ".join(f"{pid} ({describe_exit(code)})" for pid, code in dead.items()) or "none",
            ", ".join(repr(name) for name in culprits) or "no state", len(innocents))
        self._retire(pool, kill=True)
        self._pump()

    @staticmethod
    def _crash_error(job: _Job, pid: int, exitcode: int) -> WorkerCrashedError:
        call = job.call
        return WorkerCrashedError(
            f"state {call.state_name!r} ({call.func_name}) crashed its worker process {pid}: "
            f"{describe_exit(exitcode)}", state_name=call.state_name, exitcode=exitcode)

    def _memory_error(self, job: _Job, pid: int) -> WorkerCrashedError:
        call = job.call
        return WorkerCrashedError(
            f"state {call.state_name!r} ({call.func_name}) drove its worker process {abs(pid)} "
            f"to {_mib(job.rss)} of memory, past max_memory={_mib(self.max_memory or 0)}: "
            "the worker was killed", state_name=call.state_name, exitcode=-9)

    # -- cancel and memory ------------------------------------------------------------------

    def _abandon(self, job: _Job) -> None:
        """The task awaiting ``job`` was cancelled: drop it, or kill the worker running it."""
        if job.slot is None:
            with contextlib.suppress(ValueError):
                self._pending.remove(job)
            return
        if self._phase is _Phase.CLOSED:
            return  # shutdown kills every worker
        job.doom = "cancel"
        self._kill_when_started(job, job.ticket)

    def _kill_when_started(self, job: _Job, ticket: int) -> None:
        if not self._current(job, ticket) or self._phase is _Phase.CLOSED:
            return
        pid = self._table[job.slot]  # type: ignore[index]
        if pid > 0:
            self._kill(job, pid)
        elif pid == 0:  # not started yet: a local drop if loky still holds it, else wait
            cf = job.cf
            if cf is None or not cf.cancel():
                self._loop.call_later(  # type: ignore[union-attr]
                    _START_POLL_S, self._kill_when_started, job, ticket)
        # pid < 0: it has finished; its outcome is on the way and is discarded

    def _kill(self, job: _Job, pid: int) -> None:
        pool = job.pool
        if pool is not None and pool.has(pid):
            logger.debug("killing worker %d running state %r (%s)", pid, job.call.state_name,
                         job.doom)
            kill_tree(pid)

    def _poll_memory(self) -> None:
        self._memory_timer = None
        limit, table = self.max_memory, self._table
        if limit is None or table is None or self._phase is _Phase.CLOSED:
            return
        for slot, job in list(self._running.items()):
            pid = table[slot]
            if pid <= 0 or job.doom is not None:
                continue
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > limit:
                job.doom, job.rss = "memory", rss
                logger.warning("state %r drove worker %d to %s, past max_memory=%s: killing it",
                               job.call.state_name, pid, _mib(rss), _mib(limit))
                self._kill(job, pid)
        if self._running:
            self._memory_timer = self._loop.call_later(  # type: ignore[union-attr]
                self.memory_poll_interval, self._poll_memory)

    # -- introspection -----------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        pool = self._pool
        return pool.pids() if pool is not None and not pool.broken else []

    def __repr__(self) -> str:
        return (f"<LokyExecutor {self._phase.value} workers={self.max_workers} "
                f"running={len(self._running)} waiting={len(self._pending)} "
                f"pool_breaks={self.pool_breaks}>")


def _nothing() -> None:
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
