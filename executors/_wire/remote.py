"""Carrying a prepared call to a worker process and its outcome back, shared by process backends.

The parent turns a call into bytes with :func:`dumps_call`; the worker runs them with
:func:`run_pickled` (or :func:`run_pickled_async` inside a running event loop) and answers with
bytes; the parent turns those back into the result, or raises, with :func:`loads_outcome`.
Everything travels as cloudpickle bytes, so the transport (loky, aiomultiprocess, a pipe) only ever
moves ``bytes`` and never fails to pickle on its own threads.

* An object that cannot be pickled (the function, an argument, the result, the exception) becomes
  a :class:`~engine.errors.SerializationError` naming the state and the object's type.
* An exception raised by the function keeps its type; the worker's formatted traceback is its
  ``__cause__`` (a :class:`RemoteTraceback`), as ``concurrent.futures`` does.
* A ``BaseException`` that is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``) is not
  sent back as it is: raised in the parent it would stop the event loop. It becomes a
  :class:`~engine.errors.WorkerCrashedError` naming the state, with the exit code of ``SystemExit``.

Pickling is CPU work that grows with the payload: :class:`OffLoop` does it on a private thread
so that the event loop thread never pickles a large payload.
"""

from __future__ import annotations

import collections
import inspect
import io
import marshal
import pickle
import traceback
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import cloudpickle

from ..base import PreparedCall
from .logrelay import STATE

if TYPE_CHECKING:
    from statepool.engine.errors import WorkerCrashedError

# ``engine`` (its package imports the manager, asyncio, ssl...) and ``asyncio`` are imported
# where they are needed: a worker process that imports this module to run calls starts faster
# without them, and rarely needs them (an error that does not pickle, a coroutine function).

__all__ = [
    "INLINE_DUMPS_LIMIT",
    "INLINE_LOADS_LIMIT",
    "OK",
    "OffLoop",
    "Pickler",
    "RemoteTraceback",
    "cloud_dumps",
    "dumps_call",
    "dumps_call_small",
    "dumps_error",
    "dumps_result",
    "loads_outcome",
    "remote_error",
    "run_call",
    "run_pickled",
    "run_pickled_async",
]

_T = TypeVar("_T")

#: An outcome up to this many bytes is unpickled on the calling (loop) thread by ``OffLoop``.
INLINE_LOADS_LIMIT = 64 * 1024
#: ``dumps_call_small`` gives up on a call past this many bytes.
INLINE_DUMPS_LIMIT = 64 * 1024

_OK = "ok"
_ERR = "err"
#: the first item of a pickled outcome that carries a result (see :func:`remote_error`)
OK = _OK


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, attached as its ``__cause__``."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def type_name(obj: object) -> str:
    """``module.QualName`` of ``obj``'s type (``list``, ``_thread.lock``, ``mymod.Point``)."""
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    return marshal.loads, (marshal.dumps(code),)


_BY_REFERENCE: dict[object, None] = {}  # functions and classes cloudpickle pickled by reference
_BY_REFERENCE_MAX = 4096
_by_value_modules: list[set[str]] = [set()]  # cloudpickle's registry when _BY_REFERENCE was filled


