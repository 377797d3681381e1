"""The "aioprocess" executor: coroutines in child event loops, supervised.

Cross-process synchronisation goes through files in ``tmp_path``: a coroutine in a child writes a
file when it runs, or waits for one the test writes. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomultiprocess.core
import cloudpickle
import psutil
import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.errors import SerializationError, StateTimeoutError, WorkerCrashedError
from statepool.executors import registry
from statepool.executors._wire.remote import (
    INLINE_DUMPS_LIMIT,
    RemoteTraceback,
    dumps_call,
    dumps_call_small,
)
from statepool.executors.aioprocess.executor import MAX_RERUNS, AioProcessExecutor
from statepool.executors.base import PreparedCall

# Functions of this module travel by value, as a script's would: children need not import it.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DEADLINE_S = 10.0


# -- what runs in the children ------------------------------------------------------------------


async def wait_path(path: str | Path, timeout: float = DEADLINE_S) -> None:
    """Wait (child or test) until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        await asyncio.sleep(0.005)


async def add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


async def getpid() -> int:
    return os.getpid()


async def held_until(release: str, value: Any, running: str | None = None) -> tuple[int, Any]:
    """Say it runs (``running``), wait for ``release``, answer ``(pid, value)``."""
    if running is not None:
        Path(running).write_text(str(os.getpid()))
    await wait_path(release)
    return os.getpid(), value


