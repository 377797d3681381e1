"""The executor interface and the prepared call every backend runs.

A backend is anything with a ``name``, ``async run(call)`` and ``async shutdown(cancel=...)``.
The engine owns the queue, retries, timeouts and status; a backend runs one prepared call and
answers with its result or its exception. Its duties:

* call ``call.started()`` on the event loop thread when the call leaves the backend's own waiting
  line and really starts (the state's ``timeout`` clock starts there);
* when the task awaiting ``run()`` is cancelled (the state was cancelled or timed out), stop the
  work if the backend can (a process backend terminates the worker) and let ``CancelledError``
  propagate;
* never block the event loop thread;
* where it knows them, set ``call.worker`` (a PID, a thread name, a Dask worker address; before
  ``call.started()`` where it can) and ``call.ran_s`` (seconds the call ran, measured where it
  ran) for the state's events and ``handle.timings``.

Optional capabilities, which the engine asks for (never a backend's class):

* ``runs_on_loop``: calls run on the event loop thread, in the task that awaits them; the engine
  may then call a state's function itself instead of building a :class:`PreparedCall`;
* ``submit(call, on_done)``: start a call with no task to await it; the backend ends it through
  ``on_done(ok, value)`` on the loop thread and returns a :class:`Submitted` that can cancel it
  (``None`` where a backend has no such path);
* ``submit_gated(call, on_done, release)``: ``submit``, for a call that holds tag slots or
  waits for them: the call waits, holding no worker, until the returned object's ``admit()``
  (thread-safe) lets it start, and ``release()`` runs where the call ran, right after it ended
  (or was dropped unrun), so that slots go back and the next call starts with no turn of the
  loop;
* ``default_grace(seconds)``: the manager's ``shutdown_grace``, for a backend that has none of
  its own;
* ``capacity()``: how many calls run at once (its workers), ``None`` where that is not fixed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Executor", "Gated", "OnDone", "PreparedCall", "Settable", "Submitted", "fail_future"]

#: ``on_done(True, result)`` or ``on_done(False, exception)``, called on the loop thread
OnDone = Callable[[bool, Any], None]


class Submitted(Protocol):
    """What ``Executor.submit`` returns: it stands for a task (``cancel()``, ``done()``)."""

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...


class Gated(Submitted, Protocol):
    """What ``Executor.submit_gated`` returns: a :class:`Submitted` that can be let start."""

    def admit(self) -> None: ...


class PreparedCall:
    """One attempt of a state, ready to run: ``fn(*args, **kwargs)`` plus what a backend needs."""

    __slots__ = (
        "_on_start",
        "args",
        "fn",
        "func_name",
        "is_blocking",
        "is_coro",
        "kwargs",
        "ran_s",
        "state_name",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        state_name: str,
        func_name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        is_coro: bool = False,
        is_blocking: bool = False,
        timeout: float | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.state_name = state_name
        self.func_name = func_name
        self.fn = fn
        self.args = args
        self.kwargs = kwargs if kwargs is not None else {}
        self.is_coro = is_coro
        self.is_blocking = is_blocking
        self.timeout = timeout
        self._on_start = on_start
        #: where it ran (a PID, a thread name, a Dask worker address), set by the backend
        self.worker: int | str | None = None
        #: seconds it ran, measured where it ran, set by the backend where it knows
        self.ran_s: float | None = None

    def started(self) -> None:
        """Tell the engine the call is running now (loop thread only; idempotent)."""
        cb = self._on_start
        if cb is not None:
            self._on_start = None
            cb()

    def __call__(self) -> Any:
        """Run the call here: a coroutine function returns its coroutine, unawaited."""
        return self.fn(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"<PreparedCall {self.state_name!r} {self.func_name}>"


class Settable(Protocol):
    """What :func:`fail_future` sets: an ``asyncio.Future``, or an executor's own outcome."""

    def done(self) -> bool: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


def fail_future(fut: Settable, exc: BaseException, state_name: str) -> None:
    """``fut.set_exception(exc)`` unless it is done, and never raising: asyncio refuses a
    ``StopIteration`` (it would end the awaiting coroutine), so one travels as a
    ``RuntimeError`` naming the state, with the ``StopIteration`` as its ``__cause__``."""
    if fut.done():
        return
    if isinstance(exc, StopIteration):
        error = RuntimeError(f"state {state_name!r} raised StopIteration")
        error.__cause__ = exc
        exc = error
    fut.set_exception(exc)


class Executor(abc.ABC):
    """What every backend implements. See the module docstring for the duties of ``run``."""

    name: str = "executor"
    #: calls run on the event loop thread, in the awaiting task (see the module docstring)
    runs_on_loop: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Start now (pre-warm pools). ``run`` starts lazily anyway."""

    @abc.abstractmethod
    async def run(self, call: PreparedCall) -> Any:
        """Run one prepared call and return its result (or raise its exception)."""

    @abc.abstractmethod
    async def shutdown(self, *, cancel: bool) -> None:
        """Release every resource; ``cancel=True`` stops running work instead of waiting."""

    def submit(self, call: PreparedCall, on_done: OnDone) -> Submitted | None:
        """Start ``call`` with no task to await it, or return ``None`` (no such path here).

        Loop thread only. ``call.started()`` and then ``on_done`` run on the loop thread;
        ``on_done`` does not run once the returned object's ``cancel()`` was called."""
        return None

    def submit_gated(self, call: PreparedCall, on_done: OnDone,
                     release: Callable[[], None]) -> Gated | None:
        """``submit`` for a call holding tag slots, or ``None`` (no such path here): the call
        starts only once the returned object's ``admit()`` was called, from any thread, and
        the backend calls ``release()`` (thread-safe) where the call ran as soon as it ended or
        was dropped unrun. Loop thread only."""
        return None

    def default_grace(self, seconds: float) -> None:  # noqa: B027 - optional, a no-op here
        """Take the manager's ``shutdown_grace`` if this backend has none of its own."""

    def capacity(self) -> int | None:
        """How many calls run here at once (its workers), or ``None`` where that is not a
        fixed number (the event loop; a remote cluster not asked yet). ``map`` sizes its window
        from it, and the engine warns when states that could run side by side wait in line."""
        return None

    async def worker_stack(self, call: PreparedCall) -> str | None:
        """The current Python stack of the worker running ``call``, where the backend can
        take it without stopping the work (``warn_after``); ``None`` where it cannot."""
        return None

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes this executor holds now (none for in-process ones)."""
        return []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
