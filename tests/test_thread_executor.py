"""The thread executor: long-running services never starve short states."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from engine import State, StateManager, StateStatus
from executors import ThreadExecutor
from executors.base import PreparedCall


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
