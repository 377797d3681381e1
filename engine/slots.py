"""Tag slots: how many states holding each tag run at once (``StateManager(limits=...)``).

A state with tags takes one slot of every tag it names, all at once or none (two states that
each need two tags can never hold one each and wait for the other). A tag without a limit is a
label: its slots never run out, and it is counted for ``stats()["by_tag"]``. A state that finds
no room waits in a line per tag, ordered by priority, then by
arrival; when a slot frees, the line is walked in that order and every waiter whose tags all have
room takes them (so no state waits while its tags have room). A waiter stands in the line of
each of its tags, so that a slot freed in any of them looks at it again.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["SlotGuard", "TagSlots", "check_limits"]


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


class TagSlots:
    """Running counts per tag, the limits, and who waits for a slot."""

    __slots__ = ("_grant", "_seq", "_tickets", "held", "limits", "running", "waiters")

    def __init__(self, limits: dict[str, int | None], grant: Callable[[StateHandle], None]) -> None:
        self.limits = limits
        self.running: dict[str, int] = {}
        self.held: set[StateHandle] = set()  # handles holding their slots now
        # tag -> heap [(-priority, arrival, id, handle)] of handles waiting for its slots
        self.waiters: dict[str, list[tuple[int, int, int, StateHandle]]] = {}
        self._tickets: dict[StateHandle, int] = {}  # waiter -> its arrival (entries valid)
        self._grant = grant  # called with a waiter that took its slots
        self._seq = itertools.count()

    def _fits(self, tags: tuple[str, ...]) -> bool:
        limits, running = self.limits, self.running
        for tag in tags:
            limit = limits.get(tag)
            if limit is not None and running.get(tag, 0) >= limit:
                return False
        return True

    def _take(self, handle: StateHandle) -> None:
        running = self.running
        for tag in handle.state.tags:
            running[tag] = running.get(tag, 0) + 1
        self.held.add(handle)

    def acquire(self, handle: StateHandle) -> bool:
        """Take ``handle``'s slots now (True), or line it up for them (False)."""
        if handle in self.held:
            return True
        tags = handle.state.tags
        if self._fits(tags):
            self._take(handle)
            return True
        arrival = self._tickets.get(handle)
        if arrival is not None:
            return False  # already in line
        arrival = self._tickets[handle] = next(self._seq)
        entry = (-handle.state.priority, arrival, id(handle), handle)
        waiters = self.waiters
        for tag in tags:  # in every line, so that a slot freed in any of them wakes it
            line = waiters.get(tag)
            if line is None:
                waiters[tag] = [entry]
            else:
                heapq.heappush(line, entry)
        return False

    def release(self, handle: StateHandle) -> None:
        """``handle`` gives its slots back (no-op if it holds none); waiters may take them."""
        if handle not in self.held:
            return
        self.held.discard(handle)
        running = self.running
        tags = handle.state.tags
        for tag in tags:
            running[tag] -= 1
        waiters, limits = self.waiters, self.limits
        for tag in tags:
            if tag in waiters and limits.get(tag) is not None:  # a label's slot helps nobody
                self._wake(tag)

    def set_limit(self, tag: str, limit: int | None) -> None:
        self.limits[check_tag(tag)] = check_limit(tag, limit)
        self._wake(tag)

    def _wake(self, tag: str) -> None:
        """Walk ``tag``'s line in order while ``tag`` has room: every waiter whose tags all have
        room takes them; the others stay in line."""
        line = self.waiters.get(tag)
        if not line:
            return
        limit = self.limits.get(tag)
        running, tickets = self.running, self._tickets
        skipped: list[tuple[int, int, int, StateHandle]] = []
        granted: list[StateHandle] = []
        while line:
            if limit is not None and running.get(tag, 0) >= limit:
                break  # every waiter of this line needs this tag: none can start now
            entry = heapq.heappop(line)
            handle = entry[3]
            if tickets.get(handle) != entry[1]:
                continue  # granted through another tag's line meanwhile
            if handle.done():  # cancelled while it waited: it held nothing
                del tickets[handle]
                continue
            if self._fits(handle.state.tags):
                del tickets[handle]
                self._take(handle)
                granted.append(handle)
            else:
                skipped.append(entry)  # another of its tags is full
        for entry in skipped:
            heapq.heappush(line, entry)
        if not line:
            del self.waiters[tag]
        for handle in granted:
            self._grant(handle)

    def waiting(self, tag: str) -> int:
        tickets = self._tickets
        return sum(1 for e in self.waiters.get(tag, ())
                   if tickets.get(e[3]) == e[1] and not e[3].done())

    def forget(self, handle: StateHandle) -> None:
        """``handle`` ended: its slots go back and it leaves every waiting line."""
        self._tickets.pop(handle, None)
        self.release(handle)

    def by_tag(self) -> dict[str, dict[str, int | None]]:
        names = {*self.limits, *self.running, *self.waiters}
        return {tag: {"running": self.running.get(tag, 0), "waiting": self.waiting(tag),
                      "limit": self.limits.get(tag)} for tag in sorted(names)}


class SlotGuard:
    """A tagged state handed to an executor's ``submit`` (engine/fastpath.py): its slots go
    back when the call ends (``on_done``) or is cancelled (``cancel``), as the task would."""

    __slots__ = ("handle", "slots", "submitted")

    def __init__(self, slots: TagSlots, handle: StateHandle) -> None:
        self.slots = slots
        self.handle = handle
        self.submitted: Any = None

    def on_done(self, ok: bool, value: Any) -> None:
        try:
            self.handle._conclude(ok, value)
        finally:
            self.slots.release(self.handle)

    def cancel(self) -> bool:
        self.slots.release(self.handle)
        return bool(self.submitted.cancel())

    def done(self) -> bool:
        return bool(self.submitted.done())
