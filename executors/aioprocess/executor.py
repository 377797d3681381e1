"""``"aioprocess"``: coroutine functions run concurrently in the event loops of child processes.

Each child is an aiomultiprocess ``Process`` (its start method, loop set-up, ``initializer`` and
``loop_initializer``) running up to ``childconcurrency`` coroutines at once. aiomultiprocess's
``Pool`` is not used: it cannot say which child holds which task, hangs when a child dies, polls
every 5 ms and cannot stop a running task. Instead every child has its own socketpair, read by the
parent's event loop, and the executor knows what each child holds:

* a child that dies (exit, signal, segfault) fails the states it held with
  :class:`~engine.errors.WorkerCrashedError` (naming the state, the PID and the exit code or
  signal) as soon as its socket closes; a new child takes its place;
* a cancelled call (the state was cancelled or timed out) is cancelled inside its child; if it has
  not ended ``cancel_grace`` seconds later (it blocks the child's loop or ignores the
  cancellation), the child is killed, and the other calls it held are sent again to another child
  (each at most ``MAX_RERUNS`` times; past that they fail with ``WorkerCrashedError``);
* calls and outcomes travel as cloudpickle bytes (``executors._remote``): lambdas and closures
  work, exceptions keep their type, with the child's traceback as ``__cause__``.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from statepool.engine.errors import WorkerCrashedError

from .._wire import faults, lifeline, logrelay, shm, threads
from .._wire.initializer import check as initializer_check
from .._wire.remote import OffLoop, dumps_call_small
from ..base import Executor, PreparedCall
from .child import CANCEL, CANCELLED, DONE, DONE_OOB, META, RUN_OOB, frame, unstartable_main
from .line import SlotLine
from .worker import ChildHandle, Job, crash_error, describe_exit

__all__ = ["AioProcessExecutor"]

logger = logging.getLogger(__name__)

MAX_RERUNS = 2  # times an innocent call is sent again after its child was killed on purpose
_RERUN = -1  # the job's future answers this kind: send it again
_STOP_TIMEOUT_S = 5.0
TEMP_PREFIX = "statepool-aioprocess-"  # then the parent's PID (see lifeline.sweep)
_START_HOLD_S = 1.0  # after a failed start, its error answers start() for this long (doubling)
_START_HOLD_MAX_S = 30.0
_LIVENESS_S = 1.0  # how often busy children are checked for a death their socket did not tell


class _Phase(enum.Enum):
    IDLE = "idle"  # no children (never started, or shut down: start() may run again)
    STARTING = "starting"
    RUNNING = "running"
    CLOSING = "closing"


class AioProcessExecutor(Executor):
    """Coroutine functions in ``processes`` child event loops, ``childconcurrency`` per child.

    ``inner_threads`` limits the BLAS / OpenMP thread pools in each child, as on ``"process"``
    (``"auto"``: ``max(1, usable cores // processes)``, a limit set in this process's
    environment kept; an int; ``None``: the libraries are left alone). See docs/aioprocess.md.
    """

    name = "aioprocess"

    def __init__(
        self,
        processes: int | None = None,
        childconcurrency: int = 16,
        *,
        cancel_grace: float = 0.5,
        start_timeout: float = 60.0,
        initializer: Callable[..., object] | None = None,
        initargs: Sequence[Any] = (),
        loop_initializer: Callable[..., asyncio.AbstractEventLoop] | None = None,
        inner_threads: threads.InnerThreads = "auto",
    ) -> None:
        if processes is not None and processes < 1:
            raise ValueError(f"aioprocess: processes must be >= 1, got {processes!r}")
        if childconcurrency < 1:
            raise ValueError(f"aioprocess: childconcurrency must be >= 1, got {childconcurrency!r}")
        if cancel_grace < 0:
            raise ValueError(f"aioprocess: cancel_grace must be >= 0, got {cancel_grace!r}")
        self.inner_threads = threads.check(inner_threads, "aioprocess")
        self.processes = processes or threads.usable_cores()
        self.childconcurrency = childconcurrency
        self.cancel_grace = cancel_grace
        self.start_timeout = start_timeout
        # initializer(*initargs), awaited if it is a coroutine function: once in each child
        # before its first call, cloudpickled (lambdas work); a child whose initializer raised
        # fails what it is given (executors/_wire/initializer.py)
        setup = initializer_check("AioProcessExecutor", initializer, initargs,
                                  coroutine_ok=True, carried=True)
        self._child_options: dict[str, Any] = {
            "initializer": None, "initargs": (), "loop_initializer": loop_initializer,
            "setup": setup.dumps() if setup is not None else None,
        }
        self._phase = _Phase.IDLE
        self._children: list[ChildHandle] = []
        self._spawning = 0
        self._spawn_error: BaseException | None = None
        # the last failed start: until when its error answers every start(), and how many
        # failed in a row (the hold doubles)
        self._start_failed: tuple[float, BaseException] | None = None
        self._start_failures = 0
        self._line = SlotLine(self._pick)
        self._ids = itertools.count(1)
        self._index = itertools.count()
        self._started: asyncio.Future[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed: asyncio.Future[None] | None = None  # set while a shutdown runs
        self._cancelling = False  # shutdown(cancel=True) runs: waiters must not dispatch
        self._drained: list[asyncio.Future[None]] = []  # shutdown(cancel=False) waits on these
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pickler = OffLoop("statepool-aioprocess-pickle")
        self._watch_timer: asyncio.TimerHandle | None = None
        self._dir: str | None = None  # large buffers' files (shm), made on first use
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._relay: logrelay.Relay | None = None
        self._faults: str | None = None  # faulthandler's files (_wire/faults.py)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every child and wait until each one is ready (pre-warm)."""
        if self._phase is _Phase.RUNNING:
            return
        if self._phase is _Phase.CLOSING:
            raise RuntimeError("aioprocess executor is shutting down; cannot start it")
        if self._started is None:
            failed = self._start_failed
            if failed is not None and time.monotonic() < failed[0]:
                raise failed[1]  # it failed a moment ago: not a child per call meanwhile
            self._phase = _Phase.STARTING
            self._loop = asyncio.get_running_loop()
            self._started = self._loop.create_future()
            self._close_observers()
            self._relay = logrelay.Relay(self._loop)  # the children's log records, here
            self._faults = lifeline.make_temp_dir(TEMP_PREFIX)  # and sweep dead parents' ones
            try:
                if (why := unstartable_main()) is not None:  # say why once, start nothing
                    raise WorkerCrashedError(why)
                outcomes = await asyncio.gather(
                    *(self._counted_spawn() for _ in range(self.processes)),
                    return_exceptions=True,
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        raise outcome
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started.exception()  # retrieved: a later start() tries again
                self._started = None
                if not isinstance(exc, asyncio.CancelledError):  # ...after a back-off
                    self._start_failures += 1
                    hold = min(_START_HOLD_MAX_S, _START_HOLD_S * 2 ** (self._start_failures - 1))
                    self._start_failed = (time.monotonic() + hold, exc)
                await self._stop_children(graceful=False)
                self._close_observers()
                self._phase = _Phase.IDLE
                raise
            self._phase = _Phase.RUNNING
            self._start_failed, self._start_failures = None, 0
            self._started.set_result(None)
            logger.debug("aioprocess: %d children ready: %s", self.processes, self.worker_pids())
        else:
            await asyncio.shield(self._started)

    async def shutdown(self, *, cancel: bool) -> None:
        """Stop every child; ``cancel=True`` kills them now, else running calls finish first.

        Safe to call twice, and concurrently (a ``cancel=True`` call hurries a graceful one).
        """
        if self._phase is _Phase.STARTING and self._started is not None:
            await asyncio.wait({self._started})
        if self._phase is _Phase.CLOSING and self._closed is not None:
            if cancel:
                self._cancel_everything()
            await asyncio.shield(self._closed)
            return
        if self._phase is not _Phase.RUNNING:
            self._pickler.close()
            self._remove_directory()
            return
        self._phase = _Phase.CLOSING
        self._closed = asyncio.get_running_loop().create_future()
        try:
            if cancel:
                self._cancel_everything()
            while self._line.queued or any(child.in_flight for child in self._children):
                drained = asyncio.get_running_loop().create_future()
                self._drained.append(drained)
                await drained
            for task in list(self._background):
                task.cancel()
            if self._background:
                await asyncio.wait(self._background)
            await self._stop_children(graceful=not cancel)
        finally:
            if self._watch_timer is not None:
                self._watch_timer.cancel()
                self._watch_timer = None
            self._started, self._spawn_error, self._loop = None, None, None
            self._close_observers()
            self._cancelling = False
            self._spawning = 0  # respawns cancelled before they ran never counted down
            self._pickler.close()
            self._remove_directory()
            self._phase = _Phase.IDLE
            self._closed.set_result(None)
            self._closed = None
        logger.debug("aioprocess: shut down (cancel=%s)", cancel)

    def _tick(self) -> None:
        """While children hold calls: notice a death that end of file did not tell (a process
        a state started holds the child's socket open)."""
        self._watch_timer = None
        for child in self._children:
            child.check()
        if self._loop is not None and any(child.in_flight for child in self._children):
            self._watch_timer = self._loop.call_later(_LIVENESS_S, self._tick)
    def _observe(self) -> dict[str, Any]:
        return {"log": self._relay.config() if self._relay is not None else None,
                "faults": self._faults}

    def _close_observers(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None
        if self._faults is not None:
            shutil.rmtree(self._faults, ignore_errors=True)
            self._faults = None

    async def worker_stack(self, call: PreparedCall) -> str | None:
        """The current Python stack of the child running ``call`` (faulthandler; it runs on)."""
        pid = call.worker
        if not isinstance(pid, int) or pid not in self.worker_pids():
            return None
        return await faults.stack(self._faults, pid) or None

    def _cancel_everything(self) -> None:
        """Cancel the calls waiting in line and those in the children (which are killed)."""
        self._cancelling = True
        self._line.cancel_all()
        for child in self._children:
            for job in list(child.in_flight.values()):
                self._drop(job)
            child.in_flight.clear()
            child.kill("the executor shut down")
        self._wake()

    async def _stop_children(self, *, graceful: bool) -> None:
        children = list(self._children)
        for child in children:
            if graceful:
                child.end_input()
            else:
                child.kill("the executor shut down")
        await asyncio.gather(*(child.wait_closed(_STOP_TIMEOUT_S) for child in children))
        self._children.clear()

    def _directory(self) -> str:
        """The private temporary directory of the large buffers' files (made on first use,
        removed at shutdown)."""
        if self._dir is None:
            self._dir = lifeline.make_temp_dir(TEMP_PREFIX)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _remove_directory(self) -> None:
        finalizer, self._finalizer, self._dir = self._finalizer, None, None
        if finalizer is not None:
            finalizer()

    def worker_pids(self) -> list[int]:
        return [child.pid for child in self._children if child.alive]

    def capacity(self) -> int:
        return self.processes * self.childconcurrency

    def __repr__(self) -> str:
        return (f"<AioProcessExecutor {self._phase.value} processes={self.processes} "
                f"childconcurrency={self.childconcurrency} pids={self.worker_pids()}>")

    # -- running a call ------------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        small = dumps_call_small(call)  # a large call is pickled off the loop thread
        job = Job(next(self._ids), call, b"" if small is None else small)
        if small is None:  # its large buffers go out of band (shm)
            pickling = asyncio.ensure_future(
                self._pickler.run(shm.dumps_call_out, call, self._directory()))
            try:
                meta, payload = await asyncio.shield(pickling)
            except asyncio.CancelledError:  # the file being written goes once it is written
                pickling.add_done_callback(_release_written)
                raise
            if meta:
                job.kind, job.path = RUN_OOB, shm.meta_path(meta)
                payload = META.pack(len(meta)) + meta + payload
            job.payload = payload
        try:
            return await self._run(job)
        finally:
            shm.release(job.path)  # a child that runs it has mapped it

    async def _run(self, job: Job) -> Any:
        call = job.call
        if self._phase is _Phase.CLOSING:
            raise RuntimeError(
                f"state {call.state_name!r}: executor 'aioprocess' is shutting down"
            )
        if self._phase is not _Phase.RUNNING or self._loop is not asyncio.get_running_loop():
            await self._start_here(call)
        while True:
            child = await self._acquire(call, fresh=job.reruns == 0)
            future = job.future = asyncio.get_running_loop().create_future()
            job.child = child
            child.in_flight[job.tid] = job
            child.send(frame(job.kind, job.tid, job.payload))
            call.worker = child.pid
            call.started()
            if self._watch_timer is None:
                self._watch_timer = asyncio.get_running_loop().call_later(_LIVENESS_S,
                                                                          self._tick)
            try:
                kind, body = await future
            except asyncio.CancelledError:
                self._abandon(job)
                raise
            if kind == DONE:
                return await self._pickler.loads_outcome(body, call.state_name)
            if kind == DONE_OOB:
                ok, value = await self._pickler.run(_load_out, body, call.state_name)
                if ok:
                    return value
                raise value
            if kind == CANCELLED:  # the coroutine raised CancelledError itself
                raise asyncio.CancelledError()

    async def _start_here(self, call: PreparedCall) -> None:
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            raise RuntimeError(
                f"state {call.state_name!r}: this aioprocess executor runs on another event loop; "
                "shut it down there first, or give each loop its own executor"
            )
        await self.start()

    async def _acquire(self, call: PreparedCall, *, fresh: bool) -> ChildHandle:
        """The least loaded child with a free slot, waiting in line for one."""
        if self._cancelling:
            raise asyncio.CancelledError()
        if not self._line:
            self._check_usable(call, fresh=fresh)
            if (child := self._pick()) is not None:
                return child
            self._top_up()

        def retry() -> ChildHandle | None:
            self._check_usable(call, fresh=False)
            return self._pick()

        try:
            child = await self._line.wait(retry)
        finally:
            self._check_drained()
        if self._cancelling:
            raise asyncio.CancelledError()
        return child

    def _usable(self) -> list[ChildHandle]:
        return [child for child in self._children if child.usable]

    def _check_usable(self, call: PreparedCall, *, fresh: bool) -> None:
        """Raise if no child is left and none will come; a ``fresh`` call tries to start one."""
        if self._spawning or self._usable():
            return
        if self._phase is not _Phase.RUNNING:
            raise RuntimeError(f"state {call.state_name!r}: executor 'aioprocess' is "
                               "shutting down and has no child left")
        error = self._spawn_error
        if error is not None and not fresh:
            raise WorkerCrashedError(
                f"state {call.state_name!r}: executor 'aioprocess' cannot start a child: "
                f"{error}", state_name=call.state_name,
            ) from error

    def _pick(self) -> ChildHandle | None:
        """The least loaded usable child with a free slot, or None."""
        best: ChildHandle | None = None
        best_load = self.childconcurrency
        for child in self._children:
            load = len(child.in_flight) + child.reserved
            if load < best_load and child.usable:
                best, best_load = child, load
        return best

    def _wake(self) -> None:
        """Hand free slots to the line; if no child will come, wake everyone to see why."""
        self._line.hand_out()
        if self._line:
            if not self._spawning and not self._usable():
                self._line.wake_all()
            else:
                self._top_up()
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained and not self._line.queued and \
                not any(c.in_flight for c in self._children):
            for drained in self._drained:
                if not drained.done():
                    drained.set_result(None)
            self._drained.clear()

    def _abandon(self, job: Job) -> None:
        """The caller was cancelled: cancel the coroutine in its child, kill the child later."""
        job.abandoned = True
        child = job.child
        if child is None or not child.alive or self._phase is _Phase.CLOSING:
            return
        child.send(frame(CANCEL, job.tid))
        job.killer = asyncio.get_running_loop().call_later(
            self.cancel_grace, self._kill_for, child, job
        )

    def _kill_for(self, child: ChildHandle, job: Job) -> None:
        if job.child is not child or not child.alive:
            return
        others = [j.call.state_name for j in child.in_flight.values() if j is not job]
        logger.warning(
            "aioprocess: state %r did not stop %.2f s after its cancellation; killing its child "
            "pid %d (states sent to another child: %s)",
            job.call.state_name, self.cancel_grace, child.pid, others or "none",
        )
        child.kill(f"to stop state {job.call.state_name!r}, cancelled")

    def _drop(self, job: Job) -> None:
        job.abandoned = True
        if job.killer is not None:
            job.killer.cancel()
        if job.future is not None and not job.future.done():
            job.future.cancel()

    # -- what the children say ---------------------------------------------------------------

    def _on_frame(self, child: ChildHandle, kind: int, tid: int, body: bytes,
                  seconds: float) -> None:
        job = child.in_flight.pop(tid, None)
        if job is None:
            _drop_out(kind, body)
            return
        job.child = None
        if kind != CANCELLED:
            job.call.ran_s = seconds  # measured in the child (handle.timings' "running")
        if job.killer is not None:
            job.killer.cancel()
        if not job.abandoned and job.future is not None and not job.future.done():
            job.future.set_result((kind, body))
        else:
            _drop_out(kind, body)
        self._wake()

    def _on_lost(self, child: ChildHandle, code: int | None) -> None:
        if self._relay is not None:
            self._relay.drain()  # what it logged before it died comes first
        fault = faults.describe(self._faults, child.pid)
        if child in self._children:
            self._children.remove(child)
        jobs = list(child.in_flight.values())
        child.in_flight.clear()
        names = [job.call.state_name for job in jobs if not job.abandoned]
        if child.killed_for is None and self._phase is _Phase.RUNNING:
            logger.warning("aioprocess: child pid %d %s holding states %s",
                           child.pid, describe_exit(code), names or "none")
        else:
            logger.debug("aioprocess: child pid %d %s", child.pid, describe_exit(code))
        for job in jobs:
            job.child = None
            if job.killer is not None:
                job.killer.cancel()
            if job.abandoned or job.future is None or job.future.done():
                continue
            if child.killed_for is not None and self._phase is not _Phase.CLOSING \
                    and job.reruns < MAX_RERUNS:
                job.reruns += 1
                job.future.set_result((_RERUN, b""))
            else:
                job.future.set_exception(crash_error(job, child, code, names, fault))
        if self._phase is _Phase.RUNNING:
            self._top_up()
        self._wake()

    # -- children ------------------------------------------------------------------------------

    def _top_up(self) -> None:
        """Start children in the background until there are ``processes`` of them."""
        if self._phase is not _Phase.RUNNING:
            return
        for _ in range(self.processes - len(self._children) - self._spawning):
            self._spawning += 1  # now, so that a second _top_up in this iteration counts it
            task = asyncio.get_running_loop().create_task(self._respawn())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _respawn(self) -> None:
        try:
            await self._spawn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("aioprocess: cannot start a child: %s", exc)
            self._spawn_error = exc
        self._wake()

    async def _counted_spawn(self) -> None:
        self._spawning += 1
        await self._spawn()

    async def _spawn(self) -> None:
        """Start one child (the caller counted it in ``_spawning``) and serve it."""
        try:
            child = await ChildHandle.spawn(
                next(self._index), timeout=self.start_timeout, **self._child_options,
                env=threads.worker_env(self.inner_threads, self.processes),
                directory=self._directory(), observe=self._observe())
        finally:
            self._spawning -= 1
        self._spawn_error = None
        if self._phase is _Phase.CLOSING:
            child.kill("the executor shut down")
        self._children.append(child)
        child.serve(self._on_frame, self._on_lost)


def _load_out(body: bytes, state_name: str) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)`` of a ``DONE_OOB`` body (helper thread)."""
    try:
        size = META.unpack_from(body)[0]
        return True, shm.load_outcome(memoryview(body)[META.size:], size, state_name)
    except BaseException as exc:
        if isinstance(exc, StopIteration):  # raised in a coroutine it would end it
            exc = RuntimeError(f"state {state_name!r} raised StopIteration")
        return False, exc


def _release_written(pickling: asyncio.Future[tuple[bytes, bytes]]) -> None:
    """A call cancelled while its large buffers were written out: remove their file."""
    if not pickling.cancelled() and pickling.exception() is None:
        meta = pickling.result()[0]
        if meta:
            shm.release(shm.meta_path(meta))


def _drop_out(kind: int, body: bytes) -> None:
    """Nobody wants this outcome: the file of its large buffers goes."""
    if kind == DONE_OOB:
        size = META.unpack_from(body)[0]
        shm.release(shm.meta_path(body[META.size:META.size + size]))