def _by_reference(obj: object) -> bool:
    """Did cloudpickle already decide to pickle ``obj`` by reference (and may it still)?"""
    if obj not in _BY_REFERENCE:
        return False
    registry = cloudpickle.list_registry_pickle_by_value()
    if registry != _by_value_modules[0]:  # register_pickle_by_value() since: decide again
        _BY_REFERENCE.clear()
        _by_value_modules[0] = registry
        return False
    return True


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's pickler, but code carried by value keeps its file name and line numbers
    (cloudpickle writes ``<dynamic-code>``): a worker's traceback through a function of
    ``__main__`` shows where it is, as loky's does. Code travels as ``marshal`` data, which
    keeps every field; parent and workers run the same interpreter.

    cloudpickle asks, for every function and class it meets, whether it can be pickled by
    reference (a module lookup: a few microseconds, a good part of a small batch's cost); the
    answer "by reference" is remembered per function or class (plain ``type`` classes only),
    until ``cloudpickle.register_pickle_by_value`` changes the rules."""

    dispatch_table = collections.ChainMap({types.CodeType: _reduce_code},
                                          cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if cls is not types.FunctionType and cls is not type:
            return super().reducer_override(obj)
        if _by_reference(obj):
            return NotImplemented  # the C pickler's save_global: module and name
        reduced = super().reducer_override(obj)
        if reduced is NotImplemented and len(_BY_REFERENCE) < _BY_REFERENCE_MAX:
            if not _BY_REFERENCE:
                _by_value_modules[0] = cloudpickle.list_registry_pickle_by_value()
            _BY_REFERENCE[obj] = None
        return reduced


def cloud_dumps(obj: object, protocol: int = pickle.HIGHEST_PROTOCOL,
                buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None) -> bytes:
    """``cloudpickle.dumps`` with :class:`Pickler`."""
    with io.BytesIO() as file:
        Pickler(file, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def _dumps(obj: object) -> bytes:
    return cloud_dumps(obj)


# -- parent side: the call ------------------------------------------------------------------


def dumps_call(call: PreparedCall, parts: tuple[Any, ...] | None = None,
               buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None) -> bytes:
    """Cloudpickle ``call`` for :func:`run_pickled`; an unpicklable part is a SerializationError.
    ``parts`` replaces ``(fn, args, kwargs)``; ``buffer_callback`` may keep buffers out of band
    (``shm.dumps_call_out``)."""
    try:
        if parts is None and buffer_callback is None:
            return _name(call) + _dumps((call.fn, call.args, call.kwargs))
        data = cloud_dumps((call.fn, call.args, call.kwargs) if parts is None else parts,
                           buffer_callback=buffer_callback)
        return _name(call) + data
    except BaseException as exc:  # a __reduce__ may raise anything, sys.exit() included
        raise unpicklable_call(call, exc) from exc


def _name(call: PreparedCall) -> bytes:
    """The state's name, pickled ahead of the call: a worker that cannot unpickle the call
    still names the state in its error."""
    return pickle.dumps(str(call.state_name), protocol=pickle.HIGHEST_PROTOCOL)


def unpicklable_call(call: PreparedCall, exc: BaseException) -> Exception:
    """The SerializationError of a call that raised ``exc`` as it was pickled, naming the state
    and the part at fault. (Whatever the pickling hook raised, ``SystemExit`` included, it only
    fails the state.)"""
    from statepool.engine.errors import SerializationError

    what, obj = _find_unpicklable(call)
    return SerializationError(
        f"cannot send state {call.state_name!r} to a worker process: its {what} of type "
        f"{type_name(obj)} cannot be pickled ({type(exc).__name__}: {safe_str(exc)})")


def safe_str(obj: object) -> str:
    """``str(obj)``, or a placeholder when its ``__str__`` raises."""
    try:
        return str(obj)
    except BaseException: # a broken __str__ must not hide the error itself
        return f"<{type_name(obj)}: str() failed>"


class _TooBig(Exception):
    pass


class _CappedBuffer:
    """A write-only file that raises ``_TooBig`` once more than ``limit`` bytes reach it."""

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def write(self, data: bytes | pickle.PickleBuffer) -> int:
        view = memoryview(data)  # a large payload may come as a PickleBuffer, without len()
        self.size += view.nbytes
        if self.size > self.limit:
            raise _TooBig
        self.parts.append(view.tobytes())
        return view.nbytes


def dumps_call_small(call: PreparedCall, limit: int = INLINE_DUMPS_LIMIT) -> bytes | None:
    """:func:`dumps_call` for a call that pickles to at most ``limit`` bytes, else ``None``.

    Pickling stops as soon as the output passes ``limit``, so this is cheap enough for the event
    loop thread: a caller pickles small calls inline and hands ``None`` ones to a thread.
    """
    buffer = _CappedBuffer(limit)
    try:
        buffer.write(_name(call))
        pickler = Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dump((call.fn, call.args, call.kwargs))
    except _TooBig:
        return None
    except BaseException:
        return dumps_call(call)  # raises the SerializationError that names the part
    return b"".join(buffer.parts)


def _find_unpicklable(call: PreparedCall) -> tuple[str, object]:
    """Which part of ``call`` does not pickle: ``("function", fn)``, ``("argument 1", x)``..."""
    parts: list[tuple[str, object]] = [("function", call.fn)]
    parts += [(f"argument {i}", arg) for i, arg in enumerate(call.args)]
    parts += [(f"keyword argument {key!r}", value) for key, value in call.kwargs.items()]
    for what, obj in parts:
        try:
            _dumps(obj)
        except BaseException:
            return what, obj
    return "call", call  # each part pickles alone, not together (a shared object's state?)


# -- worker side ----------------------------------------------------------------------------


def run_pickled(payload: bytes) -> bytes:
    """Run a call made by :func:`dumps_call`; a coroutine runs under its own ``asyncio.run``.

    Returns the pickled outcome for :func:`loads_outcome`. Never raises.
    """
    state_name, loaded = _loads_call(payload)
    if isinstance(loaded, bytes):
        return loaded
    return run_call(state_name, *loaded)


def _loads_call(payload: bytes,
                buffers: list[memoryview] | None = None) -> tuple[str, tuple[Any, ...] | bytes]:
    """``(state name, (fn, args, kwargs))``, or ``(state name, pickled error)`` when the call
    cannot be unpickled here (the name is read first, so the error names the state).
    ``buffers``: the call's out-of-band buffers (``shm.dumps_call_out``)."""
    import io

    stream = io.BytesIO(payload)
    state_name = "?"
    try:
        state_name = pickle.load(stream)
        fn, args, kwargs = pickle.load(stream, buffers=buffers)
    except BaseException as exc:  # a __reduce__ may raise anything, sys.exit() included
        return state_name, dumps_error(state_name, unloadable_call(state_name, exc))
    # (an Exception keeps its type, as the function's own would)
    return state_name, (fn, args, kwargs)


def unloadable_call(state_name: str | None, exc: BaseException) -> BaseException:
    """What a call that raised ``exc`` as a worker unpickled it fails with: an ``Exception``
    as it is (its type kept), anything else (``SystemExit`` from a ``__reduce__``) as a
    SerializationError naming the state (``None``: the parent names it)."""
    import os

    if isinstance(exc, Exception):
        return exc

    from statepool.engine.errors import SerializationError

    who = "a call" if state_name is None else f"state {state_name!r}"
    error = SerializationError(
        f"{who} cannot be unpickled in worker process {os.getpid()} "
        f"({type_name(exc)}: {safe_str(exc)})")
    error.__cause__ = None
    return error


def run_call(state_name: str, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any], buffers: list[pickle.PickleBuffer] | None = None,
             keep_out: Callable[[pickle.PickleBuffer], bool] | None = None) -> bytes:
    """``fn(*args, **kwargs)`` here (an awaitable result is run under its own ``asyncio.run``),
    answered as the pickled outcome for :func:`loads_outcome`. Never raises. ``buffers`` and
    ``keep_out``: see :func:`dumps_result`."""
    token = STATE.set(state_name)  # the worker's log records name the state (logrelay)
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            import asyncio

            result = asyncio.run(_await(result))
    except BaseException as exc:
        return _dumps_error(state_name, exc)
    finally:
        STATE.reset(token)
    return dumps_result(state_name, result, buffers, keep_out)


