"""The manager's fast paths for plain states: no task unless one is needed.

A *plain* state has no gate, lazy argument, timeout or retry, and names its executor by name.
While DEBUG logging is off (it logs every state's enter and exit from the ordinary path):

* a coroutine state on the inline executor starts eagerly (engine/eager.py): its first step runs
  at once, and it gets a task only if it waits;
* a blocking state on the thread executor goes to the pool with no task of its own
  (``ThreadExecutor.submit``): the pool ends its handle from the batched results.

Everything else takes the ordinary path, ``StateManager._run`` in a task of its own. These
methods are a part of :class:`~engine.manager.StateManager`, kept apart to keep it readable.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from executors.base import Executor, PreparedCall
from executors.thread import ThreadExecutor

from . import eager
from .handle import StateHandle, StateStatus
from .log import logger
from .state import State

__all__ = ["FastPaths", "logged_already"]

_RUNNING, _SUCCEEDED, _CANCELLED = StateStatus.RUNNING, StateStatus.SUCCEEDED, StateStatus.CANCELLED


class FastPaths:
    """The fast paths of :class:`~engine.manager.StateManager` (its attributes, used here)."""

    _loop: asyncio.AbstractEventLoop | None
    _clock: Callable[[], float]
    _counts: list[int]
    _put_waiters: deque[asyncio.Future[None]]
    _running: set[StateHandle]
    _by_executor: Counter[str]
    _tasks: set[asyncio.Future[Any]]
    _current: StateHandle | None

    if TYPE_CHECKING:
        def _queued_left(self) -> None: ...

        def _executor_for(self, state: State) -> Executor: ...

    @staticmethod
    def _fast_paths(loop: asyncio.AbstractEventLoop) -> tuple[bool, bool]:
        """Whether plain states may take the fast paths now (not while DEBUG logs each state),
        and whether coroutine states may start eagerly (engine/eager.py). Asked again each turn
        of the main loop, so that DEBUG turned on or a task factory set meanwhile takes effect."""
        fast = not logger.isEnabledFor(logging.DEBUG)
        return fast, fast and eager.usable(loop)

    @staticmethod
    def _plain(state: State) -> bool:
        """A state with no gate, lazy argument, timeout or retry, named by executor name: on the
        inline executor (a coroutine) it starts eagerly (engine/eager.py); on the thread executor
        (blocking) it goes to a thread with no task of its own (``_start_on_thread``)."""
        given = state.executor
        return (state.event is None and not state._has_lazy and state.timeout is None
                and not state.retries and (given is None or type(given) is str))

    def _try_executor_for(self, state: State) -> Executor | None:
        try:
            return self._executor_for(state)
        except Exception:  # the ordinary path fails the state with this error
            return None

    def _begin(self, handle: StateHandle, state: State) -> None:
        """A queued state starts its one attempt (the fast paths: no retry, no timeout)."""
        handle._set_status(_RUNNING)
        self._running.add(handle)
        ex_name = handle._executor_name = state._executor
        self._by_executor[ex_name] += 1
        handle.attempts = 1

    def _start_eager(self, handle: StateHandle, state: State) -> eager.EagerTask | None:
        """Run the state's first step now; return its task if it waits, None if it ended."""
        loop = self._loop
        assert loop is not None
        self._begin(handle, state)
        handle.started_at = self._clock()
        task = handle._task = eager.EagerTask.new(loop)
        if not state.is_blocking:
            self._current = handle  # a stop signalled from the first step cancels it
        ended = True
        ctx = handle._context(keep=False)  # kept on the handle below, if the state waits
        try:
            yielded = eager.first_step(loop, task, ctx, state.func, state.args, state.kwargs)
        except (Exception, asyncio.CancelledError, KeyboardInterrupt, SystemExit) as exc:
            handle._conclude(False, exc)
        else:
            if yielded is eager.DONE:
                handle._finish(_SUCCEEDED, task.first_result)
            else:
                ended = False
        finally:
            self._current = None
        if ended:
            handle._task = None
            if task._asked is not None and task.awaited():  # callbacks wait on its task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return None
        runner = self._continue_eager(handle, task, yielded)
        eager.prime(runner)
        handle._ctx = ctx
        task.bind(runner, ctx)
        self._tasks.add(task)
        return task

    def _start_on_thread(self, handle: StateHandle, state: State, ex: ThreadExecutor) -> None:
        """Hand a plain blocking state to a thread with no task: the pool ends its handle."""
        self._begin(handle, state)
        call = PreparedCall(state.name, state._func_name, state.func, state.args, state.kwargs,
                            is_coro=state._is_coro, is_blocking=True, on_start=handle._started)
        try:
            # the pool's item stands for the task: it has cancel() and done()
            handle._task = ex.submit(call, handle._conclude)  # type: ignore[assignment]
        except Exception as exc:  # the pool is shut down
            handle._conclude(False, exc)

    async def _continue_eager(self, handle: StateHandle, task: eager.EagerTask,
                              yielded: Any) -> None:
        """The rest of an eagerly started state, in its own task (as ``_run`` would end it)."""
        try:
            try:
                result = await eager.Resume(task, yielded)
            except asyncio.CancelledError:
                if handle._finish(_CANCELLED):
                    raise  # stopped from outside: let the cancellation through
                return
            except (Exception, KeyboardInterrupt, SystemExit) as exc:
                if not isinstance(exc, Exception):
                    logged_already()  # _conclude raises it again, out of this task
                handle._conclude(False, exc)
                return
            handle._conclude(True, result)
        finally:
            self._tasks.discard(task)


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
