"""State: a named piece of work, how it runs, and its validation."""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from statepool.executors import registry
from statepool.executors.base import Executor, PreparedCall

from . import current
from .errors import LazyArgumentError
from .handle import StateHandle
from .naming import func_name as _func_name
from .naming import is_coroutine_callable
from .retry import Retry

__all__ = ["State"]

_EMPTY: dict[str, Any] = {}
_NONE: tuple[Any, ...] = ()
#: built-in executor names known without asking the registry (the check of the common case)
_CHECKED = frozenset({"inline", "thread", "process", "aioprocess", "dask"})


class State:
    """A named unit of work for a :class:`~statepool.engine.StateManager`.

    ``func(*args, *resolved_lazy_args, **kwargs, **resolved_lazy_kwargs)`` runs in the executor the
    state names (see the README's table); ``is_blocking`` states are dispatched without waiting.
    Every bad argument raises ``TypeError`` or ``ValueError`` naming the state and the field.
    """

    __slots__ = (
        "_deps",
        "_executor",
        "_func_name",
        "_has_lazy",
        "_is_coro",
        "_plain",
        "_retry",
        "_sched",
        "_waits",
        "after",
        "args",
        "event",
        "executor",
        "func",
        "is_blocking",
        "kwargs",
        "lazy_args",
        "lazy_kwargs",
        "name",
        "priority",
        "retries",
        "tags",
        "timeout",
        "warn_after",
    )

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        is_blocking: bool = False,
        *,
        lazy_args: Sequence[Any] = (),
        lazy_kwargs: Mapping[str, Any] | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        event: asyncio.Event | None = None,
        event_to_wait: asyncio.Event | None = None,
        executor: str | Executor | None = None,
        timeout: float | None = None,
        retries: int | Retry = 0,
        after: Sequence[StateHandle] = _NONE,
        tags: Sequence[str] = _NONE,
        priority: int = 0,
        warn_after: float | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"State name must be a non-empty str, got {name!r}")
        self.name = name
        if not callable(func):
            raise TypeError(self._field("func", "must be callable", func))
        self.func = func
        self._func_name = _func_name(func)
        self._is_coro = is_coroutine_callable(func)
        self.is_blocking = bool(is_blocking)
        # A State is built per put: the common values skip the checks' method calls.
        self.lazy_args = lazy_args if type(lazy_args) is tuple else self._sequence(
            "lazy_args", lazy_args)
        self.args = args if type(args) is tuple else self._sequence("args", args)
        self.lazy_kwargs = _EMPTY if lazy_kwargs is None else self._mapping(
            "lazy_kwargs", lazy_kwargs)
        self.kwargs = _EMPTY if kwargs is None else self._mapping("kwargs", kwargs)
        if event is None and event_to_wait is None:
            self.event = None
        else:
            self.event = self._gate(event, event_to_wait)
        self.timeout = None if timeout is None else self._timeout(timeout)
        self.warn_after = None if warn_after is None else self._timeout(warn_after, "warn_after")
        if type(retries) is int and retries >= 0:  # the common case first
            self._retry: Retry | None = None
            self.retries = retries
        elif isinstance(retries, Retry):
            self._retry = retries
            self.retries = retries.times
        elif isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(self._field("retries", "must be an int >= 0 or a Retry", retries))
        else:
            self._retry = None
            self.retries = int(retries)
        lazy = bool(self.lazy_args or self.lazy_kwargs)
        self._has_lazy = lazy
        if after is _NONE and tags is _NONE and type(priority) is int and not priority \
                and not lazy and kwargs is None:  # the common case: a few stores
            self.after = self.tags = self._deps = _NONE
            self.priority = 0
            self._waits = self._sched = False
            for arg in self.args:
                if type(arg) is StateHandle:  # a dependency given as an argument
                    self._scheduling(after, tags, priority)
                    break
        else:
            self._scheduling(after, tags, priority)
        self.executor = executor
        if executor is None:  # the default, which needs no check
            self._executor = "inline" if self._is_coro or not self.is_blocking else "thread"
        elif type(executor) is str and executor in _CHECKED and (
                executor != "inline" or self._is_coro or not self.is_blocking):
            self._executor = executor  # a built-in name that takes this state: no check
        else:
            self._executor = self._executor_name(executor)
        # the fast paths' one check (engine/fastpath.py): no gate, lazy argument, timeout,
        # retry, dependency or stall warning, and the executor named by name (tags are fine)
        self._plain = (self.event is None and not lazy and self.timeout is None
                       and not self.retries and not self._deps and self.warn_after is None
                       and (executor is None or type(executor) is str))

    @property
    def func_name(self) -> str:
        """The function's name for logs and errors (see :func:`engine.naming.func_name`)."""
        return self._func_name

    @property
    def is_coro(self) -> bool:
        """True when ``func`` is a coroutine function (or a partial or object wrapping one)."""
        return self._is_coro

    @property
    def executor_name(self) -> str:
        """The name of the executor this state runs on."""
        return self._executor

    # -- validation helpers ----------------------------------------------------------------

    def _field(self, field: str, rule: str, value: Any) -> str:
        return f"State {self.name!r}: field {field!r} {rule}, got {value!r}"

    def _sequence(self, field: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            raise TypeError(self._field(field, "must be a tuple or list", value))
        return tuple(value)

    def _mapping(self, field: str, value: Any) -> dict[str, Any]:
        if value is None:
            return _EMPTY
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise TypeError(self._field(field, "must be a mapping with str keys", value))
        return dict(value)

    def _gate(self, event: Any, event_to_wait: Any) -> asyncio.Event | None:
        if event is not None and event_to_wait is not None:
            raise ValueError(
                f"State {self.name!r}: give 'event' or its alias 'event_to_wait', not both")
        gate = event if event is not None else event_to_wait
        if not isinstance(gate, asyncio.Event):
            raise TypeError(self._field("event", "must be an asyncio.Event", gate))
        return gate

    def _scheduling(self, after: Any, tags: Any, priority: Any) -> None:
        """Check and set ``after``, ``tags`` and ``priority``, and find the dependencies:
        ``after`` and the handles given directly as arguments (engine/deps.py)."""
        self.after = self._after(after) if after is not _NONE else _NONE
        self.tags = self._tags(tags) if tags is not _NONE else _NONE
        if type(priority) is not int:
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise TypeError(self._field("priority", "must be an int", priority))
            priority = int(priority)
        self.priority = priority
        self._deps = self._handles_in_arguments(self.after)
        self._waits = bool(self._deps or self.tags)  # it may wait, not holding the queue
        self._sched = bool(self._waits or priority)  # the scheduler looks at it when put

    def _after(self, after: Any) -> tuple[StateHandle, ...]:
        if not isinstance(after, (tuple, list)):
            raise TypeError(self._field("after", "must be a tuple or list of StateHandles", after))
        for dep in after:
            if not isinstance(dep, StateHandle):
                raise TypeError(self._field("after", "must hold StateHandles only", dep))
        return tuple(dict.fromkeys(after))

    def _tags(self, tags: Any) -> tuple[str, ...]:
        if not isinstance(tags, (tuple, list)):
            raise TypeError(self._field("tags", "must be a tuple or list of str", tags))
        for tag in tags:
            if not isinstance(tag, str) or not tag:
                raise ValueError(self._field("tags", "must hold non-empty strs only", tag))
        return tuple(dict.fromkeys(tags))

    def _handles_in_arguments(self, deps: tuple[StateHandle, ...]) -> tuple[StateHandle, ...]:
        """``deps`` and every handle given directly as an element of the four arguments."""
        found: list[StateHandle] = []
        for seq in (self.args, self.lazy_args, self.kwargs.values(), self.lazy_kwargs.values()):
            if seq and StateHandle in map(type, seq):
                found.extend(item for item in seq if type(item) is StateHandle)
        if not found:
            return deps
        return tuple(dict.fromkeys((*deps, *found)))

    def _timeout(self, timeout: Any, field: str = "timeout") -> float:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(self._field(field, "must be a number of seconds", timeout))
        try:
            seconds = float(timeout)
        except OverflowError:  # an int past float's range (10**400)
            raise ValueError(self._field(field, "must be finite seconds > 0", timeout)) \
                from None
        if not (seconds > 0 and math.isfinite(seconds)):  # nan, inf, <= 0
            raise ValueError(self._field(field, "must be finite seconds > 0", timeout))
        return seconds

    def _executor_name(self, executor: str | Executor) -> str:
        if isinstance(executor, str):
            if not registry.is_known(executor):
                raise ValueError(self._field(
                    "executor",
                    f"must be one of {', '.join(registry.known_names())} or an Executor", executor))
            name = executor
        elif isinstance(executor, Executor):
            name = executor.name
        else:
            raise TypeError(self._field("executor", "must be a name or an Executor", executor))
        if name == "inline" and self.is_blocking and not self._is_coro:
            raise ValueError(self._field(
                "executor", "cannot be 'inline' for a blocking plain function (it would freeze "
                "the event loop); use 'thread' or 'process'", executor))
        return name

    # -- running ---------------------------------------------------------------------------

    async def _resolve_lazy(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments with the lazy ones resolved (loop thread)."""
        if not self._has_lazy:
            return self.args, self.kwargs
        args = list(self.args)
        for index, item in enumerate(self.lazy_args):
            args.append(await self._resolve_one(item, f"lazy_args[{index}]"))
        kwargs = dict(self.kwargs)
        for key, item in self.lazy_kwargs.items():
            kwargs[key] = await self._resolve_one(item, f"lazy_kwargs[{key!r}]")
        return tuple(args), kwargs

    async def _resolve_one(self, item: Any, where: str) -> Any:
        if not callable(item):
            return item
        try:
            value = item()
            if type(value) is StateHandle:  # a dependency: the state waits for it parked
                return value
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            raise LazyArgumentError(
                f"State {self.name!r}: lazy argument {where} ({_func_name(item)}) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return value

    def _make_function(self, args: tuple[Any, ...] | None = None,
                       kwargs: dict[str, Any] | None = None, *,
                       on_start: Callable[[], None] | None = None) -> PreparedCall:
        """The call the chosen executor runs: ``func`` with these (resolved) arguments."""
        return PreparedCall(
            self.name, self.func_name, self.func,
            self.args if args is None else args,
            self.kwargs if kwargs is None else kwargs,
            is_coro=self.is_coro, is_blocking=self.is_blocking, timeout=self.timeout,
            on_start=on_start,
        )

    async def enter_state(self) -> Any:
        """Run this state once, now, outside any queue, on the process-wide manager.

        Returns the result (raising the state's exception); for a blocking state, returns the
        :class:`StateHandle` as soon as it has been dispatched.
        """
        handle: StateHandle = await current.manager()._enter_now(self)
        if self.is_blocking:
            return handle
        return await handle

    def __repr__(self) -> str:
        return (f"State({self.name!r}, {self.func_name}, is_blocking={self.is_blocking}, "
                f"executor={self.executor_name!r})")
