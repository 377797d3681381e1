"""Objects that misbehave at one stage of a call's way to a worker and back (the crash table).

A call goes through five stages: the parent pickles it (``dumps_arg``), the worker unpickles it
(``loads_arg``), the worker runs it (``run``), the worker pickles the result (``dumps_result``)
and the parent unpickles it (``loads_result``). A :class:`Trap` travels as an argument or a
result and does its ``kind`` of harm at its stage only: it tells the parent from the worker by
the parent's PID. Importable (not a test file), so workers import it by reference.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

__all__ = ["KINDS", "STAGES", "Trap", "UserBase", "harm", "make_trap", "raise_kind",
           "take_trap"]

STAGES = ("dumps_arg", "loads_arg", "run", "dumps_result", "loads_result")
#: what a stage does: raise one of these, or (in a worker only) end the process
RAISES = ("exception", "stopiteration", "generatorexit", "keyboardinterrupt", "systemexit",
          "userbase")
CRASHES = ("os_exit", "sigkill")
KINDS = RAISES + CRASHES
IN_PARENT = ("dumps_arg", "loads_result")


class UserBase(BaseException):
    """A user's own BaseException subclass."""


class Unpicklable(Exception):
    """An exception that cannot be pickled and whose ``__str__`` raises."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = __import__("threading").Lock()

    def __str__(self) -> str:
        raise RuntimeError("__str__ refuses too")


def harm(kind: str) -> None:
    """Do ``kind`` of harm here and now."""
    if kind == "exception":
        raise ValueError("attack")
    if kind == "stopiteration":
        raise StopIteration("attack")
    if kind == "generatorexit":
        raise GeneratorExit("attack")
    if kind == "keyboardinterrupt":
        raise KeyboardInterrupt("attack")
    if kind == "systemexit":
        sys.exit(3)
    if kind == "userbase":
        raise UserBase("attack")
    if kind == "unpicklable":
        raise Unpicklable()
    if kind == "os_exit":
        os._exit(3)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(f"unknown kind {kind!r}")


class Trap:
    """Harmless but at ``stage``, where it does ``kind`` of harm."""

    def __init__(self, stage: str, kind: str, parent: int) -> None:
        self.stage, self.kind, self.parent = stage, kind, parent

    def __reduce__(self) -> tuple[Any, ...]:
        in_parent = os.getpid() == self.parent
        if (self.stage == "dumps_arg" and in_parent) or \
                (self.stage == "dumps_result" and not in_parent):
            harm(self.kind)
        return _load_trap, (self.stage, self.kind, self.parent)


def _load_trap(stage: str, kind: str, parent: int) -> Trap:
    in_parent = os.getpid() == parent
    if (stage == "loads_arg" and not in_parent) or (stage == "loads_result" and in_parent):
        harm(kind)
    return Trap(stage, kind, parent)


def take_trap(trap: Trap) -> str:
    """A call whose argument is a trap."""
    return "ran"


async def take_trap_async(trap: Trap) -> str:
    return "ran"


def make_trap(stage: str, kind: str, parent: int) -> Trap:
    """A call whose result is a trap."""
    return Trap(stage, kind, parent)


async def make_trap_async(stage: str, kind: str, parent: int) -> Trap:
    return Trap(stage, kind, parent)


def raise_kind(kind: str) -> None:
    harm(kind)


async def raise_kind_async(kind: str) -> None:
    harm(kind)


def answer(x: int) -> int:
    return x


async def answer_async(x: int) -> int:
    return x


# -- leaving processes behind (test_orphans.py) ----------------------------------------------


def _write_pid(path: str, pid: int) -> None:
    with open(f"{path}.tmp", "w") as file:
        file.write(str(pid))
    os.replace(f"{path}.tmp", path)


def spin_forever() -> None:
    """Burn CPU until killed (a busy service state)."""
    n = 0
    while True:
        n += 1


async def spin_forever_async() -> None:
    spin_forever()


def popen_then_sleep(path: str, seconds: float = 120.0) -> int:
    """Start a ``sleep`` child, write its PID to ``path``, then sleep."""
    import subprocess
    import time

    child = subprocess.Popen(["sleep", str(int(seconds))])
    _write_pid(path, child.pid)
    time.sleep(seconds)
    return child.pid


async def popen_then_sleep_async(path: str, seconds: float = 120.0) -> int:
    import asyncio
    import subprocess

    child = subprocess.Popen(["sleep", str(int(seconds))])
    _write_pid(path, child.pid)
    await asyncio.sleep(seconds)
    return child.pid


def daemonize(path: str, seconds: float = 120.0) -> None:
    """Double fork and ``setsid``: a daemon that keeps this process's descriptors (its socket,
    its sentinel) open for ``seconds`` and writes its PID to ``path``."""
    import time

    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                _write_pid(path, os.getpid())
                time.sleep(seconds)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    while not os.path.exists(path):
        time.sleep(0.005)


def daemonize_then_sleep(path: str, seconds: float = 120.0) -> None:
    import time

    daemonize(path, seconds)
    time.sleep(seconds)


async def daemonize_then_sleep_async(path: str, seconds: float = 120.0) -> None:
    import asyncio

    daemonize(path, seconds)
    await asyncio.sleep(seconds)


def daemonize_then_exit(path: str) -> None:
    """Leave a daemon holding this worker's descriptors, then kill the worker."""
    daemonize(path)
    os._exit(3)


async def daemonize_then_exit_async(path: str) -> None:
    daemonize_then_exit(path)


class ExitsOnDel:
    """An argument whose release kills the worker that holds it (not the parent)."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __del__(self) -> None:
        if os.getpid() != self.parent:
            os._exit(9)


def answer_holding(x: int, held: object) -> int:
    return x


async def answer_holding_async(x: int, held: object) -> int:
    return x


def lower_rlimit_as(nbytes: int) -> int:
    """Lower this worker's address-space limit (a state that changes its worker's process
    state); answers the PID."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, hard))
    return os.getpid()


def rlimit_as() -> tuple[int, int]:
    import resource

    return os.getpid(), resource.getrlimit(resource.RLIMIT_AS)[0]


async def publish_and_wait(path: str, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` (atomically), then wait to be killed."""
    import asyncio
    import json

    with open(f"{path}.tmp", "w") as file:
        json.dump(info, file)
    os.replace(f"{path}.tmp", path)
    await asyncio.sleep(3600)
