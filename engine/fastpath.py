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

* a plain function state on an executor that ``runs_on_loop`` (not blocking, by its nature)
  is called by the main loop itself, in a copy of its context: no task at all.

A plain state may have tags: the main loop takes its slots before it starts it (or parks it,
``engine/waiting.py``), and they go back when its attempt ends or is cancelled. A blocking state
for ``submit`` takes its slots through ``submit_gated``: the thread gives them back as the call
ends, and a waiter's call, prepared on the executor while it waits, is admitted there by the
thread that freed its slot (no turn of the event loop per state).

Everything else takes the ordinary path, ``StateManager._run`` in a task of its own. These
methods are a part of :class:`~statepool.engine.manager.StateManager`, kept apart to keep it
readable; they know executors only through :class:`~statepool.executors.base.Executor`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from statepool.executors.base import Executor, PreparedCall

from .handle import StateHandle, StateStatus
from .log import logger
from .slots import TagSlots
from .state import State
from .timings import marks_of

if TYPE_CHECKING:
    from .books import Books

__all__ = ["EAGER_START", "FastPaths", "logged_already"]

_RUNNING, _SUCCEEDED, _CANCELLED = StateStatus.RUNNING, StateStatus.SUCCEEDED, StateStatus.CANCELLED
_WAITING = StateStatus.WAITING
#: asyncio's public eager tasks (``Task(..., eager_start=True)``) exist from Python 3.12
EAGER_START = sys.version_info >= (3, 12)
FACTORY, DIRECT, EAGER = 0, 1, 2  # how a plain state's task is made (FastPaths._fast_paths)


