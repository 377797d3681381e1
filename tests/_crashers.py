"""Functions that misbehave in a worker process, importable by tests and by the workers.

They live in an importable module (not in a test file) so that cloudpickle sends them by
reference and a worker can import them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Boom(Exception):
    """The exception a state raises on purpose."""


def raise_boom(message: str = "boom") -> None:
    raise Boom(message)


def call_sys_exit(code: int = 3) -> None:
    sys.exit(code)


def call_os_exit(code: int = 7) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def kill_myself(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def return_lock() -> Any:
    return threading.Lock()


def identity(x: Any) -> Any:
    return x


def pid_after(delay: float) -> int:
    """Sleep ``delay`` seconds, then answer this worker's PID."""
    time.sleep(delay)
    return os.getpid()


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds``; answers the loop count."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def announce_then(path: str, action: str, arg: float = 60.0) -> Any:
    """Write this worker's PID to ``path`` (atomically), then ``action``: ``"sleep"``
    (``arg`` seconds, answering the PID), ``"spin"`` (burn CPU), ``"alloc"`` (hold ``arg``
    bytes, then sleep)."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)
    if action == "spin":
        return spin(arg)
    if action == "alloc":
        block = bytearray(int(arg))
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(60)
        return len(block)
    time.sleep(arg)
    return os.getpid()


def allocate(nbytes: int) -> int:
    """Touch ``nbytes`` and keep them alive in this worker (a deliberate leak)."""
    block = bytearray(nbytes)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _LEAK.append(block)
    return os.getpid()


_LEAK: list[bytearray] = []


def wait_for_pid(path: str, timeout: float = 30.0) -> int:
    """The PID a worker wrote with ``announce_then`` (polls ``path``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(Path(path).read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.01)
    raise TimeoutError(f"no worker wrote its PID to {path} within {timeout} s")


def logged(path: str, i: int, delay: float = 0.0, crash: bool = False) -> int:
    """Append ``"<pid> <i>"`` to ``path`` (one atomic write), sleep ``delay``, then answer
    ``i * 2``, or kill this worker (``os._exit(3)``) when ``crash``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {i}\n".encode())
    finally:
        os.close(fd)
    if delay:
        time.sleep(delay)
    if crash:
        os._exit(3)
    return i * 2


def read_log(path: str) -> list[tuple[int, int]]:
    """The ``(pid, i)`` lines ``logged`` wrote."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [(int(pid), int(i)) for pid, i in (line.split() for line in text.splitlines())]


def _refuse_to_load(message: str) -> Any:
    raise ValueError(message)


def _exit_on_load(code: int) -> Any:
    os._exit(code)


class Unloadable:
    """Pickles fine; unpickling it raises ``ValueError`` (in the worker)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _refuse_to_load, ("this argument refuses to load",)


class KillsOnLoad:
    """Pickles fine; unpickling it kills the process that does it (before any call starts)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _exit_on_load, (5,)


def array_facts(arr: Any) -> tuple[float, bool, bool, int]:
    """``(sum, mapped: a view of an mmap, writable, pid)`` of an array, after writing into it."""
    import mmap

    total = float(arr.sum())
    base = arr
    while getattr(base, "base", None) is not None:
        base = base.base
    while isinstance(base, memoryview):
        base = base.obj
    writable = bool(arr.flags.writeable)
    if writable and arr.size:
        arr[0] = -1.0  # copy-on-write: the parent's array does not change
    return total, isinstance(base, mmap.mmap), writable, os.getpid()


def twice(x: Any) -> Any:
    return x * 2


def hold_array(path: str, arr: Any, seconds: float) -> float:
    """Write this worker's PID to ``path``, hold ``arr`` for ``seconds``, answer its sum."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(seconds)
    return float(arr.sum())


def exit_holding(arr: Any, code: int = 3) -> None:
    """Kill this worker while an (out-of-band) argument is mapped."""
    if arr.size:
        os._exit(code)


def packages_seen() -> tuple[bool, str, str, str]:
    """In a worker: was asyncio imported before the call, and do ``executors`` and ``engine``
    work in full when a state's code uses them?"""
    import sys

    had_asyncio = "asyncio" in sys.modules
    import statepool.engine.errors
    import statepool.executors as executors
    import statepool.executors.base

    return (had_asyncio, executors.ThreadExecutor.__name__, executors.base.PreparedCall.__name__,
            statepool.engine.errors.WorkerCrashedError.__name__)


def fork_then_exit(path: str, code: int = 3) -> None:
    """Fork a grandchild that keeps this worker's file descriptors (its socket, its sentinel)
    open for 30 s and writes its PID to ``path``; then kill this worker."""
    pid = os.fork()
    if pid == 0:  # the grandchild
        try:
            Path(path).write_text(str(os.getpid()))
            time.sleep(30)
        finally:
            os._exit(0)
    wait_for_pid(path)
    os._exit(code)
