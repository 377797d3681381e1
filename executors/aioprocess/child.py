"""The child side of ``"aioprocess"``: the frames on the wire and the loop every child runs.

Parent and child talk over one socketpair. A frame is a header ``(kind, task id, length,
seconds)`` and ``length`` bytes. The parent sends ``RUN`` (a ``dumps_call`` payload) and
``CANCEL``; the child sends ``READY`` once (its PID as the id), then ``DONE`` (a pickled outcome,
with the seconds the call ran here) or ``CANCELLED`` (the task ended on a cancellation) for each
``RUN``. End of file from the parent means stop. A child that fails before it is ready sends
``START_FAILED`` (its traceback) instead of ``READY``, then exits.

A call's function, arguments and result are released only once its outcome has left for the
kernel (as on ``"process"`` and in loky): an argument whose ``__del__`` kills the child cannot lose
a result that was computed.

Large buffers (numpy arrays, ``bytes``, ``bytearray`` of ``shm.OOB_MIN`` bytes or more) travel
out of band as on ``"process"`` (``_wire.shm``): written into a file of the executor's private
directory, which the other side maps copy-on-write. ``RUN_OOB`` and ``DONE_OOB`` frames carry
``meta`` (naming that file) ahead of the payload: ``(meta length: u32, meta, payload)``.

The child is aiomultiprocess's ``Process`` (its start method, event loop set-up, ``initializer``
and ``loop_initializer``) running :func:`child_main`, a module-level coroutine: cloudpickled bytes
travel through it, so lambdas and closures work where aiomultiprocess's plain pickle hangs.
"""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import aiomultiprocess
from aiomultiprocess.core import get_context
from aiomultiprocess.types import Unit

from .._wire import faults, initializer, lifeline, logrelay, shm
from .._wire.remote import dumps_error, run_pickled_async
from .._wire.threads import apply_loaded, set_here

__all__ = [
    "CANCEL",
    "CANCELLED",
    "DONE",
    "DONE_OOB",
    "HEADER",
    "META",
    "READY",
    "RUN",
    "RUN_OOB",
    "START_FAILED",
    "ChildProcess",
    "child_bootstrap",
    "child_init",
    "child_main",
    "frame",
    "last_lines",
    "not_started",
]

HEADER = struct.Struct("!BQQd")
RUN, CANCEL, READY, DONE, CANCELLED, RUN_OOB, DONE_OOB, START_FAILED = 1, 2, 3, 4, 5, 6, 7, 8
META = struct.Struct("!I")  # the meta length at the head of a RUN_OOB / DONE_OOB body


def unstartable_main() -> str | None:
    """Why no child can start here, or ``None``: under the ``spawn`` and ``forkserver`` start
    methods a child imports the parent's ``__main__`` from its file, and a script read from
    stdin (``python - < script.py``) has no file; each child would die printing a traceback."""
    import sys

    method = get_context().get_start_method()
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if method == "fork" or getattr(main, "__spec__", None) is not None or path is None \
            or os.path.exists(path):
        return None
    return (f"aioprocess children start with multiprocessing's {method!r} method, which imports "
            f"the parent's __main__ from its file, and __main__ here is {path!r}, which is not a "
            "file (a script read from stdin?): run the script from a file, or as a module")


def frame(kind: int, tid: int, body: bytes = b"", seconds: float = 0.0) -> bytes:
    """One frame: the header, then the body; ``seconds``: how long a call ran (``DONE``)."""
    return HEADER.pack(kind, tid, len(body), seconds) + body


