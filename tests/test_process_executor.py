"""The ``"process"`` executor (loky): carrying calls, the crash table, cancel, timeout, recycling.

Every test shuts its pool down (in under 10 s) and the conftest's leak check then fails it if a
worker process or a thread is left. Misbehaving functions live in ``_crashers`` (importable, so
workers import them by reference).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _crashers
import psutil
import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.errors import SerializationError, StateTimeoutError, WorkerCrashedError
from statepool.executors import LokyExecutor, registry
from statepool.executors._wire.remote import RemoteTraceback, dumps_call, loads_outcome, run_pickled
from statepool.executors.base import PreparedCall

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 20.0


# -- helpers ---------------------------------------------------------------------------------


def prepared(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> PreparedCall:
    func_name = getattr(fn, "__name__", type(fn).__name__)
    return PreparedCall(name, func_name, fn, args, kwargs,
                        is_coro=inspect.iscoroutinefunction(fn))


@contextlib.asynccontextmanager
async def process_pool(max_workers: int = 2, **options: Any) -> AsyncIterator[LokyExecutor]:
    """A started executor, shut down (killing its workers) in under 10 s on the way out."""
    ex = LokyExecutor(max_workers, **options)
    await ex.start()
    try:
        yield ex
    finally:
        began = time.monotonic()
        await ex.shutdown(cancel=True)
        assert time.monotonic() - began < 10.0
        assert ex.worker_pids() == []


async def pid_in(path: str) -> int:
    """The PID a worker wrote with ``_crashers.announce_then`` (polls without blocking)."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(Path(path).read_text())
        await asyncio.sleep(0.005)
    raise AssertionError(f"no worker wrote its PID to {path}")


