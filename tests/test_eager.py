"""Eager start of coroutine states (engine/fastpath.py: asyncio's public eager_start, 3.12+):
the first step runs at once, a task is made
only when the state waits, and everything a task gives a coroutine stays true meanwhile."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from typing import Any

import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.engine.fastpath import EAGER, EAGER_START, FACTORY

# What must hold for every coroutine state holds on every Python; the tests marked with this
# check eager start itself, which needs asyncio's C tasks on CPython 3.11+.
needs_eager = pytest.mark.skipif(not EAGER_START,
                                 reason="asyncio's eager tasks (eager_start=True) are 3.12's")
py311 = pytest.mark.skipif(sys.version_info < (3, 11),
                           reason="asyncio.timeout(), TaskGroup and uncancel() are 3.11's")

var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


def eager_state(name: str, func: Any, blocking: bool = True) -> State:
    return State(name, func, blocking, executor="inline")


@needs_eager
async def test_a_state_that_never_waits_runs_before_the_loop_turns_and_makes_no_task() -> None:
    seen: list[Any] = []

    async def quick(i: int) -> int:
        seen.append(asyncio.current_task())
        return i * 2

    async with StateManager() as m:
        tasks_before = len(asyncio.all_tasks())
        handles = await m.put_states(
            [State(f"q{i}", quick, True, args=(i,)) for i in range(50)])
        await m.join()
        assert len(asyncio.all_tasks()) == tasks_before  # none was ever scheduled
    assert [h.result() for h in handles] == [i * 2 for i in range(50)]
    assert all(isinstance(t, asyncio.Task) for t in seen)
    assert len({id(t) for t in seen}) == 50  # each state its own current task
    assert all(h.started_at is not None and h.finished_at >= h.started_at for h in handles)


async def test_current_task_is_the_same_object_before_and_after_the_first_wait() -> None:
    async def steps() -> tuple[bool, bool, str]:
        me = asyncio.current_task()
        assert me is not None
        me.set_name("renamed")
        await asyncio.sleep(0)
        again = asyncio.current_task()
        await asyncio.sleep(0.01)
        return again is me, asyncio.current_task() is me, me.get_name()

    async with StateManager() as m:
        h = await m.put_state(eager_state("steps", steps))
        assert await h == (True, True, "renamed")
        assert m._main_task is not None and not m._main_task.done()


@py311
async def test_asyncio_timeout_entered_in_the_first_step_cancels_only_that_state() -> None:
    async def slow_with_timeout() -> str:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return "timed out"
        return "not reached"

    async def other() -> str:
        await asyncio.sleep(0.1)
        return "other"

    async with StateManager() as m:
        h1 = await m.put_state(eager_state("t", slow_with_timeout))
        h2 = await m.put_state(eager_state("o", other))
        assert await h1 == "timed out"
        assert await h2 == "other"
        assert m._main_task is not None and not m._main_task.cancelling()


@py311
async def test_a_task_group_opened_in_the_first_step_runs_its_children() -> None:
    async def child(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    async def parent() -> list[int]:
        async with asyncio.TaskGroup() as tg:
            ts = [tg.create_task(child(i)) for i in range(3)]
        return [t.result() for t in ts]

    async def failing_parent() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(5))
            raise_soon = tg.create_task(child(1))
            await raise_soon
            raise ValueError("boom in the group")

    async with StateManager() as m:
        h = await m.put_state(eager_state("parent", parent))
        f = await m.put_state(eager_state("failing", failing_parent))
        assert await h == [0, 1, 2]
        await m.join()
    assert f.status is StateStatus.FAILED
    assert type(f.exception()).__name__ == "ExceptionGroup"


async def test_a_state_cancelling_its_own_task_then_waiting_ends_cancelled() -> None:
    cleanup: list[str] = []

    async def self_cancel() -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        try:
            await asyncio.sleep(10)
        finally:
            cleanup.append("finally ran")

    async with StateManager() as m:
        h = await m.put_state(eager_state("self-cancel", self_cancel))
        await m.join()
        h2 = await m.put_state(eager_state("after", _answer))
        assert await h2 == 42  # the manager went on
    assert h.status is StateStatus.CANCELLED
    assert cleanup == ["finally ran"]


async def _answer() -> int:
    return 42


@py311
async def test_cancelling_and_uncancelling_in_the_first_step_counts_like_a_task() -> None:
    async def counts() -> tuple[int, int, int]:
        me = asyncio.current_task()
        assert me is not None
        me.cancel()
        a = me.cancelling()
        me.cancel()
        b = me.cancelling()
        c = me.uncancel()
        return a, b, c

    async with StateManager() as m:
        h = await m.put_state(eager_state("counts", counts))
        assert await h == (1, 2, 1)


async def test_done_callbacks_added_in_the_first_step_run_whether_it_waits_or_not() -> None:
    fired: list[str] = []

    def make(name: str, wait: bool) -> Any:
        async def run() -> str:
            asyncio.current_task().add_done_callback(  # type: ignore[union-attr]
                lambda t: fired.append(f"{name}:{t.done()}"))
            if wait:
                await asyncio.sleep(0.01)
            return name

        return run

    async with StateManager() as m:
        hs = await m.put_states([eager_state("w", make("w", True)),
                                 eager_state("n", make("n", False))])
        assert [await h for h in hs] == ["w", "n"]
        for _ in range(5):
            await asyncio.sleep(0)
    assert sorted(fired) == ["n:True", "w:True"]


async def test_the_first_step_runs_in_the_putters_context_and_isolates_changes() -> None:
    async def reads_and_sets(tag: str, wait: bool) -> tuple[str, str]:
        before = var.get()
        var.set(tag)
        if wait:
            await asyncio.sleep(0.01)
        return before, var.get()

    var.set("putter")
    async with StateManager() as m:
        hs = await m.put_states([
            State("a", reads_and_sets, True, args=("a", True)),
            State("b", reads_and_sets, True, args=("b", False)),
        ])
        assert [await h for h in hs] == [("putter", "a"), ("putter", "b")]
    assert var.get() == "putter"


async def test_cancel_reaching_a_state_before_its_task_first_steps_is_thrown_at_its_await(
) -> None:
    """State b cancels state a between a's first step and the first step of a's task."""
    trace: list[str] = []
    box: dict[str, Any] = {}

    async def a() -> None:
        fut = asyncio.get_running_loop().create_future()
        box["fut"] = fut
        try:
            await fut
        except asyncio.CancelledError:
            trace.append("a cancelled at its await")
            raise

    async def b() -> str:
        box["a"].cancel()
        return "b"

    async with StateManager() as m:
        ha, hb = await m.put_states([eager_state("a", a), eager_state("b", b)])
        box["a"] = ha
        await m.join()
    assert ha.status is StateStatus.CANCELLED and hb.result() == "b"
    assert trace == ["a cancelled at its await"]
    assert box["fut"].cancelled()


async def test_a_non_blocking_state_that_waits_holds_the_queue_until_it_ends() -> None:
    log: list[str] = []

    async def first() -> None:
        log.append("first start")
        await asyncio.sleep(0.02)
        log.append("first end")

    async def second() -> None:
        log.append("second")

    async with StateManager() as m:
        await m.put_states([State("1", first), State("2", second)])
    assert log == ["first start", "first end", "second"]


async def test_errors_in_the_first_step_fail_the_state_and_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    async def bad() -> None:
        raise KeyError("first step")

    async def bad_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later step")

    caplog.set_level(logging.ERROR, logger="statepool")
    async with StateManager() as m:
        h1 = await m.put_state(eager_state("bad", bad))
        h2 = await m.put_state(eager_state("bad-later", bad_later))
        await m.join()
    assert isinstance(h1.exception(), KeyError) and isinstance(h2.exception(), KeyError)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failures) == 2
    assert "'bad'" in failures[0].getMessage() and "'bad-later'" in failures[1].getMessage()


async def test_many_states_that_never_wait_do_not_starve_the_loop() -> None:
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0)
            now = loop.time()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        async with StateManager() as m:
            states = [eager_state(f"s{i}", _answer) for i in range(30_000)]
            await asyncio.sleep(0.01)
            gaps.clear()
            await m.put_states(states)
            await m.join()
    finally:
        tick.cancel()
    assert len(gaps) > 10  # the ticker ran while the states did
    assert max(gaps) < 0.25  # generous for a loaded machine: a turn is 5 ms of states


async def test_stop_while_an_eager_state_waits_cancels_it_and_leaves_no_task() -> None:
    ran_finally: list[bool] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ran_finally.append(True)

    m = StateManager()
    runner = asyncio.create_task(m.process_states())
    h = await m.put_state(eager_state("waits", waits))
    await asyncio.sleep(0.01)
    assert h.status is StateStatus.RUNNING
    m.signal_stopping()
    await asyncio.wait_for(runner, 5)
    assert h.status is StateStatus.CANCELLED and ran_finally == [True]
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()


@needs_eager
def test_eager_start_is_used_on_this_python() -> None:
    loop = asyncio.new_event_loop()
    try:
        m = StateManager()
        assert m._fast_paths(loop) == (True, EAGER)
        loop.set_task_factory(lambda loop, coro, **kw: asyncio.Task(coro, loop=loop, **kw))
        assert m._fast_paths(loop) == (True, FACTORY)  # a custom task factory
    finally:
        loop.close()


async def test_a_task_factory_set_while_the_manager_runs_gets_every_later_state() -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(type(coro).__name__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with StateManager() as m:
        assert await (await m.put_state(eager_state("before", _answer))) == 42
        loop.set_task_factory(factory)
        try:
            assert await (await m.put_state(eager_state("after", _answer))) == 42
        finally:
            loop.set_task_factory(None)
    assert made == ["coroutine"]  # the state after it: its task came from the factory


@pytest.mark.parametrize("wait_first", [False, True], ids=["first step", "later step"])
@pytest.mark.parametrize("options", [{}, {"timeout": 30.0}], ids=["eager", "own task"])
def test_system_exit_in_a_coroutine_state_fails_it_and_ends_the_loop(
        options: dict[str, Any], wait_first: bool) -> None:
    seen: dict[str, Any] = {}

    async def exits() -> None:
        if wait_first:
            await asyncio.sleep(0)
        sys.exit(4)

    async def main() -> None:
        async with StateManager() as m:
            seen["handle"] = await m.put_state(State("exit", exits, True, **options))
            await asyncio.sleep(10)

    with pytest.raises(SystemExit):
        asyncio.run(main())
    assert seen["handle"].status is StateStatus.FAILED
    assert isinstance(seen["handle"].exception(), SystemExit)
