"""Helpers of the ``"dask"`` executor: what runs on the workers and how errors come back.

The functions shipped to workers are built by factories, as closures: cloudpickle carries a
closure by value, so a Dask worker runs them without statepool installed (it needs only what the
state's own function imports).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import cloudpickle
from distributed import KilledWorker
from distributed.diagnostics.plugin import WorkerPlugin

from statepool.engine.errors import SerializationError, WorkerCrashedError

from .._wire.remote import RemoteTraceback, type_name
from ..base import PreparedCall

__all__ = ["Lifeline", "cancel_mark", "hard_exit", "kill_worker_tree", "local_security",
           "serialization_error", "task_function", "translate_error"]

logger = logging.getLogger(__name__)

_RESULT_NOT_SERIALIZABLE = "Could not serialize object of type "
_SCHEDULER_LOST = "scheduler-connection-lost"
_EXIT_MARK = "statepool: the state tried to end its Dask worker"


def local_security() -> Any:
    """TLS with temporary credentials for a LocalCluster statepool starts (its ports would take
    code from any local user), where ``cryptography`` is installed (the ``dask`` extra brings
    it); ``None`` (plain TCP on loopback, with a warning) where it is not."""
    if importlib.util.find_spec("cryptography") is None:  # Security.temporary() needs it
        logger.warning("dask: cryptography is not installed; the LocalCluster listens on "
                       "loopback without TLS (any local user could submit code to it): "
                       "pip install 'statepool[dask]'")
        return None
    from distributed import Security

    return Security.temporary()  # type: ignore[no-untyped-call]


class Lifeline(WorkerPlugin):
    """A worker plugin: a worker of a LocalCluster statepool started dies, with what its tasks
    started, within about a second of the parent's death (``_wire.lifeline``, the watch thread:
    no parent-death signal, which follows the parent's thread that started the worker)."""

    name = "statepool-lifeline"

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def setup(self, worker: Any) -> None:
        import os

        from .._wire import lifeline

        if os.getppid() != self.parent:  # not a worker process of ours
            return
        lifeline.arm(self.parent, pdeathsig=False)
        # distributed ends a worker whose parent died with os._exit() at once, from its own
        # watch thread, before ours sees it: in our workers, that exit (and any other) first
        # kills what the tasks started
        if not getattr(os._exit, "statepool_lifeline", False):
            os._exit = _exit_killing_descendants(os._exit)  # type: ignore[assignment]


def _exit_killing_descendants(real: Callable[[int], Any]) -> Callable[[int], Any]:
    def _exit(code: int) -> Any:
        from .._wire import lifeline

        with contextlib.suppress(BaseException):
            lifeline.kill_descendants()
        return real(code)

    _exit.statepool_lifeline = True  # type: ignore[attr-defined]
    return _exit


#: on each Dask worker object: ``(lock, keys started, keys cancelled -> when)`` (see
#: :func:`task_function` and :func:`cancel_mark`)
_CALLS = "_statepool_calls"
_CANCEL_MEMORY_S = 120.0  # a cancel mark older than this is forgotten (the task will not come)


