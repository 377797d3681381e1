"""The line of ``"aioprocess"`` calls that wait for a free slot in a child."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .worker import ChildHandle

__all__ = ["SlotLine"]

Pick = Callable[[], "ChildHandle | None"]


class SlotLine:
    """Callers waiting, first come first served, for a child with a free slot.

    A freed slot is handed to the head of the line directly (the child's ``reserved`` counts it
    until the caller has sent its job), so a wake-up is never lost, nor wasted on a caller that
    finds the slot taken by a newcomer.
    """

    def __init__(self, pick: Pick) -> None:
        self._pick = pick  # the least loaded usable child with a free slot, or None
        self._waiters: deque[asyncio.Future[ChildHandle | None]] = deque()
        self.queued = 0  # callers inside wait()

    def __bool__(self) -> bool:
        return bool(self._waiters)

    async def wait(self, retry: Pick) -> ChildHandle:
        """Wait for a slot. Woken without one, ask ``retry()`` (it may raise) or wait again."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ChildHandle | None] = loop.create_future()
        self._waiters.append(waiter)
        self.queued += 1
        try:
            while True:
                try:
                    child = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():  # handed a slot: pass it on
                        handed = waiter.result()
                        if handed is not None:
                            handed.reserved -= 1
                    elif waiter in self._waiters:
                        self._waiters.remove(waiter)
                    self.hand_out()
                    raise
                if child is not None:
                    child.reserved -= 1
                    if child.usable:
                        return child
                if (child := retry()) is not None:
                    return child
                waiter = loop.create_future()
                self._waiters.appendleft(waiter)  # keep our place at the head of the line
        finally:
            self.queued -= 1

    def hand_out(self) -> None:
        """Give each free slot to the caller at the head of the line."""
        while self._waiters and (child := self._pick()) is not None:
            waiter = self._waiters.popleft()
            if not waiter.done():
                child.reserved += 1
                waiter.set_result(child)

    def wake_all(self) -> None:
        """Wake every caller without a slot (no child will come: let them see why)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def cancel_all(self) -> None:
        for waiter in self._waiters:
            waiter.cancel()