async def run_pickled_async(payload: bytes, buffers: list[memoryview] | None = None,
                            large: list[pickle.PickleBuffer] | None = None,
                            keep_out: Callable[[pickle.PickleBuffer], bool] | None = None,
                            hold: list[Any] | None = None) -> bytes:
    """:func:`run_pickled` for a worker that already runs an event loop: awaits a coroutine.
    ``buffers``: the call's out-of-band buffers; ``large`` and ``keep_out``: see
    :func:`dumps_result`. ``hold``: the call (function, arguments) and its result go into it
    instead of being released here, so that the caller releases it only after it sent the
    outcome (a ``__del__`` that kills the worker cannot lose a computed result)."""
    import asyncio

    state_name, loaded = _loads_call(payload, buffers)
    del buffers
    if isinstance(loaded, bytes):
        return loaded
    STATE.set(state_name)  # in this call's own task: its log records name the state
    if hold is not None:
        hold.append(loaded)
    try:
        fn, args, kwargs = loaded
        del loaded
        result = fn(*args, **kwargs)
        del fn, args, kwargs  # an out-of-band argument unmaps once its call is over
        if inspect.isawaitable(result):
            result = await result
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        return _dumps_error(state_name, exc)
    if hold is not None:
        hold.append(result)
    return dumps_result(state_name, result, large, keep_out)


