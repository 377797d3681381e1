"""``warn_after``: one WARNING for a state still running past it, with where it is stuck.

The manager's watch runs while a threshold is in force (``StateManager(warn_after=...)``, or a
state with ``State(warn_after=...)`` started). Every tick it looks at the running states; one
that has run longer than its threshold in its current attempt logs one WARNING: for a process
state with its worker's current Python stack (faulthandler on a signal: the worker runs on), for
a state on a thread of this process (``"thread"``: its ``worker`` is the thread's name) with that
thread's current stack (``sys._current_frames()``, documented CPython API; the thread runs on),
for a coroutine on the loop with its task's stack.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .log import logger, state_extra
from .timings import worker_of

if TYPE_CHECKING:
    from statepool.executors.base import Executor

    from .books import Books
    from .handle import StateHandle

__all__ = ["StallWatch"]

_TICK_MAX = 0.25  # seconds between looks at most (a threshold under 1 s looks more often)


class StallWatch:
    """The stall warnings of one manager."""

    def __init__(self, books: Books, default: float | None,
                 executor_of: Callable[[StateHandle], Executor | None]) -> None:
        self.books = books
        self.default = default
        self.executor_of = executor_of
        self.tick = min(_TICK_MAX, default / 4) if default else _TICK_MAX
        self.warned: dict[StateHandle, int] = {}  # handle -> the attempt warned about
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def ensure(self, threshold: float | None = None) -> None:
        """Look from now on (a state with its own ``threshold`` started)."""
        if threshold is not None:
            self.tick = min(self.tick, threshold / 4)
        loop = self.books.loop
        if self.timer is None and not self.closed and loop is not None:
            self.timer = loop.call_later(self.tick, self._look)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for task in self.tasks:
            task.cancel()

    def _look(self) -> None:
        self.timer = None
        books = self.books
        now = books.clock()
        warned = self.warned
        for handle in [h for h in warned if h.done()]:
            del warned[handle]
        for handle in list(books.running):
            limit = handle.state.warn_after
            if limit is None:
                limit = self.default
            started = handle.started_at
            if limit is None or started is None or handle.done():
                continue
            if now - started >= limit and warned.get(handle) != handle.attempts:
                warned[handle] = handle.attempts
                task = asyncio.ensure_future(self._warn(handle, now - started, limit))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        if books.running or self.default is not None:
            self.ensure()

    async def _warn(self, handle: StateHandle, ran: float, limit: float) -> None:
        state = handle.state
        where = _where(handle)
        stack = await self._stack(handle)
        if handle.done():
            return
        tail = f"; its current Python stack:\n{stack}" if stack else ""
        logger.warning(
            "state %r (%s) has been running for %.1f s on %s%s (attempt %d), past "
            "warn_after=%s s%s", state.name, state.func_name, ran,
            handle._executor_name or state.executor_name, where, handle.attempts, limit, tail,
            extra=state_extra(handle))

    async def _stack(self, handle: StateHandle) -> str:
        marks = handle._marks
        call = marks.call if marks is not None else None
        executor = self.executor_of(handle)
        if call is not None and executor is not None:
            try:
                stack = await executor.worker_stack(call)
            except Exception:  # a stack is a bonus: the warning goes out without it
                logger.debug("no stack for state %r", handle.state.name, exc_info=True)
                stack = None
            if stack:
                return stack
        if call is not None and isinstance(call.worker, str):
            stack = thread_stack(call.worker)
            if stack:
                return stack
        task = handle._task
        if isinstance(task, asyncio.Task) and not task.done() and (
                executor is None or executor.runs_on_loop):
            out = io.StringIO()
            task.print_stack(file=out)
            return out.getvalue().strip()
        return ""


_EXECUTORS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "executors") + os.sep


def thread_stack(name: str) -> str:
    """The current Python stack of this process's thread called ``name``, from the state's
    own code on (the thread's start and the backend's loop are left out), or ``""``."""
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            frame = sys._current_frames().get(thread.ident)
            if frame is None:  # it has just ended
                return ""
            frames = traceback.extract_stack(frame)
            del frame
            while len(frames) > 1 and _plumbing(frames[0].filename):
                frames.pop(0)
            return "".join(traceback.format_list(frames)).rstrip()
    return ""


def _plumbing(filename: str) -> bool:
    return filename == threading.__file__ or os.path.abspath(filename).startswith(_EXECUTORS)


def _where(handle: StateHandle) -> str:
    worker: Any = worker_of(handle)
    if worker is None:
        return ""
    return f" (worker {worker})"


def check_seconds(owner: str, field: str, value: Any) -> float | None:
    """``value`` as finite seconds > 0 (``None`` stays ``None``), or ValueError/TypeError."""
    import math

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {field!r} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{owner}: {field!r} must be finite seconds > 0, got {value!r}") \
            from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{owner}: {field!r} must be finite seconds > 0, got {value!r}")
    return seconds