async def rendezvous(folder: str, me: int, count: int) -> int:
    """Only returns if ``count`` of these run at the same time."""
    Path(folder, f"{me}.here").touch()
    deadline = time.monotonic() + DEADLINE_S
    while len(list(Path(folder).glob("*.here"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the others never came: not concurrent")
        await asyncio.sleep(0.005)
    return os.getpid()


async def raise_value() -> None:
    raise ValueError("boom from the child")


async def call_sys_exit() -> None:
    sys.exit(4)


async def call_os_exit() -> None:
    os._exit(3)


async def segfault() -> None:
    ctypes.string_at(0)


async def return_lock() -> Any:
    return threading.Lock()


async def echo(value: Any) -> Any:
    return value


async def mark_cancellation(running: str, marker: str) -> None:
    Path(running).write_text(str(os.getpid()))
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        Path(marker).touch()
        raise


async def block_loop(running: str) -> None:
    """CPU-bound in the child's event loop: it cannot see a cancellation."""
    Path(running).write_text(str(os.getpid()))
    time.sleep(60)


async def ignore_cancellation(running: str) -> None:
    Path(running).write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            continue


def plain_add(a: int, b: int) -> int:
    return a + b


def set_marker_env(value: str) -> None:
    os.environ["STATEPOOL_AIO_INIT"] = value


async def read_marker_env() -> str | None:
    return os.environ.get("STATEPOOL_AIO_INIT")


def broken_initializer() -> None:
    raise RuntimeError("initializer fails")


# -- helpers ---------------------------------------------------------------------------------------


def prepared(name: str, fn: Callable[..., Any], *args: Any, is_coro: bool = True,
             on_start: Callable[[], None] | None = None, **kwargs: Any) -> PreparedCall:
    func_name = getattr(fn, "__name__", type(fn).__name__)
    return PreparedCall(name, func_name, fn, args, kwargs, is_coro=is_coro, on_start=on_start)


async def pid_in(path: Path) -> int:
    await wait_path(path)
    for _ in range(200):  # written, maybe not flushed yet
        text = path.read_text()
        if text:
            return int(text)
        await asyncio.sleep(0.005)
    raise AssertionError(f"{path} stayed empty")


async def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def gone(pids: Any, timeout: float = DEADLINE_S) -> bool:
    """The conftest's ``pids_gone``, polling without blocking the loop (it may have to act)."""
    return await wait_for(lambda: not any(alive(pid) for pid in pids), timeout)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.asynccontextmanager
async def started_executor(**options: Any) -> AsyncIterator[AioProcessExecutor]:
    """An executor with its children started, shut down (``cancel=True``) when the block ends."""
    ex = AioProcessExecutor(**options)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.shutdown(cancel=True)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    yield lambda name: str(tmp_path / name)


# -- basics ----------------------------------------------------------------------------------------


async def test_runs_a_coroutine_in_a_child_process() -> None:
    ex = AioProcessExecutor(processes=1)
    try:
        assert await ex.run(prepared("add", add, 1, 2)) == 3
        pid = await ex.run(prepared("pid", getpid))
        assert pid != os.getpid()
        assert ex.worker_pids() == [pid]
    finally:
        await ex.shutdown(cancel=True)


async def test_closures_lambdas_and_local_classes_travel() -> None:
    factor = 7

    class Point:
        def __init__(self, x: int) -> None:
            self.x = x

    async def scale(point: Point) -> Point:  # a closure: plain pickle cannot carry it
        return Point(point.x * factor)

    ex = AioProcessExecutor(processes=1)
    try:
        result = await ex.run(prepared("closure", scale, Point(3)))
        assert isinstance(result, Point) and result.x == 21
        doubled = await ex.run(prepared("lambda", lambda x: asyncio.sleep(0, result=x * 2), 21,
                                        is_coro=False))
        assert doubled == 42
    finally:
        await ex.shutdown(cancel=True)


async def test_plain_function_runs_in_the_child_loop() -> None:
    ex = AioProcessExecutor(processes=1)
    try:
        assert await ex.run(prepared("plain", plain_add, 2, 3, is_coro=False)) == 5
    finally:
        await ex.shutdown(cancel=True)


async def test_large_arguments_and_results_travel() -> None:
    blob = os.urandom(3 * 1024 * 1024)
    ex = AioProcessExecutor(processes=1)
    try:
        assert await ex.run(prepared("big", echo, blob)) == blob
    finally:
        await ex.shutdown(cancel=True)


def test_dumps_call_small_gives_up_early_on_large_calls() -> None:
    small = prepared("small", add, 1, 2)
    assert dumps_call_small(small) == dumps_call(small)
    big = prepared("big", echo, b"x" * (INLINE_DUMPS_LIMIT + 1))
    assert dumps_call_small(big) is None
    with pytest.raises(SerializationError, match=r"'bad'.*_thread\.lock"):
        dumps_call_small(prepared("bad", echo, LOCK))


async def test_exception_keeps_its_type_and_the_child_traceback() -> None:
    class LocalError(Exception):
        pass

    async def fail() -> None:
        raise LocalError("custom")

    ex = AioProcessExecutor(processes=1)
    try:
        with pytest.raises(LocalError, match="custom") as info:
            await ex.run(prepared("fail", fail))
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "in fail" in str(info.value.__cause__)
    finally:
        await ex.shutdown(cancel=True)


async def test_coroutines_run_concurrently_in_one_child(tmp_path: Path) -> None:
    ex = AioProcessExecutor(processes=1, childconcurrency=4)
    try:
        pids = await asyncio.gather(
            *(ex.run(prepared(f"r{i}", rendezvous, str(tmp_path), i, 4)) for i in range(4))
        )
        assert len(set(pids)) == 1
    finally:
        await ex.shutdown(cancel=True)


async def test_childconcurrency_bounds_the_calls_a_child_holds(files: Any) -> None:
    async with started_executor(processes=1, childconcurrency=2) as ex:
        started = [asyncio.Event() for _ in range(3)]
        tasks = [asyncio.create_task(ex.run(prepared(
            f"h{i}", held_until, files("release"), i, on_start=started[i].set))) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(started[0].wait(), started[1].wait()), DEADLINE_S)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not started[2].is_set(), "a third call was handed to a child with 2 slots"
        Path(files("release")).touch()
        results = await asyncio.gather(*tasks)
        assert [value for _, value in results] == [0, 1, 2]
        assert started[2].is_set()


async def test_calls_spread_over_the_least_loaded_children(files: Any) -> None:
    ex = AioProcessExecutor(processes=2)
    try:
        tasks = [asyncio.create_task(ex.run(prepared(f"h{i}", held_until, files("go"), i)))
                 for i in range(2)]
        await asyncio.sleep(0)
        Path(files("go")).touch()
        results = await asyncio.gather(*tasks)
        assert {pid for pid, _ in results} == set(ex.worker_pids())
        assert len(ex.worker_pids()) == 2
    finally:
        await ex.shutdown(cancel=True)


async def test_many_calls_with_cancellations_in_line_all_answer() -> None:
    ex = AioProcessExecutor(processes=2, childconcurrency=3)
    try:
        tasks = [asyncio.create_task(ex.run(prepared(f"c{i}", add, i, 1))) for i in range(300)]
        await asyncio.sleep(0)
        for task in tasks[5::7]:
            task.cancel()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), DEADLINE_S)
        for i, (task, result) in enumerate(zip(tasks, results, strict=True)):
            if isinstance(result, asyncio.CancelledError):
                assert task in tasks[5::7]
            else:
                assert result == i + 1
        assert ex._line.queued == 0 and not ex._line
        assert await wait_for(lambda: all(  # a call cancelled in its child answers soon after
            not child.in_flight and not child.reserved for child in ex._children))
    finally:
        await ex.shutdown(cancel=True)


async def test_round_trip_beats_aiomultiprocess_polling() -> None:
    async with started_executor(processes=1) as ex:
        await ex.run(prepared("warm", add, 0, 0))
        times = []
        for i in range(100):
            t0 = time.perf_counter()
            assert await ex.run(prepared("add", add, i, 1)) == i + 1
            times.append(time.perf_counter() - t0)
        median = sorted(times)[len(times) // 2]
        assert median < 0.005, f"median round trip {median * 1e3:.2f} ms (aiomultiprocess: 10-16)"


# -- the crash table -------------------------------------------------------------------------------


@dataclass
class Crash:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    error: type[BaseException]
    says: str  # in the message
    kills_child: bool
    sigkill: bool = False  # the test kills the child from outside

    def __str__(self) -> str:
        return self.fn.__name__


LOCK = threading.Lock()
CRASHES = {
    "raise": Crash(raise_value, (), ValueError, "boom from the child", kills_child=False),
    "sys.exit": Crash(call_sys_exit, (), WorkerCrashedError, "sys.exit(4)", kills_child=False),
    "os._exit": Crash(call_os_exit, (), WorkerCrashedError, "exited with code 3",
                      kills_child=True),
    "sigkill": Crash(held_until, (), WorkerCrashedError, "SIGKILL (9)", kills_child=True,
                     sigkill=True),
    "segfault": Crash(segfault, (), WorkerCrashedError, "SIGSEGV (11)", kills_child=True),
    "unpicklable argument": Crash(echo, (LOCK,), SerializationError, "_thread.lock",
                                  kills_child=False),
    "unpicklable result": Crash(return_lock, (), SerializationError, "_thread.lock",
                                kills_child=False),
}


@pytest.mark.parametrize("case", list(CRASHES.values()), ids=list(CRASHES))
async def test_crash_table(case: Crash, files: Any) -> None:
    async with started_executor(processes=2, childconcurrency=4) as ex:
        before = set(ex.worker_pids())
        innocent_started = asyncio.Event()
        innocent = asyncio.create_task(ex.run(prepared(
            "innocent", held_until, files("release"), "fine", on_start=innocent_started.set)))
        await asyncio.wait_for(innocent_started.wait(), DEADLINE_S)

        args = (files("never"), None, files("running")) if case.sigkill else case.args
        guilty = asyncio.create_task(ex.run(prepared("guilty", case.fn, *args)))
        if case.sigkill:
            os.kill(await pid_in(Path(files("running"))), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(case.error) as info:
            await asyncio.wait_for(guilty, DEADLINE_S)
        assert time.monotonic() - t0 < 2.0
        message = str(info.value)
        assert case.says in message
        if case.error is not ValueError:
            assert "'guilty'" in message
            assert "innocent" not in message
        if isinstance(info.value, WorkerCrashedError):
            assert info.value.state_name == "guilty"

        assert not innocent.done(), "the innocent call ended with the crash"
        Path(files("release")).touch()
        innocent_pid, value = await asyncio.wait_for(innocent, DEADLINE_S)
        assert value == "fine" and innocent_pid in before

        lost = before - set(ex.worker_pids())
        if case.kills_child:
            assert len(lost) == 1 and innocent_pid not in lost
            assert await gone(lost)
            assert await wait_for(lambda: len(ex.worker_pids()) == 2), "no child replaced it"
            assert await wait_for(lambda: ex._spawning == 0)
            assert len(ex.worker_pids()) == 2, "more children than processes"
        else:
            assert not lost, "the child should have survived"
        assert await ex.run(prepared("next", add, 2, 2)) == 4


async def test_crash_fails_every_call_that_shared_the_child(files: Any) -> None:
    async with started_executor(processes=1, childconcurrency=4) as ex:
        started = asyncio.Event()
        sharer = asyncio.create_task(ex.run(prepared(
            "sharer", held_until, files("never"), None, on_start=started.set)))
        await started.wait()
        with pytest.raises(WorkerCrashedError, match="exited with code 3") as guilty:
            await ex.run(prepared("guilty", call_os_exit))
        with pytest.raises(WorkerCrashedError) as shared:
            await asyncio.wait_for(sharer, DEADLINE_S)
        assert shared.value.state_name == "sharer"
        assert "'guilty'" in str(shared.value) and "may have caused it" in str(shared.value)
        assert "'sharer'" in str(guilty.value)
        assert await ex.run(prepared("next", add, 1, 1)) == 2


async def test_idle_child_killed_from_outside_is_replaced() -> None:
    async with started_executor(processes=1) as ex:
        (victim,) = ex.worker_pids()
        os.kill(victim, signal.SIGKILL)
        assert await gone([victim])
        assert await wait_for(lambda: len(ex.worker_pids()) == 1 and victim not in
                              ex.worker_pids())
        assert await ex.run(prepared("after", getpid)) != victim


# -- cancellation and timeouts ----------------------------------------------------------------


async def test_cancel_cancels_the_coroutine_inside_its_child(files: Any) -> None:
    async with started_executor(processes=1) as ex:
        (pid,) = ex.worker_pids()
        task = asyncio.create_task(ex.run(prepared(
            "cancel me", mark_cancellation, files("running"), files("cancelled"))))
        await pid_in(Path(files("running")))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_path(files("cancelled"))  # the work saw its cancellation and stopped
        assert ex.worker_pids() == [pid]  # the child lives on
        assert await ex.run(prepared("next", getpid)) == pid


@pytest.mark.parametrize("stubborn", [block_loop, ignore_cancellation])
async def test_cancel_kills_a_child_that_does_not_stop(
    stubborn: Callable[..., Any], files: Any
) -> None:
    async with started_executor(processes=1, childconcurrency=2, cancel_grace=0.2) as ex:
        started = asyncio.Event()
        sharer = asyncio.create_task(ex.run(prepared(
            "sharer", held_until, files("release"), "ok", on_start=started.set)))
        await started.wait()
        task = asyncio.create_task(ex.run(prepared("stubborn", stubborn, files("running"))))
        pid = await pid_in(Path(files("running")))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await gone([pid], timeout=3.0), "the stubborn child was not killed"
        Path(files("release")).touch()
        sharer_pid, value = await asyncio.wait_for(sharer, DEADLINE_S)  # sent again, succeeds
        assert value == "ok" and sharer_pid != pid


async def test_a_call_whose_child_is_killed_too_often_fails(files: Any) -> None:
    async with started_executor(processes=1, childconcurrency=2, cancel_grace=0.05) as ex:
        started = asyncio.Event()
        sharer = asyncio.create_task(ex.run(prepared(
            "sharer", held_until, files("never"), None, on_start=started.set)))
        await started.wait()
        for attempt in range(MAX_RERUNS + 1):
            running = files(f"running{attempt}")
            task = asyncio.create_task(ex.run(prepared(f"stubborn {attempt}", block_loop,
                                                        running)))
            pid = await pid_in(Path(running))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await gone([pid])
        with pytest.raises(WorkerCrashedError,
                           match=f"killed to stop state 'stubborn {MAX_RERUNS}'"):
            await asyncio.wait_for(sharer, DEADLINE_S)


async def test_timeout_stops_the_work(files: Any) -> None:
    async with started_executor(processes=2, cancel_grace=0.1) as ex:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ex.run(prepared("slow", block_loop, files("running"))), 0.5)
        pid = await pid_in(Path(files("running")))
        assert await gone([pid], timeout=3.0)
        assert await ex.run(prepared("next", add, 1, 2)) == 3


async def test_cancel_while_waiting_for_a_slot_never_starts(files: Any) -> None:
    async with started_executor(processes=1, childconcurrency=1) as ex:
        first = asyncio.create_task(ex.run(prepared("first", held_until, files("go"), 1)))
        started = asyncio.Event()
        second = asyncio.create_task(ex.run(prepared(
            "second", add, 1, 1, on_start=started.set)))
        for _ in range(10):
            await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert not started.is_set()
        Path(files("go")).touch()
        assert (await first)[1] == 1
        assert await ex.run(prepared("third", add, 2, 2)) == 4


# -- lifecycle ---------------------------------------------------------------------------------


async def test_start_prewarms_every_child() -> None:
    ex = AioProcessExecutor(processes=2)
    try:
        assert ex.worker_pids() == []
        await ex.start()
        pids = ex.worker_pids()
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        assert set(pids) <= {p.pid for p in psutil.Process().children()}
    finally:
        await ex.shutdown(cancel=True)


async def test_shutdown_cancel_kills_children_and_running_calls(files: Any) -> None:
    ex = AioProcessExecutor(processes=2)
    await ex.start()
    pids = ex.worker_pids()
    started = asyncio.Event()
    task = asyncio.create_task(ex.run(prepared(
        "running", held_until, files("never"), None, on_start=started.set)))
    await started.wait()
    await ex.shutdown(cancel=True)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ex.worker_pids() == []
    assert await gone(pids)
    assert aiomultiprocess.core._manager is None, "aiomultiprocess's manager was started"


async def test_shutdown_without_cancel_lets_running_calls_finish(files: Any) -> None:
    ex = AioProcessExecutor(processes=1)
    await ex.start()
    task = asyncio.create_task(ex.run(prepared(
        "finishing", held_until, files("release"), "done", running=files("running"))))
    await pid_in(Path(files("running")))
    stopping = asyncio.create_task(ex.shutdown(cancel=False))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not stopping.done()
    with pytest.raises(RuntimeError, match="shutting down"):
        await ex.run(prepared("late", add, 1, 1))
    Path(files("release")).touch()
    assert (await task)[1] == "done"
    await asyncio.wait_for(stopping, DEADLINE_S)
    assert ex.worker_pids() == []


async def test_shutdown_cancel_hurries_a_graceful_shutdown(files: Any) -> None:
    ex = AioProcessExecutor(processes=1)
    await ex.start()
    pids = ex.worker_pids()
    started = asyncio.Event()
    task = asyncio.create_task(ex.run(prepared(
        "stuck", held_until, files("never"), None, on_start=started.set)))
    await started.wait()
    graceful = asyncio.create_task(ex.shutdown(cancel=False))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not graceful.done()
    await asyncio.wait_for(ex.shutdown(cancel=True), DEADLINE_S)
    assert graceful.done()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gone(pids)


async def test_shutdown_twice_then_run_again() -> None:
    ex = AioProcessExecutor(processes=1)
    first = await ex.run(prepared("a", getpid))
    await ex.shutdown(cancel=True)
    await ex.shutdown(cancel=True)
    try:
        second = await ex.run(prepared("b", getpid))
        assert second != first
    finally:
        await ex.shutdown(cancel=False)


def children_but_trackers() -> set[int]:
    out = set()
    for proc in psutil.Process().children():
        try:
            if not any("resource_tracker" in part for part in proc.cmdline()):
                out.add(proc.pid)
        except psutil.Error:
            continue
    return out


async def test_cancelled_start_leaves_no_child() -> None:
    before = children_but_trackers()
    ex = AioProcessExecutor(processes=2)
    starting = asyncio.create_task(ex.start())
    assert await wait_for(lambda: len(children_but_trackers() - before) == 2)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert ex.worker_pids() == []
    assert await gone(children_but_trackers() - before)
    try:
        assert await ex.run(prepared("after", add, 1, 1)) == 2  # a later start works
    finally:
        await ex.shutdown(cancel=True)


async def test_initializer_runs_in_every_child() -> None:
    ex = AioProcessExecutor(processes=1, initializer=set_marker_env, initargs=("ready",))
    try:
        assert await ex.run(prepared("env", read_marker_env)) == "ready"
    finally:
        await ex.shutdown(cancel=True)


async def test_children_that_cannot_start_fail_start() -> None:
    # (a raising initializer does not stop a child from starting: tests/test_initializer.py)
    ex = AioProcessExecutor(processes=1, loop_initializer=broken_initializer)
    with pytest.raises(WorkerCrashedError, match="failed to start") as info:
        await ex.start()
    message = str(info.value)  # why: where it was raised, and what it said
    assert "exited with code 1 before it was ready" in message
    assert "in broken_initializer" in message and "RuntimeError: initializer fails" in message
    assert isinstance(info.value.__cause__, RemoteTraceback)  # the child's whole traceback
    assert "broken_initializer" in info.value.__cause__.tb
    assert ex.worker_pids() == []
    await ex.shutdown(cancel=True)


async def test_a_failed_start_answers_the_next_ones_for_a_while() -> None:
    """Not a child per call while children cannot start: the error stands for a second (the
    hold doubles with each failure in a row), then a start tries again."""
    ex = AioProcessExecutor(processes=1, loop_initializer=broken_initializer)
    with pytest.raises(WorkerCrashedError) as first:
        await ex.start()
    with pytest.raises(WorkerCrashedError) as again:
        await ex.start()
    assert again.value is first.value
    await asyncio.sleep(1.1)
    with pytest.raises(WorkerCrashedError) as later:
        await ex.start()
    assert later.value is not first.value  # it tried again
    await ex.shutdown(cancel=True)


def killed_at_start() -> asyncio.AbstractEventLoop:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("not reached")


async def test_a_child_killed_as_it_starts_says_so() -> None:
    ex = AioProcessExecutor(processes=1, loop_initializer=killed_at_start)
    with pytest.raises(WorkerCrashedError,
                       match=r"was killed by signal SIGKILL \(9\) before it was ready"):
        await ex.start()
    await ex.shutdown(cancel=True)


UNIMPORTABLE = """import os
if os.environ.get("STATEPOOL_TEST_IMPORTER") != str(os.getpid()):
    raise RuntimeError("needs the licence server, which only the parent reaches")

def init():
    pass
"""


async def test_an_initializer_whose_module_fails_at_import_in_the_child_says_why_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Every state fails with the child's reason (where and what it raised), and the
    children print nothing: the parent logs it (once, then one line per repeat)."""
    (tmp_path / "licensed.py").write_text(UNIMPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))  # (the children get the parent's sys.path)
    monkeypatch.setenv("STATEPOOL_TEST_IMPORTER", str(os.getpid()))
    import licensed  # type: ignore[import-not-found]

    try:
        ex = AioProcessExecutor(2, initializer=licensed.init)
        async with StateManager(executors={"aioprocess": ex}) as m:
            handles = [await m.put_state(State(f"s{i}", add, args=(i, 1),
                                               executor="aioprocess")) for i in range(6)]
            done, _ = await asyncio.wait([asyncio.ensure_future(_settle(h)) for h in handles],
                                         timeout=DEADLINE_S)
        assert len(done) == 6
        for handle in handles:
            assert handle.status is StateStatus.FAILED
            message = str(handle.exception())
            assert "failed to start: it exited with code 1 before it was ready" in message
            assert 'licensed.py", line 3, in <module>' in message
            assert "RuntimeError: needs the licence server" in message
    finally:
        sys.modules.pop("licensed", None)
    err = capfd.readouterr().err
    assert "Traceback" not in err.replace("RemoteTraceback", "")  # the children said nothing


async def _settle(handle: Any) -> None:
    with contextlib.suppress(Exception):
        await handle


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="processes"):
        AioProcessExecutor(processes=0)
    with pytest.raises(ValueError, match="childconcurrency"):
        AioProcessExecutor(childconcurrency=0)
    with pytest.raises(ValueError, match="cancel_grace"):
        AioProcessExecutor(cancel_grace=-1)


def test_registry_builds_it_by_name() -> None:
    import statepool.executors as executors

    assert executors.AioProcessExecutor is AioProcessExecutor
    ex = registry.create("aioprocess")
    assert isinstance(ex, AioProcessExecutor) and ex.name == "aioprocess"
    assert ex.processes == len(os.sched_getaffinity(0))
    assert ex.childconcurrency == 16


# -- through the StateManager ----------------------------------------------------------------


async def test_states_run_through_the_manager(files: Any) -> None:
    async def triple(x: int) -> int:
        return x * 3

    async with StateManager(executors={"aioprocess": AioProcessExecutor(processes=2)}) as m:
        ok = await m.put_state(State("triple", triple, lazy_args=(lambda: 5,),
                                     executor="aioprocess"))
        crash = await m.put_state(State("crasher", call_os_exit, executor="aioprocess"))
        assert await ok == 15
        lam = await m.put_state(State("lambda", lambda x: asyncio.sleep(0, result=x + 1),
                                      args=(41,), executor="aioprocess"))
        assert await lam == 42
        with pytest.raises(WorkerCrashedError, match=r"'crasher'.*exited with code 3"):
            await crash
        assert crash.status is StateStatus.FAILED


async def test_manager_timeout_kills_the_stuck_child(files: Any) -> None:
    ex = AioProcessExecutor(processes=1, cancel_grace=0.1)
    async with StateManager(executors={"aioprocess": ex}) as m:
        slow = await m.put_state(State("slow", block_loop, args=(files("running"),),
                                       executor="aioprocess", timeout=0.5))
        with pytest.raises(StateTimeoutError):
            await slow
        assert await gone([await pid_in(Path(files("running")))], timeout=3.0)
        after = await m.put_state(State("after", add, args=(1, 1), executor="aioprocess"))
        assert await after == 2


async def test_manager_cancel_stops_a_running_state(files: Any) -> None:
    async with StateManager() as m:
        handle = await m.put_state(State(
            "long", mark_cancellation, args=(files("running"), files("cancelled")),
            is_blocking=True, executor="aioprocess"))
        await pid_in(Path(files("running")))
        handle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handle
        assert handle.status is StateStatus.CANCELLED
        await wait_path(files("cancelled"))


async def test_manager_retries_a_crashed_state(files: Any) -> None:
    async def crash_once(marker: str) -> str:
        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        return "second time lucky"

    async with StateManager() as m:
        handle = await m.put_state(State("flaky", crash_once, args=(files("crashed"),),
                                         executor="aioprocess", retries=1))
        assert await handle == "second time lucky"
        assert handle.attempts == 2


async def test_manager_stop_leaves_no_child(files: Any) -> None:
    ex = AioProcessExecutor(processes=2)
    m = StateManager(executors={"aioprocess": ex})
    main = asyncio.create_task(m.process_states())
    handle = await m.put_state(State("forever", held_until, args=(files("never"), None),
                                     is_blocking=True, executor="aioprocess"))
    assert await wait_for(lambda: handle.started_at is not None)
    pids = ex.worker_pids()
    assert len(pids) == 2
    m.signal_stopping()
    await asyncio.wait_for(main, DEADLINE_S)
    assert handle.status is StateStatus.CANCELLED
    assert await gone(pids)


class SlowToLoadHere:
    """A result that takes 0.3 s to unpickle in the parent (and none in the child)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load_slowly, (self.parent,))


def _load_slowly(parent: int) -> SlowToLoadHere:
    if os.getpid() == parent:
        time.sleep(0.3)
    return SlowToLoadHere(parent)


async def run_then_return_slow(seconds: float, parent: int) -> SlowToLoadHere:
    await asyncio.sleep(seconds)
    return SlowToLoadHere(parent)


async def test_running_is_measured_in_the_child() -> None:
    """``timings["running"]`` is the time the call ran in its child, not the round trip: the
    0.3 s the parent takes to unpickle the result is ``returning``."""
    async with StateManager(executors={"aioprocess": AioProcessExecutor(1, 4)}) as m:
        await m.put_state(State("warm", add, args=(1, 2), executor="aioprocess"))
        await m.join()
        handle = await m.put_state(State("timed", run_then_return_slow,
                                         args=(0.2, os.getpid()), executor="aioprocess"))
        assert isinstance(await asyncio.wait_for(handle, DEADLINE_S), SlowToLoadHere)
    t = handle.timings
    assert t["running"] >= 0.19, t  # (the child's own pickling of the result counts in it)
    assert t["returning"] >= 0.28, t  # measured in the parent, it was all "running"
