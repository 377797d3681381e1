"""Every malformed call of the public API answers with a clear error and the manager works on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from statepool.engine import ManagerStoppedError, State, StateManager
from statepool.executors import InlineExecutor, ThreadExecutor, register

# building a manager or executor: (factory, exception, words the message holds)
CONSTRUCTION = [
    (lambda: StateManager(max_queue=-1), ValueError, ["max_queue"]),
    (lambda: StateManager(max_queue="10"), ValueError, ["max_queue"]),
    (lambda: StateManager(shutdown_grace=-0.5), ValueError, ["shutdown_grace"]),
    (lambda: StateManager(executors={"process": "loky"}), TypeError, ["executors['process']"]),
    (lambda: ThreadExecutor(max_workers=0), ValueError, ["max_workers"]),
    (lambda: register("", InlineExecutor), ValueError, ["name"]),
    (lambda: register("x", None), TypeError, ["'x'"]),
]


@pytest.mark.parametrize(("factory", "exc_type", "words"), CONSTRUCTION)
def test_bad_construction(factory: Callable[[], Any], exc_type: type, words: list[str]) -> None:
    with pytest.raises(exc_type) as info:
        factory()
    for word in words:
        assert word in str(info.value)


async def _put_non_state(m: StateManager) -> Any:
    return await m.put_state(object())  # type: ignore[arg-type]


async def _put_mixed_batch(m: StateManager) -> Any:
    return await m.put_states([State("fine", lambda: 1), "nope"])  # type: ignore[list-item]


async def _second_main_loop(m: StateManager) -> Any:
    return await m.process_states()


async def _await_from_other_loop(m: StateManager) -> Any:
    handle = await m.put_state(State("slow", asyncio.sleep, True, args=(0.2,)))
    result: list[BaseException] = []

    def other() -> None:
        async def wait() -> None:
            await handle

        try:
            asyncio.run(wait())
        except BaseException as exc:
            result.append(exc)

    await asyncio.get_running_loop().run_in_executor(None, other)
    raise result[0]


async def _manager_on_two_loops(m: StateManager) -> Any:
    result: list[BaseException] = []

    def other() -> None:
        async def put() -> None:
            await m.put_state(State("x", lambda: 1))

        try:
            asyncio.run(put())
        except BaseException as exc:
            result.append(exc)

    await asyncio.get_running_loop().run_in_executor(None, other)
    raise result[0]


# misuse of a running manager: (call, exception, words the message holds)
RUNNING_MISUSE: list[tuple[Callable[[StateManager], Awaitable[Any]], type, list[str]]] = [
    (_put_non_state, TypeError, ["State", "object"]),
    (_put_mixed_batch, TypeError, ["State", "str"]),
    (_second_main_loop, RuntimeError, ["already running"]),
    (_await_from_other_loop, RuntimeError, ["'slow'", "another loop"]),
    (_manager_on_two_loops, RuntimeError, ["another event loop"]),
]


@pytest.mark.parametrize(("call", "exc_type", "words"), RUNNING_MISUSE)
async def test_misuse_leaves_the_manager_working(call, exc_type, words) -> None:  # type: ignore[no-untyped-def]
    async with StateManager() as m:
        await asyncio.sleep(0)
        with pytest.raises(exc_type) as info:
            await call(m)
        for word in words:
            assert word in str(info.value)
        assert await (await m.put_state(State("after", lambda: "works"))) == "works"
        assert m.stats()["by_status"]["QUEUED"] == 0


async def test_stopped_manager_refuses_puts_and_a_new_main_loop() -> None:
    async with StateManager() as m:
        pass
    with pytest.raises(ManagerStoppedError, match="'late'"):
        await m.put_state(State("late", lambda: 1))
    with pytest.raises(ManagerStoppedError, match="'late'"):
        await m.put_states([State("late", lambda: 1)])
    with pytest.raises(ManagerStoppedError):
        await m.process_states()


async def test_enter_state_on_a_stopped_process_wide_manager() -> None:
    manager = StateManager.instance()
    assert await State("first", lambda: 1).enter_state() == 1
    manager.signal_stopping()
    await manager.join()
    with pytest.raises(ManagerStoppedError, match="'late'"):
        await State("late", lambda: 1).enter_state()
