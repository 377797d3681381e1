"""The manager's books: counts by status and executor, the running set, join and put waiters.

One owner for the bookkeeping. A :class:`~statepool.engine.handle.StateHandle` reports each change
of its status through :meth:`Books.moved` or :meth:`Books.ended`; the manager reads the books and
waits on them (``join()``, a bounded ``put_state``). Nothing else edits these fields.

The books also carry the lifecycle events (engine/events.py): ``hub`` is ``None`` while nobody
listens, so an unobserved manager pays one attribute check per change. The hooks are
:meth:`queued`, :meth:`moved` (waiting), :meth:`attempt_started`, :meth:`retrying` and
:meth:`ended`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .futurelike import DoneCallbacks
from .log import note_overhead
from .timings import Marks

if TYPE_CHECKING:
    from .events import EventHub
    from .handle import StateHandle, StateStatus
    from .idle import IdleWatch
    from .slots import TagSlots

__all__ = ["Books"]


class Books:
    """Counts by ``StateStatus.index``, states run by executor, what runs now, who waits."""

    __slots__ = ("by_executor", "callbacks", "cheap", "clock", "counts", "failures", "hub", "idle",
                 "join_waiters", "loop", "put_waiters", "running", "serving", "slots",
                 "spare_hub", "unfinished")

    callbacks: DoneCallbacks  # the handles' done-callbacks to run (set by bind)
    idle: IdleWatch  # the warning for waiting on a manager that does not run (set by the manager)

    def __init__(self, statuses: int) -> None:
        self.counts: list[int] = [0] * statuses
        self.slots: TagSlots | None = None  # the manager's, once a state took a tag slot
        self.by_executor: Counter[str] = Counter()
        self.running: set[StateHandle] = set()
        self.unfinished = 0  # handles put and not yet terminal
        self.join_waiters: list[asyncio.Future[None]] = []
        self.put_waiters: deque[asyncio.Future[None]] = deque()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clock: Callable[[], float] = time.monotonic
        self.hub: EventHub | None = None  # set while someone listens to the events
        self.spare_hub: EventHub | None = None
        self.serving = False  # the manager's process_states() runs
        self.failures: dict[tuple[Any, ...], int] = {}  # engine/log.py: errors logged, by kind
        self.cheap: dict[str, int] = {}  # engine/log.py: cheap process calls, by function

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Time on ``loop``'s clock (without a Python call where it is asyncio's own)."""
        self.loop = loop
        self.callbacks = DoneCallbacks(loop)
        self.clock = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time

    def added(self, count: int, queued: StateStatus) -> None:
        """``count`` new handles, QUEUED."""
        self.counts[queued.index] += count
        self.unfinished += count

    def queued(self, handles: Sequence[StateHandle]) -> None:
        """``handles`` were put (after :meth:`added`): their ``"queued"`` events."""
        hub = self.hub
        if hub is not None:
            hub.queued(handles)

    def started(self, handle: StateHandle, executor: str) -> None:
        """``handle`` runs now on ``executor`` (its status was set to RUNNING)."""
        self.running.add(handle)
        self.by_executor[executor] += 1

    def attempt_started(self, handle: StateHandle) -> None:
        """An attempt of ``handle`` started in its executor (``started_at`` was just set): its
        ``"started"`` event. Callers on hot paths check ``books.hub`` first."""
        hub = self.hub
        if hub is not None:
            hub.started(handle)

    def retrying(self, handle: StateHandle, error: BaseException, delay: float) -> None:
        """The attempt of ``handle`` failed with ``error``; another follows in ``delay`` s."""
        marks = handle._marks
        if marks is not None:
            marks.settle()
        hub = self.hub
        if hub is not None:
            hub.retrying(handle, error, delay)

    def moved(self, old: StateStatus, new: StateStatus,
              handle: StateHandle | None = None) -> None:
        """A handle went from ``old`` to ``new``, neither terminal (in one call: it runs for
        every state, twice for one that waits)."""
        counts = self.counts
        was, now_in = old.index, new.index
        counts[was] -= 1
        counts[now_in] += 1
        if not was and self.put_waiters:  # it left QUEUED: one producer may put
            self._let_one_in()
        if (now_in == 1 or was == 1) and handle is not None:  # WAITING: timings, the event
            now = self.clock()
            marks = handle._marks
            if marks is None:
                marks = handle._marks = Marks()
            if was == 1 and marks.wait_from is not None:
                marks.waited += now - marks.wait_from
                marks.wait_from = None
            if now_in == 1:
                if marks.left_at is None:
                    marks.left_at = now
                marks.wait_from = now
                hub = self.hub
                if hub is not None:
                    hub.waiting(handle, now)

    def ended(self, handle: StateHandle, old: StateStatus, new: StateStatus) -> None:
        """``handle`` went from ``old`` to the terminal ``new``."""
        counts = self.counts
        counts[old.index] -= 1
        counts[new.index] += 1
        if old.index == 0 and self.put_waiters:
            self._let_one_in()
        marks = handle._marks
        if marks is not None:
            marks.settle()
            if marks.wait_from is not None:
                marks.waited += (handle.finished_at or self.clock()) - marks.wait_from
                marks.wait_from = None
            ran = marks.ran_s
            if ran is not None and type(marks.worker) is int and new.index == 3:  # SUCCEEDED
                self._cheap(handle, marks, ran)
        self.running.discard(handle)
        self.unfinished -= 1
        hub = self.hub
        if hub is not None:
            hub.ended(handle)
        if not self.unfinished and self.join_waiters:
            self.release_all()
        slots = self.slots  # a state's slots go back as it ends, and it waits for none
        if slots is not None and (handle in slots.held or handle in slots.waiters):
            slots.forget(handle)

    def _cheap(self, handle: StateHandle, marks: Marks, ran: float) -> None:
        """A process state succeeded: was it worth its trip? (engine/log.py says, once.)"""
        if marks.t1 is None or handle.finished_at is None:
            return
        note_overhead(handle, ran, max(0.0, handle.finished_at - marks.t1 - ran))

    def _let_one_in(self) -> None:
        waiters = self.put_waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def release_all(self) -> None:
        """Wake every joiner: no handle is unfinished."""
        waiters, self.join_waiters = self.join_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def wake_producers(self) -> None:
        for fut in self.put_waiters:
            if not fut.done():
                fut.set_result(None)
