"""``"thread"``: plain functions on worker threads, results handed back to the loop in batches.

Calls go straight into one work queue that ``max_workers`` threads drain, as in
``concurrent.futures.ThreadPoolExecutor``; starts and results come back to the event loop in
batches (one wake-up of the loop for many calls). A blocking call (``is_blocking=True``) still
running after ``long_after`` seconds no longer counts against ``max_workers``: the pool starts
another thread for the calls waiting behind it, so a service that runs for the life of the
application never starves the short states queued after it. A coroutine function sent here runs
under its own event loop in the thread.

A thread cannot be killed: a cancelled or timed-out thread state is marked at once and its
result discarded, but the thread runs on until the function returns (the pool replaces it
meanwhile). At shutdown, threads still busy after ``shutdown_grace`` seconds are abandoned and
reported.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ._wire.initializer import check as initializer_check
from ._wire.initializer import failed as initializer_failed
from ._wire.initializer import run as initializer_run
from ._wire.threads import ThreadCap
from .base import Executor, OnDone, PreparedCall, fail_future

__all__ = ["ThreadExecutor"]

logger = logging.getLogger(__name__)
_ids = itertools.count(1)
_START, _OK, _ERR, _SPAWN = 0, 1, 2, 3


class _Item:
    """One call in the pool: awaited through ``fut`` (``run``), or ended through ``on_done``
    (``submit``, no task). ``cancel()``/``done()`` let the engine hold it as a state's task."""

    __slots__ = ("abandoned", "call", "fut", "long", "on_done", "pool", "release", "started")

    def __init__(self, pool: ThreadExecutor, call: PreparedCall, fut: asyncio.Future[Any] | None,
                 on_done: Callable[[bool, Any], None] | None = None) -> None:
        self.pool = pool
        self.call = call
        self.fut = fut
        self.on_done = on_done
        self.started = 0.0  # monotonic time its thread started it; 0.0 before
        self.long = False  # counted as a long runner: no longer holds one of max_workers
        self.abandoned = False  # cancelled or timed out: its outcome is discarded
        # submit_gated: run on the worker thread once the call ended or was dropped unrun
        self.release: Callable[[], None] | None = None

    def admit(self) -> None:
        """Let a gated call start (any thread): the next call of the worker thread that admits
        it, or into the work queue, with a thread for it."""
        pool = self.pool
        hand = getattr(pool._local, "hand", None)
        if hand is not None and not hand:  # a worker of this pool gave back slots: it runs it
            hand.append(self)
            return
        pool._work.put(self)
        if threading.get_ident() == pool._loop_thread:
            pool._add_thread_if_needed()
        elif not pool._idle.acquire(blocking=False):  # no idle thread: the loop adds one
            pool._post(self, _SPAWN, None)

    def cancel(self) -> bool:
        """Abandon the call: its thread, if it runs, runs on; its outcome is dropped."""
        if self.done():
            return False
        self.pool._abandon(self)
        return True

    def done(self) -> bool:
        return self.abandoned or self not in self.pool._live


