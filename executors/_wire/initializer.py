"""Worker initializers (SPEC: executors): checked when the executor is built, carried to worker
processes by cloudpickle (lambdas and closures work), run once in each worker before its first
call. A worker whose initializer raised stays in its pool and answers every call it is given with
:class:`~statepool.engine.errors.InitializerError` (naming the state and the initializer, the
initializer's error as its cause): it is not started again, so nothing respawns in a loop.
"""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Callable
from typing import Any

import cloudpickle

__all__ = ["Setup", "check", "failed", "run", "run_async"]


class Setup:
    """An initializer, its arguments and its name, as a worker receives them."""

    __slots__ = ("args", "fn", "name")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self.fn = fn
        self.args = args
        self.name = name

    def dumps(self) -> bytes:
        data: bytes = cloudpickle.dumps((self.fn, self.args, self.name),
                                        protocol=pickle.HIGHEST_PROTOCOL)
        return data

    @staticmethod
    def loads(payload: bytes) -> Setup:
        fn, args, name = pickle.loads(payload)
        return Setup(fn, args, name)


def check(owner: str, initializer: Any, initargs: Any, *, coroutine_ok: bool,
          carried: bool) -> Setup | None:
    """The ``Setup`` of an executor's ``initializer``/``initargs``, or None; a ``TypeError``
    naming the executor and the field for a bad one (``carried``: it must pickle)."""
    if initializer is None:
        if initargs:
            raise TypeError(f"{owner}: 'initargs' given without an 'initializer'")
        return None
    if not callable(initializer):
        raise TypeError(f"{owner}: 'initializer' must be callable, got {initializer!r}")
    if not isinstance(initargs, (tuple, list)):
        raise TypeError(f"{owner}: 'initargs' must be a tuple or list, got {initargs!r}")
    name = _name(initializer)
    if not coroutine_ok and _is_coroutine_function(initializer):
        raise TypeError(
            f"{owner}: 'initializer' {name} is a coroutine function, which only "
            "AioProcessExecutor can await (its children run an event loop); give a plain "
            "function here")
    setup = Setup(initializer, tuple(initargs), name)
    if carried:
        try:
            setup.dumps()
        except Exception as exc:
            raise TypeError(f"{owner}: 'initializer' {name} or its 'initargs' cannot be "
                            f"pickled for the worker processes ({type(exc).__name__}: {exc})"
                            ) from exc
    return setup


def run(setup: Setup) -> BaseException | None:
    """Run the initializer here; what it raised, or None."""
    try:
        setup.fn(*setup.args)
    except BaseException as exc:  # kept: every call of this worker fails with it
        return exc
    return None


async def run_async(setup: Setup) -> BaseException | None:
    """:func:`run` in a worker that runs an event loop: an awaitable result is awaited."""
    try:
        result = setup.fn(*setup.args)
        if inspect.isawaitable(result):
            await result
    except BaseException as exc:
        return exc
    return None


def failed(setup: Setup, exc: BaseException, state_name: str, where: str) -> Exception:
    """The error a call given to a worker whose initializer raised ``exc`` fails with."""
    from statepool.engine.errors import InitializerError

    error = InitializerError(
        f"state {state_name!r} cannot run: the initializer {setup.name} of {where} raised "
        f"{type(exc).__name__}: {exc}", state_name=state_name, initializer=setup.name)
    error.__cause__ = exc
    return error


def _name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name == "<lambda>":
        code = getattr(fn, "__code__", None)
        if code is not None:
            return f"<lambda> ({code.co_filename}:{code.co_firstlineno})"
    return str(name) if name else type(fn).__name__


def _is_coroutine_function(fn: Any) -> bool:
    import functools

    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(fn.__call__)