def task_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The function submitted to Dask for ``fn``: it runs there, in a worker thread.

    A coroutine (what a coroutine function returns) runs under its own ``asyncio.run``, so one
    that blocks does not stall the worker's event loop (Dask's native async tasks share that loop
    with the worker's heartbeats). ``SystemExit`` and ``KeyboardInterrupt`` come back as a marked
    ``RuntimeError`` instead of taking the worker down (which Dask does, slowly, and then runs
    the task again elsewhere). It answers ``(worker address, seconds it ran, result)``: where
    it ran and for how long, for the state's events and timings.

    Cancel is exact although several tasks wait on each worker thread: before it calls ``fn``,
    the task looks, under the worker's lock, for a cancel mark of its key (:func:`cancel_mark`)
    and, if there is none, notes that it started. A task cancelled before it started never
    calls ``fn``; the mark tells the parent which worker runs one that had started.
    """
    mark, calls_name = _EXIT_MARK, _CALLS

    def statepool_task(*args: Any, **kwargs: Any) -> Any:
        import asyncio
        import inspect
        import threading
        import time

        address = key = calls = None
        try:
            from distributed import get_worker

            worker = get_worker()
            address, key = str(worker.address), worker.get_current_task()
            calls = worker.__dict__.get(calls_name) or worker.__dict__.setdefault(
                calls_name, (threading.Lock(), set(), {}))
        except Exception:  # not in a worker (a test calling the function here)
            pass
        if calls is not None:
            lock, started, cancelled = calls
            with lock:
                if cancelled.pop(key, None) is not None:
                    return address, 0.0, None  # cancelled before it started: it never runs
                started.add(key)
        began = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):
                awaitable = result

                async def wait() -> Any:
                    return await awaitable

                result = asyncio.run(wait())
            return address, time.perf_counter() - began, result
        except (SystemExit, KeyboardInterrupt) as exc:
            code = exc.code if isinstance(exc, SystemExit) else None
            raise RuntimeError(mark, type(exc).__name__, code) from None
        finally:
            if calls is not None:
                with lock:
                    started.discard(key)

    return statepool_task


def cancel_mark(key: str) -> Callable[..., bool]:
    """A function for ``client.run`` on every worker: mark ``key`` cancelled there, so that it
    never starts, and answer whether it runs there now (it started before the mark)."""
    calls_name, memory_s = _CALLS, _CANCEL_MEMORY_S

    def statepool_cancel(dask_worker: Any) -> bool:
        import threading
        import time

        calls = dask_worker.__dict__.get(calls_name) or dask_worker.__dict__.setdefault(
            calls_name, (threading.Lock(), set(), {}))
        lock, started, cancelled = calls
        now = time.monotonic()
        with lock:
            if key in started:
                return True
            cancelled[key] = now
            if len(cancelled) > 1024:  # marks of tasks that went elsewhere, or had ended
                for old in [k for k, when in cancelled.items() if now - when > memory_s]:
                    del cancelled[old]
        return False

    return statepool_cancel


def hard_exit() -> Callable[[], Coroutine[Any, Any, None]]:
    """A coroutine function that ends the worker process at once (its nanny starts a new one)."""

    async def statepool_hard_exit() -> None:
        import asyncio
        import os

        asyncio.get_running_loop().call_soon(os._exit, 1)

    return statepool_hard_exit


def kill_worker_tree() -> Callable[..., int | None]:
    """A function for ``client.run(..., nanny=True)``: the nanny SIGKILLs its worker process and
    what that started, and answers the worker's PID (``None``: it has none now).

    The nanny does it, not the worker: a worker whose task holds the GIL answers slowly (each
    of its event loop's steps waits for the GIL), the nanny at once; and it starts a new worker.
    """

    def statepool_kill_worker(dask_worker: Any) -> int | None:
        import contextlib

        import psutil

        pid = dask_worker.pid  # the nanny's worker process, None while it has none
        if not pid:
            return None
        try:
            proc = psutil.Process(pid)
            victims = [*proc.children(recursive=True), proc]
        except psutil.Error:
            return None
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        return int(pid)

    return statepool_kill_worker


def translate_error(exc: BaseException, call: PreparedCall) -> BaseException:
    """The exception ``run()`` raises for ``exc``, raised while awaiting a Dask future."""
    where = f"state {call.state_name!r} ({call.func_name})"
    err: BaseException
    if isinstance(exc, KilledWorker):
        last = getattr(exc.last_worker, "address", "?")
        err = WorkerCrashedError(
            f"{where}: the Dask worker process running it died; Dask ran it on "
            f"{exc.allowed_failures + 1} worker(s), each died (last: {last})",
            state_name=call.state_name,
        )
    elif isinstance(exc, concurrent.futures.CancelledError):  # distributed's FutureCancelledError
        reason = getattr(exc, "reason", "unknown")
        if reason == _SCHEDULER_LOST:  # not a cancellation: the cluster went away under it
            err = WorkerCrashedError(
                f"{where}: the client lost its connection to the Dask scheduler while the "
                "state ran", state_name=call.state_name)
        else:
            err = asyncio.CancelledError(f"{where}: its Dask future was cancelled ({reason})")
    elif isinstance(exc, RuntimeError) and exc.args[:1] == (_EXIT_MARK,):
        _, kind, code = exc.args
        exitcode = code if isinstance(code, int) else (None if code is None else 1)
        what = f"sys.exit({code!r})" if kind == "SystemExit" else kind
        err = WorkerCrashedError(
            f"{where} raised {what} on its Dask worker", state_name=call.state_name,
            exitcode=exitcode,
        )
    elif isinstance(exc, TypeError) and str(exc).startswith(_RESULT_NOT_SERIALIZABLE):
        type_ = str(exc)[len(_RESULT_NOT_SERIALIZABLE):].split("\n", 1)[0].strip()
        err = SerializationError(
            f"{where} returned a {type_} that Dask cannot serialize back to the client"
        )
    else:
        if exc.__cause__ is None and exc.__traceback__ is not None:
            exc.__cause__ = RemoteTraceback(
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return exc
    err.__cause__ = exc
    return err


def serialization_error(exc: BaseException, call: PreparedCall) -> SerializationError | None:
    """The error for a submit that failed to serialize, naming the first part that does not
    pickle; ``None`` when every part pickles (``exc`` is about something else)."""
    parts: list[tuple[str, object]] = [("function", call.fn)]
    parts += [(f"argument {i}", arg) for i, arg in enumerate(call.args)]
    parts += [(f"keyword argument {key!r}", value) for key, value in call.kwargs.items()]
    for label, obj in parts:
        try:
            cloudpickle.dumps(obj)
        except Exception:
            what = f"{label} of type {type_name(obj)}"
            break
    else:
        return None
    err = SerializationError(
        f"cannot send state {call.state_name!r} to Dask: its {what} cannot be pickled "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    )
    err.__cause__ = exc
    return err


