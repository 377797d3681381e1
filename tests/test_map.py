"""manager.map and run_map (SPEC: StateManager; issue 12), the is_blocking trap warning, and the
process-wide manager across several asyncio.run() calls."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import pytest

from statepool.engine import State, StateManager
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor


def _sleepy(x: float) -> float:
    time.sleep(x)
    return x


async def _aio_sleepy(x: float) -> float:
    await asyncio.sleep(x)
    return x


# -- StateManager.instance() across event loops ---------------------------------------------


def test_the_process_wide_manager_works_across_two_asyncio_runs() -> None:
    async def once(n: int) -> tuple[int, int]:
        manager = StateManager.instance()
        runner = asyncio.create_task(manager.process_states())
        handle = await manager.put_state(State("twice", _aio_sleepy, True, args=(0.01,)))
        await handle
        manager.signal_stopping()
        await runner
        return n, id(manager)

    first = asyncio.run(once(1))
    second = asyncio.run(once(2))
    assert first[1] != second[1]  # the stopped one was replaced


def test_instance_replaces_a_manager_whose_loop_closed_without_stopping() -> None:
    async def put_only() -> int:
        manager = StateManager.instance()
        await manager.put_state(State("left", _aio_sleepy, True, args=(0.01,)))
        return id(manager)

    async def run_one() -> float:
        async with StateManager.instance() as manager:
            return await (await manager.put_state(State("ok", _aio_sleepy, True, args=(0.02,))))

    old = asyncio.run(put_only())
    assert asyncio.run(run_one()) == 0.02
    assert id(StateManager.instance()) != old


async def test_instance_is_kept_while_its_loop_is_open() -> None:
    manager = StateManager.instance()
    assert StateManager.instance() is manager
    async with manager:
        assert StateManager.instance() is manager


# -- the is_blocking trap ----------------------------------------------------------------------


def _trap_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "is_blocking=True" in r.getMessage()]


def trap_executors(name: str) -> dict[str, Any]:
    return {"thread": {"thread": ThreadExecutor(2)},
            "process": {"process": LokyExecutor(max_workers=2)},
            "aioprocess": {"aioprocess": AioProcessExecutor(processes=1, childconcurrency=2)},
            }[name]


@pytest.mark.parametrize("executor", ["thread", "process", "aioprocess"])
async def test_non_blocking_states_in_line_on_a_pool_warn_once_per_function(
        executor: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    fn = _aio_sleepy if executor == "aioprocess" else _sleepy
    async with StateManager(executors=trap_executors(executor)) as manager:
        await manager.put_states([State(f"warm {i}", fn, True, args=(0.0,), executor=executor)
                                  for i in range(2)])
        await manager.join()
        handles = await manager.put_states(
            [State(f"slow {i}", fn, args=(0.02,), executor=executor) for i in range(6)])
        await manager.join()
        more = await manager.put_states(
            [State(f"again {i}", fn, args=(0.01,), executor=executor) for i in range(3)])
        await manager.join()
    assert all(h.result() == 0.02 for h in handles) and all(h.done() for h in more)
    (record,) = _trap_warnings(caplog)
    message = record.getMessage()
    assert "'slow 0'" in message and fn.__name__ in message and "manager.map" in message
    assert record.levelno == logging.WARNING


async def test_no_trap_warning_for_blocking_states_single_workers_or_mixed_functions(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    async with StateManager(executors={"thread": ThreadExecutor(2)}) as manager:
        await manager.put_states(
            [State(f"b {i}", _sleepy, True, args=(0.01,), executor="thread") for i in range(6)])
        await manager.join()
        await manager.put_states(  # alternating functions: nothing of one waits behind it
            [State(f"m {i}", _sleepy if i % 2 else os.getpid, args=(0.01,) if i % 2 else (),
                   executor="thread") for i in range(6)])
        await manager.join()
    async with StateManager(executors={"thread": ThreadExecutor(1)}) as manager:
        await manager.put_states(
            [State(f"one {i}", _sleepy, args=(0.01,), executor="thread") for i in range(4)])
        await manager.join()
    assert _trap_warnings(caplog) == []
