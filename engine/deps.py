"""Dependencies between states: ``State(after=...)`` and handles given as arguments.

A handle given in ``after``, or directly as an element of ``args``, ``kwargs``, ``lazy_args`` or
``lazy_kwargs`` (or returned by a lazy argument), is a dependency: the state starts once every
dependency succeeded, and its function receives each such handle's result in its place. A failed
or cancelled dependency fails the state with :class:`~statepool.engine.errors.DependencyError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import DependencyError
from .handle import StateHandle, StateStatus

if TYPE_CHECKING:
    from .books import Books
    from .state import State

__all__ = ["dependency_error", "failed_dependency", "foreign_dependency", "pending",
           "when_done", "with_results"]

_SUCCEEDED, _CANCELLED = StateStatus.SUCCEEDED, StateStatus.CANCELLED


def when_done(handle: StateHandle, callback: Callable[[StateHandle], None]) -> None:
    """Call ``callback(handle)`` on the loop once ``handle`` is terminal (soon if it is)."""
    if handle.status.terminal:
        loop = handle._books.loop
        assert loop is not None
        loop.call_soon(callback, handle)
    else:
        handle.add_done_callback(callback)


def pending(deps: Iterable[StateHandle]) -> list[StateHandle]:
    return [dep for dep in deps if not dep.status.terminal]


def failed_dependency(deps: Iterable[StateHandle]) -> StateHandle | None:
    for dep in deps:
        if dep.status.terminal and dep.status is not _SUCCEEDED:
            return dep
    return None


def dependency_error(state: State, dep: StateHandle) -> DependencyError:
    """The error of ``state``, which cannot run because ``dep`` failed or was cancelled."""
    status = dep.status.name
    if dep.status is _CANCELLED:
        cause: BaseException = asyncio.CancelledError(f"state {dep.state.name!r} was cancelled")
        why = "was cancelled"
    else:
        cause = dep._exception or RuntimeError(f"state {dep.state.name!r} failed")
        why = f"failed ({type(cause).__name__}: {cause})"
    error = DependencyError(
        f"state {state.name!r} ({state.func_name}) did not run: its dependency "
        f"{dep.state.name!r} ({dep.state.func_name}) {why} [{status}]",
        state_name=state.name, dependency_name=dep.state.name, dependency_status=status)
    error.__cause__ = cause
    return error


def foreign_dependency(state: State, books: Books, deps: Iterable[StateHandle]) -> str | None:
    """The message of the ValueError for a dependency of another manager, or None."""
    for dep in deps:
        if dep._books is not books:
            return (f"State {state.name!r}: dependency {dep.state.name!r} (in 'after' or the "
                    "arguments) is a handle of another StateManager; a state can depend only "
                    "on states of its own manager")
    return None


def _handles(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[StateHandle]:
    found = [a for a in args if type(a) is StateHandle]
    if kwargs:
        found.extend(v for v in kwargs.values() if type(v) is StateHandle)
    return found


def with_results(args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any], list[StateHandle]]:
    """``args`` and ``kwargs`` with each handle replaced by its result, and the handles found
    among them; the replacement happens only when every handle found succeeded."""
    found = _handles(args, kwargs)
    if not found or any(h.status is not _SUCCEEDED for h in found):
        return args, kwargs, found
    args = tuple(a._result if type(a) is StateHandle else a for a in args)
    if kwargs:
        kwargs = {k: v._result if type(v) is StateHandle else v for k, v in kwargs.items()}
    return args, kwargs, found
