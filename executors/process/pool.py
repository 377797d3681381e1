"""The parent side of one ``"process"`` worker: start it, write its frames, read its answers,
notice its death.

A worker is a fresh interpreter started by loky's process backend (``get_context("loky")``:
fork + exec, safe with threads) that runs ``_loky_worker.worker_main`` on one end of a
socketpair. Starting one blocks for a few milliseconds, so :meth:`Worker.spawn` runs on the
executor's helper thread; everything else runs on the event loop thread, without blocking:
the socket is non-blocking, read with ``add_reader`` (every frame that arrived is handled in
one go) and written directly, the rest of a frame that does not fit waiting for
``add_writer``. The process's sentinel (a pipe the kernel closes when it exits, however it
exits) tells its death; what it sent before dying is still read, then it is reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import runpy
import signal
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from loky.backend.context import get_context

from .._wire import lifeline
from .._wire.lifeline import kill_tree
from . import boot
from .batch import Batch, Job
from .worker import FRAME, STOP, SlotTable

__all__ = ["Frame", "Worker", "describe_exit", "kill_tree"]

Frame = tuple[int, int, int, int, float, bytes | bytearray]  # kind, number, count, meta length,
#                                                          seconds, body (meta first)
_CHUNK = 256 * 1024  # bytes read at most per readable event (a big body: 4 MiB)
_BIG = 1 << 20  # a body this large is read into its own buffer
_REAP_GRACE_S = 1.0  # a worker that closed its socket and lives on this long is killed
_BOOT = boot.__file__  # the worker's first code (see boot)


class _Slot:
    """A frame's place in the write queue (filled later when it is pickled off the loop)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[bytes] | None) -> None:
        self.parts = parts


