"""Human-readable names for the functions states run."""

from __future__ import annotations

import functools
import inspect
from inspect import CO_COROUTINE
from types import FunctionType
from typing import Any

__all__ = ["func_name", "is_coroutine_callable"]


def func_name(func: Any) -> str:
    """Name ``func`` for logs and errors.

    ``functools.partial`` (nested too) -> the wrapped function's name; bound method ->
    ``Class.method``; lambda -> ``<lambda>`` with its file and line; callable object -> its class.
    """
    if type(func) is FunctionType and func.__name__ != "<lambda>":
        return func.__name__  # the common case, fast
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.ismethod(func):
        owner = func.__self__
        cls = owner if isinstance(owner, type) else type(owner)
        return f"{cls.__name__}.{func.__func__.__name__}"
    name = getattr(func, "__name__", None)
    if name == "<lambda>":
        code = func.__code__
        return f"<lambda> ({code.co_filename}:{code.co_firstlineno})"
    if isinstance(name, str) and (inspect.isroutine(func) or isinstance(func, type)):
        return name
    return type(func).__name__


def is_coroutine_callable(func: Any) -> bool:
    """True for coroutine functions, partials of them and objects with an ``async __call__``."""
    if type(func) is FunctionType:  # the common case, fast
        return bool(func.__code__.co_flags & CO_COROUTINE)
    while isinstance(func, functools.partial):
        func = func.func
    if inspect.iscoroutinefunction(func):
        return True
    if inspect.isroutine(func) or isinstance(func, type) or not callable(func):
        return False
    return inspect.iscoroutinefunction(type(func).__call__)