class ThreadExecutor(Executor):
    """A thread pool that long-running blocking states cannot starve."""

    name = "thread"

    def __init__(self, max_workers: int | None = None, *, long_after: float = 0.25,
                 idle_timeout: float = 30.0, shutdown_grace: float | None = None,
                 inner_threads: int | None = None,
                 initializer: Callable[..., object] | None = None,
                 initargs: tuple[Any, ...] | list[Any] = ()) -> None:
        """``inner_threads`` (default ``None``: the libraries are left alone) limits the BLAS /
        OpenMP thread pools (numpy...) while the executor runs. Those pools belong to the whole
        process: the limit holds for every thread of it, this one's included, until shutdown
        (see docs/thread.md). ``initializer(*initargs)`` runs once in each thread before its
        first call (a plain function); a thread whose initializer raised fails every call it
        takes with ``InitializerError`` (executors/_wire/initializer.py)."""
        self._setup = initializer_check("ThreadExecutor", initializer, initargs,
                                        coroutine_ok=False, carried=False)
        if inner_threads is not None and (isinstance(inner_threads, bool) or not isinstance(
                inner_threads, int) or inner_threads < 1):
            raise ValueError("ThreadExecutor: 'inner_threads' must be an int >= 1 or None, "
                             f"got {inner_threads!r}")
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)
        if max_workers < 1:
            raise ValueError(f"ThreadExecutor: max_workers must be >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.long_after = long_after
        self.idle_timeout = idle_timeout
        self.shutdown_grace = shutdown_grace
        self.inner_threads = inner_threads
        self._cap = None if inner_threads is None else ThreadCap(inner_threads)
        self.abandoned: list[str] = []  # states whose threads were left running at shutdown
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._local = threading.local()  # a worker's ``hand``: a call it admitted (admit)
        self._idle = threading.Semaphore(0)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._live: set[_Item] = set()  # put and not finished (loop side)
        self._running: set[_Item] = set()  # reported started, not finished, not abandoned
        self._orphans: set[_Item] = set()  # abandoned while their thread runs on
        self._waiting = 0  # put, not yet reported started, not abandoned
        self._long = 0  # long runners and orphans still on a thread
        self._events: list[tuple[_Item, int, Any]] = []
        self._events_lock = threading.Lock()
        self._drain_scheduled = False
        self._monitor: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False

    # -- loop side -------------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        loop = self._loop_for(call)
        item = _Item(self, call, loop.create_future())
        self._put(item, loop)
        assert item.fut is not None
        try:
            return await item.fut
        except asyncio.CancelledError:
            self._abandon(item)
            raise

    def submit(self, call: PreparedCall, on_done: OnDone) -> _Item:
        """Start ``call`` with no task to await it (the engine's fast path; loop thread only).

        ``on_done(True, result)`` or ``on_done(False, exception)`` runs on the loop when it ends,
        unless the returned item was cancelled first. The item's ``cancel()`` abandons the call as
        cancelling the task of ``run()`` does.
        """
        loop = self._loop_for(call)
        item = _Item(self, call, None, on_done)
        self._put(item, loop)
        return item

    def submit_gated(self, call: PreparedCall, on_done: OnDone,
                     release: Callable[[], None]) -> _Item:
        """``submit`` for a call that holds tag slots or waits for them: the call is held,
        with no thread, until ``item.admit()`` (any thread); ``release()`` runs on the worker
        thread as soon as the call ended (or was dropped unrun, cancelled), before the thread
        takes its next call, so that a slot freed here admits the next waiting call at once."""
        loop = self._loop_for(call)
        if self._cap is not None:
            self._cap.ensure_process()
        item = _Item(self, call, None, on_done)
        item.release = release
        self._live.add(item)
        self._waiting += 1
        if self._monitor is None:
            self._monitor = loop.call_later(self.long_after / 2, self._check_long_runners)
        return item

    def capacity(self) -> int:
        return self.max_workers

    def default_grace(self, seconds: float) -> None:
        if self.shutdown_grace is None:
            self.shutdown_grace = float(seconds)

    def _loop_for(self, call: PreparedCall) -> asyncio.AbstractEventLoop:
        if self._closed:
            raise RuntimeError(f"state {call.state_name!r}: the thread executor is shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        return loop

    def _put(self, item: _Item, loop: asyncio.AbstractEventLoop) -> None:
        if self._cap is not None:
            self._cap.ensure_process()
        self._live.add(item)
        self._waiting += 1
        self._work.put(item)
        self._add_thread_if_needed()
        if self._monitor is None:
            self._monitor = loop.call_later(self.long_after / 2, self._check_long_runners)

    def _add_thread_if_needed(self) -> None:
        if self._idle.acquire(blocking=False):
            return  # an idle thread will take it
        if len(self._threads) < self.max_workers + self._long:
            self._spawn_thread()

    def _abandon(self, item: _Item) -> None:
        if item.abandoned or item not in self._live:  # abandoned already, or it has ended
            return
        item.abandoned = True
        self._live.discard(item)
        if item in self._running:
            self._running.discard(item)
            self._orphan(item)
            logger.warning("state %r (%s): abandoned on its thread, which runs on until the "
                           "function returns; its result will be discarded",
                           item.call.state_name, item.call.func_name)
        else:  # not started (or its start is not drained yet: _drain sorts that out)
            self._waiting -= 1

    def _orphan(self, item: _Item) -> None:
        """An abandoned call keeps its thread: let the pool grow past it meanwhile."""
        self._orphans.add(item)
        if not item.long:
            item.long = True
            self._long += 1
        if self._waiting > 0:
            self._add_thread_if_needed()

    def _drain(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
            self._drain_scheduled = False
        for item, kind, value in events:
            if kind == _SPAWN:  # a call admitted on a worker thread found no idle thread
                if len(self._threads) < self.max_workers + self._long and not self._closed:
                    self._spawn_thread()
                continue
            if kind == _START:
                if item.abandoned:  # cancelled before its start reached the loop
                    self._orphan(item)
                    continue
                self._waiting -= 1
                self._running.add(item)
                item.call.started()
                continue
            self._running.discard(item)
            self._live.discard(item)
            if item.long:
                item.long = False
                self._long -= 1
            if item.abandoned:
                self._orphans.discard(item)
                continue
            on_done = item.on_done
            if on_done is not None:
                item.on_done = None  # the handle holds its item: no cycle left for the GC
                on_done(kind == _OK, value)
                continue
            fut = item.fut
            assert fut is not None
            if not fut.done():
                if kind == _OK:
                    fut.set_result(value)
                else:  # StopIteration included: asyncio refuses it as it is
                    fail_future(fut, value, item.call.state_name)

    def _check_long_runners(self) -> None:
        """Blocking calls running past ``long_after`` stop counting against ``max_workers``."""
        self._monitor = None
        now = time.monotonic()
        for item in self._running:
            if not item.long and item.call.is_blocking and now - item.started >= self.long_after:
                item.long = True
                self._long += 1
                if self._waiting > 0:
                    self._add_thread_if_needed()
        if self._live and self._loop is not None and not self._closed:
            self._monitor = self._loop.call_later(self.long_after / 2, self._check_long_runners)

    # -- thread side -----------------------------------------------------------------------

    def _spawn_thread(self) -> None:
        thread = threading.Thread(target=self._worker, name=f"statepool-thread-{next(_ids)}",
                                  daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def _worker(self) -> None:
        work = self._work
        name = threading.current_thread().name
        clock = time.perf_counter
        cap = self._cap
        setup = self._setup
        broken = initializer_run(setup) if setup is not None else None
        local = self._local
        nxt: _Item | None = None
        while True:
            item: _Item | None
            if nxt is not None:  # admitted by the slots this thread just gave back
                item, nxt = nxt, None
            else:
                try:
                    item = work.get(timeout=self.idle_timeout)
                except queue.Empty:
                    if self._retire():
                        return
                    continue
            if item is None:
                self._retire(force=True)
                return
            if not item.abandoned:
                item.started = time.monotonic()
                call = item.call
                call.worker = name
                self._post(item, _START, None)
                if cap is not None:
                    cap.ensure_thread()
                t0 = clock()
                if broken is not None and setup is not None:
                    ok, value = False, initializer_failed(setup, broken, call.state_name,
                                                          f"its thread {name}")
                else:
                    ok, value = _call(call)
                call.ran_s = clock() - t0
                del call
                self._post(item, _OK if ok else _ERR, value)
                del value
            release, item.release = item.release, None
            del item
            if release is None:
                self._idle.release()
                continue
            # its slots go back here; the first call they admit is this thread's next (it
            # stays busy: no idle count, no trip through the work queue), the others queue
            hand: list[_Item] = []
            local.hand = hand
            try:
                release()
            except Exception:  # pragma: no cover - the engine's bookkeeping raised
                logger.exception("thread executor: giving back a call's slots failed")
            finally:
                local.hand = None
            del release
            if hand:
                nxt = hand[0]
            else:
                self._idle.release()

    def _retire(self, force: bool = False) -> bool:
        """Leave the pool: at shutdown, or when idle with more threads than it needs."""
        with self._threads_lock:
            if not force and (len(self._threads) <= self.max_workers + self._long
                              or not self._idle.acquire(blocking=False)):
                return False
            self._threads.discard(threading.current_thread())
            return True

    def _post(self, item: _Item, kind: int, value: Any) -> None:
        with self._events_lock:
            self._events.append((item, kind, value))
            if self._drain_scheduled:
                return
            self._drain_scheduled = True
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed: an abandoned thread finishing late
            pass

    # -- shutdown --------------------------------------------------------------------------

    async def shutdown(self, *, cancel: bool) -> None:
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        if cancel:
            for item in list(self._live):
                if item not in self._running:
                    if item.fut is not None:
                        item.fut.cancel()
                    self._abandon(item)
        else:
            while self._live:  # every call ends (submit()'s have no future to wait on)
                futs = [i.fut for i in self._live if i.fut is not None]
                if futs:
                    await asyncio.wait(futs)
                else:
                    await asyncio.sleep(0.005)
        with self._threads_lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        grace = 5.0 if self.shutdown_grace is None else self.shutdown_grace
        deadline = time.monotonic() + grace
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if any(t.is_alive() for t in threads):
            names = sorted(i.call.state_name for i in self._running | self._orphans)
            self.abandoned.extend(names)
            logger.warning("thread executor: %d thread(s) still running after %.1f s grace "
                           "were abandoned (states: %s)",
                           sum(t.is_alive() for t in threads), grace, ", ".join(names) or "?")
        for thread in threads:
            if not thread.is_alive():
                thread.join()
        if self._cap is not None:
            self._cap.restore()

    def __repr__(self) -> str:
        return (f"<ThreadExecutor max_workers={self.max_workers} waiting={self._waiting} "
                f"running={len(self._running)} threads={len(self._threads)}>")


def _call(call: PreparedCall) -> tuple[bool, Any]:
    try:
        if call.is_coro:
            return True, asyncio.run(call())
        return True, call()
    except BaseException as exc:  # handed to the loop, where the engine sorts it
        return False, exc
