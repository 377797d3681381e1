"""A progress bar (rich) over a manager's events or a ``map``: done, failed, running, rate, ETA.

::

    with progress.bar(manager):                # every state put while the block runs
        await manager.join()

    async for result in progress.track(manager.map(f, items), total=len(items)):
        ...                                    # or manager.map(f, items, progress=True)

The bar shows only when its console is a terminal, unless ``show=True`` (``show=False``: never).
Counting is a listener that adds to a few integers; the bar itself is redrawn on the loop, at
most every ``refresh`` seconds, so a fast pipeline pays for the drawing ten times a second, not
once per state. rich comes with the ``bench`` and ``test`` extras; without it the bar is an
``ImportError`` that says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .events import StateEvent
    from .manager import StateManager

__all__ = ["Bar", "bar", "track"]

_REFRESH_S = 0.1


def _rich() -> Any:
    try:
        import rich.progress
    except ImportError as exc:  # pragma: no cover - rich is in the bench/test extras
        raise ImportError("statepool.engine.progress needs rich: pip install rich "
                          "(or statepool[bench])") from exc
    return rich.progress


class Bar:
    """One bar: counts (``done``, ``failed``, ``cancelled``, ``running``, ``total``), drawn by
    rich on ``console`` (default: stderr)."""

    def __init__(self, description: str = "states", *, total: int | None = None,
                 console: Any = None, show: bool | None = None, transient: bool = False,
                 refresh: float = _REFRESH_S) -> None:
        rp = _rich()
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.shown = self.console.is_terminal if show is None else bool(show)
        self.done = self.failed = self.cancelled = self.running = 0
        self.total = total
        self._count_total = total is None  # count the states put
        self._running: set[int] = set()
        self._refresh = refresh
        self._timer: asyncio.TimerHandle | None = None
        self._progress = rp.Progress(
            rp.TextColumn("[bold]{task.description}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("[green]{task.fields[done]} done[/] [red]{task.fields[failed]} "
                          "failed[/] [blue]{task.fields[running]} running[/]"),
            rp.TextColumn("[cyan]{task.fields[rate]}"),
            rp.TimeElapsedColumn(),
            rp.TextColumn("ETA"),
            rp.TimeRemainingColumn(),
            console=self.console, auto_refresh=False, disable=not self.shown,
            transient=transient)
        self._task = self._progress.add_task(description, total=total, done=0, failed=0,
                                             running=0, rate="-/s")
        self._began = time.monotonic()

    # -- counting --------------------------------------------------------------------------

    def on_event(self, event: StateEvent) -> None:
        """A manager listener: count the event (the bar is drawn later, on a timer)."""
        kind = event.kind
        if kind == "queued":
            if self._count_total:
                self.total = (self.total or 0) + 1
        elif kind == "started":
            self._running.add(id(event.handle))
        elif kind == "retrying":
            self._running.discard(id(event.handle))
        else:
            if kind == "succeeded":
                self.done += 1
            elif kind == "failed":
                self.failed += 1
            elif kind == "cancelled":
                self.cancelled += 1
            else:
                return
            self._running.discard(id(event.handle))
        self.running = len(self._running)
        self._soon()

    def advance(self, *, done: int = 0, failed: int = 0, running: int | None = None) -> None:
        """Count results by hand (a ``map``'s items)."""
        self.done += done
        self.failed += failed
        if running is not None:
            self.running = running
        self._soon()

    # -- drawing ---------------------------------------------------------------------------

    def _soon(self) -> None:
        if self._timer is None and self.shown:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.draw()
                return
            self._timer = loop.call_later(self._refresh, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.draw()

    def draw(self) -> None:
        """Redraw now."""
        ended = self.done + self.failed + self.cancelled
        elapsed = time.monotonic() - self._began
        rate = f"{ended / elapsed:,.1f}/s" if elapsed > 0 and ended else "-/s"
        self._progress.update(self._task, completed=ended, total=self.total, done=self.done,
                              failed=self.failed, running=self.running, rate=rate)
        self._progress.refresh()

    def start(self) -> Bar:
        self._began = time.monotonic()
        self._progress.start()
        return self

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.draw()
        self._progress.stop()

    def __enter__(self) -> Bar:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def bar(manager: StateManager, description: str = "states", **options: Any) -> Iterator[Bar]:
    """A bar over every state put on ``manager`` while the block runs (see :class:`Bar`)."""
    progress = Bar(description, **options)
    remove = manager.add_listener(progress.on_event)
    progress.start()
    try:
        yield progress
    finally:
        remove()
        progress.stop()


async def track(results: AsyncIterable[Any], *, total: int | None = None,
                description: str = "items", manager: StateManager | None = None,
                **options: Any) -> AsyncIterator[Any]:
    """Yield ``results`` (a ``map``'s) as they come and count them on a bar: an exception
    yielded in an item's place (``return_exceptions=True``) counts as failed. With ``manager``,
    ``running`` is how many of its states run."""
    progress = Bar(description, total=total, **options)
    progress.start()
    try:
        async for value in results:
            failed = isinstance(value, BaseException)
            running = len(manager._books.running) if manager is not None else None
            progress.advance(done=0 if failed else 1, failed=1 if failed else 0,
                             running=running)
            yield value
    finally:
        progress.stop()
        aclose = getattr(results, "aclose", None)
        if aclose is not None:  # leaving early cancels what the map has pending
            await aclose()
