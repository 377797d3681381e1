"""``"thread"``: plain functions on worker threads, results handed back to the loop in batches.

Short calls share ``max_workers`` slots. A blocking call (``is_blocking=True``) that is still
running after ``long_after`` seconds gives its slot back, so a service that runs for the life of
the application never starves the short states queued behind it: it keeps its thread, and the
pool starts another one for them. A coroutine function sent here runs under its own event loop
in the thread.

A thread cannot be killed: a cancelled or timed-out thread state is marked at once, its result is
discarded and its slot freed, but the thread runs on until the function returns. At shutdown,
threads that do not finish within ``shutdown_grace`` seconds are abandoned and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any

from .base import Executor, PreparedCall

__all__ = ["ThreadExecutor"]

logger = logging.getLogger("engine")
_ids = itertools.count(1)


class _Item:
    __slots__ = ("abandoned", "call", "fut", "slot", "started")

    def __init__(self, call: PreparedCall, fut: asyncio.Future[Any]) -> None:
        self.call = call
        self.fut = fut
        self.started = 0.0  # monotonic time the thread started it; 0.0 while it has not
        self.slot = False  # holds one of the max_workers slots
        self.abandoned = False


class ThreadExecutor(Executor):
    """A thread pool that long-running blocking states cannot starve."""

    name = "thread"

    def __init__(self, max_workers: int | None = None, *, long_after: float = 0.25,
                 idle_timeout: float = 30.0, shutdown_grace: float | None = None) -> None:
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)
        if max_workers < 1:
            raise ValueError(f"ThreadExecutor: max_workers must be >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        self.long_after = long_after
        self.idle_timeout = idle_timeout
        self.shutdown_grace = shutdown_grace
        self.abandoned: list[str] = []  # states whose threads were left running at shutdown
        self._work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._pending: deque[_Item] = deque()
        self._running: set[_Item] = set()
        self._orphans: set[_Item] = set()  # abandoned while their thread runs on
        self._active = 0
        self._done: list[tuple[_Item, bool, Any]] = []
        self._done_lock = threading.Lock()
        self._drain_scheduled = False
        self._monitor: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- loop side -------------------------------------------------------------------------

    async def run(self, call: PreparedCall) -> Any:
        if self._closed:
            raise RuntimeError(f"state {call.state_name!r}: the thread executor is shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        item = _Item(call, loop.create_future())
        if self._active < self.max_workers:
            self._submit(item)
        else:
            self._pending.append(item)
            self._watch_long_runners()
        try:
            return await item.fut
        except asyncio.CancelledError:
            self._abandon(item)
            raise

    def _submit(self, item: _Item) -> None:
        self._active += 1
        item.slot = True
        self._running.add(item)
        item.call.started()
        self._work.put(item)
        if not self._idle.acquire(blocking=False):
            self._spawn_thread()

    def _release(self, item: _Item) -> None:
        if item.slot:
            item.slot = False
            self._active -= 1
        pending = self._pending
        while pending and self._active < self.max_workers:
            nxt = pending.popleft()
            if not nxt.fut.done():
                self._submit(nxt)

    def _abandon(self, item: _Item) -> None:
        if not item.slot and item not in self._running:
            with contextlib.suppress(ValueError):  # never started: a local operation
                self._pending.remove(item)
            return
        item.abandoned = True
        self._running.discard(item)
        self._orphans.add(item)
        if item.started:
            logger.warning("state %r (%s): abandoned on its thread, which runs on until the "
                           "function returns; its result will be discarded",
                           item.call.state_name, item.call.func_name)
        self._release(item)

    def _drain(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._drain_scheduled = False
        for item, ok, value in done:
            self._running.discard(item)
            self._orphans.discard(item)
            fut = item.fut
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            self._release(item)

    def _watch_long_runners(self) -> None:
        if self._monitor is None and self._loop is not None:
            self._monitor = self._loop.call_later(self.long_after / 2, self._check_long_runners)

    def _check_long_runners(self) -> None:
        """Blocking calls running past ``long_after`` give their slot to pending calls."""
        self._monitor = None
        now = time.monotonic()
        for item in list(self._running):
            if item.slot and item.call.is_blocking and item.started \
                    and now - item.started >= self.long_after:
                self._release(item)
        if self._pending:
            self._watch_long_runners()

    # -- thread side -----------------------------------------------------------------------

    def _spawn_thread(self) -> None:
        thread = threading.Thread(target=self._worker, name=f"statepool-thread-{next(_ids)}",
                                  daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def _worker(self) -> None:
        work = self._work
        while True:
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
                self._deliver(item, *_call(item.call))
            del item
            self._idle.release()

    def _retire(self, force: bool = False) -> bool:
        """Leave the pool: at shutdown, or when idle with more threads than slots."""
        with self._threads_lock:
            if not force and (len(self._threads) <= self.max_workers
                              or not self._idle.acquire(blocking=False)):
                return False
            self._threads.discard(threading.current_thread())
            return True

    def _deliver(self, item: _Item, ok: bool, value: Any) -> None:
        with self._done_lock:
            self._done.append((item, ok, value))
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
        while self._pending:
            self._pending.popleft().fut.cancel()
        if not cancel and self._running:
            await asyncio.wait([i.fut for i in self._running])
        with self._threads_lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        grace = 5.0 if self.shutdown_grace is None else self.shutdown_grace
        deadline = time.monotonic() + grace
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        alive = [t for t in threads if t.is_alive()]
        if alive:
            names = sorted(i.call.state_name for i in self._running | self._orphans)
            self.abandoned.extend(names)
            logger.warning("thread executor: %d thread(s) still running after %.1f s grace were "
                           "abandoned (states: %s)", len(alive), grace, ", ".join(names) or "?")
        for thread in threads:
            if not thread.is_alive():
                thread.join()

    def __repr__(self) -> str:
        return (f"<ThreadExecutor max_workers={self.max_workers} active={self._active} "
                f"pending={len(self._pending)} threads={len(self._threads)}>")


def _call(call: PreparedCall) -> tuple[bool, Any]:
    try:
        if call.is_coro:
            return True, asyncio.run(call())
        return True, call()
    except BaseException as exc:  # handed to the loop, where the engine sorts it
        return False, exc