class FastPaths:
    """The fast paths of :class:`~statepool.engine.manager.StateManager` (its attributes)."""

    _loop: asyncio.AbstractEventLoop | None
    _books: Books
    _tasks: set[asyncio.Future[Any]]
    _current: StateHandle | None
    _slots: TagSlots
    _task_mode: int = FACTORY

    if TYPE_CHECKING:
        def _executor_for(self, state: State) -> Executor: ...

        def _slots_ready(self, handle: StateHandle) -> bool: ...

        def _park(self, handle: StateHandle, slots: bool = False) -> None: ...

    def _fast_paths(self, loop: asyncio.AbstractEventLoop) -> tuple[bool, int]:
        """Whether plain states may take the fast paths now (not while DEBUG logs each state),
        and how their tasks are made: ``EAGER`` (3.12+, no custom task factory: started
        eagerly), ``DIRECT`` (no custom task factory: ``asyncio.Task(...)`` as
        ``loop.create_task`` would make it, without its Python frame) or ``FACTORY``
        (``loop.create_task``). Asked again each turn of the main loop, so that DEBUG turned on
        or a task factory set meanwhile takes effect (kept in ``_task_mode`` for the grants)."""
        fast = not logger.isEnabledFor(logging.DEBUG)
        if loop.get_task_factory() is not None:
            mode = FACTORY
        else:
            mode = EAGER if fast and EAGER_START else DIRECT
        self._task_mode = DIRECT if mode == EAGER else mode
        return fast, mode

    @staticmethod
    def _plain(state: State) -> bool:
        """A state with no gate, lazy argument, timeout, retry or dependency, named by executor
        name (tags are fine: the main loop takes their slots first); computed once, by State."""
        return state._plain

    def _try_executor_for(self, state: State) -> Executor | None:
        try:
            return self._executor_for(state)
        except Exception:  # the ordinary path fails the state with this error
            return None

    def _begin(self, handle: StateHandle, state: State) -> None:
        """A queued state starts its one attempt (the fast paths: no retry, no timeout)."""
        old, handle.status = handle.status, _RUNNING
        books = self._books
        books.moved(old, _RUNNING, handle)
        ex_name = handle._executor_name = state._executor
        books.running.add(handle)
        books.by_executor[ex_name] += 1
        handle.attempts = 1

    def _start_plain(self, handle: StateHandle, state: State,
                     mode: int) -> asyncio.Task[Any] | None:
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
            task = _task(loop, coro, ctx, state.name, mode)
        finally:
            self._current = None
        if task.done():  # it ended in its first step: it was never scheduled
            return None
        handle._task = task
        self._tasks.add(task)
        return task

    def _start_submitted(self, handle: StateHandle, state: State, ex: Executor) -> bool:
        """Hand a plain blocking state to an executor's ``submit`` with no task; False if the
        executor has no such path (the state then takes the ordinary one). A tagged state goes
        through ``submit_gated``: its call is prepared on the executor and let start once it
        holds its slots, at once or, parked meanwhile, on whatever thread freed them."""
        if type(ex).submit is Executor.submit:  # the base's: no submit path, build no call
            return False
        gated = False
        if state.tags:
            if type(ex).submit_gated is Executor.submit_gated:
                if not self._slots_ready(handle):  # parked: granted through the loop
                    return True
            else:
                gated = True
        if gated:
            on_start: Any = functools.partial(self._gated_start, handle)
        else:
            on_start = handle._started
        call = PreparedCall(state.name, state._func_name, state.func, state.args, state.kwargs,
                            is_coro=state._is_coro, is_blocking=True, on_start=on_start)
        marks = marks_of(handle)
        marks.attempt(self._books.clock())  # it leaves the queue and is dispatched now
        marks.call = call  # its worker and run time, for timings and events
        try:
            if gated:
                submitted: Any = ex.submit_gated(call, handle._conclude,
                                                 _Release(self._slots, handle))
            else:
                submitted = ex.submit(call, handle._conclude)
        except Exception as exc:  # the executor is shut down
            self._begin(handle, state)
            handle._conclude(False, exc)
            return True
        if submitted is None:
            return False
        handle._task = submitted  # cancel() and done(), as a task
        if not gated:
            self._begin(handle, state)
            return True
        slots = self._slots
        if self._books.slots is None:
            self._books.slots = slots
        if slots.acquire(handle, submitted.admit):
            self._begin(handle, state)
            submitted.admit()
        else:
            self._park(handle, slots=True)  # its call starts when its slots are free
        return True

    def _gated_start(self, handle: StateHandle) -> None:
        """A gated call started: one that waited for its slots is RUNNING from now."""
        if handle.status is _WAITING:
            self._begin(handle, handle.state)
        handle._started()

    def _run_sync(self, handle: StateHandle, state: State) -> None:
        """Call a plain function state on the loop, now, in a copy of its context (no task);
        a tagged one takes its slots first, or is parked."""
        if state.tags and not self._slots_ready(handle):
            return
        self._begin(handle, state)
        books = self._books
        handle.started_at = books.clock()
        if books.hub is not None:
            books.hub.started(handle)
        try:
            result = handle._context(keep=False).run(state.func, *state.args, **state.kwargs)
        except BaseException as exc:  # GeneratorExit, a user's own...: the state fails
            handle._conclude(False, exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # raised on the loop thread:
                _leave_loop(self._loop, exc)  # it leaves the loop, as asyncio does
        else:
            handle._finish(_SUCCEEDED, result)

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
          ctx: contextvars.Context, name: str, mode: int) -> asyncio.Task[Any]:
    """A task for a state: started eagerly (3.12+: public ``eager_start``), made directly (no
    task factory), or through ``loop.create_task`` (see ``FastPaths._fast_paths``)."""
    if mode == EAGER:
        return asyncio.Task(coro, loop=loop, name=name, context=ctx,  # type: ignore[call-arg,unused-ignore]
                            eager_start=True)
    if sys.version_info >= (3, 11):
        if mode == DIRECT:
            return asyncio.Task(coro, loop=loop, name=name, context=ctx)  # type: ignore[call-arg,unused-ignore]
        return loop.create_task(coro, name=name, context=ctx)  # type: ignore[call-arg]
    return ctx.run(loop.create_task, coro, name=name)  # pragma: no cover - Python 3.10


class _Release:
    """Give a state's slots back (``submit_gated``'s ``release``: on the thread it ran on)."""

    __slots__ = ("handle", "slots")

    def __init__(self, slots: TagSlots, handle: StateHandle) -> None:
        self.slots = slots
        self.handle = handle

    def __call__(self) -> None:
        slots = self.slots
        if slots.lines:  # someone waits: free the slots now; else the loop does as it ends
            slots.release(self.handle)


def _leave_loop(loop: asyncio.AbstractEventLoop | None, exc: BaseException) -> None:
    """``KeyboardInterrupt`` or ``SystemExit`` from a state's code called by the main loop: it
    leaves the event loop from a callback of its own (asyncio lets these two through), and the
    main loop itself is not unwound by it."""
    if loop is not None:
        loop.call_soon(_raise, exc)


def _raise(exc: BaseException) -> None:
    raise exc


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
