"""faulthandler in the process workers: a crash's Python traceback, a busy worker's stack.

Each worker, as it starts (:func:`install`), points :mod:`faulthandler` at a file of its own,
``<directory>/<pid>.txt``: a segfault (or another fatal signal) writes the Python traceback of
every thread there before the worker dies, and :func:`read` gives it to the parent for the
state's ``WorkerCrashedError``. ``SIGUSR1`` makes faulthandler write the current stacks there
too, without stopping the worker: :func:`stack` is how the parent sees where a stalled state
is (``warn_after``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import IO

__all__ = ["STACK_SIGNAL", "describe", "install", "read", "stack"]

STACK_SIGNAL = getattr(signal, "SIGUSR1", None)
_file: IO[str] | None = None  # the worker's file, kept open for faulthandler


def _path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{pid}.txt")


def install(directory: str | None) -> None:
    """In a worker as it starts: faulthandler writes to this worker's file."""
    global _file
    if not directory:
        return
    import faulthandler

    try:
        _file = open(_path(directory, os.getpid()), "w")  # noqa: SIM115 - lives with the worker
    except OSError:
        return
    faulthandler.enable(file=_file, all_threads=True)
    if STACK_SIGNAL is not None:
        faulthandler.register(STACK_SIGNAL, file=_file, all_threads=True, chain=False)


def read(directory: str | None, pid: int, limit: int = 20_000) -> str:
    """What faulthandler wrote for worker ``pid`` (its crash traceback), or ``""``."""
    if not directory:
        return ""
    try:
        with open(_path(directory, pid), errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    with contextlib.suppress(OSError):
        os.unlink(_path(directory, pid))
    text = text.strip()
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


def describe(directory: str | None, pid: int) -> str:
    """The text to add to a crash's message: the worker's Python traceback, if it left one."""
    text = read(directory, pid)
    if not text:
        return ""
    return f"\nthe worker's Python traceback (faulthandler):\n{text}"


async def stack(directory: str | None, pid: int, timeout: float = 1.0) -> str:
    """The current Python stacks of worker ``pid`` (it goes on running), or ``""``."""
    if not directory or STACK_SIGNAL is None:
        return ""
    import asyncio  # (parent side only: a worker does not import asyncio for nothing)

    path = _path(directory, pid)
    try:
        start = os.path.getsize(path)
        os.kill(pid, STACK_SIGNAL)
    except OSError:
        return ""
    deadline = time.monotonic() + timeout
    size = start
    while time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        try:
            now = os.path.getsize(path)
        except OSError:
            return ""
        if now > start and now == size:  # it wrote, and stopped writing
            break
        size = now
    try:
        with open(path, errors="replace") as f:
            f.seek(start)
            return f.read().strip()
    except OSError:
        return ""
