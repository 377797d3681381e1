"""The parent side of one ``"aioprocess"`` child: start it, send it frames, read its answers.

A child's death shows as end of file on its socket (the kernel closes it when the process dies,
however it dies); :meth:`ChildHandle.serve`'s reader then reaps the process and reports its exit
code. Nothing polls while a child is healthy.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from statepool.engine.errors import WorkerCrashedError

from .._wire import faults
from .._wire.lifeline import kill_tree
from .._wire.remote import RemoteTraceback
from ..base import PreparedCall
from .child import HEADER, READY, RUN, START_FAILED, ChildProcess

__all__ = ["ChildHandle", "Job", "crash_error", "describe_exit"]

logger = logging.getLogger(__name__)

REAP_GRACE_S = 1.0  # after end of file, how long a child may take to exit before it is killed


@dataclass(eq=False)
class Job:
    """One call on its way through the executor (it may be sent again after a deliberate kill)."""

    tid: int
    call: PreparedCall
    payload: bytes
    kind: int = RUN  # RUN, or RUN_OOB when large buffers went into the file at ``path``
    path: str | None = None
    future: asyncio.Future[tuple[int, bytes]] | None = None
    child: ChildHandle | None = None
    abandoned: bool = False
    reruns: int = 0
    killer: asyncio.TimerHandle | None = None


def describe_exit(code: int | None) -> str:
    """``exited with code 1``, ``was killed by signal SIGSEGV (11)``."""
    if code is None:
        return "ended without an exit code"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by signal {signal.Signals(-code).name} ({-code})"
    except ValueError:
        return f"was killed by signal {-code}"


def crash_error(job: Job, child: ChildHandle, code: int | None,
                names: list[str], fault: str = "") -> WorkerCrashedError:
    """The error of a call whose child died; ``names``: the states the child held."""
    name = job.call.state_name
    message = (f"state {name!r} ({job.call.func_name}) failed: its aioprocess child "
               f"(pid {child.pid}) {describe_exit(code)}")
    if child.killed_for is not None:
        message += f" (killed {child.killed_for})"
    others = [other for other in names if other != name]
    if others:
        message += (f"; it also ran {', '.join(map(repr, others))}, which failed with it: "
                    "any of them may have caused it")
    message += fault  # a segfault's Python traceback (faulthandler)
    return WorkerCrashedError(message, state_name=name, exitcode=code)


def _why_not_started(exc: BaseException, code: int | None, told: str, timeout: float,
                     fault: str) -> str:
    """Why a child died before it was ready, as the end of the start error's message."""
    if told:  # it said so itself: its traceback's last lines
        return f" before it was ready:\n{told}"
    if fault:  # faulthandler's traceback of a fatal signal
        return f" before it was ready; its Python traceback (faulthandler):\n{fault}"
    if isinstance(exc, asyncio.TimeoutError):  # (not yet the builtin one on 3.10)
        return f" after it did not say it was ready within {timeout} s"
    if code is not None and code < 0:
        return " before it was ready"
    return (" before it could run statepool's code: multiprocessing could not prepare it "
            "(import the parent's __main__, or unpickle the child's set-up, such as its "
            "loop_initializer); its traceback is on this process's standard error")


FrameHandler = Callable[["ChildHandle", int, int, bytes, float], None]
LostHandler = Callable[["ChildHandle", "int | None"], None]


