"""What one call of ``manager.map`` runs in a worker: several items, each with its own outcome.

``map_chunk(func, items)`` calls ``func(item)`` for each item in turn and returns
``(results, errors, seconds)``: the results in order (``None`` where an item raised), ``None`` or
``{offset: exception}`` for the items that raised, and the seconds the items took in the worker
(``manager.map`` sizes its chunks from it). ``map_chunk_async`` does the same for a coroutine
function, awaiting one item after the other (so that the time measured is each item's own).

The module is registered with cloudpickle *by value*: a worker process rebuilds these two small
functions from the call itself and never imports ``statepool.engine`` for them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cloudpickle

__all__ = ["Outcome", "map_chunk", "map_chunk_async"]

#: ``(results, errors or None, seconds in the worker)``
Outcome = tuple[list[Any], "dict[int, BaseException] | None", float]


def map_chunk(func: Callable[[Any], Any], items: Sequence[Any]) -> Outcome:
    """Run ``func`` over ``items``; an item that raises does not stop the others."""
    clock = time.perf_counter
    start = clock()
    results: list[Any] = []
    errors: dict[int, BaseException] | None = None
    append = results.append
    for offset, item in enumerate(items):
        try:
            append(func(item))
        except Exception as exc:
            append(None)
            if errors is None:
                errors = {}
            errors[offset] = exc
    return results, errors, clock() - start


async def map_chunk_async(func: Callable[[Any], Awaitable[Any]], items: Sequence[Any]) -> Outcome:
    """:func:`map_chunk` for a coroutine function: the items are awaited one after another."""
    clock = time.perf_counter
    start = clock()
    results: list[Any] = []
    errors: dict[int, BaseException] | None = None
    for offset, item in enumerate(items):
        try:
            results.append(await func(item))
        except Exception as exc:
            results.append(None)
            if errors is None:
                errors = {}
            errors[offset] = exc
    return results, errors, clock() - start


cloudpickle.register_pickle_by_value(sys.modules[__name__])
