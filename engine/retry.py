"""``Retry``: how many more attempts a failing state gets, how long it waits before each, and
which failures it retries."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

__all__ = ["Retry"]

RetryOn = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], Any]


def _number(field: str, value: Any, *, low: float, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"Retry: field {field!r} must be a finite number, got {value!r}")
    if value < low:
        raise ValueError(f"Retry: field {field!r} must be >= {low}, got {value!r}")
    return float(value)


class Retry:
    """``Retry(times, *, delay=0.0, backoff=1.0, max_delay=None, jitter=0.0, on=None)``.

    After its n-th failure a state waits ``delay * backoff**(n-1)`` seconds (capped by
    ``max_delay``, then spread by +/- ``jitter`` as a fraction of it) before its next attempt, up
    to ``times`` more attempts. ``on`` picks the failures that are retried: an exception class, a
    tuple of them, or a predicate taking the exception (``None``: every failure but
    cancellation). A state waiting to retry holds no worker, no tag slot and not the queue.
    """

    __slots__ = ("backoff", "delay", "jitter", "max_delay", "on", "times")

    def __init__(self, times: int, *, delay: float = 0.0, backoff: float = 1.0,
                 max_delay: float | None = None, jitter: float = 0.0,
                 on: RetryOn | None = None) -> None:
        if isinstance(times, bool) or not isinstance(times, int):
            raise TypeError(f"Retry: field 'times' must be an int >= 0, got {times!r}")
        if times < 0:
            raise ValueError(f"Retry: field 'times' must be an int >= 0, got {times!r}")
        self.times = times
        self.delay = _number("delay", delay, low=0.0)
        self.backoff = _number("backoff", backoff, low=1.0)
        self.max_delay = _number("max_delay", max_delay, low=0.0, allow_none=True)
        jitter_ = _number("jitter", jitter, low=0.0)
        assert jitter_ is not None
        if jitter_ > 1.0:
            raise ValueError(f"Retry: field 'jitter' must be a fraction in [0, 1], got {jitter!r}")
        self.jitter = jitter_
        self.on = _check_on(on)

    def accepts(self, error: BaseException) -> bool:
        """Whether ``error`` is a failure this policy retries."""
        on = self.on
        if on is None:
            return True
        if isinstance(on, tuple):
            return isinstance(error, on)
        return bool(on(error))

    def wait_after(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based) before the next attempt."""
        base = self.delay
        assert base is not None and self.backoff is not None
        if not base:
            return 0.0
        try:
            wait = base * self.backoff ** (failures - 1)
        except OverflowError:
            wait = math.inf
        if self.max_delay is not None:
            wait = min(wait, self.max_delay)
        if self.jitter:
            wait *= 1.0 + self.jitter * (2.0 * rand() - 1.0)
        return max(0.0, wait) if math.isfinite(wait) else 1e9

    def __repr__(self) -> str:
        return (f"Retry({self.times}, delay={self.delay}, backoff={self.backoff}, "
                f"max_delay={self.max_delay}, jitter={self.jitter}, on={self.on!r})")


def _check_on(on: Any) -> tuple[type[BaseException], ...] | Callable[[BaseException], Any] | None:
    if on is None:
        return None
    if isinstance(on, type) and issubclass(on, BaseException):
        return (on,)
    if isinstance(on, tuple) and on and all(
            isinstance(c, type) and issubclass(c, BaseException) for c in on):
        return on
    if callable(on) and not isinstance(on, (type, tuple)):
        return on  # type: ignore[no-any-return]
    raise TypeError(f"Retry: field 'on' must be an exception class, a tuple of them or a "
                    f"predicate, got {on!r}")
