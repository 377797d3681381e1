"""StateHandle and StateStatus: what a caller holds for a state put on a queue."""

from __future__ import annotations

import asyncio
import contextvars
import enum
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .futurelike import FutureLike
from .log import log_failure
from .timings import timings_of

if TYPE_CHECKING:
    from .books import Books
    from .state import State
    from .timings import Marks

__all__ = ["TERMINAL", "SharedContext", "StateHandle", "StateStatus"]


class StateStatus(enum.Enum):
    """The lifecycle of one put of a state; the last three are terminal."""

    QUEUED = "queued"
    WAITING = "waiting"  # on its event gate
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    # set below: plain attributes, so the hot path never hashes an enum member
    index: int
    terminal: bool


TERMINAL = frozenset({StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED})
for _index, _status in enumerate(StateStatus):
    _status.index = _index
    _status.terminal = _status in TERMINAL
_QUEUED, _SUCCEEDED, _FAILED, _CANCELLED = (
    StateStatus.QUEUED, StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED)


class SharedContext:
    """The ``contextvars`` context current when a batch of states was put, shared by their handles
    until each state first runs; then each runs in its own copy (``StateHandle._context``)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: contextvars.Context) -> None:
        self.ctx = ctx


class StateHandle(FutureLike):
    """One put of a state: its status, timing, attempts and outcome. Awaitable.

    ``result = await handle`` returns the result, raises the state's exception, or raises
    ``asyncio.CancelledError`` for a cancelled state. Timestamps are on the manager loop's clock.
    A handle is an asyncio future as far as asyncio can tell (``asyncio.isfuture(handle)``):
    ``gather``, ``wait`` and ``as_completed`` take it as it is, with no task made for it, and
    ``add_done_callback`` / ``remove_done_callback`` / ``get_loop()`` work as on
    ``asyncio.Future`` (engine/futurelike.py). As with an ``asyncio.Future``, cancelling a task
    that awaits a handle cancels the handle (``asyncio.shield(handle)`` if that is not meant).
    """

    __slots__ = (
        "__weakref__",
        "_books",
        "_ctx",
        "_exception",
        "_executor_name",
        "_marks",
        "_result",
        "_task",
        "_tb",
        "_timed_out",
        "_timer",
        "attempts",
        "finished_at",
        "queued_at",
        "started_at",
        "state",
        "status",
    )

    def __init__(self, state: State, books: Books, queued_at: float,
                 ctx: contextvars.Context | SharedContext) -> None:
        self.state = state
        self.status = _QUEUED
        self.attempts = 0
        self.queued_at = queued_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._result: Any = None
        self._exception: BaseException | None = None
        self._tb: TracebackType | None = None  # the exception's traceback as the state ended
        self._init_future()
        self._books = books  # the manager's bookkeeping, told of every change of status
        self._task: asyncio.Future[Any] | None = None
        self._ctx: contextvars.Context | SharedContext = ctx
        self._timed_out = False
        self._timer: asyncio.TimerHandle | None = None
        self._executor_name: str | None = None
        self._marks: Marks | None = None  # engine/timings.py: the last attempt's marks

    # -- the Future-like surface ---------------------------------------------------------

    def done(self) -> bool:
        return self.status.terminal

    def cancelled(self) -> bool:
        return self.status is _CANCELLED

    def result(self) -> Any:
        """The result; raises the state's exception, ``CancelledError`` or ``InvalidStateError``.

        The exception is raised with the traceback it had when the state ended, so that raising
        it again (a second ``await``) does not make its traceback grow."""
        if self.status is _SUCCEEDED:
            return self._result
        if not self.status.terminal:
            raise asyncio.InvalidStateError(f"state {self.state.name!r} is not done yet")
        if self.status is _CANCELLED:
            raise self._make_cancelled_error()
        exc = self._exception
        if exc is not None:
            raise exc.with_traceback(self._tb)
        return self._result

    def exception(self) -> BaseException | None:
        """The state's exception or ``None``; raises like ``asyncio.Future.exception()``."""
        if self.status is _SUCCEEDED:
            return None
        if not self.status.terminal:
            raise asyncio.InvalidStateError(f"state {self.state.name!r} is not done yet")
        if self.status is _CANCELLED:
            raise self._make_cancelled_error()
        return self._exception

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the state; False if it had already ended.

        Queued or gated: it never starts. Running coroutine: cancelled. Running process state:
        its worker is terminated. Running thread state: marked ``CANCELLED`` at once and its result
        discarded, but the thread itself runs on (a thread cannot be killed). ``msg`` is the
        message of the ``CancelledError`` that awaiting the handle raises (as on asyncio.Future).
        """
        if self.status.terminal:
            return False
        if msg is not None:
            self._cancel_message = msg
        task = self._task
        self._finish(_CANCELLED)
        if task is not None and not task.done():
            task.cancel()
        return True

    def _cancelled_text(self) -> str:
        return f"state {self.state.name!r} was cancelled"

    def _await_check(self) -> None:
        """Awaited before its end: only from a task of the manager's loop."""
        loop = self._books.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not loop or loop is None:
            raise RuntimeError(
                f"state {self.state.name!r}: its handle belongs to the manager's event loop "
                "and cannot be awaited from another loop or thread"
            )

    def _watch(self) -> None:
        """Someone waits on this handle while the manager's main loop does not run."""
        self._books.idle.watch(self)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds in each phase of the last attempt: ``queued``, ``waiting`` (gate,
        dependencies, tag slots, retry delay), ``resolving`` (lazy arguments), ``dispatch``
        (serialisation, waiting for a free worker), ``running`` (measured in the worker where
        the executor says), ``returning`` (the result's way back); absent phases are 0.0."""
        return timings_of(self, self._books.clock())

    # -- engine side -----------------------------------------------------------------------

    def _context(self, keep: bool = True) -> contextvars.Context:
        """The state's own context, a copy of the one current when it was put; ``keep=False``
        does not keep a new copy on the handle (a state that may end at once needs it no more)."""
        ctx = self._ctx
        if isinstance(ctx, SharedContext):
            copy = ctx.ctx.copy()
            if keep:
                self._ctx = copy
            return copy
        return ctx

    def _started(self) -> None:
        """Its call started on a thread (``StateManager._start_on_thread``)."""
        books = self._books
        self.started_at = books.clock()
        if books.hub is not None:
            books.hub.started(self)

    def _conclude(self, ok: bool, value: Any) -> None:
        """End the one attempt of a state on a fast path (engine/fastpath.py) with its outcome:
        a result, or what it raised. A failure is logged once. Never raises: a ``SystemExit``
        raised on a thread only fails its state (the loop-thread caller re-raises it)."""
        if ok:
            self._finish(_SUCCEEDED, value)
        elif isinstance(value, asyncio.CancelledError):
            self._finish(_CANCELLED)
        elif self._finish(_FAILED, exc=value):
            log_failure(self, self._executor_name or self.state.executor_name, value)

    def _set_status(self, status: StateStatus) -> None:
        """A move between non-terminal statuses, reported to the manager's books."""
        old, self.status = self.status, status
        self._books.moved(old, status, self)

    def _finish(self, status: StateStatus, result: Any = None,
                exc: BaseException | None = None) -> bool:
        """End the handle once: the first terminal status wins; later calls change nothing."""
        if self.status.terminal:
            return False
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        self._result = result
        if exc is not None:
            self._exception = exc
            self._tb = exc.__traceback__
        books = self._books
        self.finished_at = books.clock()
        old, self.status = self.status, status
        if self._cb0 is not None:
            books.callbacks.add(self)  # its done-callbacks run soon, on the loop
        books.ended(self, old, status)
        return True

    def __repr__(self) -> str:
        return f"<StateHandle {self.state.name!r} {self.status.name} attempts={self.attempts}>"