class Worker:
    """One worker process, its socket, the batches and calls it holds."""

    def __init__(self, index: int, base: int, ring: int, process: Any,
                 sock: socket.socket) -> None:
        self.index = index
        self.base = base  # its slots in the table: base .. base + ring - 1
        self.ring = ring
        self.process = process
        self.pid: int = process.pid
        self.sock = sock
        self.ready = False  # it said READY
        self.leaving = False  # it said BYE (recycling), or was told to STOP
        self.alive = True  # not seen dead yet
        self.killed_for: str | None = None
        self.exitcode: int | None = None
        self.seq = 0  # the next call's sequence number
        self.jobs: dict[int, Job] = {}  # sequence number -> call sent and not answered
        self.batches: deque[Batch] = deque()  # in the order sent
        self.exited: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_frames: Callable[[Worker, list[Frame]], None] | None = None
        self._on_exit: Callable[[Worker], None] | None = None
        self._out: deque[_Slot] = deque()
        self._sending: memoryview | None = None  # the rest of the part being written
        self._writing = False  # waiting for the socket to take more
        self._buf = bytearray()
        self._scratch = bytearray(_CHUNK)  # recv() would allocate (and map) _CHUNK every time
        self._scratch_view = memoryview(self._scratch)
        self._big: tuple[int, int, int, int, float, bytearray, int] | None = None
        self._reap_timer: asyncio.TimerHandle | None = None
        self._reap_deadline = 0.0

    # -- start ------------------------------------------------------------------------------

    @classmethod
    def spawn(cls, index: int, base: int, ring: int, table: SlotTable,
              max_tasks: int | None, max_memory: int | None,
              pycache: str | None = None, env: dict[str, str] | None = None,
              observe: dict[str, Any] | None = None,
              setup: bytes | None = None) -> Worker:
        """Start a worker process (blocks a few ms: helper thread only); ``env`` is added to
        its environment (the thread limits of ``_wire.threads``); ``observe``: the log relay's
        config and faulthandler's directory (_wire/logrelay.py, _wire/faults.py)."""
        parent, child = socket.socketpair()
        args = (child, table.path, table.nslots, base, ring, max_tasks, max_memory, os.getpid(),
                setup, lifeline.anchor())
        try:
            process = get_context("loky").Process(  # boot runs worker_main(*args)
                target=runpy.run_path, name=f"statepool-process-{index}", args=(_BOOT,),
                kwargs={"init_globals": {"ARGS": args, "PYCACHE": pycache, "OBSERVE": observe},
                        "run_name": boot.RUN_NAME}, env=env)
            process.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        return cls(index, base, ring, process, parent)

    def attach(self, loop: asyncio.AbstractEventLoop,
               on_frames: Callable[[Worker, list[Frame]], None],
               on_exit: Callable[[Worker], None]) -> None:
        """Start reading (loop thread)."""
        self._loop = loop
        self._on_frames, self._on_exit = on_frames, on_exit
        self.exited = loop.create_future()
        loop.add_reader(self.sock.fileno(), self._readable)
        loop.add_reader(self.process.sentinel, self.died)

    @property
    def usable(self) -> bool:
        """It may take new calls (once it is ready)."""
        return self.alive and not self.leaving and self.killed_for is None

    # -- writing ----------------------------------------------------------------------------

    def reserve(self) -> _Slot:
        """A place for a frame in the write queue, to :meth:`fill` later."""
        slot = _Slot(None)
        self._out.append(slot)
        return slot

    def send(self, parts: list[bytes]) -> None:
        self._out.append(_Slot(parts))
        self._flush()

    def fill(self, slot: _Slot, parts: list[bytes]) -> None:
        slot.parts = parts
        self._flush()

    def _flush(self) -> None:
        if not self.alive or self._loop is None:
            self._out.clear()
            self._sending = None
            return
        while True:
            view = self._sending
            if view is None:
                view = self._next_part()
                if view is None:
                    break
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # it died: the sentinel says so
                self._out.clear()
                self._sending = None
                break
            if sent < view.nbytes:
                self._sending = view[sent:]
                self._want_write(True)
                return
            self._sending = None
        self._want_write(False)

    def _next_part(self) -> memoryview | None:
        out = self._out
        while out:
            parts = out[0].parts
            if parts is None:  # still being pickled: what follows waits for it
                return None
            if not parts:
                out.popleft()
                continue
            part = parts.pop(0)
            if not parts:
                out.popleft()
            return memoryview(part)
        return None

    def _want_write(self, on: bool) -> None:
        if on is not self._writing:
            assert self._loop is not None
            if on:
                self._loop.add_writer(self.sock.fileno(), self._flush)
            else:
                self._loop.remove_writer(self.sock.fileno())
            self._writing = on

    def stop(self) -> None:
        """Ask it to exit once it has run what it holds."""
        self.leaving = True
        self.send([FRAME.pack(STOP, 0, 0, 0, 0, 0.0)])

    # -- reading ----------------------------------------------------------------------------

    def _readable(self) -> None:
        frames = self._read()
        if frames:
            assert self._on_frames is not None
            self._on_frames(self, frames)

    def _read(self) -> list[Frame] | None:
        """The frames completed by one read; ``None`` when there was nothing to read."""
        big = self._big
        try:
            if big is not None:
                kind, seq, count, aux, seconds, body, got = big
                with memoryview(body) as view:
                    n = self.sock.recv_into(view[got:got + 16 * _CHUNK])
                if not n:
                    self._eof()
                    return None
                got += n
                if got < len(body):
                    self._big = (kind, seq, count, aux, seconds, body, got)
                    return []
                self._big = None
                return [(kind, seq, count, aux, seconds, body)]
            n = self.sock.recv_into(self._scratch)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            n = 0
        if not n:
            self._eof()
            return None
        buf = self._buf
        buf += self._scratch_view[:n]
        frames: list[Frame] = []
        pos, end = 0, len(buf)
        while end - pos >= FRAME.size:
            kind, seq, count, aux, size, seconds = FRAME.unpack_from(buf, pos)
            start = pos + FRAME.size
            if end - start < size:
                if size >= _BIG:  # read the rest straight into its own buffer
                    body = bytearray(size)
                    body[:end - start] = buf[start:end]
                    self._big = (kind, seq, count, aux, seconds, body, end - start)
                    pos = end
                break
            frames.append((kind, seq, count, aux, seconds, buf[start:start + size]))
            pos = start + size
        del buf[:pos]
        return frames

    def _eof(self) -> None:
        """It closed its socket: it is exiting. Its sentinel will say when it is gone."""
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.sock.fileno())
        if self._reap_timer is None and self.alive:
            self._reap_timer = loop.call_later(_REAP_GRACE_S, self.kill, "it did not exit")

    # -- death ------------------------------------------------------------------------------

    def died(self) -> None:
        """It exited (its sentinel says so, or a poll found it reaped): read what it sent
        before, reap it, report it."""
        loop = self._loop
        assert loop is not None
        loop.remove_reader(self.process.sentinel)
        if self.alive:
            self.alive = False
            frames: list[Frame] = []
            while (more := self._read()) is not None:  # what it sent before it died
                frames += more
            if frames and self._on_frames is not None:
                self._on_frames(self, frames)
        self._reap_deadline = loop.time() + _REAP_GRACE_S
        self._reap()

    def _reap(self) -> None:
        """Wait (without blocking) until the process can be reaped, then close up."""
        code = self.process.exitcode  # waitpid(WNOHANG)
        loop = self._loop
        assert loop is not None
        if code is None:
            if loop.time() > self._reap_deadline:
                self.kill("it did not exit")
                self._reap_deadline = float("inf")
            loop.call_later(0.001, self._reap)
            return
        self.exitcode = code
        self.process.join(0)
        self.close()
        if self._on_exit is not None:
            self._on_exit(self)
        if self.exited is not None and not self.exited.done():
            self.exited.set_result(None)

    def kill(self, reason: str) -> None:
        """SIGKILL it (and what it started); its sentinel then reports it lost."""
        if self.killed_for is None:
            self.killed_for = reason
        if self.exitcode is None:
            kill_tree(self.pid)

    def close(self) -> None:
        """Release the socket and the readers (the process is reaped)."""
        self.alive = False
        loop = self._loop
        if self._reap_timer is not None:
            self._reap_timer.cancel()
            self._reap_timer = None
        if loop is not None and self.sock.fileno() >= 0:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.sock.fileno())
            if self._writing:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_writer(self.sock.fileno())
                self._writing = False
        self._sending = None
        self._out.clear()
        self.sock.close()
        # a handle kept by the caller may hold this object (through its error's traceback):
        # let it hold no descriptor and no buffer
        self._scratch_view.release()
        self._scratch = bytearray()
        self._scratch_view = memoryview(self._scratch)
        self._buf = bytearray()
        self._big = None

    def __repr__(self) -> str:
        state = ("alive" if self.alive else describe_exit(self.exitcode)
                 if self.exitcode is not None else "dying")
        return (f"<Worker {self.index} pid={self.pid} {state} calls={len(self.jobs)} "
                f"batches={len(self.batches)}>")


def describe_exit(exitcode: int) -> str:
    """``exit code 3``, ``signal SIGSEGV (-11): a segmentation fault``..."""
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"
    hint = _SIGNAL_HINTS.get(name, "")
    return f"signal {name} ({exitcode}){hint}"


_SIGNAL_HINTS = {
    "SIGKILL": ": killed from outside, or by the out-of-memory killer",
    "SIGSEGV": ": a segmentation fault",
    "SIGBUS": ": a bus error",
    "SIGABRT": ": aborted",
    "SIGTERM": ": terminated from outside",
}
