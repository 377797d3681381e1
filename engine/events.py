"""Lifecycle events: :class:`StateEvent`, the manager's subscribers, and ``events()``.

The manager's books (engine/books.py) hold an :class:`EventHub` only while someone listens: with
no subscriber the engine pays one attribute check per change. Each subscriber is a *sink*: a
listener (a sync callable, called on the loop thread as the event happens) or the bounded buffer
behind one ``manager.events()`` iterator, which drops its oldest events when its reader falls
``buffer`` events behind and says how many on the next event it yields (``event.dropped``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from .handle import StateStatus
from .timings import timings_of, worker_of

if TYPE_CHECKING:
    from .books import Books
    from .handle import StateHandle

__all__ = ["KINDS", "EventHub", "EventSource", "EventStream", "StateEvent"]

logger = logging.getLogger("statepool.engine")

#: every kind of event, in the order one state's events come
KINDS = ("queued", "waiting", "started", "retrying", "succeeded", "failed", "cancelled")
TERMINAL_KINDS = frozenset(KINDS[4:])
_KIND = [status.value for status in StateStatus]  # by StateStatus.index


class StateEvent(tuple):  # type: ignore[type-arg]  # a record: (kind, handle, ...)
    """One step of one state's lifecycle: a read-only record (a tuple, as a named tuple).

    ``kind`` (one of :data:`KINDS`), ``handle``, ``name`` (the state's), ``executor`` (its name),
    ``attempt`` (1-based; 0 before the first), ``worker`` (a PID for process executors, a thread
    name for threads, a Dask worker address; ``None`` on the loop or where not known), ``time``
    (the manager loop's clock), ``error`` (the exception on ``"failed"`` and ``"retrying"``),
    ``delay`` (seconds before the next attempt, on ``"retrying"``), ``dropped`` (events this
    subscriber lost just before this one) and, on a terminal event, ``timings`` (the handle's).

    The engine builds one per change of a state, so it is a tuple subclass (built in C, with
    no ``__init__`` to run): ``StateEvent((kind, handle, attempt, worker, time, error, delay,
    dropped))``.
    """

    __slots__ = ()

    kind: str = property(itemgetter(0))  # type: ignore[assignment]
    handle: StateHandle = property(itemgetter(1))  # type: ignore[assignment]
    attempt: int = property(itemgetter(2))  # type: ignore[assignment]
    worker: int | str | None = property(itemgetter(3))  # type: ignore[assignment]
    time: float = property(itemgetter(4))  # type: ignore[assignment]
    error: BaseException | None = property(itemgetter(5))  # type: ignore[assignment]
    delay: float | None = property(itemgetter(6))  # type: ignore[assignment]
    dropped: int = property(itemgetter(7))  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return self[1].state.name  # type: ignore[no-any-return]

    @property
    def executor(self) -> str:
        handle = self[1]
        return handle._executor_name or handle.state.executor_name  # type: ignore[no-any-return]

    @property
    def timings(self) -> dict[str, float] | None:
        """The handle's ``timings`` on a terminal event, else ``None``."""
        if self[0] not in TERMINAL_KINDS:
            return None
        return timings_of(self[1], self[4])

    def _with_dropped(self, dropped: int) -> StateEvent:
        return StateEvent((*self[:7], dropped))

    def __repr__(self) -> str:
        extra = f" error={type(self.error).__name__}" if self.error is not None else ""
        if self.dropped:
            extra += f" dropped={self.dropped}"
        return (f"<StateEvent {self.kind} {self.name!r} attempt={self.attempt} "
                f"worker={self.worker!r} time={self.time:.6f}{extra}>")


class _Buffer:
    """What one ``events()`` iterator has not read yet, at most ``size`` events."""

    __slots__ = ("closed", "dropped", "items", "size", "waiter")

    def __init__(self, size: int) -> None:
        self.items: collections.deque[StateEvent] = collections.deque()
        self.size = size
        self.dropped = 0
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: StateEvent) -> None:
        items = self.items
        if len(items) >= self.size:
            items.popleft()
            self.dropped += 1
        items.append(event)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


Sink = Callable[[StateEvent], Any]  # a listener, or a buffer's push


class EventHub:
    """The subscribers of one manager; lives on its books while there is at least one.

    ``calls`` holds what each event is handed to: a listener itself, or the ``push`` of one
    iterator's buffer. The hooks build each event once and hand it to each in turn, with no
    call more than needed: they run for every state."""

    __slots__ = ("books", "buffers", "calls")

    def __init__(self, books: Books) -> None:
        self.books = books
        self.calls: tuple[Sink, ...] = ()
        self.buffers: list[_Buffer] = []

    def add(self, call: Sink) -> None:
        self.calls = (*self.calls, call)
        self.books.hub = self

    def remove(self, call: Sink) -> None:
        calls = list(self.calls)
        for i, c in enumerate(calls):
            if c is call or c == call:  # a buffer's push is a new bound method each time
                del calls[i]
                break
        self.calls = tuple(calls)
        if not self.calls and self.books.hub is self:
            self.books.hub = None  # nobody listens: back to one attribute check per change

    def forget(self, buffer: _Buffer) -> None:
        if buffer in self.buffers:
            self.buffers.remove(buffer)
        self.remove(buffer.push)

    def _raised(self, call: Sink, event: StateEvent) -> None:
        """A listener raised: logged once, and it is removed; the engine goes on."""
        logger.exception("event listener %r raised on %r; it is removed", call, event)
        self.remove(call)

    def emit(self, event: StateEvent) -> None:
        for call in self.calls:
            try:
                call(event)
            except Exception:
                self._raised(call, event)

    def close(self) -> None:
        """The manager stopped: every iterator ends once it has yielded what it holds."""
        self.calls = ()
        if self.books.hub is self:
            self.books.hub = None
        buffers, self.buffers = self.buffers, []
        for buf in buffers:
            buf.close()

    # -- the hooks (Books and the manager call them while ``books.hub`` is set) --------------

    def queued(self, handles: Iterable[StateHandle]) -> None:
        calls = self.calls
        for handle in handles:
            event = StateEvent(("queued", handle, 0, None, handle.queued_at, None, None, 0))
            for call in calls:
                try:
                    call(event)
                except Exception:
                    self._raised(call, event)
                    calls = self.calls  # without it from the next event on

    def waiting(self, handle: StateHandle, now: float) -> None:
        self.emit(StateEvent(("waiting", handle, handle.attempts, None, now, None, None, 0)))

    def started(self, handle: StateHandle) -> None:
        marks = handle._marks
        started = handle.started_at
        event = StateEvent(("started", handle, handle.attempts,
                            marks.current_worker() if marks is not None else None,
                            started if started is not None else self.books.clock(),
                            None, None, 0))
        for call in self.calls:
            try:
                call(event)
            except Exception:
                self._raised(call, event)

    def retrying(self, handle: StateHandle, error: BaseException, delay: float) -> None:
        self.emit(StateEvent(("retrying", handle, handle.attempts, worker_of(handle),
                              self.books.clock(), error, delay, 0)))

    def ended(self, handle: StateHandle) -> None:
        marks = handle._marks
        finished = handle.finished_at
        event = StateEvent((_KIND[handle.status.index], handle, handle.attempts,
                            marks.worker if marks is not None else None,  # settled by now
                            finished if finished is not None else self.books.clock(),
                            handle._exception, None, 0))
        for call in self.calls:
            try:
                call(event)
            except Exception:
                self._raised(call, event)


class EventStream(AsyncIterator[StateEvent]):
    """``manager.events()``: yields events until the manager has stopped; ``aclose()`` (or
    leaving it to the garbage collector) unsubscribes."""

    def __init__(self, hub: EventHub | None, buffer: _Buffer) -> None:
        self._hub = hub
        self._buffer = buffer
        if hub is not None:
            hub.buffers.append(buffer)
            hub.add(buffer.push)
        else:
            buffer.closed = True  # the manager has stopped: nothing will come

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StateEvent:
        buf = self._buffer
        while not buf.items:
            if buf.closed:
                self._hub = None
                raise StopAsyncIteration
            waiter = buf.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if buf.waiter is waiter:
                    buf.waiter = None
        event = buf.items.popleft()
        if buf.dropped:
            event, buf.dropped = event._with_dropped(buf.dropped), 0
        return event

    def pending(self) -> int:
        """Events received and not yet read."""
        return len(self._buffer.items)

    async def aclose(self) -> None:
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        hub, self._hub = self._hub, None
        self._buffer.closed = True
        self._buffer.items.clear()
        if hub is not None:
            hub.forget(self._buffer)

    def __del__(self) -> None:
        hub = self._hub
        if hub is not None:
            hub.forget(self._buffer)


class EventSource:
    """``events()`` and ``add_listener()``: a part of
    :class:`~statepool.engine.manager.StateManager`, kept apart."""

    _books: Books
    _stopped: bool

    def _hub(self) -> EventHub | None:
        if self._stopped:
            return None
        books = self._books
        hub = books.hub
        if hub is None:
            hub = books.spare_hub
            if hub is None:
                hub = books.spare_hub = EventHub(books)
        return hub

    def events(self, *, buffer: int = 10_000) -> EventStream:
        """An async iterator over the lifecycle of every state put from now on, until the
        manager stops. A reader more than ``buffer`` events behind loses the oldest; the next
        event it gets says how many (``event.dropped``)."""
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"events(): 'buffer' must be an int >= 1, got {buffer!r}")
        return EventStream(self._hub(), _Buffer(buffer))

    def add_listener(self, callback: Callable[[StateEvent], Any]) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop thread for every event from now on; returns a
        function that removes it. A listener that raises is logged once and removed."""
        if not callable(callback):
            raise TypeError(f"add_listener() takes a callable, got {callback!r}")
        hub = self._hub()
        if hub is None:
            return _nothing
        hub.add(callback)
        return lambda: hub.remove(callback)


def _nothing() -> None:
    pass
