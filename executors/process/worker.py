"""What runs inside a worker process of the ``"process"`` executor, and what it shares with the
parent: the frames on its socket and the slot table.

Each worker is a fresh interpreter started by loky's process backend (fork + exec) with one end
of a socketpair. The parent sends ``BATCH`` frames: one or more pickled calls, each with a
*sequence number*. The worker runs them in order and answers each with its own ``DONE`` frame
(the pickled outcome and how long the call took, sending included), sent as soon as the call
ends, so a result that reached the parent is never lost when the worker dies later.

The slot table is an mmap'd temporary file (nothing lands in ``/dev/shm``) with two int64 cells
per sequence number modulo the worker's ring of slots: its *state*, written by the worker
(``RUNNING`` just before the call, ``FINISHED`` once its ``DONE`` frame is sent, ``SKIPPED``)
and its *cancel* flag, written by the parent. A call whose flag is set before it starts is
skipped (``SKIP``); the parent kills the worker of a cancelled call that is ``RUNNING``. When a
worker dies, the states tell the parent which call it was running (the one to blame) and which
calls of its batches never started (to run elsewhere).

Recycling (``max_tasks_per_worker``, ``max_memory``) is decided here, between two calls: the
worker sends ``BYE`` and exits with 0; the calls it had not started go back in line.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import signal
import socket
import struct
import time
import weakref
from typing import Any

from .._wire import initializer, lifeline
from .._wire.remote import dumps_error, run_call, unloadable_call
from .._wire.shm import keep_out, map_buffers, write_out
from .._wire.threads import apply_loaded

__all__ = [
    "BAD",
    "BATCH",
    "BYE",
    "DONE",
    "FINISHED",
    "FRAME",
    "IDLE",
    "READY",
    "RUNNING",
    "SKIP",
    "SKIPPED",
    "STOP",
    "SlotTable",
    "load_batch",
    "worker_main",
]

#: kind, sequence number, count, meta length, body length, seconds
FRAME = struct.Struct("<BIIIQd")
BATCH, STOP = 1, 2  # parent -> worker
READY, DONE, SKIP, BAD, BYE = 10, 11, 12, 13, 14  # worker -> parent
IDLE, RUNNING, FINISHED, SKIPPED = 0, 1, 2, 3  # slot states

_ITEM = 8  # bytes per cell: one int64
_INLINE_SEND = 64 * 1024  # an outcome up to this size leaves with its header in one write
_MEMORY_CHECK_S = 0.05  # RSS is read at most this often while calls are short


class SlotTable:
    """``nslots`` states and ``nslots`` cancel flags (int64) shared through an mmap'd file."""

    def __init__(self, path: str, nslots: int, *, owner: bool) -> None:
        self.path = path
        self.nslots = nslots
        fd = os.open(path, os.O_RDWR)
        try:
            if owner:
                os.ftruncate(fd, 2 * nslots * _ITEM)
            self._mmap = mmap.mmap(fd, 2 * nslots * _ITEM)
        finally:
            os.close(fd)
        view = memoryview(self._mmap).cast("q")
        self._view: memoryview | None = view
        self.states = view[:nslots]
        self.cancels = view[nslots:]
        self._zeros = memoryview(bytearray(nslots * _ITEM)).cast("q")
        self._unlink = weakref.finalize(self, _unlink, path) if owner else None

    @classmethod
    def create(cls, nslots: int, directory: str) -> SlotTable:
        """A new table in a fresh file of ``directory``, removed by ``close()``."""
        fd = os.open(os.path.join(directory, "slots"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        return cls(os.path.join(directory, "slots"), nslots, owner=True)

    def reset(self, slot: int) -> None:
        self.states[slot] = IDLE
        self.cancels[slot] = 0

    def reset_range(self, base: int, ring: int, start: int, count: int) -> None:
        """:meth:`reset` the ``count`` slots from ``base + start`` on, in a ring of ``ring``
        slots from ``base`` (two slice writes at most)."""
        zeros = self._zeros
        while count > 0:
            n = min(count, ring - start)
            low = base + start
            self.states[low:low + n] = zeros[:n]
            self.cancels[low:low + n] = zeros[:n]
            count -= n
            start = 0

    def close(self) -> None:
        """Unmap (and, for the owner, remove the file). Safe to call twice."""
        view, self._view = self._view, None
        if view is not None:
            self.states.release()
            self.cancels.release()
            view.release()
            self._mmap.close()
        if self._unlink is not None:
            self._unlink()

    def __repr__(self) -> str:
        return f"<SlotTable {self.path} {self.nslots} slots>"


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def load_batch(body: bytes | bytearray, meta: bytes | bytearray) -> list[Any]:
    """The calls of a ``BATCH`` body; ``meta`` (when not empty) names the file that holds its
    out-of-band buffers, mapped copy-on-write: the worker reads them without a copy."""
    calls: list[Any] = pickle.loads(body, buffers=map_buffers(meta) if meta else None)
    return calls


# -- in the worker --------------------------------------------------------------------------


class _Reader:
    """Frames from a blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.scratch = memoryview(bytearray(256 * 1024))  # recv() would allocate it every time

    def _fill(self, need: int) -> bool:
        buf = self.buf
        while len(buf) < need:
            if need - len(buf) > self.scratch.nbytes:  # a large body: straight into place
                start = len(buf)
                buf.extend(bytes(need - start))
                with memoryview(buf) as view:
                    while start < need:
                        n = self.sock.recv_into(view[start:need])
                        if not n:
                            return False
                        start += n
                return True
            n = self.sock.recv_into(self.scratch)
            if not n:
                return False
            buf += self.scratch[:n]
        return True

    def frame(self) -> tuple[int, int, int, bytearray, bytearray] | None:
        if not self._fill(FRAME.size):
            return None
        kind, seq, count, meta_len, body_len, _ = FRAME.unpack_from(self.buf)
        end = FRAME.size + body_len
        if not self._fill(end):
            return None
        meta = self.buf[FRAME.size:FRAME.size + meta_len]
        body = self.buf[FRAME.size + meta_len:end]
        del self.buf[:end]
        return kind, seq, count, meta, body


def worker_main(sock: socket.socket, table_path: str, nslots: int, base: int, ring: int,
                max_tasks: int | None, max_memory: int | None, parent: int | None = None,
                setup: bytes | None = None, anchor: socket.socket | None = None) -> None:
    """Serve ``BATCH`` frames until ``STOP``, end of file, or a recycling. ``setup``: the
    pickled initializer, run before the first call (``_wire.initializer``); ``anchor``: the
    parent's (``_wire.lifeline``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    if parent is not None:
        lifeline.arm(parent, watch=anchor)  # never outlive the parent (nor what states start)
    sock.setblocking(True)
    table = SlotTable(table_path, nslots, owner=False)
    states, cancels = table.states, table.cancels
    send = sock.sendall
    apply_loaded()  # the thread limits, for libraries loaded already (after an initializer)
    send(FRAME.pack(READY, os.getpid(), 0, 0, 0, 0.0))
    reader = _Reader(sock)
    directory = os.path.dirname(table_path)
    large: list[pickle.PickleBuffer] = []
    keep = keep_out(large)
    done = 0
    checked = time.perf_counter()
    init: initializer.Setup | None = None
    broken: BaseException | None = None
    while (frame := reader.frame()) is not None:
        kind, seq, count, meta, body = frame
        if kind != BATCH:
            break
        try:
            calls = load_batch(body, meta)
        except BaseException as exc:  # reported to the parent, which names the state
            error = dumps_error("?", unloadable_call(None, exc))
            send(FRAME.pack(BAD, seq, count, 0, len(error), 0.0) + error)
            continue
        del body, meta, frame
        for i in range(count):
            number = (seq + i) & 0xFFFFFFFF
            slot = base + number % ring
            if cancels[slot] or calls[i] is None:  # cancelled, or it did not pickle
                states[slot] = SKIPPED
                calls[i] = None
                send(FRAME.pack(SKIP, number, 0, 0, 0, 0.0))
                continue
            if setup is not None:  # the first call: the initializer first, once
                init, setup = initializer.Setup.loads(setup), None
                broken = initializer.run(init)
                apply_loaded()  # the thread limits again, on what the initializer loaded
            states[slot] = RUNNING
            began = time.perf_counter()
            name, fn, args, kwargs = calls[i]
            calls[i] = None
            if broken is not None and init is not None:
                outcome = dumps_error(name, initializer.failed(
                    init, broken, name, f"its worker process {os.getpid()}"))
            else:
                outcome = run_call(name, fn, args, kwargs, large, keep)
            extra = b""
            if large:  # the result's large buffers go out of band too
                extra, outcome = write_out(large, directory, name, outcome)
            elapsed = time.perf_counter() - began
            head = FRAME.pack(DONE, number, 0, len(extra), len(extra) + len(outcome), elapsed)
            if len(outcome) <= _INLINE_SEND:
                send(head + extra + outcome)
            else:
                send(head + extra)
                send(outcome)
            states[slot] = FINISHED
            # the arguments go only now (an out-of-band one unmaps): a __del__ that kills this
            # worker cannot lose a result that was computed, as in loky
            del fn, args, kwargs
            done += 1
            if _should_leave(done, max_tasks, max_memory, elapsed, checked):
                send(FRAME.pack(BYE, number, 0, 0, 0, 0.0))
                return
            if max_memory is not None and time.perf_counter() - checked > _MEMORY_CHECK_S:
                checked = time.perf_counter()
    sock.close()


def _should_leave(done: int, max_tasks: int | None, max_memory: int | None, elapsed: float,
                  checked: float) -> bool:
    """Recycle now? After ``max_tasks`` calls, or past ``max_memory`` (RSS is read after a call
    that took a while, and otherwise at most every ``_MEMORY_CHECK_S``)."""
    if max_tasks is not None and done >= max_tasks:
        return True
    if max_memory is None:
        return False
    if elapsed < _MEMORY_CHECK_S and time.perf_counter() - checked < _MEMORY_CHECK_S:
        return False
    import psutil

    return bool(psutil.Process().memory_info().rss > max_memory)
