"""Logging and timing helpers: logger ``statepool.engine``, no handlers configured by the library.

Every line that costs formatting is guarded by ``isEnabledFor`` so that logging costs nothing
measurable when DEBUG is off.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from .chunk import map_chunk, map_chunk_async
from .timings import timings_of, worker_of

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["log_enter", "log_exit", "log_failure", "log_failure_of", "log_retry", "logger",
           "note_overhead", "state_extra"]

logger = logging.getLogger("statepool.engine")
_DEBUG = logging.DEBUG


def log_enter(handle: StateHandle, executor: str, loop: asyncio.AbstractEventLoop) -> None:
    if logger.isEnabledFor(_DEBUG):
        now = loop.time()
        state = handle.state
        logger.debug(
            "enter %r (%s) on %s at loop time %.6f, attempt %d, queued %.6f s",
            state.name, state.func_name, executor, now, handle.attempts,
            now - handle.queued_at, extra=state_extra(handle, executor),
        )


def state_extra(handle: StateHandle, executor: str | None = None) -> dict[str, Any]:
    """The ``extra`` of every record about a state: ``state``, ``executor``, ``attempt``,
    ``worker`` (a structured handler needs no parsing)."""
    return {"state": handle.state.name,
            "executor": executor or handle._executor_name or handle.state.executor_name,
            "attempt": handle.attempts, "worker": worker_of(handle)}


def log_exit(handle: StateHandle, executor: str, loop: asyncio.AbstractEventLoop) -> None:
    if logger.isEnabledFor(_DEBUG):
        now = loop.time()
        started = handle.started_at if handle.started_at is not None else now
        timings = timings_of(handle, now)
        logger.debug(
            "exit %r (%s) on %s at loop time %.6f: %s, ran %.6f s, attempts %d (%s)",
            handle.state.name, handle.state.func_name, executor, now,
            handle.status.name, now - started, handle.attempts,
            ", ".join(f"{phase} {seconds:.6f}" for phase, seconds in timings.items()),
            extra=state_extra(handle, executor),
        )


#: past this many distinct errors a manager logs, each failure gets its traceback again
_SEEN_LIMIT = 1000


def log_failure(handle: StateHandle, executor: str, exc: BaseException) -> None:
    """One ERROR record per failure. The first failure of a kind (function, exception type,
    the line it was raised on) carries its traceback; its repeats are one line that counts."""
    state = handle.state
    log_failure_of(handle._books.failures, state.name, state.func_name, executor,
                   handle.attempts, exc, state_extra(handle, executor))


def log_failure_of(seen: dict[tuple[Any, ...], int], name: str, func_name: str, executor: str,
                   attempts: int, exc: BaseException, extra: dict[str, Any]) -> None:
    """:func:`log_failure` for a failure that is not a state's own (an item of a ``map`` chunk
    that failed in its worker while the chunk succeeded): the same record, the same counting in
    ``seen`` (the manager's ``Books.failures``)."""
    key = (func_name, type(exc), _origin(exc))
    count = seen.get(key, 0) + 1
    if count > 1 or len(seen) < _SEEN_LIMIT:
        seen[key] = count
    if count == 1:
        logger.error(
            "state %r (%s) on %s failed after %d attempt(s): %s: %s",
            name, func_name, executor, attempts, type(exc).__name__, exc,
            exc_info=exc, extra=extra,
        )
        return
    logger.error(
        "state %r (%s) on %s failed after %d attempt(s): %s: %s [failure %d of this kind; "
        "its traceback was logged with the first]",
        name, func_name, executor, attempts, type(exc).__name__, exc, count, extra=extra,
    )


#: the last frame of a traceback printed as text: ``File "path", line 12, in func``
_FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def _origin(exc: BaseException) -> tuple[str, int] | None:
    """Where ``exc`` was raised: the file and line of its traceback's last frame; for an
    exception raised in a worker process (its ``__cause__`` carries the worker's traceback as
    text, in ``tb``), the last frame of that text."""
    remote = getattr(exc.__cause__, "tb", None)
    if isinstance(remote, str):
        frames = _FRAME_LINE.findall(remote)
        if frames:
            path, line = frames[-1]
            return path, int(line)
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno


def log_retry(handle: StateHandle, executor: str, exc: BaseException) -> None:
    state = handle.state
    logger.warning(
        "state %r (%s) on %s: attempt %d of %d failed (%s: %s); retrying",
        state.name, state.func_name, executor, handle.attempts, state.retries + 1,
        type(exc).__name__, exc, extra=state_extra(handle, executor),
    )


#: how many cheap calls of one function a manager sees before it says so (once)
OVERHEAD_CALLS = 8
#: a call is cheap when it ran in its worker less than this fraction of what it cost around it
OVERHEAD_FRACTION = 0.1


def note_overhead(handle: StateHandle, ran: float, cost: float) -> None:
    """A process state ran ``ran`` s in its worker and cost ``cost`` s more on its way there
    and back; the ``OVERHEAD_CALLS``-th such cheap call of one function logs a WARNING, once."""
    if ran >= cost * OVERHEAD_FRACTION:
        return
    state = handle.state
    if state.func is map_chunk or state.func is map_chunk_async:
        return  # manager.map sizes its own chunks (its first calls carry one item each)
    cheap = handle._books.cheap
    count = cheap.get(state.func_name, 0) + 1
    if count > OVERHEAD_CALLS:
        return
    cheap[state.func_name] = count
    if count == OVERHEAD_CALLS:
        logger.warning(
            "state %r (%s) ran %s in its worker and cost %s on its way there and back: "
            "map it with a chunksize, or run it inline",
            state.name, state.func_name, _short(ran), _short(cost),
            extra=state_extra(handle),
        )


def _short(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"
