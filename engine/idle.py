"""The warning for waiting on a manager whose main loop does not run (no silent hang).

Awaiting a handle, ``join()`` or ``map()`` of a manager whose ``process_states()`` is not running
would wait for ever: the queued states never start. :class:`IdleWatch` notices it: the first wait
of that kind arms a timer, and if after :data:`DELAY` seconds the main loop still does not run and
a state is still queued, it logs one WARNING naming that state. A later wait arms it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .log import logger

if TYPE_CHECKING:
    import asyncio

    from .books import Books
    from .handle import StateHandle

__all__ = ["DELAY", "IdleWatch"]

DELAY = 0.5  # seconds: the warning comes within a second


class IdleWatch:
    """Arms one timer per manager while someone waits on it and its main loop does not run."""

    __slots__ = ("_books", "_handle", "_queue", "_timer", "_what")

    def __init__(self, books: Books, queue: Iterable[StateHandle]) -> None:
        self._books = books
        self._queue = queue
        self._timer: asyncio.TimerHandle | None = None
        self._handle: StateHandle | None = None
        self._what = ""

    def watch(self, handle: StateHandle | None = None, what: str = "a handle is awaited") -> None:
        """Someone waits (on ``handle``, or on the whole manager) while the main loop does not
        run; warn in :data:`DELAY` seconds if it still does not by then."""
        if self._timer is not None:
            return
        loop = self._books.loop
        if loop is None or loop.is_closed():
            return
        self._handle, self._what = handle, what
        self._timer = loop.call_later(DELAY, self._check)

    def _check(self) -> None:
        self._timer = None
        handle, self._handle = self._handle, None
        books = self._books
        if books.serving:
            return
        if handle is None or handle.status.index != 0:  # not QUEUED: name the first that is
            handle = next((h for h in self._queue if h.status.index == 0), None)
        if handle is None:
            return  # nothing waits for the main loop (states entered with enter_state run)
        queued = books.counts[0]
        logger.warning(
            "%s but nothing will run it: state %r (%s) and %d other queued state(s) wait for "
            "the manager's main loop, and process_states() is not running; run "
            "`await manager.process_states()` in a task, or use `async with manager:`",
            self._what, handle.state.name, handle.state.func_name, max(0, queued - 1),
            extra={"state": handle.state.name, "executor": handle.state.executor_name,
                   "attempt": handle.attempts, "worker": None})

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handle = None