def start(coro: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


# -- carrying calls ---------------------------------------------------------------------------


async def test_lambdas_closures_and_local_classes_travel() -> None:
    factor = 7

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    def scale(point: Point) -> Point:  # a closure over a local class: plain pickle fails
        return Point(point.x * factor)

    async with process_pool(1) as ex:
        result = await ex.run(prepared("closure", scale, Point(3)))
        assert isinstance(result, Point) and result.x == 21
        assert await ex.run(prepared("lambda", lambda x: (x * 2, os.getpid()), 21)) \
            == (42, ex.worker_pids()[0])


async def test_coroutine_function_runs_under_its_own_loop_in_the_worker() -> None:
    async def where(delay: float) -> tuple[int, bool]:
        await asyncio.sleep(delay)
        return os.getpid(), asyncio.get_running_loop() is not None

    async with process_pool(1) as ex:
        pid, had_loop = await ex.run(prepared("coro", where, 0.01))
        assert pid != os.getpid() and had_loop


def test_functions_of_main_travel(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from statepool.executors.base import PreparedCall
        from statepool.executors.process import LokyExecutor

        class Point:
            def __init__(self, x):
                self.x = x

        def triple(point):
            return Point(point.x * 3)

        async def main():
            ex = LokyExecutor(1)
            try:
                result = await ex.run(PreparedCall("main", "triple", triple, (Point(2),)))
                print(type(result).__module__, type(result).__name__, result.x)
            finally:
                await ex.shutdown(cancel=True)

        if __name__ == "__main__":
            asyncio.run(main())
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["__main__", "Point", "6"]


async def test_a_worker_starts_light_and_the_packages_work_in_it() -> None:
    async with process_pool(1) as ex:
        had_asyncio, thread, call, crashed = await ex.run(prepared("seen",
                                                                   _crashers.packages_seen))
        assert not had_asyncio  # executors/__init__ (and what it imports) waited until needed
        assert (thread, call, crashed) == ("ThreadExecutor", "PreparedCall", "WorkerCrashedError")


def test_dumps_call_names_the_part_that_does_not_pickle() -> None:
    lock = threading.Lock()
    cases = [
        (prepared("fn", lock.acquire), "its function of type builtin_function_or_method"),
        (prepared("arg", _crashers.identity, 1, lock), "its argument 1 of type _thread.lock"),
        (prepared("kw", _crashers.identity, x=lock), "its keyword argument 'x' of type "
                                                     "_thread.lock"),
    ]
    for call, message in cases:
        with pytest.raises(SerializationError, match=message) as info:
            dumps_call(call)
        assert f"state {call.state_name!r}" in str(info.value)
        assert isinstance(info.value.__cause__, Exception)


def test_outcome_keeps_the_exception_type_and_the_worker_traceback() -> None:
    data = run_pickled(dumps_call(prepared("boom", _crashers.raise_boom, "bad")))
    with pytest.raises(_crashers.Boom, match="bad") as info:
        loads_outcome(data)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in raise_boom" in str(info.value.__cause__)


def test_an_exception_that_cannot_travel_becomes_a_serialization_error() -> None:
    class Stubborn(Exception):
        def __init__(self, a: int, b: int) -> None:  # pickles, but does not rebuild
            super().__init__(a)

    def fail() -> None:
        raise Stubborn(1, 2)

    with pytest.raises(SerializationError, match=r"state 'stubborn' raised .*Stubborn"):
        loads_outcome(run_pickled(dumps_call(prepared("stubborn", fail))))


# -- the crash table --------------------------------------------------------------------------


@dataclass(frozen=True)
class Crash:
    id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    error: type[BaseException]
    message: str  # found in str(error)
    exitcode: int | None = None  # of a WorkerCrashedError
    kill_from_outside: bool = False


CRASHES = [
    Crash("raise", _crashers.raise_boom, ("guilty boom",), _crashers.Boom, "guilty boom"),
    Crash("sys.exit", _crashers.call_sys_exit, (3,), WorkerCrashedError,
          r"state 'guilty' called sys\.exit\(3\)", exitcode=3),
    Crash("os._exit", _crashers.call_os_exit, (7,), WorkerCrashedError,
          r"state 'guilty' \(call_os_exit\) crashed its worker process \d+: exit code 7",
          exitcode=7),
    Crash("sigkill-from-outside", _crashers.announce_then, ("sleep", 60.0), WorkerCrashedError,
          "state 'guilty' .* signal SIGKILL", exitcode=-signal.SIGKILL, kill_from_outside=True),
    Crash("segfault", _crashers.segfault, (), WorkerCrashedError,
          "state 'guilty' .* signal SIGSEGV", exitcode=-signal.SIGSEGV),
    Crash("unpicklable-argument", _crashers.identity, (threading.Lock(),), SerializationError,
          "state 'guilty' .* argument 0 of type _thread.lock"),
    Crash("unpicklable-result", _crashers.return_lock, (), SerializationError,
          "state 'guilty' returned a _thread.lock"),
]


@pytest.mark.parametrize("crash", CRASHES, ids=[c.id for c in CRASHES])
async def test_crash_fails_only_its_own_state(crash: Crash, tmp_path: Path,
                                              pids_gone: Any) -> None:
    seen: set[int] = set()
    async with process_pool(2) as ex:
        seen.update(ex.worker_pids())
        running = str(tmp_path / "running.pid")
        innocent = start(ex.run(prepared("innocent-running", _crashers.announce_then, running,
                                         "sleep", 1.0)))
        await pid_in(running)
        args = crash.args
        if crash.kill_from_outside:
            args = (str(tmp_path / "guilty.pid"), *args)
        guilty = start(ex.run(prepared("guilty", crash.fn, *args)))
        waiting = start(ex.run(prepared("innocent-waiting", _crashers.identity, 42)))
        if crash.kill_from_outside:
            os.kill(await pid_in(args[0]), signal.SIGKILL)

        with pytest.raises(crash.error, match=crash.message) as info:
            await guilty
        if isinstance(info.value, WorkerCrashedError):
            assert info.value.state_name == "guilty"
            assert info.value.exitcode == crash.exitcode
        if crash.error is _crashers.Boom:
            assert "in raise_boom" in str(info.value.__cause__)
        assert isinstance(await innocent, int)
        assert await waiting == 42
        assert await ex.run(prepared("next", _crashers.identity, "after")) == "after"
        seen.update(ex.worker_pids())
    assert pids_gone(seen)


async def test_a_deterministic_crasher_fails_once_and_does_not_loop() -> None:
    async with process_pool(2) as ex:
        results = await asyncio.gather(
            ex.run(prepared("crasher", _crashers.call_os_exit, 1)),
            *(ex.run(prepared(f"innocent-{i}", _crashers.pid_after, 0.2)) for i in range(3)),
            return_exceptions=True)
        assert isinstance(results[0], WorkerCrashedError)
        assert all(isinstance(r, int) for r in results[1:])
        assert ex.crashes == 1


async def test_a_crash_is_seen_while_a_process_it_started_holds_its_pipes(
        tmp_path: Path) -> None:
    path = str(tmp_path / "grandchild.pid")
    async with process_pool(1) as ex:
        try:
            began = time.monotonic()
            with pytest.raises(WorkerCrashedError, match="exit code 3"):
                await ex.run(prepared("forker", _crashers.fork_then_exit, path))
            assert time.monotonic() - began < 5.0
            assert await ex.run(prepared("next", _crashers.identity, 1)) == 1
        finally:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
                os.kill(int(Path(path).read_text()), signal.SIGKILL)


async def test_a_worker_killed_while_idle_breaks_nothing_visible() -> None:
    async with process_pool(2) as ex:
        for pid in ex.worker_pids():
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        assert await ex.run(prepared("after", _crashers.identity, 1)) == 1


# -- cancel and timeout -----------------------------------------------------------------------


async def test_cancel_kills_the_worker_and_the_others_carry_on(tmp_path: Path,
                                                               pids_gone: Any) -> None:
    async with process_pool(2) as ex:
        innocent = start(ex.run(prepared("innocent", _crashers.pid_after, 1.0)))
        path = str(tmp_path / "spin.pid")
        spinner = start(ex.run(prepared("spinner", _crashers.announce_then, path, "spin", 60)))
        pid = await pid_in(path)
        spinner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await spinner
        assert pids_gone([pid], 1.0)  # its CPU work stopped within a second
        assert isinstance(await innocent, int)
        assert await ex.run(prepared("next", _crashers.identity, 5)) == 5


async def test_timeout_kills_the_worker(tmp_path: Path, pids_gone: Any) -> None:
    async with process_pool(1) as ex:
        path = str(tmp_path / "spin.pid")
        with pytest.raises(asyncio.TimeoutError):  # TimeoutError from 3.11
            await asyncio.wait_for(
                ex.run(prepared("spinner", _crashers.announce_then, path, "spin", 60)), 1.0)
        assert pids_gone([await pid_in(path)], 1.0)
        assert await ex.run(prepared("next", _crashers.identity, 5)) == 5


async def test_cancelling_a_waiting_call_is_local(tmp_path: Path) -> None:
    async with process_pool(1) as ex:
        busy_path, queued_path = str(tmp_path / "busy.pid"), str(tmp_path / "queued.pid")
        busy = start(ex.run(prepared("busy", _crashers.announce_then, busy_path, "sleep", 0.5)))
        pid = await pid_in(busy_path)
        queued = start(ex.run(prepared("queued", _crashers.announce_then, queued_path,
                                       "sleep", 0.0)))
        await asyncio.sleep(0.05)
        queued.cancel()
        assert await busy == pid  # not killed, not run again
        await asyncio.sleep(0.1)
        assert not Path(queued_path).exists()
        assert ex.crashes == 0


async def test_the_timeout_clock_waits_for_a_starting_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold executor (not pre-warmed): the first state's clock starts once a worker runs it,
    not while the worker starts (made to take 1 s here, well past the state's timeout)."""
    from statepool.executors.process import pool as _loky_pool

    slow_boot = tmp_path / "slow_boot.py"
    slow_boot.write_text(textwrap.dedent(f"""
        import runpy, time
        time.sleep(1.0)
        runpy.run_path({_loky_pool._BOOT!r}, run_name=__name__,
                       init_globals={{"ARGS": ARGS, "PYCACHE": PYCACHE}})
    """))
    monkeypatch.setattr(_loky_pool, "_BOOT", str(slow_boot))
    ex = LokyExecutor(1)
    try:
        async with StateManager() as manager:
            t0 = time.monotonic()
            handle = await manager.put_state(State("quick", _crashers.identity, True,
                                                   args=(5,), executor=ex, timeout=0.5))
            assert await asyncio.wait_for(handle, 30) == 5
            assert time.monotonic() - t0 > 1.0  # the worker's start took longer than 0.5 s
    finally:
        await ex.shutdown(cancel=True)


# -- the pool ---------------------------------------------------------------------------------


async def test_workers_that_cannot_start_fail_the_waiting_calls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from statepool.executors.process import pool as _loky_pool

    monkeypatch.setattr(_loky_pool, "_BOOT", str(tmp_path / "missing.py"))  # each dies at once
    ex = LokyExecutor(2)
    try:
        with pytest.raises(WorkerCrashedError, match="workers die as they start"):
            await asyncio.wait_for(ex.run(prepared("doomed", _crashers.identity, 1)), 30)
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(ex.start(), 30)
        monkeypatch.undo()  # the next call tries again, and works
        assert await asyncio.wait_for(ex.run(prepared("later", _crashers.identity, 2)), 30) == 2
    finally:
        await ex.shutdown(cancel=True)


def test_defaults_to_the_usable_cores() -> None:
    assert LokyExecutor().max_workers == len(os.sched_getaffinity(0))
    assert isinstance(registry.create("process"), LokyExecutor)


async def test_worker_pids_are_the_live_workers() -> None:
    async with process_pool(2) as ex:
        pids = ex.worker_pids()
        assert len(pids) == 2 and all(psutil.pid_exists(pid) for pid in pids)
        assert {await ex.run(prepared(f"p{i}", _crashers.pid_after, 0.3)) for i in range(2)} \
            <= set(pids)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
async def test_two_cpu_bound_calls_run_in_parallel() -> None:
    async with process_pool(2) as ex:
        await asyncio.gather(*(ex.run(prepared("warm", _crashers.spin, 0.05)) for _ in range(2)))
        began = time.perf_counter()
        await ex.run(prepared("one", _crashers.spin, 0.5))
        one = time.perf_counter() - began
        began = time.perf_counter()
        await asyncio.gather(*(ex.run(prepared(f"two-{i}", _crashers.spin, 0.5))
                               for i in range(2)))
        assert time.perf_counter() - began < 1.6 * one


async def test_the_event_loop_is_never_blocked(tmp_path: Path) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    big = b"x" * (16 * 2**20)  # pickled twice on other threads (a copy that holds the GIL)
    beat = start(heartbeat())
    ex = LokyExecutor(2)
    try:
        await ex.start()  # starting workers happens off the loop
        assert await ex.run(prepared("big", len, big)) == len(big)
        with pytest.raises(WorkerCrashedError):
            await ex.run(prepared("crash", _crashers.call_os_exit, 1))
        assert await ex.run(prepared("after", _crashers.identity, 2)) == 2
    finally:
        await ex.shutdown(cancel=True)
        stop.set()
        await beat
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps):.3f} s"


async def test_shutdown_without_cancel_lets_running_calls_finish() -> None:
    ex = LokyExecutor(1)
    call = start(ex.run(prepared("slow", _crashers.pid_after, 0.3)))
    await asyncio.sleep(0.05)
    await ex.shutdown(cancel=False)
    assert isinstance(await call, int)
    with pytest.raises(RuntimeError, match="closed"):
        await ex.run(prepared("late", _crashers.identity, 1))
    await ex.shutdown(cancel=False)  # twice is fine


async def test_shutdown_without_cancel_still_stops_a_cancelled_call(tmp_path: Path,
                                                                   pids_gone: Any) -> None:
    ex = LokyExecutor(1)
    path = str(tmp_path / "spin.pid")
    call = start(ex.run(prepared("spinner", _crashers.announce_then, path, "spin", 60)))
    pid = await pid_in(path)
    call.cancel()
    began = time.monotonic()
    await ex.shutdown(cancel=False)
    assert time.monotonic() - began < 5.0
    assert pids_gone([pid], 1.0)


async def test_shutdown_with_cancel_kills_running_work(tmp_path: Path, pids_gone: Any) -> None:
    ex = LokyExecutor(1)
    path = str(tmp_path / "spin.pid")
    call = start(ex.run(prepared("spinner", _crashers.announce_then, path, "spin", 60)))
    pid = await pid_in(path)
    began = time.monotonic()
    await ex.shutdown(cancel=True)
    assert time.monotonic() - began < 5.0
    with pytest.raises(asyncio.CancelledError):
        await call
    assert pids_gone([pid], 1.0)


# -- recycling --------------------------------------------------------------------------------


async def test_max_tasks_per_worker_recycles_workers() -> None:
    async with process_pool(1, max_tasks_per_worker=2) as ex:
        pids = [await ex.run(prepared(f"t{i}", os.getpid)) for i in range(6)]
        assert pids[0] == pids[1] != pids[2] == pids[3] != pids[4] == pids[5]
        assert ex.crashes == 0  # a recycling is not a crash


async def test_max_tasks_per_worker_of_one_under_load() -> None:
    async with process_pool(2, max_tasks_per_worker=1) as ex:
        pids = await asyncio.gather(*(ex.run(prepared(f"t{i}", _crashers.pid_after, 0.01))
                                      for i in range(8)))
        assert len(set(pids)) == 8
        assert ex.crashes == 0


def _worker_rss(ex: LokyExecutor) -> int:
    return int(max(psutil.Process(pid).memory_info().rss for pid in ex.worker_pids()))


async def test_max_memory_recycles_a_worker_between_states() -> None:
    probe = LokyExecutor(1)
    await probe.start()
    baseline = _worker_rss(probe)
    await probe.shutdown(cancel=True)
    options = {"max_memory": baseline + 64 * 2**20, "memory_poll_interval": 60.0}
    async with process_pool(1, **options) as ex:  # the poll would catch it while it runs
        leaky = await ex.run(prepared("leaky", _crashers.allocate, 128 * 2**20))
        assert await ex.run(prepared("next", os.getpid)) != leaky
        assert ex.crashes == 0


async def test_max_memory_kills_a_state_that_passes_it_while_running(tmp_path: Path) -> None:
    probe = LokyExecutor(1)
    await probe.start()
    baseline = _worker_rss(probe)
    await probe.shutdown(cancel=True)
    async with process_pool(2, max_memory=baseline + 64 * 2**20) as ex:
        innocent = start(ex.run(prepared("innocent", _crashers.pid_after, 0.5)))
        path = str(tmp_path / "hog.pid")
        with pytest.raises(WorkerCrashedError, match=r"state 'hog' .* past max_memory="):
            await ex.run(prepared("hog", _crashers.announce_then, path, "alloc", 256 * 2**20))
        assert isinstance(await innocent, int)


# -- through the manager ----------------------------------------------------------------------


async def test_process_states_through_the_manager(tmp_path: Path, pids_gone: Any) -> None:
    path = str(tmp_path / "spin.pid")
    async with StateManager(executors={"process": LokyExecutor(2)}) as manager:
        spinner = await manager.put_state(State(
            "spinner", _crashers.announce_then, True, args=(path, "spin", 60.0),
            executor="process", timeout=2.0))
        await pid_in(path)
        crasher = await manager.put_state(State(
            "crasher", _crashers.call_os_exit, True, args=(9,), executor="process", retries=1))
        fine = await manager.put_state(State(
            "fine", _crashers.pid_after, True, args=(0.5,), executor="process"))
        await manager.join()
    assert crasher.status is StateStatus.FAILED and crasher.attempts == 2
    assert isinstance(crasher.exception(), WorkerCrashedError)
    assert "'crasher'" in str(crasher.exception())
    assert spinner.status is StateStatus.FAILED
    assert isinstance(spinner.exception(), StateTimeoutError)
    assert pids_gone([int(Path(path).read_text())], 1.0)
    assert fine.status is StateStatus.SUCCEEDED
