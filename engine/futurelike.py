"""asyncio's future protocol for :class:`~statepool.engine.handle.StateHandle`, in one place.

asyncio takes any object as a future when its class has the attribute
``_asyncio_future_blocking`` (``asyncio.isfuture``; a task that awaits such an object waits on it
through ``add_done_callback`` instead of wrapping it in a task). That name is asyncio's documented
duck-typing protocol (see ``asyncio.isfuture``), but it starts with an underscore, and so do the
two other names ``asyncio.gather`` reads on a cancelled child (``_cancel_message`` and
``_make_cancelled_error()``). They are all here, and ``tests/test_handle_future.py`` fails if
asyncio stops using them.

:class:`FutureLike` supplies that protocol: ``__await__`` (yield itself, as ``asyncio.Future``
does), ``get_loop()``, ``add_done_callback`` / ``remove_done_callback`` and the scheduling of the
callbacks when the handle ends. The handle supplies ``done()``, ``cancelled()``, ``result()``,
``exception()`` and ``cancel(msg=None)``.

Callbacks run as ``asyncio.Future``'s do: soon after the end, on the loop, in the context they
were added in (a copy of the current one by default), never from inside ``add_done_callback``.
The callbacks of the handles that end in one turn of the loop are run by a single loop callback
(:class:`DoneCallbacks`): one ``call_soon`` for many handles, not one per callback.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Generator
from contextvars import copy_context
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .books import Books
    from .handle import StateStatus

__all__ = ["DoneCallbacks", "FutureLike"]

Callback = Callable[[Any], object]


class DoneCallbacks:
    """The handles of one manager whose done-callbacks wait to run, run by one loop callback."""

    __slots__ = ("_due", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._due: list[FutureLike] = []

    def add(self, fut: FutureLike) -> None:
        """Run ``fut``'s callbacks soon, on the loop (``fut`` ended, or got one once ended)."""
        due = self._due
        if not due:
            loop = self._loop
            if loop.is_closed():  # nobody is left to run them, as for an asyncio.Future
                return
            loop.call_soon(self._run)
        due.append(fut)

    def _run(self) -> None:
        due, self._due = self._due, []
        for fut in due:
            fn, ctx, more = fut._cb0, fut._ctx0, fut._callbacks
            fut._cb0 = fut._ctx0 = fut._callbacks = None
            if fn is not None and ctx is not None:
                self._call(fn, ctx, fut)
            if more:
                for fn, ctx in more:
                    self._call(fn, ctx, fut)

    def _call(self, fn: Callback, ctx: contextvars.Context, fut: FutureLike) -> None:
        try:
            ctx.run(fn, fut)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # as the loop reports a failing callback
            self._loop.call_exception_handler({
                "message": f"Exception in callback {fn!r} of {fut!r}",
                "exception": exc, "future": fut})


class FutureLike:
    """The asyncio future protocol for a class that has ``done()``, ``result()`` and the rest.

    The first callback is kept in two slots and the others in a list, as ``asyncio.Future``
    does: the common case (one task or one ``gather`` waiting) allocates nothing."""

    __slots__ = ("_asyncio_future_blocking", "_callbacks", "_cancel_message", "_cb0", "_ctx0")

    _books: Books
    status: StateStatus

    if TYPE_CHECKING:
        def done(self) -> bool: ...

        def result(self) -> Any: ...

        def cancel(self, msg: Any = None) -> bool: ...

        def _await_check(self) -> None: ...

        def _watch(self) -> None: ...

    def _init_future(self) -> None:
        self._asyncio_future_blocking = False  # asyncio.isfuture(): True; a Task sets it back
        self._cb0: Callback | None = None
        self._ctx0: contextvars.Context | None = None
        self._callbacks: list[tuple[Callback, contextvars.Context]] | None = None
        self._cancel_message: Any = None

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            self._await_check()
            self._asyncio_future_blocking = True
            yield self  # the awaiting task waits on us through add_done_callback
            if not self.done():
                raise RuntimeError("await wasn't used with future")
        return self.result()

    __iter__ = __await__

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of the manager this handle belongs to."""
        loop = self._books.loop
        if loop is None:  # pragma: no cover - a handle exists only on a bound manager
            raise RuntimeError("the manager of this handle is not bound to an event loop")
        return loop

    def add_done_callback(self, fn: Callback, *,
                          context: contextvars.Context | None = None) -> None:
        """Call ``fn(handle)`` on the loop once the handle is terminal (as on asyncio.Future)."""
        if context is None:
            context = copy_context()
        if self._cb0 is None:
            self._cb0, self._ctx0 = fn, context
            if self.status.terminal:
                self._books.callbacks.add(self)
                return
        elif self._callbacks is None:
            self._callbacks = [(fn, context)]
        else:
            self._callbacks.append((fn, context))
        if not self._books.serving and not self.status.terminal:
            self._watch()

    def remove_done_callback(self, fn: Callback) -> int:
        """Remove every registration of ``fn``; returns how many there were."""
        removed = 0
        if self._cb0 is not None and self._cb0 == fn:
            self._cb0 = self._ctx0 = None
            removed = 1
        more = self._callbacks
        if more:
            kept = [(f, ctx) for f, ctx in more if f != fn]
            removed += len(more) - len(kept)
            self._callbacks = kept or None
        if self._cb0 is None and self._callbacks:  # keep the first in the slots
            self._cb0, self._ctx0 = self._callbacks.pop(0)
            self._callbacks = self._callbacks or None
        return removed

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        """The ``CancelledError`` to raise for this cancelled handle (``asyncio.gather`` asks)."""
        msg = self._cancel_message
        return asyncio.CancelledError(msg if msg is not None else self._cancelled_text())

    def _cancelled_text(self) -> str:
        return "the state was cancelled"
