"""States that wait without holding the queue: dependencies, tag slots, retry delays.

A part of :class:`~statepool.engine.manager.StateManager`, kept apart as the fast paths are. A
state that must wait is *parked*: it is ``WAITING``, it is in no queue and holds no worker and no
tag slot, and the main loop goes on with the states behind it. When what it waits for happens (its
last dependency succeeded, slots of its tags freed, its retry delay passed) it comes back to the
front of the queue at its priority (``StateQueue.push_front``) and the main loop takes it up where
it left. A failed or cancelled dependency fails it at once with ``DependencyError``; ``cancel()``
ends a parked state at once; at stop, parked states end ``CANCELLED``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

from . import deps
from .handle import StateHandle, StateStatus
from .log import logger, state_extra

if TYPE_CHECKING:
    from statepool.executors.base import Executor

    from .books import Books
    from .queue import StateQueue
    from .slots import TagSlots
    from .state import State

__all__ = ["Waiting"]

_WAITING, _FAILED = StateStatus.WAITING, StateStatus.FAILED
Arguments = tuple[tuple[Any, ...], dict[str, Any]]


class Waiting:
    """Parking and resuming states (attributes of the manager, set by its ``__init__``)."""

    _loop: asyncio.AbstractEventLoop | None
    _books: Books
    _queue: StateQueue
    _slots: TagSlots
    _wakeup: asyncio.Future[None] | None
    _main_task: asyncio.Task[None] | None
    _stop_requested: bool
    _executors: dict[str, Executor]
    _task_mode: int

    if TYPE_CHECKING:
        @staticmethod
        def _plain(state: State) -> bool: ...

        def _start_plain(self, handle: StateHandle, state: State,
                         mode: int) -> asyncio.Task[Any] | None: ...

        def _start_submitted(self, handle: StateHandle, state: State, ex: Executor) -> bool: ...

        def _run_sync(self, handle: StateHandle, state: State) -> None: ...

    def _init_waiting(self) -> None:
        self._ready: set[StateHandle] = set()  # parked states back in the queue
        self._parked: weakref.WeakSet[StateHandle] = weakref.WeakSet()
        self._stash: dict[StateHandle, Arguments] = {}  # resolved lazy args of a parked state
        self._resumers: dict[StateHandle, asyncio.Future[None]] = {}  # enter_state()'s states
        self._grants: list[StateHandle] | None = None  # granted, to start (see _granted)

    # -- checks at put ---------------------------------------------------------------------

    def _check_dependencies(self, state: State) -> None:
        message = deps.foreign_dependency(state, self._books, state._deps)
        if message is not None:
            raise ValueError(message)

    # -- the main loop's side ----------------------------------------------------------------

    def _resume(self, handle: StateHandle) -> bool:
        """A handle taken from the queue that is not QUEUED: True if it is a parked state
        coming back (the main loop starts it), False to skip it."""
        if handle not in self._ready:
            return False
        self._ready.discard(handle)
        if handle.status.terminal:  # cancelled after it came back: give back what it took
            self._slots.forget(handle)
            return False
        return True

    def _wake_main(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _requeue(self, handle: StateHandle) -> None:
        """A parked state may go on: back to the front of the queue (or to its enter_state)."""
        handle._timer = None
        self._parked.discard(handle)
        if handle.status.terminal or self._stop_requested:  # at stop: it never starts
            handle.cancel()
            self._slots.forget(handle)
            return
        resumer = self._resumers.pop(handle, None)
        if resumer is not None:
            if not resumer.done():
                resumer.set_result(None)
            return
        self._ready.add(handle)
        self._queue.push_front(handle)
        self._wake_main()

    def _granted(self, handle: StateHandle) -> None:
        """``handle`` took the slots it waited for. A plain state that can take a fast path
        starts at once, from here (no turn of the main loop: a freed slot is used as soon as the
        state holding it ends); any other goes back to the front of the queue. A state that
        ends at once and so grants the next is not started from inside its own start: the
        grants are taken one after another, in order."""
        grants = self._grants
        if grants is not None:
            grants.append(handle)
            return
        grants = self._grants = []
        try:
            if not self._direct(handle):
                self._requeue(handle)
            while grants:
                nxt = grants.pop(0)
                if not self._direct(nxt):
                    self._requeue(nxt)
        finally:
            self._grants = None

    def _direct(self, handle: StateHandle) -> bool:
        state = handle.state
        if not state._plain or self._main_task is None or self._stop_requested \
                or handle.status.terminal or handle in self._resumers \
                or logger.isEnabledFor(logging.DEBUG):
            return False
        ex = self._executors.get(state._executor)
        if ex is None:
            return False
        if ex.runs_on_loop:
            if not state._is_coro:
                self._run_sync(handle, state)
            elif state.is_blocking:
                self._start_plain(handle, state, self._task_mode)  # never eager here
            else:
                return False  # the main loop awaits it, holding the queue
        elif not state.is_blocking or not self._start_submitted(handle, state, ex):
            return False
        return True

    def _park(self, handle: StateHandle, slots: bool = False) -> None:
        """``handle`` waits, holding nothing; ``slots``: for its tag slots, in their lines
        (which keep it), not among the parked."""
        if not slots:
            self._slots.release(handle)
            self._parked.add(handle)
        self._books.running.discard(handle)
        if handle.status is not _WAITING:
            handle._set_status(_WAITING)

    def _fail_dependent(self, handle: StateHandle, dep: StateHandle) -> None:
        self._parked.discard(handle)
        self._slots.forget(handle)
        self._stash.pop(handle, None)
        resumer = self._resumers.pop(handle, None)
        error = deps.dependency_error(handle.state, dep)
        if handle._finish(_FAILED, exc=error):
            # one line: the dependency's own failure was logged with its traceback
            state = handle.state
            executor = handle._executor_name or state.executor_name
            logger.error("state %r (%s) on %s failed: %s", state.name, state.func_name,
                         executor, error, extra=state_extra(handle, executor))
        if resumer is not None and not resumer.done():
            resumer.set_result(None)

    def _wait_for(self, handle: StateHandle, waited: list[StateHandle]) -> None:
        """Park ``handle`` until every handle of ``waited`` ended; the first failure fails it."""
        self._park(handle)
        left = [len(waited)]

        def one_done(dep: StateHandle) -> None:
            if handle.status.terminal:
                return
            if dep.status is not StateStatus.SUCCEEDED:
                self._fail_dependent(handle, dep)
                return
            left[0] -= 1
            if not left[0]:
                self._requeue(handle)

        for dep in waited:
            deps.when_done(dep, one_done)

    def _deps_ready(self, handle: StateHandle) -> bool:
        """True when every dependency succeeded; else the state is parked or failed."""
        state_deps = handle.state._deps
        if not state_deps:
            return True
        failed = deps.failed_dependency(state_deps)
        if failed is not None:
            self._fail_dependent(handle, failed)
            return False
        waited = deps.pending(state_deps)
        if not waited:
            return True
        self._wait_for(handle, waited)
        return False

    def _slots_ready(self, handle: StateHandle) -> bool:
        """True when the state holds a slot of each of its tags; else it waits for them. The
        books give the slots back when the state ends (``Books.ended``), whatever the path."""
        slots = self._slots
        if self._books.slots is None:
            self._books.slots = slots
        if slots.acquire(handle):
            return True
        self._park(handle, slots=True)
        return False

    # -- inside an attempt (StateManager._run) -------------------------------------------------

    def _with_results(self, handle: StateHandle, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Arguments | None:
        """The arguments with handles replaced by results; None when the state cannot run now:
        it waits for a handle a lazy argument returned (parked), or one of them failed."""
        new_args, new_kwargs, found = deps.with_results(args, kwargs)
        if not found:
            return args, kwargs
        message = deps.foreign_dependency(handle.state, self._books, found)
        if message is not None:
            raise ValueError(message)
        failed = deps.failed_dependency(found)
        if failed is not None:
            self._fail_dependent(handle, failed)
            return None
        waited = deps.pending(found)
        if waited:  # returned by a lazy argument: this attempt starts once they end
            handle.attempts -= 1
            self._stash[handle] = (args, kwargs)
            self._wait_for(handle, waited)
            return None
        return new_args, new_kwargs

    def _stashed(self, handle: StateHandle) -> Arguments | None:
        return self._stash.pop(handle, None) if self._stash else None

    def _retry_later(self, handle: StateHandle, delay: float) -> None:
        """Park ``handle`` for ``delay`` seconds before its next attempt (cancel() ends it)."""
        loop = self._loop
        assert loop is not None
        self._park(handle)
        handle._timer = loop.call_later(delay, self._requeue, handle)

    # -- stopping ------------------------------------------------------------------------------

    def _cancel_parked(self) -> None:
        slots = self._slots
        for handle in slots.waiting_handles():
            handle.cancel()
        with slots.lock:
            held = list(slots.held)
        for handle in held:  # granted on a thread, on its way to the loop
            if handle.status is _WAITING:
                handle.cancel()
        for handle in list(self._parked):
            handle.cancel()
        self._parked.clear()
        for handle in list(self._ready):
            handle.cancel()
        self._ready.clear()
        for fut in self._resumers.values():
            if not fut.done():
                fut.set_result(None)
        self._resumers.clear()
