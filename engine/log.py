"""Logging and timing helpers: logger ``statepool.engine``, no handlers configured by the library.

Every line that costs formatting is guarded by ``isEnabledFor`` so that logging costs nothing
measurable when DEBUG is off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["log_enter", "log_exit", "log_failure", "log_retry", "logger"]

logger = logging.getLogger("statepool.engine")
_DEBUG = logging.DEBUG


def log_enter(handle: StateHandle, executor: str, loop: asyncio.AbstractEventLoop) -> None:
    if logger.isEnabledFor(_DEBUG):
        now = loop.time()
        state = handle.state
        logger.debug(
            "enter %r (%s) on %s at loop time %.6f, attempt %d, queued %.6f s",
            state.name, state.func_name, executor, now, handle.attempts,
            now - handle.queued_at,
        )


def log_exit(handle: StateHandle, executor: str, loop: asyncio.AbstractEventLoop) -> None:
    if logger.isEnabledFor(_DEBUG):
        now = loop.time()
        started = handle.started_at if handle.started_at is not None else now
        logger.debug(
            "exit %r (%s) on %s at loop time %.6f: %s, ran %.6f s, attempts %d",
            handle.state.name, handle.state.func_name, executor, now,
            handle.status.name, now - started, handle.attempts,
        )


def log_failure(handle: StateHandle, executor: str, exc: BaseException) -> None:
    state = handle.state
    logger.error(
        "state %r (%s) on %s failed after %d attempt(s): %s: %s",
        state.name, state.func_name, executor, handle.attempts, type(exc).__name__, exc,
        exc_info=exc,
    )


def log_retry(handle: StateHandle, executor: str, exc: BaseException) -> None:
    state = handle.state
    logger.warning(
        "state %r (%s) on %s: attempt %d of %d failed (%s: %s); retrying",
        state.name, state.func_name, executor, handle.attempts, state.retries + 1,
        type(exc).__name__, exc,
    )
