"""``wrap_with_tryexcept``: the original code's error-wrapping helper."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from .log import logger
from .naming import func_name

__all__ = ["wrap_with_tryexcept"]


def wrap_with_tryexcept(func: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> Callable[[], Awaitable[Any]]:
    """A no-argument coroutine function that runs ``func(*args, **kwargs)`` (awaiting it when it
    is a coroutine function) and returns its result, or logs the exception at ERROR on logger
    ``engine`` and returns ``None``.
    """
    name = func_name(func)

    @functools.wraps(func)
    async def wrapped() -> Any:
        try:
            result = func(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception:
            logger.exception("%s raised; wrap_with_tryexcept returns None", name)
            return None

    return wrapped
