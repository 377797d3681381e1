"""One generation of the ``"process"`` executor's loky pool, and what it knows of its workers.

loky fails every in-flight future when one worker dies and stays broken; ``LokyExecutor``
replaces the whole pool then. To tell the state that crashed from the ones that merely shared
the pool, it must know which worker died *first*: loky flags the executor broken before it
kills the surviving workers, so :class:`LokyPool` wraps that flag and records, at that moment,
the exit code of every worker already dead.

Everything here that can block (creating the executor, starting workers, shutting down) is
called on the executor's helper thread, never on the event loop thread. The few reads of loky's
private state (``_processes``, ``_flags``) are kept in this module.
"""

from __future__ import annotations

import contextlib
import signal
from concurrent.futures import Future
from typing import Any

import psutil
from loky import ProcessPoolExecutor

from ._loky_worker import SlotTable, init_worker, noop

__all__ = ["LokyPool", "describe_exit", "kill_tree"]


class LokyPool:
    """A loky ``ProcessPoolExecutor`` with fixed settings, pre-warmed at construction."""

    def __init__(self, max_workers: int, table: SlotTable, *, max_tasks: int | None,
                 max_memory: int | None, generation: int) -> None:
        self.generation = generation
        self.executor = ProcessPoolExecutor(
            max_workers=max_workers,
            initializer=init_worker,
            initargs=(table.path, table.nslots, max_tasks, max_memory),
        )
        #: pid -> exit code of the workers already dead when loky found the pool broken
        self.dead: dict[int, int] | None = None
        self.handled = False  # the executor has dealt with this pool's break
        self._watch_breakage()
        try:
            self.warm: Future[Any] = self.executor.submit(noop)  # starts every worker
        except BaseException:
            self.executor.shutdown(wait=True, kill_workers=True)
            raise
        # Workers recycle on purpose (see _loky_worker): loky need not warn of a memory leak.
        # Its warning would also break the pool where warnings are errors.
        self.executor._executor_manager_thread.recycling_warned = True

    def _watch_breakage(self) -> None:
        flags = self.executor._flags
        flag_as_broken = flags.flag_as_broken

        def record_then_flag(broken: BaseException) -> None:
            # Runs on loky's manager thread, before it kills the surviving workers.
            if self.dead is None:
                self.dead = self._exit_codes()
            flag_as_broken(broken)

        flags.flag_as_broken = record_then_flag

    def _exit_codes(self) -> dict[int, int]:
        codes = {}
        for pid, process in self.executor._processes.copy().items():
            code = process.exitcode
            if code is not None:
                codes[pid] = code
        return codes

    @property
    def broken(self) -> bool:
        return self.executor._flags.broken is not None

    def pids(self) -> list[int]:
        """The worker PIDs loky holds now."""
        return list(self.executor._processes.copy())

    def has(self, pid: int) -> bool:
        return pid in self.executor._processes

    def close(self, kill: bool) -> None:
        """Shut the pool down and join its workers (helper thread only)."""
        self.executor.shutdown(wait=True, kill_workers=kill)

    def __repr__(self) -> str:
        phase = "broken" if self.broken else "ok"
        return f"<LokyPool #{self.generation} {phase} workers={self.pids()}>"


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (a state may have started processes of its own)."""
    try:
        proc = psutil.Process(pid)
        victims = [*proc.children(recursive=True), proc]
    except psutil.Error:
        return
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()


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
