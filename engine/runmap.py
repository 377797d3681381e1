"""``run_map``: ``manager.map`` from synchronous code (a script that is not async)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import Any

from statepool.executors.base import Executor

from .manager import StateManager

__all__ = ["run_map"]


def run_map(func: Callable[[Any], Any], iterable: Iterable[Any] | AsyncIterable[Any], *,
            executors: Mapping[str, Executor] | None = None, **options: Any) -> list[Any]:
    """Every ``func(item)`` in input order, from synchronous code.

    Starts an event loop and a manager (``executors`` as for ``StateManager``), runs
    ``manager.map(func, iterable, **options)`` to the end, stops both and returns the results.
    Called while an event loop runs in this thread it is a ``RuntimeError``: use
    ``manager.map`` there.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "run_map() cannot run inside a running event loop (it starts its own): use "
            "`[r async for r in manager.map(func, items)]` (StateManager.map) instead")
    if "ordered" in options:
        raise TypeError("run_map() returns the results in input order: it takes no 'ordered' "
                        "(use manager.map(..., ordered=False) for results as they complete)")

    async def main() -> list[Any]:
        async with StateManager(executors=executors) as manager:
            mapper = manager._mapper(func, iterable, **options)
            return await mapper.collect()

    return asyncio.run(main())
