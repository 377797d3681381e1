"""StateManager: the queue, the main loop, put / join / stop, and the stats snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import sys
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
    Sized,
)
from types import TracebackType
from typing import Any, ClassVar

from statepool.executors import registry
from statepool.executors.base import Executor

from . import current
from .books import Books
from .errors import ManagerStoppedError, StateTimeoutError
from .events import EventSource
from .fastpath import FastPaths, logged_already
from .handle import SharedContext, StateHandle, StateStatus
from .idle import IdleWatch
from .log import log_enter, log_exit, log_failure, log_retry, logger, state_extra
from .pipeline import Mapper
from .queue import StateQueue
from .slots import TagSlots, check_limits
from .stalls import StallWatch, check_seconds
from .state import State
from .stats import ManagerStats, snapshot
from .timings import marks_of
from .waiting import Waiting

__all__ = ["ManagerStats", "StateManager"]

_QUEUED, _WAITING, _RUNNING = StateStatus.QUEUED, StateStatus.WAITING, StateStatus.RUNNING
_SUCCEEDED, _FAILED, _CANCELLED = StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED
_HAS_TASK_CONTEXT = sys.version_info >= (3, 11)
_TURN = 0.005  # seconds the main loop runs eager states before it yields to the event loop


class StateManager(FastPaths, EventSource, Waiting):
    """Runs states in the order they were put, each in its executor.

    ``StateManager.instance()`` is the process-wide manager; ``StateManager(...)`` builds an
    independent one. Options: ``executors`` (name -> Executor instance, used instead of the
    registry's defaults), ``max_queue`` (``put_state`` waits while that many states are queued;
    0 means unbounded), ``shutdown_grace`` (seconds thread states get at stop) and ``limits``
    (tag -> how many states holding it may run at once; see ``State(tags=...)``).
    """

    _instance: ClassVar[StateManager | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, *, executors: Mapping[str, Executor] | None = None,
                 max_queue: int = 0, shutdown_grace: float = 5.0,
                 limits: Mapping[str, int | None] | None = None,
                 warn_after: float | None = None) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"StateManager: 'max_queue' must be an int >= 0, got {max_queue!r}")
        if isinstance(shutdown_grace, bool) or not isinstance(shutdown_grace, (int, float)) \
                or shutdown_grace < 0:
            raise ValueError(
                f"StateManager: 'shutdown_grace' must be seconds >= 0, got {shutdown_grace!r}")
        self._executors: dict[str, Executor] = {}
        for name, ex in (executors or {}).items():
            if not isinstance(ex, Executor):
                raise TypeError(f"StateManager: executors[{name!r}] must be an Executor, "
                                f"got {ex!r}")
            self._executors[name] = ex
            ex.default_grace(float(shutdown_grace))
        self._configured = list(self._executors.values())
        self._adopted: set[Executor] = set()  # instances given to single states
        self.max_queue = max_queue
        self.shutdown_grace = float(shutdown_grace)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue = StateQueue()
        self._slots = TagSlots(check_limits(limits), self._granted)
        self._init_waiting()
        self._books = Books(len(StateStatus))  # counts, running set, join and put waiters
        self._books.idle = IdleWatch(self._books, self._queue)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._wakeup: asyncio.Future[None] | None = None
        self._current: StateHandle | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._bg_task: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._stopped = False
        self._stopped_event: asyncio.Event | None = None
        self.warn_after = check_seconds("StateManager", "warn_after", warn_after)
        self._stalls = StallWatch(self._books, self.warn_after, self._executor_of)
        self._warned_in_line: set[str] = set()  # functions warned of (see _check_in_line)
        self._start_waiters: dict[StateHandle, asyncio.Future[None]] = {}  # _until_started

    # -- the singleton -----------------------------------------------------------------------

    @classmethod
    def instance(cls) -> StateManager:
        """The process-wide manager, created on first use.

        A manager that has stopped, or whose event loop is closed (a second ``asyncio.run()``, a
        notebook cell run again), is replaced by a new one here."""
        inst = cls._instance
        if inst is None or inst._spent():
            with cls._instance_lock:
                inst = cls._instance
                if inst is None or inst._spent():
                    if inst is not None and not inst._stop_requested:
                        inst.signal_stopping()  # its loop is gone: nothing of it can run again
                    inst = cls._instance = cls()
        return inst

    def _spent(self) -> bool:
        """Stopped (or stop asked with no loop to run the cleanup on), or its loop is closed."""
        if self._stopped:
            return True
        loop = self._loop
        if loop is None:
            return self._stop_requested
        return loop.is_closed()

    @classmethod
    def _reset_instance(cls) -> None:
        """Forget the process-wide manager (tests); stop it first if it still runs."""
        with cls._instance_lock:
            inst, cls._instance = cls._instance, None
        if inst is not None and not inst._stop_requested:
            inst.signal_stopping()

    # -- putting states ----------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._books.bind(loop)
            self._slots.bind(loop)
        elif self._loop is not loop:
            raise RuntimeError("StateManager is bound to another event loop; build one per loop")
        return loop

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, State):
            raise TypeError(f"put_state() takes a State, got {type(state).__name__}: {state!r}")
        if self._stop_requested:
            raise ManagerStoppedError(f"cannot put {state.name!r}: the manager is stopping")

    async def put_state(self, state: State) -> StateHandle:
        """Queue ``state``; waits while ``max_queue`` states are queued. Returns its handle."""
        self._check_state(state)
        if state._deps:
            self._check_dependencies(state)
        loop = self._bind_loop()
        if self.max_queue:
            await self._wait_for_room(state, loop)
        return self._enqueue(state)

    async def put_states(self, states: Iterable[State]) -> list[StateHandle]:
        """Queue every state in order; checks them all before queuing any."""
        states = list(states)
        sched = False
        for state in states:
            if type(state) is not State:  # an exact State passes the type check
                self._check_state(state)
            if state._sched:
                sched = True
        if sched:
            for state in states:
                if state._deps:
                    self._check_dependencies(state)
        if self._stop_requested and states:
            self._check_state(states[0])  # ManagerStoppedError, naming the first
        loop = self._bind_loop()
        if not self.max_queue:
            now, books = self._books.clock(), self._books
            ctx = SharedContext(contextvars.copy_context())  # each state copies it as it starts
            handles = [StateHandle(state, books, now, ctx) for state in states]
            self._queued(handles, sched)
            return handles
        handles = []
        for state in states:
            await self._wait_for_room(state, loop)
            handles.append(self._enqueue(state))
        return handles

    async def _wait_for_room(self, state: State, loop: asyncio.AbstractEventLoop) -> None:
        while self._books.counts[_QUEUED.index] >= self.max_queue:
            fut: asyncio.Future[None] = loop.create_future()
            self._books.put_waiters.append(fut)
            try:
                await fut
            finally:
                if not fut.done():
                    fut.cancel()
            if self._stop_requested:
                raise ManagerStoppedError(f"cannot put {state.name!r}: the manager is stopping")

    def _enqueue(self, state: State) -> StateHandle:
        handle = StateHandle(state, self._books, self._books.clock(), contextvars.copy_context())
        self._queued((handle,), state._sched)
        return handle

    def _queued(self, handles: Sequence[StateHandle], sched: bool = True) -> None:
        """``handles`` join the queue (new, QUEUED); the main loop wakes if it waits.
        ``sched``: some have a priority (they go to the queue's heap)."""
        if sched:
            self._queue.extend(handles)
        else:
            self._queue.fifo.extend(handles)
        books = self._books
        books.added(len(handles), _QUEUED)
        if books.hub is not None:
            books.queued(handles)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def join(self) -> None:
        """Wait until the queue is empty and every handle of this manager is terminal."""
        if self._books.unfinished == 0:
            return
        fut: asyncio.Future[None] = self._bind_loop().create_future()
        self._books.join_waiters.append(fut)
        if not self._books.serving:
            self._books.idle.watch(None, "join() waits")
        await fut

    def map(self, func: Callable[[Any], Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
            executor: str | Executor | None = None, ordered: bool = True,
            window: int | None = None, chunksize: int | None = None,
            return_exceptions: bool = False, name: str | None = None,
            progress: bool | dict[str, Any] = False,
            **state_options: Any) -> AsyncIterator[Any]:
        """``func(item)`` for every item of a sync or async iterable, as blocking states side by
        side; yields the results in input order (``ordered``) or as they complete.

        The input is read lazily: at most ``window`` items are put, running or waiting to be
        yielded at once (default: a few calls per worker). ``chunksize`` items travel and run as
        one call (``None``: automatic, from the run times measured in the workers); each item
        keeps its own result, error and retries. The first failure raises and cancels what is
        pending, unless ``return_exceptions=True`` (the exception is yielded in its place);
        leaving the loop early cancels what is pending. ``state_options`` are State's
        (``timeout``, ``retries``, ``tags``, ``priority``...). Details: engine/pipeline.py.
        ``progress=True`` (or a dict of :class:`~statepool.engine.progress.Bar` options) shows
        a progress bar of the items (engine/progress.py; needs rich).
        """
        results = self._mapper(func, iterable, executor=executor, ordered=ordered,
                               window=window, chunksize=chunksize,
                               return_exceptions=return_exceptions, name=name,
                               **state_options).results()
        if not progress:
            return results
        from .naming import func_name
        from .progress import track

        options = progress if isinstance(progress, dict) else {}
        total = len(iterable) if isinstance(iterable, Sized) else None
        return track(results, total=total, manager=self,
                     **{"description": name or func_name(func), **options})

    def _mapper(self, func: Callable[[Any], Any], iterable: Any, *,
                executor: str | Executor | None = None, ordered: bool = True,
                window: int | None = None, chunksize: int | None = None,
                return_exceptions: bool = False, name: str | None = None,
                **state_options: Any) -> Mapper:
        return Mapper(self, func, iterable, executor=executor, ordered=ordered, window=window,
                      chunksize=chunksize, return_exceptions=return_exceptions, name=name,
                      options=state_options)

    # -- the main loop -----------------------------------------------------------------------

    async def process_states(self) -> None:
        """Start queued states in order until ``signal_stopping()``; then clean up and return."""
        if self._main_task is not None:
            raise RuntimeError("process_states() is already running for this manager")
        if self._stopped:
            raise ManagerStoppedError("process_states(): this manager has stopped")
        loop = self._bind_loop()
        self._main_task = asyncio.current_task()
        self._books.serving = True
        if self.warn_after is not None:
            self._stalls.ensure()  # one WARNING per state running past warn_after
        for configured in self._configured:
            self._spawn(self._prewarm(configured), None)
        try:
            queue = self._queue
            fifo, heap = queue.fifo, queue.heap
            fast, mode = self._fast_paths(loop)
            turn, started = loop.time(), 0
            handle: StateHandle | None = None
            state: State | None = None
            ex: Executor | None = None
            task: asyncio.Task[Any] | None = None
            while not self._stop_requested:
                if not fifo and not heap:
                    # hold nothing of the last state while waiting (its function, arguments
                    # and result live as long as the caller wants them, no longer)
                    handle = state = ex = task = None
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    self._wakeup = None
                    turn, started = loop.time(), 0
                    fast, mode = self._fast_paths(loop)
                    continue
                handle = queue.pop() if heap else fifo.popleft()
                if handle.status is not _QUEUED and not self._resume(handle):
                    continue
                state = handle.state
                if fast and state._plain:
                    ex = self._executors.get(state._executor)
                    if ex is None:
                        ex = self._try_executor_for(state)
                    if ex is not None and ex.runs_on_loop:
                        if not state._is_coro:
                            self._run_sync(handle, state)  # no task; tags taken or parked
                        elif not state.tags or self._slots_ready(handle):  # else parked
                            task = self._start_plain(handle, state, mode)
                            if task is not None and not state.is_blocking:
                                await self._await_own(task, handle)
                    elif not (ex is not None and state.is_blocking
                              and self._start_submitted(handle, state, ex)):
                        await self._start(handle)
                else:
                    await self._start(handle)
                started += 1
                if not started & 63 and loop.time() - turn > _TURN:
                    await asyncio.sleep(0)  # states that never wait: let the loop breathe
                    turn = loop.time()
                    fast, mode = self._fast_paths(loop)
        finally:
            self._wakeup = None
            self._books.serving = False
            await self._shutdown()
            self._main_task = None

    async def _prewarm(self, ex: Executor) -> None:
        try:
            await ex.start()
        except Exception:
            logger.warning("executor %r failed to pre-warm", ex.name, exc_info=True)

    async def _start(self, handle: StateHandle) -> None:
        """Wait for dependencies (parked), hold the queue on the gate, wait for tag slots
        (parked), then dispatch; await the state unless it is blocking."""
        state = handle.state
        if state._deps and not self._deps_ready(handle):
            return
        event = state.event
        if event is not None and not event.is_set():
            if handle.status is not _WAITING:
                handle._set_status(_WAITING)
            gate = self._spawn(_open_gate(handle, event), handle)
            await self._await_own(gate, handle)
            if handle.status is not _WAITING:
                return
        if state.tags and not self._slots_ready(handle):
            return
        task = self._spawn(self._run(handle), handle, untrack_when_done=False)
        if not handle.state.is_blocking:
            if self._queue:
                self._check_in_line(handle.state)
            await self._await_own(task, handle)
        elif event is not None:
            await self._until_started(handle, task)

    async def _until_started(self, handle: StateHandle, task: asyncio.Task[Any]) -> None:
        """A gated blocking state holds the queue until its executor has really started it
        (a thread or a worker picked it up), so that the states behind it start after it
        (SPEC: ordered transitions), or until it ended without starting."""
        if handle.started_at is not None or handle.done():
            return
        assert self._loop is not None
        started = self._start_waiters[handle] = self._loop.create_future()
        try:
            await asyncio.wait([started, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._start_waiters.pop(handle, None)

    def _started_now(self, handle: StateHandle) -> None:
        waiter = self._start_waiters.pop(handle, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_in_line(self, state: State) -> None:
        """The trap of ``is_blocking=False`` on a pool: warn, once per function, when a state
        that is not blocking holds the queue on an executor of several workers while the next
        queued state is another of the same function (they run one after another)."""
        key = state._func_name
        if key in self._warned_in_line:
            return
        nxt = self._queue[0].state
        if nxt.is_blocking or nxt._func_name != key or nxt._executor != state._executor:
            return
        given = state.executor
        ex = given if isinstance(given, Executor) else self._executors.get(state._executor)
        workers = ex.capacity() if ex is not None and not ex.runs_on_loop else None
        if workers is None or workers < 2:
            return
        self._warned_in_line.add(key)
        behind = sum(1 for h in self._queue if h.state._func_name == key)
        logger.warning(
            "state %r (%s) is not blocking, so the manager waits for it to end before it starts "
            "the next state: the states of %s run one after another on %r, which has %d "
            "workers, while %d more wait behind. Give them is_blocking=True, or use "
            "manager.map(%s, items), to run them side by side (warned once per function)",
            state.name, key, key, state._executor, workers, behind, key,
            extra={"state": state.name, "executor": state._executor, "attempt": 0,
                   "worker": None})

    async def _await_own(self, task: asyncio.Future[Any], handle: StateHandle) -> None:
        """Await a state's task; its own cancellation does not stop the main loop."""
        self._current = handle
        try:
            await task
        except asyncio.CancelledError:
            if not (task.cancelled() and handle.done()) or _cancelling(self._main_task):
                raise
        finally:
            self._current = None

    def _spawn(self, coro: Coroutine[Any, Any, Any], handle: StateHandle | None,
               untrack_when_done: bool = True) -> asyncio.Task[Any]:
        """A task in ``handle``'s context, tracked until done (``_run`` untracks itself)."""
        loop = self._loop
        assert loop is not None
        if handle is None:
            task = loop.create_task(coro)
        elif _HAS_TASK_CONTEXT:  # named after the state (asyncio.all_tasks(), asyncio ps)
            task = loop.create_task(coro, name=handle.state.name,  # type: ignore[call-arg]
                                    context=handle._context())
        else:  # pragma: no cover - Python 3.10
            task = handle._context().run(loop.create_task, coro, name=handle.state.name)
        if handle is not None:
            handle._task = task
        self._tasks.add(task)
        if untrack_when_done:
            task.add_done_callback(self._tasks.discard)
        return task

    def _executor_for(self, state: State) -> Executor:
        """The executor a state runs on; built on first use and shut down with the manager."""
        given = state.executor
        if given is not None and type(given) is not str:  # an Executor instance
            assert isinstance(given, Executor)
            self._adopted.add(given)
            return given
        name = state.executor_name
        ex = self._executors.get(name)
        if ex is None:
            ex = self._executors[name] = registry.create(name)
            ex.default_grace(self.shutdown_grace)
        return ex

    async def _run(self, handle: StateHandle) -> None:
        """Every attempt of one state, ending its handle exactly once."""
        state = handle.state
        loop = self._loop
        assert loop is not None
        if handle.status is _QUEUED or handle.status is _WAITING:
            handle._set_status(_RUNNING)
        self._books.running.add(handle)
        if state.warn_after is not None:
            self._stalls.ensure(state.warn_after)
        first = handle._executor_name is None  # not back from waiting for a retry
        try:
            try:
                executor = self._executor_for(state)
            except Exception as exc:  # a backend that cannot be built fails its state
                handle._finish(_FAILED, exc=exc)
                log_failure(handle, state.executor_name, exc)
                return
            ex_name = handle._executor_name = executor.name
            if first:
                self._books.started(handle, ex_name)
            inline = executor.runs_on_loop  # the engine calls the function: no PreparedCall
            debug = logger.isEnabledFor(logging.DEBUG)
            books, marks = self._books, marks_of(handle)
            while True:
                handle.attempts += 1
                attempt = handle.attempts
                handle._timed_out = False
                away = False  # the function runs in the executor: not on this thread
                marks.attempt(books.clock())
                try:
                    if state._has_lazy:
                        args, kwargs = self._stashed(handle) or await state._resolve_lazy()
                        marks.t1 = books.clock()
                    else:
                        args, kwargs = state.args, state.kwargs
                    if state._deps or state._has_lazy:  # handles become their results
                        arguments = self._with_results(handle, args, kwargs)
                        if arguments is None:
                            return  # it waits for a handle a lazy argument gave, or failed
                        args, kwargs = arguments
                    if debug:
                        log_enter(handle, ex_name, loop)
                    if inline:
                        if state.timeout is None:
                            handle.started_at = loop.time()
                            if books.hub is not None:
                                books.hub.started(handle)
                            if self._start_waiters:
                                self._started_now(handle)
                        else:
                            self._on_start(handle, attempt)
                        result = state.func(*args, **kwargs)
                        if state.is_coro:
                            result = await result
                    else:
                        on_start = functools.partial(self._on_start, handle, attempt)
                        call = marks.call = state._make_function(args, kwargs,
                                                                 on_start=on_start)
                        away = True
                        result = await executor.run(call)
                        del call
                except asyncio.CancelledError:
                    if not handle._timed_out or handle.done():
                        if handle._finish(_CANCELLED):
                            log_exit(handle, ex_name, loop)
                            raise  # stopped from outside: let the cancellation through
                        return  # handle.cancel(): the handle already says CANCELLED
                    _uncancel(handle._task)
                    failure: BaseException = StateTimeoutError(
                        f"state {state.name!r} ({state.func_name}) ran past its timeout of "
                        f"{state.timeout} s on {ex_name}")
                except Exception as error:
                    failure = error
                except BaseException as error:  # GeneratorExit, SystemExit, a user's own...
                    if away or not isinstance(error, (KeyboardInterrupt, SystemExit)):
                        failure = error  # a thread's, a worker's, a pickling hook's: it fails
                    else:  # raised by the state's code on the loop thread: it leaves the loop
                        if handle._finish(_FAILED, exc=error):
                            log_failure(handle, ex_name, error)
                        logged_already()
                        raise
                else:
                    if handle._finish(_SUCCEEDED, result) and debug:
                        log_exit(handle, ex_name, loop)
                    return
                if handle.done():
                    return
                timer = handle._timer
                if timer is not None:
                    timer.cancel()
                    handle._timer = None
                if attempt <= state.retries:
                    delay = self._retry_delay(handle, failure, attempt)
                    if delay is not None:
                        log_retry(handle, ex_name, failure)
                        books.retrying(handle, failure, delay)
                        if not delay:
                            continue
                        self._retry_later(handle, delay)
                        return
                handle._finish(_FAILED, exc=failure)
                log_failure(handle, ex_name, failure)
                return
        finally:
            self._tasks.discard(handle._task)
            if state.tags:
                self._slots.release(handle)

    @staticmethod
    def _retry_delay(handle: StateHandle, failure: BaseException, attempt: int) -> float | None:
        """Seconds before the next attempt after this failure, or None: it is not retried."""
        policy = handle.state._retry
        if policy is None:
            return 0.0
        try:
            accepted = policy.accepts(failure)
        except Exception:
            logger.exception("state %r (%s): the retry predicate 'on' raised; not retried",
                             handle.state.name, handle.state.func_name,
                             extra=state_extra(handle, handle._executor_name or ""))
            return None
        return policy.wait_after(attempt) if accepted else None

    def _executor_of(self, handle: StateHandle) -> Executor | None:
        """The executor a running state runs on (for the stall warning's stack)."""
        given = handle.state.executor
        if isinstance(given, Executor):
            return given
        name = handle._executor_name
        return self._executors.get(name) if name is not None else None

    def _on_start(self, handle: StateHandle, attempt: int) -> None:
        loop = self._loop
        assert loop is not None
        handle.started_at = loop.time()
        hub = self._books.hub
        if hub is not None:
            hub.started(handle)
        if self._start_waiters:
            self._started_now(handle)
        timeout = handle.state.timeout
        if timeout is not None and handle.attempts == attempt and not handle.done():
            handle._timer = loop.call_later(timeout, self._time_out, handle, attempt)

    def _time_out(self, handle: StateHandle, attempt: int) -> None:
        handle._timer = None
        task = handle._task
        if handle.attempts == attempt and not handle.done() and task is not None:
            handle._timed_out = True
            logger.warning("state %r (%s) timed out after %s s on %s (attempt %d)",
                           handle.state.name, handle.state.func_name, handle.state.timeout,
                           handle._executor_name, attempt, extra=state_extra(handle))
            task.cancel()

    async def _enter_now(self, state: State) -> StateHandle:
        """Run ``state`` at once, outside the queue (``State.enter_state``)."""
        self._check_state(state)
        loop = self._bind_loop()
        handle = StateHandle(state, self._books, loop.time(), contextvars.copy_context())
        self._books.added(1, _QUEUED)
        self._books.queued((handle,))
        self._spawn(self._detached(handle), None)
        return handle

    async def _detached(self, handle: StateHandle) -> None:
        state = handle.state
        loop = self._loop
        assert loop is not None
        gated = False
        while not handle.done():  # one pass per attempt; a parked state comes back here
            resumed = self._resumers[handle] = loop.create_future()
            if state._deps and not self._deps_ready(handle):
                await resumed
                continue
            event = state.event
            if not gated and event is not None and not event.is_set():
                if handle.status is not _WAITING:
                    handle._set_status(_WAITING)
                await self._await_own(self._spawn(_open_gate(handle, event), handle), handle)
                if handle.done():
                    break
            gated = True
            if state.tags and not self._slots_ready(handle):
                await resumed
                continue
            task = self._spawn(self._run(handle), handle, untrack_when_done=False)
            await asyncio.wait([task])
            if handle in self._parked or handle in self._stash:
                await resumed
        self._resumers.pop(handle, None)

    # -- stopping ----------------------------------------------------------------------------

    def signal_stopping(self) -> None:
        """Stop: no new states; queued ones end CANCELLED; running ones are cancelled.

        Synchronous and idempotent; safe from any thread and from a signal handler.
        ``process_states()`` returns once the cleanup is done.
        """
        if self._stop_requested:
            return
        self._stop_requested = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._on_stop()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._on_stop)

    def _on_stop(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        current = self._current
        if current is not None:
            current.cancel()
        for handle in list(self._start_waiters):  # the main loop waits no more (_until_started)
            self._started_now(handle)
        self._books.wake_producers()
        if self._main_task is None and not self._stopped:
            self._bg_task = self._spawn(self._shutdown(), None)

    async def _shutdown(self) -> None:
        self._stop_requested = True
        while self._queue:
            self._queue.pop().cancel()
        self._books.wake_producers()
        self._cancel_parked()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_grace + 1.0)
        for handle in list(self._books.running):
            handle.cancel()
        for ex in {*self._executors.values(), *self._adopted}:
            try:
                await ex.shutdown(cancel=True)
            except Exception:
                logger.exception("executor %r failed to shut down", ex.name)
        self._stopped = True
        self._stalls.close()
        if self._books.spare_hub is not None:
            self._books.spare_hub.close()  # every events() iterator ends
        self._books.idle.cancel()
        logger.debug("manager stopped: %s", self.stats().by_status)

    # -- async with ------------------------------------------------------------------------

    async def __aenter__(self) -> StateManager:
        if self._main_task is not None or self._bg_task is not None:
            raise RuntimeError("process_states() is already running for this manager")
        self._bind_loop()
        self._bg_task = asyncio.get_running_loop().create_task(self.process_states())
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        bg = self._bg_task
        try:
            if exc_type is None and bg is not None:
                joiner = asyncio.ensure_future(self.join())
                await asyncio.wait([joiner, bg], return_when=asyncio.FIRST_COMPLETED)
                joiner.cancel()
        finally:
            self.signal_stopping()
            if bg is not None:
                await asyncio.wait([bg])
                self._bg_task = None
                if not bg.cancelled() and bg.exception() is not None and exc_type is None:
                    raise bg.exception()  # type: ignore[misc]

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> ManagerStats:
        """A frozen snapshot: counts by status and by executor, what runs now, and per tag
        (``by_tag``: running, waiting for a slot, limit)."""
        loop = self._loop
        books = self._books
        return snapshot(books.counts, books.by_executor, books.running,
                        loop.time() if loop is not None else 0.0, self._slots.by_tag())

    def set_limit(self, tag: str, limit: int | None) -> None:
        """Change how many states holding ``tag`` may run at once (``None``: no limit); takes
        effect at once, while the manager runs (waiters that now fit start). Loop thread."""
        self._slots.set_limit(tag, limit)

    def __repr__(self) -> str:
        phase = "stopped" if self._stopped else "stopping" if self._stop_requested else "open"
        books = self._books
        return (f"<StateManager {phase} queued={books.counts[_QUEUED.index]} "
                f"running={len(books.running)} unfinished={books.unfinished}>")


async def _open_gate(handle: StateHandle, event: asyncio.Event) -> None:
    """Wait for a state's gate; a gate that cannot be awaited here (an ``asyncio.Event`` bound
    to another event loop) fails the state, naming it and the field."""
    try:
        await event.wait()
    except RuntimeError as exc:
        state = handle.state
        error = ValueError(f"State {state.name!r}: field 'event' cannot be awaited on the "
                           f"manager's event loop ({exc})")
        if handle._finish(_FAILED, exc=error):
            log_failure(handle, state.executor_name, error)


def _cancelling(task: asyncio.Task[Any] | None) -> bool:
    """True when ``task`` itself has a cancellation pending (3.11+; False before)."""
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


def _uncancel(task: asyncio.Future[Any] | None) -> None:
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


current.provide(StateManager.instance)
