"""Shared test machinery: async tests, leak checks, the Hypothesis profile.

* ``async def`` tests run under ``asyncio.run`` (a fresh loop per test; no plugin needed).
* Every test fails if it leaves a thread or a child process behind (the interpreter-wide
  resource trackers of multiprocessing and loky excepted).
* The global timeout comes from ``pyproject.toml`` (pytest-timeout).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "statepool",
    deadline=None,
    max_examples=int(os.environ.get("STATEPOOL_HYPOTHESIS_EXAMPLES", "40")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("statepool")

LEAK_GRACE_S = 10.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    funcargs = pyfuncitem.funcargs
    kwargs = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return True  # already gone


def live_children() -> set[int]:
    """PIDs of this process's live descendants, resource trackers excepted."""
    out = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or _is_tracker(proc):
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        out.add(proc.pid)
    return out


def _wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread or a child process behind."""
    threads_before = set(threading.enumerate())
    children_before = live_children()
    yield
    from statepool.engine import StateManager

    StateManager._reset_instance()

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]

    def new_children() -> set[int]:
        return live_children() - children_before

    _wait_until(lambda: not new_threads() and not new_children(), LEAK_GRACE_S)
    threads, children = new_threads(), new_children()
    assert not threads, f"test left threads running: {[t.name for t in threads]}"
    assert not children, f"test left child processes: {sorted(children)}"


@pytest.fixture
def pids_gone():  # type: ignore[no-untyped-def]
    """``pids_gone(pids, timeout)`` -> True once none of the PIDs is alive."""

    def check(pids: list[int] | set[int], timeout: float = 5.0) -> bool:
        def gone() -> bool:
            for pid in pids:
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    continue
            return True

        return _wait_until(gone, timeout)

    return check
