"""Large arguments sent to the Dask cluster once, ahead of the task, and shared while in use.

An argument whose estimated size (``dask.sizeof``) reaches the threshold is scattered to a worker
with ``client.scatter`` and the task receives a future in its place: the data travels once,
straight to a worker, instead of inside the task graph through the scheduler. Calls that run at
the same time with the same object share one scattered copy (found by identity: hashing 100 MB
to find equal copies would cost more than sending it); it is released when the last of them is
done.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import distributed
from dask.sizeof import sizeof

__all__ = ["ScatterCache"]

_Future: Any = distributed.Future  # distributed is typed in part only: used untyped


class _Entry:
    __slots__ = ("obj", "task", "users")

    def __init__(self, obj: Any, task: asyncio.Task[Any]) -> None:
        self.obj = obj  # kept alive while in use: its id() names no other object meanwhile
        self.task = task
        self.users = 0


def _release_when_done(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().release()


class ScatterCache:
    """Scattered copies of large arguments, counted by the calls that use them."""

    def __init__(self, threshold: int | None, *, direct: bool | None = None) -> None:
        self.threshold = threshold
        self.direct = direct  # straight to a worker (True), or through the scheduler
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def is_large(self, obj: Any) -> bool:
        if self.threshold is None or isinstance(obj, _Future):
            return False
        try:
            return int(sizeof(obj)) >= self.threshold
        except Exception:
            return False

    async def swap_in(
        self, client: Any, args: tuple[Any, ...], kwargs: dict[str, Any], held: list[int]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Replace large arguments by futures of their scattered copies.

        The tokens of the copies used are appended to ``held`` as they are taken, so that the
        caller releases them (``release(held)``) even when this is interrupted.
        """
        if self.threshold is None or not any(map(self.is_large, (*args, *kwargs.values()))):
            return args, kwargs
        new_args = list(args)
        for i, arg in enumerate(args):
            if self.is_large(arg):
                new_args[i] = await self._acquire(client, arg, held)
        new_kwargs = dict(kwargs)
        for name, arg in kwargs.items():
            if self.is_large(arg):
                new_kwargs[name] = await self._acquire(client, arg, held)
        return tuple(new_args), new_kwargs

    async def _acquire(self, client: Any, obj: Any, held: list[int]) -> Any:
        token = id(obj)
        entry = self._entries.get(token)
        if entry is None:
            # a fresh key per scatter: a key released and scattered again could race at the
            # scheduler; the token only finds copies in use now
            key = f"statepool-arg-{type(obj).__name__}-{uuid.uuid4().hex}"
            entry = _Entry(obj, asyncio.ensure_future(
                _scatter_one(client, key, obj, self.direct)))
            self._entries[token] = entry
        entry.users += 1
        held.append(token)
        return await asyncio.shield(entry.task)

    def release(self, tokens: Iterable[int]) -> None:
        """Give back copies taken by ``swap_in``; a copy no call uses is released."""
        for token in tokens:
            entry = self._entries.get(token)
            if entry is None:
                continue
            entry.users -= 1
            if entry.users <= 0:
                del self._entries[token]
                if entry.task.done():
                    _release_when_done(entry.task)
                else:
                    entry.task.add_done_callback(_release_when_done)

    def clear(self) -> None:
        """Forget every copy (the client is closing)."""
        for entry in self._entries.values():
            if not entry.task.done():
                entry.task.cancel()
        self._entries.clear()


async def _scatter_one(client: Any, key: str, obj: Any, direct: bool | None) -> Any:
    futures: dict[str, Any] = await client.scatter({key: obj}, hash=False, direct=direct)
    return futures[key]
