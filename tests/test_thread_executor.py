"""The thread executor: long-running services never starve short states."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.executors import ThreadExecutor
from statepool.executors.base import PreparedCall


async def test_services_do_not_take_the_slots_short_states_need() -> None:
    stop = threading.Event()
    running = threading.Semaphore(0)

    def service() -> str:
        running.release()
        stop.wait(20)
        return "service done"

    pool = ThreadExecutor(max_workers=2, long_after=0.05)
    try:
        async with StateManager(executors={"thread": pool}) as m:
            services = await m.put_states([State(f"svc{i}", service, True) for i in range(4)])
            shorts = await m.put_states(
                [State(f"short{i}", lambda i=i: i * i, True) for i in range(50)])
            results = await asyncio.wait_for(asyncio.gather(*shorts), 10)
            assert results == [i * i for i in range(50)]
            assert all(h.status is StateStatus.RUNNING for h in services)
            stop.set()
            assert await asyncio.wait_for(asyncio.gather(*services), 10) == ["service done"] * 4
    finally:
        stop.set()


async def test_short_calls_share_a_bounded_pool() -> None:
    peak = 0
    active = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal peak, active
        with lock:
            active += 1
            peak = max(peak, active)
        threading.Event().wait(0.01)
        with lock:
            active -= 1

    pool = ThreadExecutor(max_workers=3)
    try:
        calls = [pool.run(PreparedCall(f"s{i}", "work", work)) for i in range(30)]
        await asyncio.wait_for(asyncio.gather(*calls), 10)
    finally:
        await pool.shutdown(cancel=False)
    assert 1 <= peak <= 3


async def test_exception_keeps_its_type_and_coroutine_runs_in_thread() -> None:
    async def coro(x: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return x, threading.current_thread().name

    def bad() -> None:
        raise LookupError("gone")

    pool = ThreadExecutor(max_workers=1)
    try:
        value, name = await pool.run(PreparedCall("c", "coro", coro, (3,), is_coro=True))
        assert value == 3 and name.startswith("statepool-thread")
        try:
            await pool.run(PreparedCall("b", "bad", bad))
        except LookupError as exc:
            assert str(exc) == "gone"
        else:
            raise AssertionError("expected LookupError")
    finally:
        await pool.shutdown(cancel=True)


async def test_cancelled_pending_call_never_runs() -> None:
    release = threading.Event()
    ran = []
    pool = ThreadExecutor(max_workers=1)
    try:
        first = asyncio.ensure_future(pool.run(PreparedCall("a", "w", release.wait, (5,))))
        second = asyncio.ensure_future(pool.run(PreparedCall("b", "w", lambda: ran.append(1))))
        await asyncio.sleep(0.02)
        second.cancel()  # delivered at the task's next step: let it land before releasing
        with contextlib.suppress(asyncio.CancelledError):
            await second
        release.set()
        assert await first is True
        await asyncio.sleep(0.05)
        assert ran == []
    finally:
        release.set()
        await pool.shutdown(cancel=True)


async def test_shutdown_after_use_leaves_no_thread() -> None:
    pool = ThreadExecutor(max_workers=4)
    await asyncio.gather(*[pool.run(PreparedCall(f"s{i}", "f", int)) for i in range(20)])
    await pool.shutdown(cancel=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("statepool-thread")]
    assert pool.abandoned == []


# -- plain blocking thread states: no task of their own (StateManager._start_on_thread) --------


async def test_plain_thread_states_report_their_times_and_counts() -> None:
    pool = ThreadExecutor(max_workers=2)
    async with StateManager(executors={"thread": pool}) as m:
        handles = await m.put_states(
            [State(f"t{i}", lambda i=i: (i, threading.current_thread().name), True)
             for i in range(40)])
        await asyncio.wait_for(m.join(), 10)
        stats = m.stats()
    assert [h.result()[0] for h in handles] == list(range(40))
    assert all(h.result()[1].startswith("statepool-thread") for h in handles)
    assert all(h.queued_at <= h.started_at <= h.finished_at for h in handles)  # type: ignore
    assert all(h.attempts == 1 for h in handles)
    assert stats["by_executor"]["thread"] == 40 and stats["by_status"]["SUCCEEDED"] == 40


async def test_plain_thread_state_errors_fail_it_once_with_their_type(caplog: Any) -> None:
    def bad() -> None:
        raise LookupError("gone")

    def cancels_itself() -> None:
        raise asyncio.CancelledError

    caplog.set_level(logging.ERROR, logger="statepool")
    async with StateManager(executors={"thread": ThreadExecutor(max_workers=1)}) as m:
        h_bad = await m.put_state(State("bad", bad, True))
        h_cancel = await m.put_state(State("cancels", cancels_itself, True))
        await asyncio.wait_for(m.join(), 10)
    assert isinstance(h_bad.exception(), LookupError)
    assert h_cancel.status is StateStatus.CANCELLED
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'bad'" in errors[0] and "LookupError" in errors[0]


async def test_cancelling_plain_thread_states_running_or_waiting(caplog: Any) -> None:
    release = threading.Event()
    ran: list[str] = []

    def hold(name: str) -> str:
        ran.append(name)
        release.wait(10)
        return name

    caplog.set_level(logging.WARNING, logger="statepool")
    pool = ThreadExecutor(max_workers=1, long_after=60)
    try:
        async with StateManager(executors={"thread": pool}) as m:
            running = await m.put_state(State("running", hold, True, args=("running",)))
            waiting = await m.put_state(State("waiting", hold, True, args=("waiting",)))
            while not ran:
                await asyncio.sleep(0.01)
            assert waiting.cancel() and running.cancel()
            assert running.status is waiting.status is StateStatus.CANCELLED
            release.set()
            after = await m.put_state(State("after", lambda: "after", True))
            assert await asyncio.wait_for(after, 10) == "after"  # the pool carries on
    finally:
        release.set()
    assert ran == ["running"]  # the waiting one never started
    assert any("'running'" in r.getMessage() and "abandoned" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, GeneratorExit])
@pytest.mark.parametrize("options", [{}, {"timeout": 30.0}], ids=["no task", "own task"])
async def test_base_exceptions_in_a_thread_state_only_fail_it(
        options: dict[str, Any], kind: type[BaseException]) -> None:
    """SPEC: raised anywhere but by a state's code on the loop thread, they only fail the state
    (a thread is not the loop: the main loop goes on)."""

    def leave() -> None:
        raise kind(3)

    async with StateManager(executors={"thread": ThreadExecutor(max_workers=1)}) as m:
        handle = await m.put_state(State("exit", leave, True, **options))
        other = await m.put_state(State("other", lambda: "other", True, **options))
        assert await asyncio.wait_for(other, 10) == "other"
        deadline = time.monotonic() + 10
        while not handle.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
    assert handle.status is StateStatus.FAILED
    assert isinstance(handle.exception(), kind)
