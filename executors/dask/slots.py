"""How many calls of the ``"dask"`` executor are in Dask at once.

A call waits here, in the parent, until one of ``capacity()`` places is free (read again as it
changes: workers come and go); so a state that is cancelled while it waits never reaches Dask.
Places are handed to the waiting calls one by one, first come first served: a freed place wakes
one caller, not all of them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Slots"]


class Slots:
    """At most ``capacity()`` calls in flight; the others wait in line."""

    def __init__(self, capacity: Callable[[], int], recheck_s: float = 0.2) -> None:
        self._capacity = capacity
        self._recheck_s = recheck_s
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def used(self) -> int:
        return self._used

    async def acquire(self) -> None:
        """A place (``capacity()`` may raise: the executor is shut down)."""
        if not self._waiters and self._used < self._capacity():
            self._used += 1
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        if self._timer is None:  # new workers are seen at the next look
            self._timer = loop.call_later(self._recheck_s, self._recheck)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given a place: pass it on
                self.release()
            raise

    def release(self) -> None:
        self._used -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        waiters = self._waiters
        while waiters:
            try:
                free = self._used < self._capacity()
            except Exception as exc:  # shut down: every waiter hears it
                while waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(exc)
                return
            if not free:
                return
            waiter = waiters.popleft()
            if not waiter.done():
                self._used += 1
                waiter.set_result(None)

    def _recheck(self) -> None:
        self._timer = None
        self._hand_out()
        if self._waiters:
            self._timer = asyncio.get_running_loop().call_later(self._recheck_s, self._recheck)
