"""``manager.map``: a function over a (possibly endless) iterable, as blocking states side by side.

:class:`Mapper` reads the input lazily (a task of its own, the *feeder*), packs items into calls,
puts each call on the manager's queue as a blocking :class:`State`, and yields the results in
input order or as they complete. What it keeps bounded:

* **The window.** At most ``window`` items are put, running or waiting to be yielded at once;
  with no ``window``, a few calls per worker of the executor (``CALLS_PER_WORKER``), each of at
  most ``MAX_CHUNK`` items. A generator of ten million items runs in memory that does not grow.
* **Chunks.** With ``chunksize=None`` the first calls carry one item each; each call measures, in
  the worker, the seconds its items took (engine/chunk.py), and later calls carry as many items
  as fit in ``TARGET_S`` of work (growing at most ``GROWTH``-fold a step, up to ``MAX_CHUNK``;
  near the end of an input that knows its length, no more than a share of what is left for
  each worker, so that the last calls end together):
  fast items travel and run many to a call, slow ones alone. Each item keeps its own result and
  error: an item that raises inside a call is retried alone (its ``retries`` less one); a call that
  fails as a whole (a crash of its worker, its timeout, a result that cannot be pickled) is run
  again item by item, each with the full ``retries`` and ``timeout``. A call's ``timeout`` is the
  item's times its items.
* **Failures.** The first item that fails for good raises from the iterator at once and cancels
  every call still pending, unless ``return_exceptions=True`` (the exception is yielded in the
  item's place). An exception of the input iterable does the same. Leaving the ``async for``
  early (``break``, an exception, ``aclose()``) cancels what is pending.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import operator
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from statepool.executors.base import Executor

from .chunk import Outcome, map_chunk, map_chunk_async
from .errors import ManagerStoppedError
from .handle import StateHandle, StateStatus
from .log import log_failure_of, logger
from .naming import func_name, is_coroutine_callable
from .state import State
from .timings import worker_of

if TYPE_CHECKING:
    from .manager import StateManager

__all__ = ["CALLS_PER_WORKER", "MAX_CHUNK", "TARGET_S", "Mapper"]

# Seconds of work a chunk of fast items aims at (measured in the worker). Each call costs the
# parent a few hundred microseconds of CPU, and up to 2 ms while the workers keep every core busy
# (2 workers on 2 cores): at 50 ms a chunk, the pipeline benchmark made 360 calls for 1,000 blobs
# and the parent used 2.7x joblib's CPU; at 200 ms (joblib's smallest batch duration) it makes
# about 110 calls and uses as much as joblib. The end of a sized input is split anyway
# (a share of what is left per worker), so the last calls still end together.
TARGET_S = 0.2
MAX_CHUNK = 4096  # items in one call at most (automatic chunking)
GROWTH = 4  # a chunk is at most this many times the largest one measured so far
CALLS_PER_WORKER = 3  # calls put, running or waiting to be yielded, per worker (no window)
_FEED_WAIT_S = 0.005  # an async input: a chunk leaves once its first item waited this long
_NOT_STATE_OPTIONS = ("args", "kwargs", "lazy_args", "lazy_kwargs", "is_blocking", "func")
_SUCCEEDED, _CANCELLED = StateStatus.SUCCEEDED, StateStatus.CANCELLED
_PENDING = object()  # an item's slot before its outcome


class _Call:
    """Items ``start .. start + len(items) - 1`` of the input, and what became of each."""

    __slots__ = ("done", "failures", "handles", "items", "results", "size", "start")

    def __init__(self, start: int, items: list[Any]) -> None:
        self.start = start
        self.size = len(items)
        self.items: list[Any] | None = items  # dropped once every item has its outcome
        self.results: list[Any] = [_PENDING] * len(items)
        self.failures: dict[int, BaseException] = {}  # offset -> the item's final error
        self.handles = 0  # states of this call not ended yet (the call, then items alone)
        self.done = False


class Mapper:
    """One ``manager.map(...)``: validated at construction, run by :meth:`results`."""

    def __init__(self, manager: StateManager, func: Callable[[Any], Any], iterable: Any, *,
                 executor: str | Executor | None, ordered: bool, window: int | None,
                 chunksize: int | None, return_exceptions: bool, name: str | None,
                 options: dict[str, Any]) -> None:
        if not callable(func):
            raise TypeError(f"map(): 'func' must be callable, got {func!r}")
        self._name = name if name is not None else func_name(func).split(" ")[0]
        if not isinstance(self._name, str) or not self._name:
            raise ValueError(f"map(): 'name' must be a non-empty str, got {name!r}")
        if isinstance(iterable, AsyncIterable):
            self._aiter: AsyncIterator[Any] | None = aiter(iterable)
            self._iter: Iterator[Any] | None = None
        elif isinstance(iterable, Iterable):
            self._iter, self._aiter = iter(iterable), None
        else:
            raise TypeError(f"map({self._name}): 'iterable' must be an iterable or an async "
                            f"iterable, got {type(iterable).__name__}: {iterable!r}")
        for field, value in (("window", window), ("chunksize", chunksize)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"map({self._name}): {field!r} must be an int >= 1 or None, "
                                 f"got {value!r}")
        wrong = [key for key in options if key in _NOT_STATE_OPTIONS]
        if wrong:
            raise TypeError(f"map({self._name}): {wrong[0]!r} is not an option of map (each "
                            "item is the function's only argument: use functools.partial for "
                            "the others)")
        self._manager = manager
        self._func = func
        self._coro = is_coroutine_callable(func)
        self._ordered = bool(ordered)
        self._return_exceptions = bool(return_exceptions)
        self._fixed_chunk = chunksize
        self._options = dict(options)
        self._retries: Any = self._options.pop("retries", 0)
        self._timeout: float | None = self._options.pop("timeout", None)
        # a plain function on the loop cannot be blocking (State says why): it runs in turn
        blocking = self._coro or not _on_loop_by_name(executor)
        self._blocking = blocking
        self._executor = executor
        # the options are State's: check them now, with the item's name, not in the main loop
        State(f"{self._name}[0]", func, blocking, args=(None,), executor=executor,
              retries=self._retries, timeout=self._timeout, **self._options)
        self._window = window
        self._max_calls = window if window is not None else 0  # set when it starts
        self._probes = 1  # one-item calls out at once before the first measure (the workers)
        self._chunk_cap = MAX_CHUNK
        self._per_item: float | None = None  # seconds an item takes in the worker (EWMA)
        self._largest = 1  # the largest chunk measured so far
        self._calls: collections.deque[_Call] = collections.deque()  # put, in input order
        self._ready: collections.deque[_Call] = collections.deque()  # done, unordered mode
        self._live: set[StateHandle] = set()
        self._items_out = 0  # items put and not yet yielded
        self._calls_out = 0  # calls put and not yet yielded
        self._error: BaseException | None = None  # the failure to raise (first one wins)
        self._failed = False
        self._exhausted = False
        self._closed = False
        self._feeder: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None  # the consumer waits on it
        self._room: asyncio.Future[None] | None = None  # the feeder waits on it
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the consumer's side -------------------------------------------------------------------

    async def results(self) -> AsyncIterator[Any]:
        """Every item's result (or exception, with ``return_exceptions``), as the map says."""
        try:
            while True:
                call = await self._next_call()
                if call is None:
                    return
                values = call.results
                self._release(call)
                for value in values:
                    yield value
                values.clear()  # see _one_less
        finally:
            self._close()

    async def collect(self) -> list[Any]:
        """Every result in input order (``run_map``): no step of an iterator per item."""
        out: list[Any] = []
        try:
            while True:
                call = await self._next_call()
                if call is None:
                    return out
                out.extend(call.results)
                call.results.clear()
                self._release(call)
        finally:
            self._close()

    async def _next_call(self) -> _Call | None:
        """The next call whose items may be yielded now; None when the input is done."""
        if self._loop is None:
            self._open()
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            if self._ordered:
                if self._calls and self._calls[0].done:
                    return self._calls.popleft()
            elif self._ready:
                return self._ready.popleft()
            if self._exhausted and not self._calls_out:
                return None
            assert self._loop is not None
            self._wake = self._loop.create_future()
            if not self._manager._books.serving:
                self._manager._books.idle.watch(None, "map() waits")
            await self._wake

    def _release(self, call: _Call) -> None:
        """``call``'s items leave the window: the feeder may put more."""
        self._calls_out -= 1
        self._items_out -= call.size
        self._wake_feeder()

    # -- the feeder's side ---------------------------------------------------------------------

    def _open(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        workers = self._workers()
        self._probes = workers
        if self._window is None:
            self._max_calls = max(4, CALLS_PER_WORKER * workers)
            self._window = self._max_calls * MAX_CHUNK
        else:
            self._max_calls = self._window
            self._chunk_cap = max(1, min(MAX_CHUNK, self._window // (2 * workers)))
        self._feeder = loop.create_task(self._feed(), name=f"map {self._name}: feeder")

    def _workers(self) -> int:
        ex = self._executor
        if not isinstance(ex, Executor):
            try:
                ex = self._manager._executor_for(self._probe())
            except Exception:  # the states fail with this error, one by one
                return 1
        capacity = ex.capacity() if not ex.runs_on_loop else None
        return max(1, capacity or 2)

    def _probe(self) -> State:
        return State(self._name, self._func, self._blocking, executor=self._executor)

    async def _feed(self) -> None:
        start = 0
        try:
            while not self._closed:
                while (self._calls_out >= (self._max_calls if self._per_item is not None
                                           or self._fixed_chunk else self._probes)
                       or self._items_out >= (self._window or 1)):
                    assert self._loop is not None
                    self._room = self._loop.create_future()
                    await self._room
                size = min(self._chunk_size(), (self._window or 1) - self._items_out)
                items = await self._take(size)
                if not items:
                    break
                await self._put(start, items)
                start += len(items)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the input raised, or the manager stopped
            if not self._closed:
                self._fail(exc)
        finally:
            self._exhausted = True
            self._wake_consumer()

    async def _take(self, size: int) -> list[Any]:
        if self._iter is not None:
            it = self._iter
            if size == 1:
                for item in it:
                    return [item]
                return []
            return list(itertools.islice(it, size))
        assert self._aiter is not None and self._loop is not None
        items: list[Any] = []
        first_at = 0.0
        while len(items) < size:
            try:
                item = await anext(self._aiter)
            except StopAsyncIteration:
                break
            items.append(item)
            if len(items) == 1:
                first_at = self._loop.time()
            elif self._loop.time() - first_at > _FEED_WAIT_S:
                break  # a slow source: the items read so far go now
        return items

    def _chunk_size(self) -> int:
        if self._fixed_chunk is not None:
            return min(self._fixed_chunk, self._window or self._fixed_chunk)
        per_item = self._per_item
        if per_item is None:
            return 1
        size = int(TARGET_S / max(per_item, 1e-7))
        if self._iter is not None:  # near the end of a sized input: a share for each worker
            left = operator.length_hint(self._iter, 0)
            if left:
                size = min(size, -(-left // (2 * self._probes)))
        return max(1, min(size, self._largest * GROWTH, self._chunk_cap))

    async def _put(self, start: int, items: list[Any]) -> None:
        call = _Call(start, items)
        n = len(items)
        if any(type(item) is StateHandle for item in items):
            # handles are dependencies (State: after): each such item runs alone, when its
            # handle has succeeded, with the handle's result as its argument
            self._calls_out += 1
            self._items_out += n
            if self._ordered:
                self._calls.append(call)
            for offset in range(n):
                self._alone(call, offset, self._retries, self._timeout)
            if call.handles == 0:
                call.handles = 1
                self._one_less(call)
            return
        runner: Callable[..., Any] = map_chunk_async if self._coro else map_chunk
        timeout = None if self._timeout is None else self._timeout * n
        end = f"{start}" if n == 1 else f"{start}:{start + n}"
        state = State(f"{self._name}[{end}]", runner, self._blocking, args=(self._func, items),
                      executor=self._executor, timeout=timeout, **self._options)
        handle = await self._manager.put_state(state)
        if self._ordered:
            self._calls.append(call)
        self._calls_out += 1
        self._items_out += n
        self._watch(handle, functools.partial(self._call_done, call, n))
        call.handles = 1

    def _watch(self, handle: StateHandle, callback: Callable[[StateHandle], None]) -> None:
        self._live.add(handle)
        books = self._manager._books
        if not books.serving:
            books.idle.watch(handle, "map() waits")
        handle.add_done_callback(callback)

    # -- outcomes (done-callbacks, on the loop) -------------------------------------------------

    def _call_done(self, call: _Call, n: int, handle: StateHandle) -> None:
        self._live.discard(handle)
        if self._closed:
            return
        if handle.status is _SUCCEEDED:
            outcome: Outcome = handle._result
            results, errors, seconds = outcome
            self._measured(n, seconds)
            call.results = results
            for offset, exc in (errors or {}).items():
                self._item_failed(call, offset, exc, logged=False, handle=handle)
        elif handle.status is _CANCELLED:  # the manager stops (map's own cancels are closed)
            for offset in range(n):
                self._final_error(call, offset, self._cancelled(call.start + offset))
        elif n == 1:  # the item's own call: its failure, a crash, a timeout
            self._item_failed(call, 0, _error_of(handle), logged=True)
        else:  # the call failed as a whole: each item again, alone, with every attempt
            items = call.items
            assert items is not None
            logger.warning("map %s: the call of items %d-%d failed as a whole (%s); running "
                           "them one by one", self._name, call.start, call.start + n - 1,
                           _describe(_error_of(handle)))
            for offset in range(n):
                self._alone(call, offset, self._retries, self._timeout)
        self._one_less(call)

    def _item_failed(self, call: _Call, offset: int, exc: BaseException, *,
                     logged: bool, handle: StateHandle | None = None) -> None:
        """An item's first attempt failed (inside a call of several, or as its own call)."""
        retries = _fewer(self._retries) if _retryable(self._retries, exc) else None
        index = call.start + offset
        if retries is not None:
            logger.warning("state '%s[%d]' (%s): attempt 1 failed (%s); retrying alone",
                           self._name, index, func_name(self._func), _describe(exc),
                           extra={"state": f"{self._name}[{index}]", "attempt": 1})
            self._alone(call, offset, retries, self._timeout)
            return
        if not logged and handle is not None:  # the engine saw the call succeed: the item's
            # failure is ours to log, by the engine's rule (one traceback per kind of failure,
            # then a line per repeat)
            name = f"{self._name}[{index}]"
            executor = handle._executor_name or handle.state.executor_name
            log_failure_of(handle._books.failures, name, func_name(self._func), executor, 1, exc,
                           {"state": name, "executor": executor, "attempt": 1,
                            "worker": worker_of(handle)})
        self._final_error(call, offset, exc)

    def _cancelled(self, index: int) -> BaseException:
        if self._manager._stop_requested:
            return ManagerStoppedError(f"map {self._name}: item {index} was cancelled: the "
                                       "manager is stopping")
        return asyncio.CancelledError(f"map {self._name}: item {index} was cancelled")

    def _alone(self, call: _Call, offset: int, retries: Any, timeout: float | None) -> None:
        """Run one item of ``call`` as a state of its own (its own attempts and timeout)."""
        items = call.items
        assert items is not None
        state = State(f"{self._name}[{call.start + offset}]", self._func, self._blocking,
                      args=(items[offset],), executor=self._executor, retries=retries,
                      timeout=timeout, **self._options)
        try:
            self._manager._check_state(state)
            if state._deps:  # a handle item: a dependency (of this manager only)
                self._manager._check_dependencies(state)
        except (ManagerStoppedError, ValueError) as exc:
            self._final_error(call, offset, exc)
            return
        handle = self._manager._enqueue(state)
        call.handles += 1
        self._watch(handle, functools.partial(self._alone_done, call, offset))

    def _alone_done(self, call: _Call, offset: int, handle: StateHandle) -> None:
        self._live.discard(handle)
        if self._closed:
            return
        if handle.status is _SUCCEEDED:
            call.results[offset] = handle._result
        elif handle.status is _CANCELLED:
            self._final_error(call, offset, self._cancelled(call.start + offset))
        else:
            self._final_error(call, offset, _error_of(handle))
        self._one_less(call)

    def _final_error(self, call: _Call, offset: int, exc: BaseException) -> None:
        call.results[offset] = exc
        call.failures[offset] = exc
        if not self._return_exceptions:
            self._fail(exc)

    def _one_less(self, call: _Call) -> None:
        call.handles -= 1
        if call.handles == 0 and not call.done:
            call.done = True
            # The items and the results lists are shared with the call's state and handle,
            # which an executor's bookkeeping may keep in a reference cycle until the GC runs:
            # emptied, they cost nothing meanwhile (the results once yielded).
            if call.items is not None:
                call.items.clear()
            call.items = None
            if not self._ordered:
                self._ready.append(call)
            self._wake_consumer()

    def _measured(self, n: int, seconds: float) -> None:
        per_item = seconds / n
        self._per_item = per_item if self._per_item is None else \
            0.5 * self._per_item + 0.5 * per_item
        self._largest = max(self._largest, n)

    # -- failing, closing ----------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The first failure for good: raise it from the iterator, cancel what is pending."""
        if not self._failed and not self._closed:
            self._failed = True
            self._error = exc
            self._cancel_pending()
            self._wake_consumer()

    def _cancel_pending(self) -> None:
        if self._feeder is not None and not self._feeder.done():
            self._feeder.cancel()
        for handle in list(self._live):
            handle.cancel()
        self._live.clear()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()
        self._calls.clear()
        self._ready.clear()

    def _wake_consumer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _wake_feeder(self) -> None:
        room = self._room
        if room is not None and not room.done():
            room.set_result(None)


def _on_loop_by_name(executor: str | Executor | None) -> bool:
    if executor is None:
        return False  # a plain function goes to "thread"
    if isinstance(executor, Executor):
        return executor.runs_on_loop
    return executor == "inline"


def _error_of(handle: StateHandle) -> BaseException:
    if handle.status is _CANCELLED:
        return handle._make_cancelled_error()
    exc = handle._exception
    return exc if exc is not None else RuntimeError(f"state {handle.state.name!r} failed")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _fewer(retries: Any) -> Any:
    """``retries`` less one attempt: an int, or a ``Retry``-like dataclass with ``times``."""
    if isinstance(retries, int):
        return retries - 1 if retries > 0 else None
    times = getattr(retries, "times", 0)
    if not times:
        return None
    if dataclasses.is_dataclass(retries) and not isinstance(retries, type):
        return dataclasses.replace(retries, times=times - 1)
    try:  # engine.retry.Retry: the same policy, one attempt less
        return type(retries)(times - 1, delay=retries.delay, backoff=retries.backoff,
                             max_delay=retries.max_delay, jitter=retries.jitter, on=retries.on)
    except (AttributeError, TypeError, ValueError):
        return retries


def _retryable(retries: Any, exc: BaseException) -> bool:
    """Whether ``retries`` retries ``exc`` (a ``Retry`` with ``on`` may refuse it)."""
    if isinstance(retries, int):
        return retries > 0
    on = getattr(retries, "on", None)
    if on is None:
        return True
    if isinstance(on, type) or (isinstance(on, tuple) and all(isinstance(c, type) for c in on)):
        return isinstance(exc, on)
    if callable(on):
        try:
            return bool(on(exc))
        except Exception:
            return False
    return True

