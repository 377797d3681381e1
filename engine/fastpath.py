"""The manager's fast paths for plain states: no task, or an eager one, where that is enough.

A *plain* state has no gate, lazy argument, timeout, retry, dependency or tag, and names its
executor by name.
While DEBUG logging is off (the ordinary path logs every state's enter and exit):

* a coroutine state on an executor that ``runs_on_loop`` (``"inline"``) runs in a lean task of
  its own; on Python 3.12+, where the loop has no custom task factory, that task is created with
  asyncio's public ``eager_start=True``: the state's first step runs at once, and a state that
  never waits is done before its task would have been scheduled;
* a blocking state on an executor that offers ``submit`` (``"thread"``) goes to it with no task
  of its own: the executor ends the handle through :meth:`StateHandle._conclude`.

A plain state may have tags: the main loop takes its slots before it starts it (or parks it,
``engine/waiting.py``), and it gives them back when its attempt ends or is cancelled.

Everything else takes the ordinary path, ``StateManager._run`` in a task of its own. These
methods are a part of :class:`~statepool.engine.manager.StateManager`, kept apart to keep it
readable; they know executors only through :class:`~statepool.executors.base.Executor`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from statepool.executors.base import Executor, PreparedCall

from .handle import StateHandle, StateStatus
from .log import logger
from .slots import SlotGuard, TagSlots
from .state import State
from .timings import marks_of

if TYPE_CHECKING:
    from .books import Books

__all__ = ["EAGER_START", "FastPaths", "logged_already"]

_RUNNING, _SUCCEEDED, _CANCELLED = StateStatus.RUNNING, StateStatus.SUCCEEDED, StateStatus.CANCELLED
#: asyncio's public eager tasks (``Task(..., eager_start=True)``) exist from Python 3.12
EAGER_START = sys.version_info >= (3, 12)


class FastPaths:
    """The fast paths of :class:`~statepool.engine.manager.StateManager` (its attributes)."""

    _loop: asyncio.AbstractEventLoop | None
    _books: Books
    _tasks: set[asyncio.Future[Any]]
    _current: StateHandle | None
    _slots: TagSlots

    if TYPE_CHECKING:
        def _executor_for(self, state: State) -> Executor: ...

    @staticmethod
    def _fast_paths(loop: asyncio.AbstractEventLoop) -> tuple[bool, bool]:
        """Whether plain states may take the fast paths now (not while DEBUG logs each state),
        and whether their tasks may start eagerly (3.12+, no custom task factory). Asked again
        each turn of the main loop, so that DEBUG turned on or a task factory set meanwhile
        takes effect."""
        fast = not logger.isEnabledFor(logging.DEBUG)
        return fast, fast and EAGER_START and loop.get_task_factory() is None

    @staticmethod
    def _plain(state: State) -> bool:
        """A state with no gate, lazy argument, timeout, retry or dependency, named by executor
        name (tags are fine: the main loop takes their slots first)."""
        given = state.executor
        return (state.event is None and not state._has_lazy and state.timeout is None
                and not state.retries and not state._deps and state.warn_after is None
                and (given is None or type(given) is str))

    def _fast_paths_now(self) -> bool:
        """Whether the fast paths are open now (DEBUG off), outside the main loop's turn."""
        return not logger.isEnabledFor(logging.DEBUG)

    def _try_executor_for(self, state: State) -> Executor | None:
        try:
            return self._executor_for(state)
        except Exception:  # the ordinary path fails the state with this error
            return None

    def _begin(self, handle: StateHandle, state: State) -> None:
        """A queued state starts its one attempt (the fast paths: no retry, no timeout)."""
        handle._set_status(_RUNNING)
        ex_name = handle._executor_name = state._executor
        self._books.started(handle, ex_name)
        handle.attempts = 1

    def _start_plain(self, handle: StateHandle, state: State,
                     eager: bool) -> asyncio.Task[Any] | None:
        """Start a plain coroutine state in its own lean task; None if it ended at once."""
        loop = self._loop
        assert loop is not None
        self._begin(handle, state)
        books = self._books
        handle.started_at = books.clock()
        if books.hub is not None:
            books.hub.started(handle)
        coro = self._plain_attempt(handle, state)
        ctx = handle._context()
        if not state.is_blocking:
            self._current = handle  # a stop signalled from the first step cancels it
        try:
            task = _task(loop, coro, ctx, state.name, eager)
        finally:
            self._current = None
        if task.done():  # it ended in its first step: it was never scheduled
            return None
        handle._task = task
        self._tasks.add(task)
        return task

    def _start_submitted(self, handle: StateHandle, state: State, ex: Executor) -> bool:
        """Hand a plain blocking state to an executor's ``submit`` with no task; False if the
        executor has no such path (the state then takes the ordinary one)."""
        if type(ex).submit is Executor.submit:  # the base's: no submit path, build no call
            return False
        call = PreparedCall(state.name, state._func_name, state.func, state.args, state.kwargs,
                            is_coro=state._is_coro, is_blocking=True, on_start=handle._started)
        marks = marks_of(handle)
        marks.attempt(self._books.clock())  # it leaves the queue and is dispatched now
        marks.call = call  # its worker and run time, for timings and events
        guard = SlotGuard(self._slots, handle) if state.tags else None
        try:
            submitted = ex.submit(call, handle._conclude if guard is None else guard.on_done)
        except Exception as exc:  # the executor is shut down
            self._begin(handle, state)
            if guard is not None:
                guard.on_done(False, exc)
            else:
                handle._conclude(False, exc)
            return True
        if submitted is None:
            return False
        self._begin(handle, state)
        if guard is not None:
            guard.submitted = submitted
            submitted = guard  # its cancel() gives the slots back too
        handle._task = submitted  # type: ignore[assignment]  # cancel() and done(), as a task
        return True

    async def _plain_attempt(self, handle: StateHandle, state: State) -> None:
        """The one attempt of a plain coroutine state (as ``_run`` would end it)."""
        try:
            try:
                result = await state.func(*state.args, **state.kwargs)
            except asyncio.CancelledError:
                if handle._finish(_CANCELLED):
                    raise  # stopped from outside: let the cancellation through
                return
            except BaseException as exc:  # GeneratorExit, a user's own: the state fails
                handle._conclude(False, exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # raised on the loop
                    logged_already()  # thread: they leave the loop, as asyncio does
                    raise
                return
            handle._finish(_SUCCEEDED, result)
        finally:
            task = handle._task
            if task is not None:
                self._tasks.discard(task)
            if state.tags:
                self._slots.release(handle)


def _task(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
          ctx: contextvars.Context, name: str, eager: bool) -> asyncio.Task[Any]:
    """A task for a state, started eagerly where asked (3.12+: public ``eager_start``)."""
    if eager:
        return asyncio.Task(coro, loop=loop, name=name, context=ctx,  # type: ignore[call-arg,unused-ignore]
                            eager_start=True)
    if sys.version_info >= (3, 11):
        return loop.create_task(coro, name=name, context=ctx)  # type: ignore[call-arg]
    return ctx.run(loop.create_task, coro, name=name)  # pragma: no cover - Python 3.10


def logged_already() -> None:
    """The current task is about to end with SystemExit or KeyboardInterrupt, which leaves the
    loop; the state's failure is logged already, so asyncio need not log it again as "never
    retrieved" when the task is collected."""
    task = asyncio.current_task()
    if task is not None:
        task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
