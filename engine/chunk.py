"""What one call of ``manager.map`` runs in a worker: several items, each with its own outcome.

``map_chunk(func, items)`` calls ``func(item)`` for each item in turn and returns
``(results, errors, seconds)``: the results in order (``None`` where an item raised), ``None`` or
``{offset: exception}`` for the items that raised, and the seconds the items took in the worker
(``manager.map`` sizes its chunks from it). ``map_chunk_async`` does the same for a coroutine
function, awaiting one item after the other (so that the time measured is each item's own).
Pickled back from a worker process, each exception keeps its traceback as text: its
``__cause__`` is a :class:`RemoteTraceback`, as for a state that raised there.

The module is registered with cloudpickle *by value*: a worker process rebuilds these two small
functions from the call itself and never imports ``statepool.engine`` for them.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cloudpickle

__all__ = ["Outcome", "RemoteTraceback", "map_chunk", "map_chunk_async"]

#: ``(results, errors or None, seconds in the worker)``
Outcome = tuple[list[Any], "dict[int, BaseException] | None", float]


class RemoteTraceback(Exception):
    """The traceback of an item that raised in a worker process, attached as its ``__cause__``
    (the text the process executor's own ``RemoteTraceback`` carries, in ``tb``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class _Errors(dict[int, BaseException]):
    """``{offset: exception}``; pickled (back from a worker), with each traceback as text."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _errors_from, ({offset: (exc, _format(exc)) for offset, exc in self.items()},)


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:  # its __str__ raises: the frames still help
        return "".join(traceback.format_tb(exc.__traceback__)) + f"{type(exc).__name__}\n"


def _errors_from(pairs: dict[int, tuple[BaseException, str]]) -> dict[int, BaseException]:
    errors: dict[int, BaseException] = {}
    for offset, (exc, text) in pairs.items():
        exc.__cause__ = RemoteTraceback(text)  # the text holds the worker's chain, if any
        errors[offset] = exc
    return errors


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
                errors = _Errors()
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
                errors = _Errors()
            errors[offset] = exc
    return results, errors, clock() - start


cloudpickle.register_pickle_by_value(sys.modules[__name__])