class ChildHandle:
    """One live child process, its socket and the jobs it holds."""

    def __init__(self, index: int, proc: ChildProcess, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.proc = proc
        self.pid: int = proc.pid or 0
        self.reader, self.writer = reader, writer
        self.in_flight: dict[int, Job] = {}
        self._outbox: list[bytes] = []
        self.reserved = 0  # slots handed to callers that have not sent their job yet
        self.killed_for: str | None = None  # why we killed it on purpose, if we did
        self.exitcode: int | None = None
        self.alive = True
        self._released = False  # proc.close() done: no more signals or exit-code polls
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(
        cls,
        index: int,
        *,
        timeout: float,
        initializer: Callable[..., None] | None,
        initargs: Sequence[Any],
        loop_initializer: Callable[..., asyncio.AbstractEventLoop] | None,
        env: dict[str, str] | None = None,
        directory: str = "",
        observe: dict[str, Any] | None = None,
        setup: bytes | None = None,
    ) -> ChildHandle:
        """Start a child and wait for its ``READY`` frame. ``observe``: the log relay's config
        and faulthandler's directory (_wire/logrelay.py, _wire/faults.py)."""
        parent_sock, child_sock = socket.socketpair()
        proc = ChildProcess(child_sock, name=f"statepool-aioprocess-{index}",
                            initializer=initializer, initargs=initargs,
                            loop_initializer=loop_initializer, env=env,
                            directory=directory, observe=observe, setup=setup)
        try:
            proc.start()  # Popen forks and writes the spawn data: about 1 ms
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        reader, writer = await asyncio.open_connection(sock=parent_sock)
        child = cls(index, proc, reader, writer)
        told = whole = ""  # what the child said before it died: its traceback
        try:
            header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
            kind, _, size, _ = HEADER.unpack(header)
            if kind == START_FAILED:
                body = await asyncio.wait_for(reader.readexactly(size), timeout)
                told, _, whole = body.decode("utf-8", "replace").partition("\0")
                raise ConnectionError("the child failed before it was ready")
            if kind != READY:
                raise ConnectionError(f"unexpected frame {kind} before READY")
        except BaseException as exc:
            if not told:  # (one that told us why exits by itself)
                child.kill("it did not start")
            code = await child.reap()
            child.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = _why_not_started(exc, code, told, timeout,
                                   faults.read((observe or {}).get("faults"), child.pid))
            error = WorkerCrashedError(
                f"aioprocess child {index} (pid {child.pid}) failed to start: it "
                f"{describe_exit(code)}{why}", exitcode=code)
            raise error from (RemoteTraceback(whole) if whole else exc)
        return child

    @property
    def usable(self) -> bool:
        """Alive and not being killed: it may take new calls."""
        return self.alive and self.killed_for is None

    def serve(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        """Read frames until end of file, then reap the process and call ``on_lost``."""
        self._task = asyncio.create_task(self._read_loop(on_frame, on_lost),
                                         name=f"statepool-aioprocess-reader-{self.pid}")

    async def _read_loop(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        reader = self.reader
        try:
            while True:
                kind, tid, size, seconds = HEADER.unpack(await reader.readexactly(HEADER.size))
                body = await reader.readexactly(size) if size else b""
                try:
                    on_frame(self, kind, tid, body, seconds)
                except Exception:  # a bug of ours must not stop the reader: the jobs would hang
                    logger.exception("aioprocess: failed to handle frame %d of child %d",
                                     kind, self.pid)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.alive = False
        code = await self.reap()
        self.close()
        on_lost(self, code)

    def send(self, data: bytes) -> None:
        """Queue a frame; the frames queued in one loop iteration leave in one write."""
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and self.alive and not self.writer.is_closing():
            self.writer.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def kill(self, reason: str) -> None:
        """SIGKILL the child (idempotent); its reader then reports it lost."""
        if self.killed_for is None:
            self.killed_for = reason
        if not self._released and self.proc.exitcode is None:
            kill_tree(self.pid)  # with what its states started (it is their subreaper)

    def end_input(self) -> None:
        """Close our sending side: the child finishes what it runs, then exits."""
        self._flush()
        if not self.writer.is_closing():
            self.writer.write_eof()

    async def reap(self) -> int | None:
        """Wait for the process to exit (killing it past ``REAP_GRACE_S``); its exit code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REAP_GRACE_S
        delay = 0.0005
        while (code := self._poll()) is None:
            if loop.time() > deadline:
                self.kill("it closed its socket but did not exit")
                deadline = loop.time() + REAP_GRACE_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        self.exitcode = code
        return code

    def _poll(self) -> int | None:
        code: int | None = self.proc.exitcode
        return code

    async def wait_closed(self, timeout: float) -> None:
        """Wait until the child is gone and reaped, killing it past ``timeout``; bounded even
        when a process it left behind holds its socket open."""
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            self.kill("it did not stop in time")
            done, _ = await asyncio.wait({self._task}, timeout=REAP_GRACE_S)
        if not done:
            self.check()  # dead, but its socket is held open elsewhere: end the reader
            await asyncio.wait({self._task}, timeout=2 * REAP_GRACE_S)

    def check(self) -> None:
        """A child that died while a process it started holds its socket open gives no end
        of file: when the process is gone, end the reader (which reports it lost)."""
        if self.alive and not self._released and self.proc.exitcode is not None:
            self.writer.close()
            self.reader.feed_eof()

    def close(self) -> None:
        self.alive = False
        self.writer.close()
        if not self._released and self.proc.exitcode is not None:
            self._released = True
            self.proc.close()

    def __repr__(self) -> str:
        state = "alive" if self.alive else describe_exit(self.exitcode)
        return f"<ChildHandle {self.index} pid={self.pid} {state} jobs={len(self.in_flight)}>"
