"""``"process"``: plain and coroutine functions in worker processes, one crash costing one state.

The workers are fresh interpreters started by loky's process backend; the executor talks to each
one over its own socketpair (``_loky_pool``, ``_loky_worker``) rather than through loky's
``ProcessPoolExecutor``, which breaks as a whole when one worker dies, cannot say which task did
it, and costs several thread hops per call. What that buys:

* **Batches.** Calls measured fast travel many to a frame (``_loky_batch``: adaptive, as
  joblib's auto-batching), pickled in one go, and a worker holds a second batch of fast calls
  while it runs the first, so it never waits for a round trip. A call not measured yet, or
  measured slow, goes alone and only to an idle worker; the calls not started of a batch that
  runs far past its estimate are asked back for idle workers. Each call answers in its own
  frame as soon as it ends; the loop reads every frame that arrived in one go.
* **Crash isolation.** A worker that dies (``os._exit``, a signal, a segfault, the OOM killer)
  takes nobody else with it: the call it was running (the slot table says which) fails with
  ``WorkerCrashedError``; the calls it had finished keep their results; the calls it had not
  started run on another worker. A new worker takes its place.
* **Hard cancel.** Cancelling the task that awaits ``run()`` (a timeout, ``handle.cancel()``)
  kills the worker running the call, and only that one; a call that has not started is skipped.
* **Never blocking the loop.** Starting workers, writing large buffers and pickling what is too
  large to pickle inline happen on one private helper thread; the loop only reads and writes
  non-blocking sockets.
* **Large arrays** (numpy, ``bytearray``) travel out of band through a file of the executor's
  temporary directory that the worker maps (``_shm``).
* **Recycling.** ``max_tasks_per_worker`` and ``max_memory`` recycle a worker between calls; a
  call that drives its worker past ``max_memory`` while it runs (RSS polled every
  ``memory_poll_interval`` seconds) has the worker killed and fails with ``WorkerCrashedError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sys
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil

from statepool.engine.errors import WorkerCrashedError

from .._wire import faults, lifeline, logrelay, shm, threads
from .._wire.initializer import check as initializer_check
from ..base import Executor, OnDone, PreparedCall
from . import boot
from .batch import Job, future_setter
from .dispatch import RING, Dispatch, Phase
from .pool import Worker, describe_exit, kill_tree
from .worker import RUNNING, SlotTable

__all__ = ["LokyExecutor"]

logger = logging.getLogger(__name__)

TEMP_PREFIX = "statepool-process-"  # then the parent's PID (see lifeline.sweep)
MAX_RERUNS = 3  # a call sent again this often after deaths with nobody to blame fails
MAX_START_FAILURES = 3  # workers in a row that die before they answer: stop trying
_STOP_TIMEOUT_S = 5.0
_RESPAWN_S = 0.1  # a worker that failed to start is tried again after this (times failures)
_EXIT_POLL_S = 0.05  # at stop, how often the workers' exit codes are polled
_LIVENESS_S = 1.0  # how often busy workers are checked for a death the sentinel missed
_OPEN = Phase.OPEN  # (an enum member looked up on its class costs 0.2 us on Python 3.11)


class LokyExecutor(Dispatch, Executor):
    """Worker processes in which a crash, a cancel or a timeout costs only its own state.

    ``max_workers`` defaults to the usable cores. ``max_tasks_per_worker`` recycles a worker
    after that many calls; ``max_memory`` (bytes of RSS per worker) recycles a worker past it
    between calls and kills one that passes it while running (its state fails).

    ``inner_threads`` limits the BLAS / OpenMP thread pools inside each worker (numpy, scipy,
    scikit-learn): ``"auto"`` (the default) gives each ``max(1, usable cores // max_workers)``
    threads, keeping a limit set in this process's environment (``OMP_NUM_THREADS``...); an int
    sets that limit; ``None`` leaves the libraries alone (each then uses every core, and
    ``max_workers`` of them fight for the cores). See docs/process.md.
    """

    name = "process"

    def __init__(self, max_workers: int | None = None, *, max_tasks_per_worker: int | None = None,
                 max_memory: int | None = None, memory_poll_interval: float = 0.1,
                 inner_threads: threads.InnerThreads = "auto",
                 initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] | list[Any] = ()) -> None:
        # initializer(*initargs): once in each worker, before its first call (cloudpickled:
        # lambdas work); a worker whose initializer raised fails what it is given
        setup = initializer_check("LokyExecutor", initializer, initargs, coroutine_ok=False,
                                  carried=True)
        self._setup = setup.dumps() if setup is not None else None
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
        self.inner_threads = threads.check(inner_threads, "LokyExecutor")
        super().__init__(max_workers)
        self.max_workers: int = max_workers
        self.max_tasks_per_worker = max_tasks_per_worker
        self.max_memory = max_memory
        self.memory_poll_interval = memory_poll_interval
        self.crashes = 0  # workers that died on their own (a crash, a kill from outside)
        self.kills = 0  # workers killed on purpose: cancel, timeout, max_memory
        self.recycled = 0  # workers that left after max_tasks_per_worker or max_memory
        self._spawning: dict[int, asyncio.Future[Worker]] = {}
        self._pycache: str | None = None  # see boot.compile_ahead
        self._env: dict[str, str] = {}  # added to each worker's environment (threads)
        self._procs: dict[int, Any] = {}  # pid -> process, for the finalizer
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._relay: logrelay.Relay | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._phase is Phase.NEW:
            self._loop = loop
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="statepool-loky")
            self._dir = lifeline.make_temp_dir(TEMP_PREFIX)  # and sweep dead parents' ones
            self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._dir)
            self._table = SlotTable.create(self.max_workers * RING, self._dir)
            self._env = threads.worker_env(self.inner_threads, self.max_workers)
            self._relay = logrelay.Relay(loop)  # the workers' log records, in this process
            self._ready = loop.create_future()
            self._phase = Phase.OPEN
            if sys.dont_write_bytecode:  # workers would compile their modules: do it once
                self._pycache = os.path.join(self._dir, "pycache")
                self._fill()  # the first workers start first, then this, while they start
                self._helper.submit(boot.compile_ahead, self._pycache)
        elif self._phase is not Phase.OPEN:
            raise RuntimeError(f"the process executor is {self._phase.value}")
        elif loop is not self._loop:
            raise RuntimeError("the process executor is bound to another event loop")
        self._fill(retry=True)
        return loop

    async def start(self) -> None:
        """Start the workers now and wait until one of them answers."""
        self._open()
        assert self._ready is not None
        await asyncio.shield(self._ready)

    def _fill(self, *, retry: bool = False) -> None:
        """Start a worker in every empty place, unless too many died as they started (a new
        call, ``retry``, tries again)."""
        if self._start_failures >= MAX_START_FAILURES:
            if not retry:
                return
            self._start_failures = 0
            if self._ready is not None and self._ready.done():
                assert self._loop is not None
                self._ready = self._loop.create_future()
        for index, worker in enumerate(self._workers):
            if worker is None and index not in self._spawning:
                self._spawn(index)

    def _spawn(self, index: int) -> None:
        assert self._loop is not None and self._helper is not None and self._table is not None
        fut = self._loop.run_in_executor(
            self._helper, Worker.spawn, index, index * RING, RING, self._table,
            self.max_tasks_per_worker, self.max_memory, self._pycache, self._env,
            {"log": self._relay.config() if self._relay else None, "faults": self._dir},
            self._setup)
        self._spawning[index] = fut
        fut.add_done_callback(functools.partial(self._spawned, index))

    def _spawned(self, index: int, fut: asyncio.Future[Worker]) -> None:
        del self._spawning[index]
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self._start_failures += 1
            logger.error("the process executor cannot start a worker: %s", exc, exc_info=exc)
            if self._start_failures >= MAX_START_FAILURES:
                self._give_up(f"its workers cannot start ({type(exc).__name__}: {exc})")
            elif self._phase is Phase.OPEN:  # EMFILE, EAGAIN, ENOMEM may pass: try again
                assert self._loop is not None  # soon (the calls waiting would hang else)
                self._loop.call_later(_RESPAWN_S * self._start_failures, self._refill)
            return
        worker = fut.result()
        self._procs[worker.pid] = worker.process
        self._workers[index] = worker
        assert self._loop is not None
        worker.attach(self._loop, self._on_frames, self._on_exit)
        if self._phase is Phase.CLOSED:
            worker.kill("the executor closed")

    def _refill(self) -> None:
        if self._phase is Phase.OPEN:
            self._fill()

    def _give_up(self, why: str) -> None:
        """Workers cannot start: fail what waits (a later ``run()`` tries again)."""
        error = WorkerCrashedError(f"the process executor: {why}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: start() may never be awaited
        while self._pending:
            self._fail(self._pending.popleft(), error)

    async def shutdown(self, *, cancel: bool) -> None:
        """Stop: ``cancel=False`` lets every call finish first; ``cancel=True`` kills the
        workers and cancels the calls. No worker process is left when it returns."""
        if self._phase is Phase.NEW:
            self._phase = Phase.CLOSED
            return
        if self._phase is not Phase.OPEN:
            return
        loop = self._loop
        assert loop is not None and self._helper is not None and self._table is not None
        self._phase = Phase.CLOSING
        while not cancel and (waiting := self._unfinished()):
            await asyncio.wait([job.waiter() for job in waiting])
        for job in self._unfinished():
            job.cancel()
        self._phase = Phase.CLOSED
        self._pending.clear()
        for timer in (self._watch_timer, self._pump_handle, self._steal_timer):
            if timer is not None:
                timer.cancel()
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        while self._spawning:  # a worker that starts now is killed as it arrives
            await asyncio.wait(list(self._spawning.values()))
        workers = [w for w in self._workers if w is not None and w.exited is not None]
        for worker in workers:
            if cancel or worker.jobs or not worker.ready:  # a cancelled call may still run
                worker.kill("the executor closed")
            elif worker.alive:
                worker.stop()
        await self._wait_exits(loop, workers)
        await loop.run_in_executor(self._helper, _nothing)
        self._helper.shutdown(wait=True)
        self._table.close()
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._finalizer is not None:
            self._finalizer()  # removes the temporary directory

    async def _wait_exits(self, loop: asyncio.AbstractEventLoop, workers: list[Worker]) -> None:
        """Wait until the workers are gone, killing them past ``_STOP_TIMEOUT_S``; bounded even
        when a process a state left behind holds a worker's socket or sentinel open (its exit
        code is polled)."""
        exits = {w.exited for w in workers if w.exited is not None}
        deadline = loop.time() + _STOP_TIMEOUT_S
        killed = False
        while exits:
            _, exits = await asyncio.wait(exits, timeout=_EXIT_POLL_S)
            for worker in workers:
                if worker.alive and worker.process.exitcode is not None:
                    worker.died()  # gone: nothing else would tell
            if exits and loop.time() > deadline:
                if killed:
                    logger.error("process executor: workers %s did not exit",
                                 [w.pid for w in workers if w.alive])
                    break
                for worker in workers:
                    worker.kill("it did not stop in time")
                killed, deadline = True, loop.time() + _STOP_TIMEOUT_S

    def _unfinished(self) -> list[Job]:
        jobs = [job for job in self._pending if not job.over]
        for worker in self._workers:
            if worker is not None:
                jobs += [job for job in worker.jobs.values() if not job.over]
        return jobs

    # -- running a call ----------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        # Open and bound: the fast path. (A task of another loop cannot await the future of
        # this one: asyncio says so.)
        loop = self._loop if self._phase is _OPEN and self._start_failures == 0 \
            and None not in self._workers else self._open()
        assert loop is not None
        fut: asyncio.Future[Any] = loop.create_future()
        job = Job(call, future_setter(fut), self)
        self._line_up(job, loop)
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancel()  # skipped, or its worker killed
            raise

    def submit(self, call: PreparedCall, on_done: OnDone) -> Job:
        """Start ``call`` with no task to await it (the engine's fast path for plain blocking
        states; loop thread only): ``on_done(True, result)`` or ``on_done(False, exception)``
        ends it. The returned object's ``cancel()`` skips the call or kills its worker, as
        cancelling ``run()``'s task does."""
        loop = self._loop if self._phase is _OPEN and self._start_failures == 0 \
            and None not in self._workers else self._open()
        assert loop is not None
        job = Job(call, on_done, self)
        pending = self._pending
        pending.append(job)
        if self._pump_handle is None:
            self._pump_soon(pending, loop)
        return job

    def _line_up(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        pending = self._pending
        pending.append(job)
        if self._pump_handle is None:
            self._pump_soon(pending, loop)

    def _pump_soon(self, pending: deque[Job], loop: asyncio.AbstractEventLoop) -> None:
        """A call joined the line and no pump is due: send it now if it is alone and a worker
        idles, else with the others of this loop iteration."""
        if len(pending) == 1 and any(w is not None and w.ready and w.usable and not w.batches
                                     for w in self._workers):
            self._pump()  # alone, and a worker is idle: send it now
        else:  # the others of this loop iteration go with it
            self._pump_handle = loop.call_soon(self._pump)

    # -- deaths ------------------------------------------------------------------------------

    def _on_exit(self, worker: Worker) -> None:
        """A worker is gone: blame the call it was running, keep what it finished, send the
        calls it had not started to another worker, and start a new one."""
        self._procs.pop(worker.pid, None)
        if self._relay is not None:
            self._relay.drain()  # what it logged before it died comes first
        if self._workers[worker.index] is worker:
            self._workers[worker.index] = None
        code = worker.exitcode if worker.exitcode is not None else -9
        for batch in worker.batches:
            shm.release(batch.path)
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        worker.batches.clear()
        if self._phase is Phase.CLOSED:
            return
        table = self._table
        assert table is not None
        recycling = worker.leaving and code == 0 and worker.killed_for is None
        running = [job for job in jobs if table.states[worker.base + job.seq % RING] == RUNNING]
        culprits = [job for job in running if not job.over]  # not cancelled meanwhile
        for job in jobs:  # a failed handle the caller keeps must not keep the dead worker
            job.worker = job.batch = None  # (its process object holds a descriptor)
        fault = faults.describe(self._dir, worker.pid)  # a segfault's Python traceback
        for job in culprits:
            self._fail(job, self._memory_error(job, worker.pid) if job.doom == "memory"
                       else self._crash_error(job, worker.pid, code, fault))
        unstarted = [job for job in jobs if job not in running and not job.over]
        blameless = not running and not recycling  # it died between calls, or as it loaded
        if blameless:  # each goes alone next time, and only a few times
            for job in unstarted:
                job.reruns += 1
                if job.reruns > MAX_RERUNS:
                    self._fail(job, self._lost_error(job, worker.pid, code))
        self._requeue([job for job in unstarted if not job.over], solo=blameless)
        self._log_exit(worker, code, recycling, culprits, len(unstarted))
        if not worker.ready and not recycling and not (code is not None and code < 0):
            # an error as it starts counts; a signal (a kill from outside) only costs a respawn
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._give_up(f"its workers die as they start ({describe_exit(code)})")
        self._fill()
        self._pump()

    def _log_exit(self, worker: Worker, code: int, recycling: bool, culprits: list[Job],
                  others: int) -> None:
        if recycling:
            self.recycled += 1
            logger.debug("process worker %d recycled; %d call(s) it had not started go to "
                         "another worker", worker.pid, others)
            return
        if worker.killed_for:
            self.kills += 1
        else:
            self.crashes += 1
        logger.log(
            logging.DEBUG if worker.killed_for and not culprits else logging.WARNING,
            "process worker %d %s (%s); failing %s, running %d call(s) it had not started on "
            "another worker", worker.pid,
            f"was killed ({worker.killed_for})" if worker.killed_for else "died",
            describe_exit(code), ", ".join(repr(job.call.state_name) for job in culprits)
            or "no state", others)

    @staticmethod
    def _crash_error(job: Job, pid: int, exitcode: int, fault: str = "") -> WorkerCrashedError:
        call = job.call
        return WorkerCrashedError(
            f"state {call.state_name!r} ({call.func_name}) crashed its worker process {pid}: "
            f"{describe_exit(exitcode)}{fault}", state_name=call.state_name, exitcode=exitcode)

    @staticmethod
    def _lost_error(job: Job, pid: int, exitcode: int) -> WorkerCrashedError:
        call = job.call
        return WorkerCrashedError(
            f"state {call.state_name!r} ({call.func_name}): its worker process died "
            f"{MAX_RERUNS + 1} times before it could start it (the last one, {pid}: "
            f"{describe_exit(exitcode)}); giving up", state_name=call.state_name,
            exitcode=exitcode)

    def _memory_error(self, job: Job, pid: int) -> WorkerCrashedError:
        call = job.call
        return WorkerCrashedError(
            f"state {call.state_name!r} ({call.func_name}) drove its worker process {pid} "
            f"to {_mib(job.rss)} of memory, past max_memory={_mib(self.max_memory or 0)}: "
            "the worker was killed", state_name=call.state_name, exitcode=-9)

    # -- watching busy workers -------------------------------------------------------------

    def _watch(self) -> None:
        if self._watch_timer is None:
            assert self._loop is not None
            interval = self.memory_poll_interval if self.max_memory is not None else _LIVENESS_S
            self._watch_timer = self._loop.call_later(min(interval, _LIVENESS_S), self._tick)

    def _tick(self) -> None:
        """While workers hold calls: notice a death that the sentinel did not tell (a process
        the call started holds it open), and kill the worker of a call past ``max_memory``."""
        self._watch_timer = None
        if self._phase is Phase.CLOSED or self._table is None:
            return
        busy = [w for w in self._workers if w is not None and w.alive and w.jobs]
        for worker in busy:
            if worker.process.exitcode is not None:  # waitpid: it is gone
                worker.died()
            elif self.max_memory is not None:
                self._check_memory(worker, self.max_memory)
        if busy:
            self._watch()

    def _check_memory(self, worker: Worker, limit: int) -> None:
        job = next(iter(worker.jobs.values()))  # the earliest unanswered: running or next
        assert self._table is not None
        if self._table.states[worker.base + job.seq % RING] != RUNNING or job.doom is not None:
            return
        try:
            rss = psutil.Process(worker.pid).memory_info().rss
        except psutil.Error:
            return
        if rss > limit:
            job.doom, job.rss = "memory", rss
            logger.warning("state %r drove worker %d to %s, past max_memory=%s: killing it",
                           job.call.state_name, worker.pid, _mib(rss), _mib(limit))
            worker.kill("past max_memory")

    # -- introspection -----------------------------------------------------------------------

    def capacity(self) -> int:
        return self.max_workers

    async def worker_stack(self, call: PreparedCall) -> str | None:
        """The current Python stack of the worker running ``call`` (faulthandler; it runs on)."""
        pid = call.worker
        if not isinstance(pid, int) or pid not in self._procs:
            return None
        return await faults.stack(self._dir, pid) or None

    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers if w is not None and w.alive]

    def __repr__(self) -> str:
        running = sum(len(w.jobs) for w in self._workers if w is not None)
        return (f"<LokyExecutor {self._phase.value} workers={self.max_workers} "
                f"running={running} waiting={len(self._pending)} crashes={self.crashes} "
                f"kills={self.kills}>")


def _cleanup(procs: dict[int, Any], directory: str) -> None:
    """Kill what is left and remove the temporary directory (at shutdown, or at exit)."""
    for pid in list(procs):
        kill_tree(pid)
        with contextlib.suppress(Exception):
            procs[pid].join(1.0)
    procs.clear()
    shutil.rmtree(directory, ignore_errors=True)


def _nothing() -> None:
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
