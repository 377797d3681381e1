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
