"""Tag slots: how many states holding each tag run at once (``StateManager(limits=...)``).

A state with tags takes one slot of every tag it names, all at once or none (two states that
each need two tags can never hold one each and wait for the other). A tag without a limit is a
label: its slots never run out, and it is counted for ``stats()["by_tag"]``. A state that finds
no room waits in a line per tag, ordered by priority, then by arrival; when a slot frees, the
line is walked in that order and every waiter whose tags all have room takes them (so no state
waits while its tags have room). A waiter stands in the line of each of its tags, so that a slot
freed in any of them looks at it again.

Slots may be given back on any thread: a thread executor's worker gives back the slots of the
call it ran as soon as it ends (``release``), and a waiter whose call is already prepared on
that executor (``acquire(..., admit=...)``) is admitted there and then, with no turn of the
event loop. Every count and line is changed under one lock, so the limits hold exactly whatever
thread frees a slot; a waiter of the loop granted on another thread is handed to the loop
(``call_soon_threadsafe``), holding its slots meanwhile.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from .handle import StateHandle

__all__ = ["TagSlots", "check_limits"]


def check_limits(limits: Any) -> dict[str, int | None]:
    """``limits`` as a dict tag -> int >= 1 (or None: no limit); errors name the field."""
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise TypeError(f"StateManager: 'limits' must be a mapping of tag -> int, got {limits!r}")
    out: dict[str, int | None] = {}
    for tag, limit in limits.items():
        out[check_tag(tag)] = check_limit(tag, limit)
    return out


def check_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"StateManager: a tag in 'limits' must be a non-empty str, got {tag!r}")
    return tag


def check_limit(tag: str, limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"StateManager: 'limits'[{tag!r}] must be an int >= 1 or None, "
                         f"got {limit!r}")
    return limit


class _Waiter:
    """One handle waiting for its slots, standing in the line of each of its tags."""

    __slots__ = ("admit", "handle", "live", "priority", "seq", "tags")

    def __init__(self, handle: StateHandle, seq: int,
                 admit: Callable[[], None] | None) -> None:
        state = handle.state
        self.handle = handle
        self.tags: tuple[str, ...] = state.tags
        self.priority: int = state.priority
        self.seq = seq
        self.admit = admit  # thread-safe start of its prepared call, or None (the loop's)
        self.live = True  # False once granted or gone: the lines drop it as they meet it


class _Line:
    """One tag's waiters, higher priority first, then by arrival: a deque for priority 0 (the
    common case, O(1)) and a heap for the others."""

    __slots__ = ("fifo", "heap")

    def __init__(self) -> None:
        self.fifo: deque[_Waiter] = deque()
        self.heap: list[tuple[int, int, _Waiter]] = []  # (-priority, arrival, waiter)

    def add(self, waiter: _Waiter) -> None:
        if waiter.priority:
            heapq.heappush(self.heap, (-waiter.priority, waiter.seq, waiter))
        else:
            self.fifo.append(waiter)

    def first(self) -> _Waiter | None:
        """The first live waiter (dead ones at the front are dropped)."""
        fifo, heap = self.fifo, self.heap
        while fifo and not fifo[0].live:
            fifo.popleft()
        while heap and not heap[0][2].live:
            heapq.heappop(heap)
        if heap and (heap[0][0] < 0 or not fifo):
            return heap[0][2]
        return fifo[0] if fifo else None

    def ordered(self) -> list[_Waiter]:
        """The live waiters in their order (the slow walk past a waiter that cannot start)."""
        heap = sorted(self.heap)
        return ([e[2] for e in heap if e[0] < 0 and e[2].live]
                + [w for w in self.fifo if w.live]
                + [e[2] for e in heap if e[0] > 0 and e[2].live])

    def __len__(self) -> int:
        return sum(1 for w in self.fifo if w.live) + sum(1 for e in self.heap if e[2].live)


class TagSlots:
    """Running counts per tag, the limits, and who waits for a slot."""

    __slots__ = ("_grant", "_loop", "_loop_thread", "_seq", "held", "limits", "lines", "lock",
                 "running", "waiters")

    def __init__(self, limits: dict[str, int | None], grant: Callable[[StateHandle], None]) -> None:
        self.limits = limits
        self.running: dict[str, int] = {}
        self.held: set[StateHandle] = set()  # handles holding their slots now
        self.lines: dict[str, _Line] = {}  # tag -> its waiters
        self.waiters: dict[StateHandle, _Waiter] = {}  # who waits now
        self.lock = threading.Lock()
        self._grant = grant  # called on the loop with a waiter of the loop that took its slots
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The manager's loop: waiters of the loop granted on another thread are sent there."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # -- under the lock ------------------------------------------------------------------------

    def _fits(self, tags: tuple[str, ...]) -> bool:
        limits, running = self.limits, self.running
        for tag in tags:
            limit = limits.get(tag)
            if limit is not None and running.get(tag, 0) >= limit:
                return False
        return True

    def _take(self, handle: StateHandle, tags: tuple[str, ...]) -> None:
        running = self.running
        for tag in tags:
            running[tag] = running.get(tag, 0) + 1
        self.held.add(handle)

    def _give_back(self, handle: StateHandle, granted: list[_Waiter]) -> None:
        self.held.discard(handle)
        running, lines, limits = self.running, self.lines, self.limits
        tags = handle.state.tags
        for tag in tags:
            running[tag] -= 1
        for tag in tags:
            if tag in lines and limits.get(tag) is not None:  # a label's slot helps nobody
                self._wake(tag, granted)

    def _wake(self, tag: str, granted: list[_Waiter]) -> None:
        """Walk ``tag``'s line in order while ``tag`` has room: every waiter whose tags all have
        room takes them; the others stay in line."""
        line = self.lines.get(tag)
        if line is None:
            return
        limit = self.limits.get(tag)
        running, waiters, held = self.running, self.waiters, self.held
        while limit is None or running.get(tag, 0) < limit:
            waiter = line.first()
            if waiter is None:
                break
            tags = waiter.tags
            if len(tags) != 1 and not self._fits(tags):  # another tag is full: look past it
                for other in line.ordered():
                    if limit is not None and running.get(tag, 0) >= limit:
                        break
                    if self._fits(other.tags):
                        self._grant_one(other, waiters, granted)
                break
            # the common case, one tag (which has room): _grant_one, inline
            handle = waiter.handle
            for t in tags:
                running[t] = running.get(t, 0) + 1
            held.add(handle)  # held before it leaves the waiters (see forget)
            waiter.live = False
            del waiters[handle]
            granted.append(waiter)
        if (not line.fifo and not line.heap) or line.first() is None:
            del self.lines[tag]

    def _grant_one(self, waiter: _Waiter, waiters: dict[StateHandle, _Waiter],
                   granted: list[_Waiter]) -> None:
        handle = waiter.handle
        self._take(handle, waiter.tags)  # held before it leaves the waiters (see forget)
        waiter.live = False
        del waiters[handle]
        granted.append(waiter)

    # -- outside the lock ----------------------------------------------------------------------

    def _hand_out(self, granted: list[_Waiter]) -> None:
        """Start what took its slots: a prepared call where we are, a loop waiter on the loop."""
        on_loop = threading.get_ident() == self._loop_thread
        later: list[StateHandle] = []
        for waiter in granted:
            admit = waiter.admit
            if admit is not None:
                admit()
            elif on_loop:
                self._grant(waiter.handle)
            else:
                later.append(waiter.handle)
        if later:
            loop = self._loop
            try:
                if loop is not None:
                    loop.call_soon_threadsafe(self._grant_all, later)
            except RuntimeError:  # the loop closed: nothing of it runs any more
                pass

    def _grant_all(self, handles: list[StateHandle]) -> None:
        for handle in handles:
            self._grant(handle)

    def try_take(self, handle: StateHandle) -> bool:
        """Take ``handle``'s slots now if they all have room (nothing is lined up)."""
        with self.lock:
            return self._take_if_room(handle, handle.state.tags)

    def _take_if_room(self, handle: StateHandle, tags: tuple[str, ...]) -> bool:
        """Under the lock: True if ``handle`` holds its slots (already, or taken now)."""
        if handle in self.held:
            return True
        if self._fits(tags):
            self._take(handle, tags)
            return True
        return False

    def acquire(self, handle: StateHandle, admit: Callable[[], None] | None = None) -> bool:
        """Take ``handle``'s slots now (True), or line it up for them (False). ``admit``, if
        given, starts its prepared call once it took them, on whatever thread freed them (it
        must be thread-safe); without it the manager's ``grant`` runs on the loop."""
        tags = handle.state.tags
        with self.lock:
            if self._take_if_room(handle, tags):
                return True
            if handle in self.waiters:
                return False  # already in line
            waiter = self.waiters[handle] = _Waiter(handle, next(self._seq), admit)
            lines = self.lines
            for tag in tags:  # in every line, so that a slot freed in any of them wakes it
                line = lines.get(tag)
                if line is None:
                    line = lines[tag] = _Line()
                line.add(waiter)
        return False

    def release(self, handle: StateHandle) -> None:
        """``handle`` gives its slots back (no-op if it holds none); waiters may take them.
        Any thread."""
        if handle not in self.held:
            return
        granted: list[_Waiter] = []
        with self.lock:
            if handle not in self.held:
                return
            self._give_back(handle, granted)
        if granted:
            self._hand_out(granted)

    def forget(self, handle: StateHandle) -> None:
        """``handle`` ended: its slots go back and it leaves every waiting line. Any thread."""
        if handle not in self.waiters and handle not in self.held:
            return
        granted: list[_Waiter] = []
        with self.lock:
            waiter = self.waiters.pop(handle, None)
            if waiter is not None:
                waiter.live = False
            if handle in self.held:
                self._give_back(handle, granted)
        if granted:
            self._hand_out(granted)

    def set_limit(self, tag: str, limit: int | None) -> None:
        tag = check_tag(tag)
        limit = check_limit(tag, limit)
        granted: list[_Waiter] = []
        with self.lock:
            self.limits[tag] = limit
            self._wake(tag, granted)
        if granted:
            self._hand_out(granted)

    def waiting_handles(self) -> list[StateHandle]:
        """The handles waiting for slots now."""
        with self.lock:
            return list(self.waiters)

    def waiting(self, tag: str) -> int:
        line = self.lines.get(tag)
        return 0 if line is None else len(line)

    def by_tag(self) -> dict[str, dict[str, int | None]]:
        with self.lock:
            names = {*self.limits, *self.running, *self.lines}
            return {tag: {"running": self.running.get(tag, 0), "waiting": self.waiting(tag),
                          "limit": self.limits.get(tag)} for tag in sorted(names)}