async def _await(awaitable: Any) -> Any:
    return await awaitable


def dumps_result(state_name: str, result: object,
                 buffers: list[pickle.PickleBuffer] | None = None,
                 keep_out: Callable[[pickle.PickleBuffer], bool] | None = None) -> bytes:
    """The pickled outcome of a call that returned ``result``; never raises (a result that does
    not pickle becomes a SerializationError). With ``keep_out`` (a protocol 5 buffer_callback
    that appends to ``buffers``), large buffers may stay out of band, in ``buffers``."""
    try:  # the C pickler first: most results are plain data (and 5x faster than cloudpickle's)
        return pickle.dumps((_OK, result), protocol=pickle.HIGHEST_PROTOCOL,
                            buffer_callback=keep_out)
    except Exception:  # a lambda, a local class...: cloudpickle carries it
        if buffers:
            buffers.clear()
    except BaseException as exc:  # a __reduce__ that calls sys.exit(): the state fails
        return _unpicklable_result(state_name, result, exc, buffers)
    try:
        data = cloud_dumps((_OK, result), buffer_callback=keep_out)
        return data
    except BaseException as exc:  # whatever a __reduce__ raises only fails the state
        return _unpicklable_result(state_name, result, exc, buffers)


def _unpicklable_result(state_name: str, result: object, exc: BaseException,
                        buffers: list[pickle.PickleBuffer] | None) -> bytes:
    from statepool.engine.errors import SerializationError

    if buffers:
        buffers.clear()
    error = SerializationError(
        f"state {state_name!r} returned a {type_name(result)} that cannot be pickled back "
        f"to the parent process ({type(exc).__name__}: {safe_str(exc)})"
    )
    return _dumps_error(state_name, error, _format(exc))


def dumps_error(state_name: str, exc: BaseException) -> bytes:
    """The pickled outcome of a call that raised ``exc`` (see :func:`loads_outcome`)."""
    return _dumps_error(state_name, exc)


def _dumps_error(state_name: str, exc: BaseException, tb: str | None = None) -> bytes:
    if tb is None:
        tb = _format_safely(exc)
    if not isinstance(exc, Exception):
        exc = _crash_for(state_name, exc)
    exc.__traceback__ = None  # its frames may hold what does not pickle
    try:
        data = _dumps((_ERR, exc, tb))
        pickle.loads(data)  # an exception class with a custom __init__ may not rebuild
        return data
    except BaseException as pickling_exc:  # its __reduce__ may raise anything
        from statepool.engine.errors import SerializationError

        error = SerializationError(
            f"state {state_name!r} raised {type_name(exc)}({safe_str(exc)}), which cannot be "
            f"pickled back to the parent process ({type(pickling_exc).__name__}: "
            f"{safe_str(pickling_exc)})"
        )
        return _dumps((_ERR, error, tb))


