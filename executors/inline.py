"""``"inline"``: the call runs on the event loop thread, in the task that awaits it."""

from __future__ import annotations

from typing import Any

from .base import Executor, PreparedCall

__all__ = ["InlineExecutor"]


class InlineExecutor(Executor):
    """Awaits coroutine functions and calls plain functions on the loop. The test double."""

    name = "inline"
    runs_on_loop = True

    async def run(self, call: PreparedCall) -> Any:
        call.started()
        if call.is_coro:
            return await call()
        return call()

    async def shutdown(self, *, cancel: bool) -> None:
        return None
