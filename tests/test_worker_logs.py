"""Worker logs in the parent (``"process"``, ``"aioprocess"``), faulthandler in workers.

A record a state logs in a worker reaches the parent's logging under its own logger name and
level, with ``state`` and ``worker`` (the PID) attributes; the worker filters at the parent's
level of that logger when it started; what it logged just before it died arrives; a segfault
leaves the worker's Python traceback in the state's ``WorkerCrashedError``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import _crashers
import _logging_work as work
import pytest

from statepool.engine import State, StateManager
from statepool.engine.errors import WorkerCrashedError
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor


def user_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "user.work"]


def executor(name: str) -> dict[str, Any]:
    if name == "process":
        return {"process": LokyExecutor(1)}
    return {"aioprocess": AioProcessExecutor(processes=1, childconcurrency=2)}


async def test_process_worker_records_reach_the_parent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="user.work")
    async with StateManager(executors=executor("process")) as m:
        h = await m.put_state(State("chat", work.chatty, True, args=(7,), executor="process"))
        assert await asyncio.wait_for(h, 30) == 7
        h2 = await m.put_state(State("threaded", work.from_a_thread, True, executor="process"))
        assert await asyncio.wait_for(h2, 30) == 1
    records = user_records(caplog)
    assert [(r.levelname, r.getMessage()) for r in records[:3]] == [
        ("INFO", "info 7"), ("WARNING", "warning 7"), ("ERROR", "failed on 7")]
    pid = records[0].worker  # type: ignore[attr-defined]
    assert isinstance(pid, int) and pid != os.getpid()
    assert all(r.state == "chat" for r in records[:3])  # type: ignore[attr-defined]
    assert records[1].color == "red"  # type: ignore[attr-defined]
    assert "KeyError: 7" in (records[2].exc_text or "")
    assert records[3].getMessage() == "from a thread" and records[3].worker == pid  # type: ignore[attr-defined]
    assert not any("debug" in r.getMessage() for r in records)  # the parent's level: INFO


async def test_the_worker_honours_the_parent_level_at_its_start(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="user.work")
    async with StateManager(executors=executor("process")) as m:
        await asyncio.wait_for(await m.put_state(
            State("chat", work.chatty, True, args=(1,), executor="process")), 30)
    assert next(r.getMessage() for r in user_records(caplog)) == "debug 1"


@pytest.mark.parametrize("name", ["process", "aioprocess"])
async def test_records_sent_just_before_the_worker_dies_arrive(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="user.work")
    fn = work.last_words if name == "process" else work.alast_words
    async with StateManager(executors=executor(name)) as m:
        h = await m.put_state(State("dying", fn, True, args=(3,), executor=name))
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(h, 30)
        # the records are read before the death is handled: they are here already
        messages = [r.getMessage() for r in user_records(caplog)]
        assert messages == [f"last words {i}" for i in range(50)]
    assert {r.state for r in user_records(caplog)} == {"dying"}  # type: ignore[attr-defined]


async def test_aioprocess_child_records_reach_the_parent(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="user.work")
    async with StateManager(executors=executor("aioprocess")) as m:
        handles = [await m.put_state(State(f"a{i}", work.achatty, True, args=(i,),
                                           executor="aioprocess")) for i in range(2)]
        assert await asyncio.wait_for(asyncio.gather(*handles), 30) == [0, 1]
    records = user_records(caplog)
    assert sorted(r.getMessage() for r in records) == ["async info 0", "async info 1"]
    assert {r.state for r in records} == {"a0", "a1"}  # type: ignore[attr-defined]
    by_state = {r.state: r.getMessage() for r in records}  # type: ignore[attr-defined]
    assert by_state == {"a0": "async info 0", "a1": "async info 1"}
    assert all(isinstance(r.worker, int) and r.worker != os.getpid()  # type: ignore[attr-defined]
               for r in records)


@pytest.mark.parametrize("name", ["process", "aioprocess"])
async def test_a_segfault_leaves_the_python_traceback_in_the_error(name: str) -> None:
    async def asegfault() -> None:
        _crashers.segfault()

    fn: Any = _crashers.segfault if name == "process" else asegfault
    async with StateManager(executors=executor(name)) as m:
        h = await m.put_state(State("segv", fn, True, executor=name))
        with pytest.raises(WorkerCrashedError) as info:
            await asyncio.wait_for(h, 30)
    message = str(info.value)
    assert "faulthandler" in message and "Segmentation fault" in message
    assert "in segfault" in message  # the frame of the function that crashed


# -- warn_after ------------------------------------------------------------------------------


def stall_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "past warn_after" in r.getMessage()]


@pytest.mark.parametrize("name", ["process", "aioprocess"])
async def test_a_stalled_process_state_warns_once_with_its_workers_stack(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    fn = work.busy if name == "process" else work.abusy
    async with StateManager(executors=executor(name)) as m:
        quick = await m.put_state(State("quick", fn, True, args=(0.01,), executor=name,
                                        warn_after=5.0))
        await asyncio.wait_for(quick, 30)  # the worker has imported the module
        h = await m.put_state(State("stuck", fn, True, args=(1.2,), executor=name,
                                    warn_after=0.3))
        assert await asyncio.wait_for(h, 30) > 0  # warned, not killed
    (record,) = stall_records(caplog)
    message = record.getMessage()
    assert "state 'stuck'" in message and "warn_after=0.3 s" in message
    assert "in busy" in message  # the worker's current Python stack, from faulthandler
    assert record.state == "stuck" and isinstance(record.worker, int)  # type: ignore[attr-defined]


def block_in_a_thread(seconds: float) -> int:
    time.sleep(seconds)  # the line the stack shows
    return 1


async def test_a_stalled_thread_state_warns_once_with_its_threads_stack(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    async with StateManager(executors={"thread": ThreadExecutor(2)}) as m:
        h = await m.put_state(State("stuck-thread", block_in_a_thread, True, args=(1.0,),
                                    executor="thread", warn_after=0.3))
        assert await asyncio.wait_for(h, 30) == 1  # warned, not stopped
    (record,) = stall_records(caplog)
    message = record.getMessage()
    assert "state 'stuck-thread'" in message and "its current Python stack" in message
    assert "in block_in_a_thread" in message and "time.sleep(seconds)" in message
    stack = message.split("its current Python stack:", 1)[1]
    files = {line.split('"')[1] for line in stack.splitlines() if line.startswith("  File")}
    assert files == {__file__}  # the state's own code: not the thread's start nor the pool's
    assert record.worker.startswith("statepool-thread-")  # type: ignore[attr-defined]


async def test_the_manager_option_covers_every_state_and_shows_a_coroutines_stack(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")

    async def dawdle() -> int:
        await asyncio.sleep(0.6)
        return 1

    async with StateManager(warn_after=0.2) as m:
        h = await m.put_state(State("slow-coro", dawdle))
        fast = await m.put_state(State("fast-coro", work.achatty, args=(1,)))
        assert await asyncio.wait_for(asyncio.gather(h, fast), 10) == [1, 1]
    (record,) = stall_records(caplog)
    assert "state 'slow-coro'" in record.getMessage()
    assert "dawdle" in record.getMessage()  # the task's stack
    with pytest.raises(ValueError, match="warn_after"):
        StateManager(warn_after=0)
    with pytest.raises(ValueError, match="warn_after"):
        State("x", dawdle, warn_after=float("nan"))
