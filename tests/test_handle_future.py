"""StateHandle as an asyncio future (SPEC: StateHandle; issue 12): gather / wait / as_completed
take handles with no task per handle, done-callbacks, get_loop, a failed handle's traceback that
does not grow, and the asyncio names the protocol relies on (engine/futurelike.py)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
import traceback
from typing import Any

import pytest

from statepool.engine import State, StateHandle, StateManager, StateStatus
from statepool.executors import AioProcessExecutor, InlineExecutor, LokyExecutor, ThreadExecutor

EXECUTORS = ["inline", "thread", "process", "aioprocess"]


def executors(name: str) -> dict[str, Any]:
    return {"inline": {"inline": InlineExecutor()},
            "thread": {"thread": ThreadExecutor(2)},
            "process": {"process": LokyExecutor(max_workers=1)},
            "aioprocess": {"aioprocess": AioProcessExecutor(processes=1)}}[name]


async def _aio_double(x: int) -> int:
    return 2 * x


def _double(x: int) -> int:
    return 2 * x


async def _aio_fail(x: int) -> int:
    raise ValueError(f"bad {x}")


def _fail(x: int) -> int:
    raise ValueError(f"bad {x}")


async def _aio_pid() -> int:
    return os.getpid()


def _pid() -> int:
    return os.getpid()


def state(name: str, executor: str, func: str, *args: Any) -> State:
    coro = executor in ("inline", "aioprocess")
    fn = {"double": _aio_double if coro else _double,
          "fail": _aio_fail if coro else _fail,
          "pid": _aio_pid if coro else _pid}[func]
    return State(name, fn, True, args=args, executor=executor)


def test_asyncio_still_recognises_futures_by_the_names_futurelike_uses() -> None:
    """The protocol's private names are asyncio's: this fails if asyncio changes them."""

    class Duck:
        _asyncio_future_blocking = False

    class NotADuck:
        pass

    assert asyncio.isfuture(Duck()) and not asyncio.isfuture(NotADuck())
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        for name in ("_asyncio_future_blocking", "_cancel_message", "_make_cancelled_error"):
            assert hasattr(fut, name), f"asyncio.Future has no {name!r} any more"
    finally:
        loop.close()


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_gather_wait_and_as_completed_take_handles_without_tasks(executor: str) -> None:
    async with StateManager(executors=executors(executor)) as manager:
        handles = await manager.put_states(
            [state(f"d{i}", executor, "double", i) for i in range(8)])
        assert all(asyncio.isfuture(h) for h in handles)
        assert asyncio.ensure_future(handles[0]) is handles[0]
        assert asyncio.wrap_future(handles[0]) is handles[0]
        tasks_before = len(asyncio.all_tasks())
        gathered = asyncio.gather(*handles)
        assert len(asyncio.all_tasks()) == tasks_before  # no task per handle
        assert await gathered == [2 * i for i in range(8)]

        more = await manager.put_states(
            [state(f"w{i}", executor, "double", i) for i in range(4)])
        done, pending = await asyncio.wait(more)
        assert done == set(more) and not pending
        late = await manager.put_states(
            [state(f"c{i}", executor, "double", i) for i in range(4)])
        got = sorted([await f for f in asyncio.as_completed(late)])
        assert got == [0, 2, 4, 6]
        assert all(h.get_loop() is asyncio.get_running_loop() for h in handles)


@pytest.mark.parametrize("executor", EXECUTORS)
async def test_a_failed_handle_raises_the_same_traceback_every_time(executor: str) -> None:
    async with StateManager(executors=executors(executor)) as manager:
        handle = await manager.put_state(state("boom", executor, "fail", 3))
        lengths, frames = [], []
        for _ in range(4):
            with pytest.raises(ValueError, match="bad 3") as info:
                await handle
            tb = traceback.extract_tb(info.value.__traceback__)
            lengths.append(len(tb))
            frames.append([(f.filename, f.name) for f in tb])
        for _ in range(2):
            with pytest.raises(ValueError):
                handle.result()
        with pytest.raises(ValueError):
            await handle
        assert len(set(lengths[1:])) == 1 and lengths[0] <= lengths[1], lengths
        assert frames[1] == frames[2] == frames[3]
        assert len(traceback.extract_tb(handle.exception().__traceback__)) <= lengths[1]
        results = await asyncio.gather(handle, return_exceptions=True)
        assert isinstance(results[0], ValueError)


async def test_done_callbacks_run_soon_in_their_context_and_can_be_removed() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    calls: list[tuple[str, StateHandle]] = []

    def record(tag: str) -> Any:
        def callback(h: StateHandle) -> None:
            calls.append((f"{tag}:{var.get()}", h))
        return callback

    gate = asyncio.Event()
    async with StateManager() as manager:
        handle = await manager.put_state(State("gated", _aio_double, True, args=(1,), event=gate))
        first, second, third = record("a"), record("b"), record("c")
        var.set("mine")
        handle.add_done_callback(first)
        handle.add_done_callback(second, context=contextvars.Context())
        handle.add_done_callback(third)
        handle.add_done_callback(third)
        assert handle.remove_done_callback(third) == 2
        assert handle.remove_done_callback(print) == 0
        gate.set()
        assert await handle == 2
        await asyncio.sleep(0)
        assert [c for c, _ in calls] == ["a:mine", "b:unset"]
        assert all(h is handle for _, h in calls)
        calls.clear()
        handle.add_done_callback(first)  # on a done handle: soon, never at once
        assert calls == []
        await asyncio.sleep(0)
        assert [c for c, _ in calls] == ["a:mine"]


async def test_a_raising_callback_goes_to_the_loop_exception_handler() -> None:
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))

    def bad(_h: StateHandle) -> None:
        raise RuntimeError("callback failed")

    async with StateManager() as manager:
        handle = await manager.put_state(State("x", _aio_double, True, args=(1,)))
        handle.add_done_callback(bad)
        await handle
        await asyncio.sleep(0)
    assert len(seen) == 1 and isinstance(seen[0]["exception"], RuntimeError)


async def test_gather_of_cancelled_handles_and_cancelling_the_gather() -> None:
    gate = asyncio.Event()
    async with StateManager() as manager:
        held = await manager.put_states(
            [State(f"g{i}", _aio_double, True, args=(i,), event=gate) for i in range(3)])
        held[0].cancel(msg="not needed")
        out = await asyncio.gather(*held[:1], return_exceptions=True)
        assert isinstance(out[0], asyncio.CancelledError) and "not needed" in str(out[0])
        with pytest.raises(asyncio.CancelledError):
            await asyncio.gather(held[0])
        outer = asyncio.gather(*held[1:])
        await asyncio.sleep(0)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert all(h.status is StateStatus.CANCELLED for h in held)
        gate.set()


async def test_cancelling_a_task_that_awaits_a_handle_cancels_the_state_as_for_a_future() -> None:
    gate = asyncio.Event()
    async with StateManager() as manager:
        handle = await manager.put_state(State("held", _aio_double, True, args=(1,), event=gate))
        shielded = await manager.put_state(
            State("kept", _aio_double, True, args=(2,), event=gate))
        waiter = asyncio.ensure_future(handle)
        assert waiter is handle  # a future already: no task
        task = asyncio.create_task(_await(handle))
        task2 = asyncio.create_task(_await(asyncio.shield(shielded)))
        await asyncio.sleep(0.01)
        task.cancel()
        task2.cancel()
        await asyncio.wait([task, task2])
        assert handle.cancelled()
        assert not shielded.done()
        gate.set()
        assert await shielded == 4
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                await manager.put_state(State("slow", asyncio.sleep, True, args=(5,))), 0.05)


async def _await(aw: Any) -> Any:
    return await aw


async def test_awaiting_a_handle_from_another_loop_is_a_clear_error() -> None:
    async with StateManager() as manager:
        handle = await manager.put_state(State("slow", asyncio.sleep, True, args=(0.3,)))

        def other_loop() -> None:
            async def inner() -> None:
                await handle
            asyncio.run(inner())

        with pytest.raises(RuntimeError, match=r"'slow'.*another loop"):
            await asyncio.get_running_loop().run_in_executor(None, other_loop)
        await handle


# -- waiting on a manager that does not run (SPEC: StateManager) -------------------------------


def _idle_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING
            and "process_states() is not running" in r.getMessage()]


async def test_awaiting_a_handle_of_a_manager_that_does_not_run_warns_within_a_second(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    manager = StateManager()
    handle = await manager.put_state(State("forgotten", _aio_double, True, args=(1,)))
    await manager.put_state(State("behind", _aio_double, True, args=(2,)))
    t0 = time.time()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(handle), 1.2)
    (record,) = _idle_warnings(caplog)
    assert "'forgotten'" in record.getMessage() and "1 other" in record.getMessage()
    assert record.created - t0 < 1.0
    assert record.state == "forgotten"  # type: ignore[attr-defined]
    runner = asyncio.create_task(manager.process_states())  # late, but it runs them
    assert await handle == 2
    manager.signal_stopping()
    await runner


async def test_join_and_gather_on_a_manager_that_does_not_run_warn_once_each(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    manager = StateManager()
    handles = await manager.put_states(
        [State(f"s{i}", _aio_double, True, args=(i,)) for i in range(50)])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(manager.join(), 0.8)
    assert len(_idle_warnings(caplog)) == 1
    assert "join() waits" in _idle_warnings(caplog)[0].getMessage()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(asyncio.gather(*handles)), 0.8)
    assert len(_idle_warnings(caplog)) == 2  # one for the 50 handles, not 50
    manager.signal_stopping()
    await asyncio.sleep(0.05)
    assert all(h.cancelled() for h in handles)


async def test_no_warning_while_the_manager_runs_or_for_enter_state(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    async with StateManager() as manager:
        handle = await manager.put_state(State("slow", asyncio.sleep, True, args=(0.8, 7)))
        assert await handle == 7
    slow = State("entered", asyncio.sleep, True, args=(0.7, 3))
    entered = await slow.enter_state()  # the process-wide manager, with no main loop
    assert await entered == 3
    assert _idle_warnings(caplog) == []