class ChildProcess(aiomultiprocess.Process):  # type: ignore[misc]
    """aiomultiprocess's ``Process`` running :func:`child_main` on one end of a socketpair.

    ``Process.__init__`` is skipped on purpose: it creates a ``Namespace`` on aiomultiprocess's
    shared manager, which would start a manager process that only ``Worker`` results need.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        initializer: Callable[..., None] | None = None,
        initargs: Sequence[Any] = (),
        loop_initializer: Callable[..., asyncio.AbstractEventLoop] | None = None,
        env: dict[str, str] | None = None,
        directory: str = "",
        observe: dict[str, Any] | None = None,
        setup: bytes | None = None,
    ) -> None:
        self.unit = Unit(
            target=child_main,
            args=(sock, os.getpid(), directory),
            kwargs={"observe": observe, "setup": setup, "anchor": lifeline.anchor()},
            namespace=None,
            initializer=child_init,
            initargs=(env or {}, initializer, tuple(initargs)),
            loop_initializer=loop_initializer,
        )
        self.aio_process = get_context().Process(
            target=child_bootstrap, args=(self.unit,), name=name, daemon=True
        )


def child_bootstrap(unit: Unit) -> Any:
    """The child's first code: aiomultiprocess's ``run_async`` (its loop set-up, initializer,
    then :func:`child_main`). What fails before the child is ready (its ``loop_initializer``,
    the initializer's module at import...) is told to the parent, which says why it could not
    start, once; the child then exits with code 1 without printing it again."""
    sock = unit.args[0]

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except BaseException as exc:
                not_started(sock, exc)

        return run

    unit = unit._replace(
        initializer=guarded(unit.initializer) if unit.initializer is not None else None,
        loop_initializer=guarded(unit.loop_initializer)
        if unit.loop_initializer is not None else None)
    return aiomultiprocess.Process.run_async(unit)


def not_started(sock: socket.socket, exc: BaseException) -> NoReturn:
    """Tell the parent why this child cannot start (``START_FAILED``: the last lines of the
    traceback, a NUL, the whole traceback), then exit."""
    import contextlib
    import traceback

    with contextlib.suppress(BaseException):
        try:
            whole = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except Exception:
            whole = ""
        sock.setblocking(True)
        sock.sendall(frame(START_FAILED, os.getpid(),
                           f"{last_lines(exc)}\0{whole}".encode("utf-8", "replace")))
    os._exit(1)


def last_lines(exc: BaseException, limit: int = 2000) -> str:
    """The last lines of ``exc``'s traceback: where it was raised, and what it says."""
    import traceback

    try:
        info = traceback.TracebackException.from_exception(exc)
        lines: list[str] = []
        if info.stack:
            where = info.stack[-1]
            lines.append(f'File "{where.filename}", line {where.lineno}, in {where.name}')
            if where.line:
                lines.append(f"  {where.line.strip()}")
        lines.extend(line.rstrip("\n") for line in info.format_exception_only())
        text = "\n".join(lines)
    except Exception:  # an exception whose __str__ raises...
        text = type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def child_init(env: dict[str, str], initializer: Callable[..., None] | None,
               initargs: tuple[Any, ...]) -> None:
    """The child's first step: the thread limits (``_wire.threads``; multiprocessing starts a
    child with the parent's environment and nothing more), then the user's initializer, then
    the limits again on what that loaded."""
    if env:
        set_here(env)
    if initializer is not None:
        initializer(*initargs)
        if env:
            apply_loaded()


async def child_main(sock: socket.socket, parent: int | None = None,
                     directory: str = "", observe: dict[str, Any] | None = None,
                     setup: bytes | None = None, anchor: socket.socket | None = None) -> None:
    """Run every ``RUN`` frame as a task of this loop until the parent closes the socket;
    ``directory``: where out-of-band buffers go (none when empty); ``observe``: the log relay
    and faulthandler's file (_wire/logrelay.py, _wire/faults.py); ``setup``: the pickled
    initializer (``_wire.initializer``), awaited before the child says it is ready;
    ``anchor``: the parent's (``_wire.lifeline``)."""
    try:
        if parent is not None:
            lifeline.arm(parent, watch=anchor)  # never outlive the parent (nor its states')
        if observe:  # the parent's log relay and faulthandler's file
            logrelay.install(observe.get("log"))
            faults.install(observe.get("faults"))
        init = initializer.Setup.loads(setup) if setup is not None else None
        broken = await initializer.run_async(init) if init is not None else None
        if init is not None:
            apply_loaded()  # the thread limits again, on what the initializer loaded
        reader, writer = await asyncio.open_connection(sock=sock)
    except BaseException as exc:  # (what the initializer raises is kept in ``broken``)
        not_started(sock, exc)
    writer.write(frame(READY, os.getpid()))
    outbox = _Outbox(writer)
    tasks: dict[int, asyncio.Task[None]] = {}
    try:
        while True:
            try:
                kind, tid, size, _ = HEADER.unpack(await reader.readexactly(HEADER.size))
                body = await reader.readexactly(size) if size else b""
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if kind in (RUN, RUN_OOB) and broken is not None and init is not None:
                outbox.send(frame(DONE, tid, _refused(body, kind == RUN_OOB, init, broken)))
            elif kind in (RUN, RUN_OOB):
                task = asyncio.create_task(_run(outbox, tid, body, kind == RUN_OOB, directory))
                tasks[tid] = task
                task.add_done_callback(functools.partial(_report, outbox, tasks, tid))
            elif kind == CANCEL and tid in tasks:
                tasks[tid].cancel()
    finally:
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        outbox.flush()
        writer.close()


async def _run(outbox: _Outbox, tid: int, body: bytes, oob: bool, directory: str) -> None:
    """One call, answered on ``outbox``: ``DONE`` (the outcome), or ``DONE_OOB`` (meta length +
    meta + outcome) when the result's large buffers went into a file of ``directory``; the
    call and its result are released once the answer has left (:meth:`_Outbox.send`)."""
    began = time.perf_counter()
    hold: list[Any] = []
    try:
        kind, answer = await _outcome(body, oob, directory, hold)
        outbox.send(frame(kind, tid, answer, time.perf_counter() - began), hold)
    finally:
        del hold  # (the outbox holds it now, unless the call was cancelled)


async def _outcome(body: bytes, oob: bool, directory: str,
                   hold: list[Any]) -> tuple[int, bytes]:
    buffers = None
    if oob:
        size = META.unpack_from(body)[0]
        meta, body = body[META.size:META.size + size], body[META.size + size:]
        try:
            buffers = shm.map_buffers(meta)
        except BaseException as exc:  # its file is gone: the parent gave up on the call
            return DONE, dumps_error("?", exc)
    if not directory:
        return DONE, await run_pickled_async(body, buffers, hold=hold)
    large: list[pickle.PickleBuffer] = []
    outcome = await run_pickled_async(body, buffers, large, shm.keep_out(large), hold=hold)
    if not large:
        return DONE, outcome
    meta, outcome = shm.write_out(large, directory, pickle.loads(body), outcome)
    return (DONE_OOB, META.pack(len(meta)) + meta + outcome) if meta else (DONE, outcome)


def _refused(body: bytes, oob: bool, init: initializer.Setup, broken: BaseException) -> bytes:
    """The outcome of a call given to a child whose initializer raised."""
    if oob:
        size = META.unpack_from(body)[0]
        body = body[META.size + size:]
    try:
        name = str(pickle.loads(body))  # the state's name, pickled ahead of the call
    except BaseException:
        name = "?"
    return dumps_error(name, initializer.failed(init, broken, name,
                                                f"its child process {os.getpid()}"))


def _report(outbox: _Outbox, tasks: dict[int, asyncio.Task[None]], tid: int,
            task: asyncio.Task[None]) -> None:
    tasks.pop(tid, None)
    if task.cancelled():
        outbox.send(frame(CANCELLED, tid))
    elif (exc := task.exception()) is not None:  # a bug of ours: answer, or the state hangs
        outbox.send(frame(DONE, tid, dumps_error("?", exc)))


class _Outbox:
    """Frames sent in one loop iteration leave in one write; what a frame's call held is
    released once the frame has left for the kernel (the transport's buffer is empty)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.frames: list[bytes] = []
        self.held: list[Any] = []  # the calls of the frames not yet written
        self.unsent: list[Any] = []  # written, still in the transport's buffer
        self.draining: asyncio.Task[None] | None = None
        writer.transport.set_write_buffer_limits(0)  # drain() returns once all has left

    def send(self, data: bytes, held: Any = None) -> None:
        if not self.frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self.frames.append(data)
        if held is not None:
            self.held.append(held)

    def flush(self) -> None:
        frames, self.frames = self.frames, []
        held, self.held = self.held, []
        writer = self.writer
        if frames and not writer.is_closing():
            writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if held and writer.transport.get_write_buffer_size() and not writer.is_closing():
            self.unsent.append(held)  # released once the buffer is empty
            if self.draining is None:
                self.draining = asyncio.get_running_loop().create_task(self._drain())
        del held

    async def _drain(self) -> None:
        try:
            while self.unsent:
                unsent, self.unsent = self.unsent, []
                await self.writer.drain()
                del unsent
        except ConnectionError:
            self.unsent.clear()
        finally:
            self.draining = None
