"""What runs inside a loky worker of the ``"process"`` executor, and the slot table it shares.

The parent gives every call it hands to loky a *slot*: an int64 in a small table that parent and
workers map from a temporary file (``mmap``, so nothing lands in ``/dev/shm``). A worker writes
its PID into the slot when it starts the call and ``-PID`` when it is done, so the parent always
knows which process runs which call: the one to kill on cancel or timeout, and the one whose
death broke the pool (loky fails every in-flight future on a crash and does not say which).

Recycling (``max_tasks_per_worker``, ``max_memory``) is decided here, after a call: the worker
sends its result itself and leaves the way loky's own memory-leak recycling does (it reports
its PID, waits for the parent to release it, exits with 0), so the pool never sees a crash.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import tempfile
import weakref
from typing import Any

from ._remote import run_pickled

__all__ = ["SlotTable", "init_worker", "noop", "run_call"]

_ITEM = 8  # bytes per slot: one int64


class SlotTable:
    """``nslots`` int64 values shared through an mmap'd file: 0 = not started, PID = running
    in that process, -PID = finished there."""

    def __init__(self, path: str, nslots: int, *, owner: bool) -> None:
        self.path = path
        self.nslots = nslots
        fd = os.open(path, os.O_RDWR)
        try:
            if owner:
                os.ftruncate(fd, nslots * _ITEM)
            self._mmap = mmap.mmap(fd, nslots * _ITEM)
        finally:
            os.close(fd)
        self._view: memoryview | None = memoryview(self._mmap).cast("q")
        self._unlink = weakref.finalize(self, _unlink, path) if owner else None

    @classmethod
    def create(cls, nslots: int) -> SlotTable:
        """A new table in a fresh temporary file, removed by ``close()`` (or at collection)."""
        fd, path = tempfile.mkstemp(prefix="statepool-slots-")
        os.close(fd)
        return cls(path, nslots, owner=True)

    def __getitem__(self, slot: int) -> int:
        assert self._view is not None, "the slot table is closed"
        return int(self._view[slot])

    def __setitem__(self, slot: int, value: int) -> None:
        assert self._view is not None, "the slot table is closed"
        self._view[slot] = value

    def close(self) -> None:
        """Unmap (and, for the owner, remove the file). Safe to call twice."""
        view, self._view = self._view, None
        if view is not None:
            view.release()
            self._mmap.close()
        if self._unlink is not None:
            self._unlink()

    def __repr__(self) -> str:
        values = [self[i] for i in range(self.nslots)] if self._view is not None else "closed"
        return f"<SlotTable {self.path} {values}>"


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- in the worker --------------------------------------------------------------------------


class _Worker:
    """This worker process's settings and counters (one per process, set by ``init_worker``)."""

    table: SlotTable | None = None
    max_tasks: int | None = None
    max_memory: int | None = None
    tasks_done = 0


def init_worker(table_path: str, nslots: int, max_tasks: int | None,
                max_memory: int | None) -> None:
    """loky's initializer: map the slot table and remember the recycling limits."""
    _Worker.table = SlotTable(table_path, nslots, owner=False)
    _Worker.max_tasks = max_tasks
    _Worker.max_memory = max_memory
    _Worker.tasks_done = 0


def noop() -> int:
    """The pre-warming task: proves a worker has started."""
    return os.getpid()


def run_call(slot: int, payload: bytes) -> tuple[bytes, bool]:
    """Run one pickled call in ``slot``: ``(outcome bytes, whether this worker now recycles)``."""
    table = _Worker.table
    assert table is not None, "the worker was started without init_worker"
    pid = os.getpid()
    table[slot] = pid
    try:
        outcome = run_pickled(payload)
    finally:
        table[slot] = -pid
    _Worker.tasks_done += 1
    if _should_recycle():
        _leave_after((outcome, True))
    return outcome, False


def _should_recycle() -> bool:
    if _Worker.max_tasks is not None and _Worker.tasks_done >= _Worker.max_tasks:
        return True
    if _Worker.max_memory is not None:
        import psutil

        return bool(psutil.Process().memory_info().rss > _Worker.max_memory)
    return False


def _leave_after(result: Any) -> None:
    """Send ``result`` for the current call, then leave the pool cleanly and exit.

    This is the exit of loky's worker loop (``_process_worker``) on memory-leak recycling,
    done from inside the call: it needs that loop's queue, lock and work id. When they cannot
    be found (another loky), return and let the caller send the result as usual.
    """
    from loky import process_executor as pe

    code = getattr(pe, "_process_worker", None)
    if code is None or not hasattr(pe, "_sendback_result"):
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code.__code__:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return
    names = frame.f_locals
    try:
        result_queue = names["result_queue"]
        exit_lock = names["worker_exit_lock"]
        work_id = names["call_item"].work_id
    except (KeyError, AttributeError):
        return
    pe._sendback_result(result_queue, work_id, result=result)
    recycled = getattr(pe, "_RecycledWorkerPid", int)
    result_queue.put(recycled(os.getpid()))
    exit_lock.acquire(True, 30)  # released by the parent once it forgot this worker
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
