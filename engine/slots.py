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

import bisect
import itertools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


class TagSlots:
    """Running counts per tag, the limits, and who waits for a slot."""

    __slots__ = ("_grant", "_seq", "_tickets", "held", "limits", "running", "waiters")

    def __init__(self, limits: dict[str, int | None], grant: Callable[[StateHandle], None]) -> None:
        self.limits = limits
        self.running: dict[str, int] = {}
        self.held: set[StateHandle] = set()  # handles holding their slots now
        # tag -> sorted [(-priority, arrival, id, handle)] of handles waiting for its slots
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
        for tag in tags:  # in every line, so that a slot freed in any of them wakes it
            bisect.insort(self.waiters.setdefault(tag, []), entry)
        return False

    def release(self, handle: StateHandle) -> None:
        """``handle`` gives its slots back (no-op if it holds none); waiters may take them."""
        if handle not in self.held:
            return
        self.held.discard(handle)
        running = self.running
        for tag in handle.state.tags:
            running[tag] -= 1
        for tag in handle.state.tags:
            if tag in self.waiters:
                self._wake(tag)

    def set_limit(self, tag: str, limit: int | None) -> None:
        self.limits[check_tag(tag)] = check_limit(tag, limit)
        self._wake(tag)

    def _wake(self, tag: str) -> None:
        line = self.waiters.get(tag)
        if not line:
            return
        keep: list[tuple[int, int, int, StateHandle]] = []
        granted: list[StateHandle] = []
        tickets = self._tickets
        for entry in line:
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
                keep.append(entry)
        if keep:
            self.waiters[tag] = keep
        else:
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