def _format_safely(exc: BaseException) -> str:
    try:
        return _format(exc)
    except BaseException: # its __str__ raises: the frames still help
        lines = traceback.format_tb(exc.__traceback__)
        return "".join(lines) + f"{type_name(exc)}: <str() failed>\n"


def _crash_for(state_name: str, exc: BaseException) -> WorkerCrashedError:
    from statepool.engine.errors import WorkerCrashedError

    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
        return WorkerCrashedError(
            f"state {state_name!r} called sys.exit({exc.code!r}) in its worker process",
            state_name=state_name,
            exitcode=code or 0,
        )
    return WorkerCrashedError(
        f"state {state_name!r} raised {type_name(exc)} in its worker process",
        state_name=state_name,
    )


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


# -- parent side: the outcome ---------------------------------------------------------------


def loads_outcome(data: bytes | bytearray | memoryview,
                  buffers: list[memoryview] | None = None, state_name: str | None = None) -> Any:
    """The result carried by ``data`` (and its out-of-band ``buffers``), or raise its exception
    (``__cause__``: the worker's traceback). Whatever unpickling raises (``SystemExit`` from a
    ``__reduce__`` included) becomes a SerializationError naming ``state_name``."""
    try:
        outcome = pickle.loads(data, buffers=buffers)
    except BaseException as exc:  # only fails the state: it must not leave the event loop
        from statepool.engine.errors import SerializationError

        who = "a worker process" if state_name is None else f"state {state_name!r}"
        raise SerializationError(
            f"the outcome of {who} ({len(data)} bytes) cannot be unpickled here "
            f"({type(exc).__name__}: {safe_str(exc)})"
        ) from exc
    if outcome[0] == _OK:
        return outcome[1]
    raise remote_error(outcome)


def remote_error(outcome: tuple[Any, ...]) -> BaseException:
    """The exception of an unpickled outcome that is not ``OK``: the worker's traceback as its
    ``__cause__`` (a caller that unpickles outcomes itself, then checks ``outcome[0] == OK``)."""
    _, error, tb = outcome
    error.__cause__ = RemoteTraceback(tb)
    error.__suppress_context__ = True
    assert isinstance(error, BaseException)
    return error


def _loads_either(data: bytes, state_name: str) -> tuple[bool, Any]:
    """``(True, result)`` or ``(False, exception)`` of :func:`loads_outcome`: never raises, so
    a thread hands any outcome to the loop (asyncio refuses a ``StopIteration``)."""
    try:
        return True, loads_outcome(data, None, state_name)
    except BaseException as exc:
        return False, exc


class OffLoop:
    """A private one-thread pool that pickles and unpickles away from the event loop thread.

    ``dumps_call`` always runs on the thread (its size is unknown until it is done);
    ``loads_outcome`` runs inline up to ``INLINE_LOADS_LIMIT`` bytes. ``close()`` joins the
    thread; it is safe to call twice, and the pool restarts on next use.
    """

    def __init__(self, name: str = "statepool-pickle") -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None

    def _thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        return self._pool

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` on the private thread."""
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread_pool(), fn, *args)

    async def dumps_call(self, call: PreparedCall) -> bytes:
        return await self.run(dumps_call, call)

    async def loads_outcome(self, data: bytes, state_name: str = "?") -> Any:
        if len(data) <= INLINE_LOADS_LIMIT:
            ok, value = _loads_either(data, state_name)
        else:
            ok, value = await self.run(_loads_either, data, state_name)
        if ok:
            return value
        if isinstance(value, StopIteration):  # raised here it would end this coroutine
            raise RuntimeError(f"state {state_name!r} raised StopIteration") from value
        raise value

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
