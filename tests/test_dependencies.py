"""Dependencies: ``State(after=...)``, handles as arguments, DependencyError, parked waiting."""

from __future__ import annotations

import asyncio
import operator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from statepool.engine import DependencyError, State, StateManager, StateStatus
from statepool.engine import errors as engine_errors

TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}


class Boom(Exception):
    pass


def double(x: int) -> int:
    return 2 * x


def add(a: int, b: int = 0, *rest: int, **more: int) -> int:
    return a + b + sum(rest) + sum(more.values())


async def coro_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def after_event(event: asyncio.Event, value: Any) -> Any:
    """A coroutine function that returns ``value`` once ``event`` is set."""
    async def wait() -> Any:
        await event.wait()
        return value

    return wait


def test_dependency_error_is_exported_and_an_engine_error() -> None:
    assert engine_errors.DependencyError is DependencyError
    assert issubclass(DependencyError, engine_errors.EngineError)


async def test_after_waits_for_the_dependency_and_does_not_hold_the_queue() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def slow() -> str:
        await release.wait()
        order.append("slow")
        return "a"

    async def rec(name: str) -> str:
        order.append(name)
        return name

    async with StateManager() as m:
        a = await m.put_state(State("a", slow, True))
        b = await m.put_state(State("b", rec, args=("b",), after=(a,)))
        c = await m.put_state(State("c", rec, args=("c",)))
        await c
        assert b.status is StateStatus.WAITING  # parked: c ran meanwhile
        assert m.stats()["by_status"]["WAITING"] == 1
        assert order == ["c"]
        release.set()
        assert await b == "b"
    assert order == ["c", "slow", "b"]
    assert b.started_at is not None and a.finished_at is not None
    assert b.started_at >= a.finished_at


async def test_handles_as_arguments_are_replaced_by_their_results() -> None:
    async with StateManager() as m:
        one = await m.put_state(State("one", lambda: 1))
        two = await m.put_state(State("two", lambda: 2, True, executor="thread"))
        handles = await m.put_states([
            State("args", add, args=(one, two)),
            State("kwargs", add, kwargs={"a": one, "b": two}),
            State("lazy_args", add, lazy_args=(one, lambda: 10)),
            State("lazy_kwargs", add, args=(100,), lazy_kwargs={"b": two, "c": lambda: 1000}),
            State("mixed", add, args=(one,), kwargs={"c": 5}, lazy_args=(two,),
                  lazy_kwargs={"z": one}),
            State("coro", coro_add, args=(one, two)),
        ])
        assert [await h for h in handles] == [3, 3, 11, 1102, 9, 3]
        assert all(h.state._deps for h in handles)


async def test_a_lazy_argument_that_returns_a_handle_makes_it_a_dependency() -> None:
    release = asyncio.Event()
    async with StateManager() as m:
        a = await m.put_state(State("a", after_event(release, 7), True))
        calls: list[int] = []

        def give() -> Any:
            calls.append(1)
            return a

        b = await m.put_state(State("b", double, lazy_args=(give,)))
        c = await m.put_state(State("c", lambda: "c"))
        assert await c == "c"  # b waits parked: it does not hold the queue
        assert b.status is StateStatus.WAITING
        release.set()
        assert await b == 14
        assert calls == [1]  # the lazy argument is resolved once for that attempt
        assert b.attempts == 1


async def test_no_late_binding_trap_with_handles_as_arguments() -> None:
    async with StateManager() as m:
        first = await m.put_states([State(f"a{i}", operator.pos, args=(i,)) for i in range(8)])
        second = await m.put_states([State(f"b{i}", double, args=(h,))
                                     for i, h in enumerate(first)])
        assert [await h for h in second] == [2 * i for i in range(8)]


async def test_a_failed_dependency_fails_its_dependents_with_dependency_error(caplog) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise Boom("root cause")

    async with StateManager() as m:
        a = await m.put_state(State("a", boom))
        b = await m.put_state(State("b", lambda x: ran.append("b"), args=(a,)))
        c = await m.put_state(State("c", lambda: ran.append("c"), after=(b,)))
        await m.join()
    assert ran == []
    assert b.status is StateStatus.FAILED and c.status is StateStatus.FAILED
    err = b.exception()
    assert isinstance(err, DependencyError)
    assert "'b'" in str(err) and "'a'" in str(err) and "FAILED" in str(err)
    assert err.state_name == "b" and err.dependency_name == "a"
    assert err.dependency_status == "FAILED"
    assert isinstance(err.__cause__, Boom)
    err_c = c.exception()
    assert isinstance(err_c, DependencyError) and err_c.__cause__ is err
    with pytest.raises(DependencyError):
        await c
    # each failure logged once at ERROR, naming the state
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage().split()[1] for r in errors] == ["'a'", "'b'", "'c'"]


async def test_a_dependency_failing_later_fails_the_waiting_dependent_at_once() -> None:
    release = asyncio.Event()
    never = asyncio.Event()

    async def fails_later() -> None:
        await release.wait()
        raise Boom("later")

    async with StateManager() as m:
        slow = await m.put_state(State("slow", never.wait, True))
        bad = await m.put_state(State("bad", fails_later, True))
        dep = await m.put_state(State("dep", lambda: 0, after=(slow, bad)))
        await asyncio.sleep(0.01)
        assert dep.status is StateStatus.WAITING
        release.set()
        with pytest.raises(DependencyError) as info:
            await asyncio.wait_for(asyncio.shield(_wait(dep)), 2)
        assert info.value.dependency_name == "bad"  # it did not wait for 'slow'
        assert slow.status is StateStatus.RUNNING
        slow.cancel()


async def _wait(handle: Any) -> Any:
    return await handle


async def test_cancelling_a_dependency_fails_its_dependents() -> None:
    never = asyncio.Event()
    async with StateManager() as m:
        a = await m.put_state(State("a", never.wait, True))
        b = await m.put_state(State("b", double, args=(a,)))
        c = await m.put_state(State("c", double, args=(b,)))
        await asyncio.sleep(0.01)
        assert b.status is StateStatus.WAITING
        a.cancel()
        await m.join()
    assert a.status is StateStatus.CANCELLED
    for handle, dep in ((b, "a"), (c, "b")):
        err = handle.exception()
        assert isinstance(err, DependencyError) and err.dependency_name == dep
    b_err = b.exception()
    assert b_err is not None and b_err.dependency_status == "CANCELLED"
    assert "CANCELLED" in str(b_err)
    assert isinstance(b_err.__cause__, asyncio.CancelledError)
    assert c.exception().dependency_status == "FAILED"  # type: ignore[union-attr]


async def test_a_queued_dependency_cancelled_before_it_ran() -> None:
    m = StateManager()  # not running: both stay queued
    a = await m.put_state(State("a", lambda: 1))
    b = await m.put_state(State("b", double, args=(a,)))
    a.cancel()
    async with m:
        await m.join()
    assert isinstance(b.exception(), DependencyError)


async def parked_dependent(m: StateManager) -> tuple[Any, Any]:
    """``a``, which runs until cancelled, and ``b``, parked waiting for it."""
    a = await m.put_state(State("a", asyncio.Event().wait, True))
    b = await m.put_state(State("b", double, args=(a,)))
    await asyncio.sleep(0.01)
    assert b.status is StateStatus.WAITING
    return a, b


async def test_cancelling_a_waiting_dependent_ends_it_at_once_and_frees_nothing() -> None:
    async with StateManager() as m:
        a, b = await parked_dependent(m)
        assert b.cancel()
        assert b.status is StateStatus.CANCELLED
        a.cancel()
        await m.join()
    assert a.status is StateStatus.CANCELLED


async def test_waiting_dependents_end_cancelled_when_the_manager_stops() -> None:
    async with StateManager() as m:
        a, b = await parked_dependent(m)
        m.signal_stopping()
    assert a.status is StateStatus.CANCELLED
    assert b.status in {StateStatus.CANCELLED, StateStatus.FAILED}
    assert m.stats()["by_status"]["WAITING"] == 0


async def test_a_handle_of_another_manager_is_a_value_error_at_put() -> None:
    async with StateManager() as other, StateManager() as m:
        h = await other.put_state(State("theirs", lambda: 1))
        for state in (State("mine", double, args=(h,)), State("mine", lambda: 0, after=[h]),
                      State("mine", double, lazy_kwargs={"x": h})):
            with pytest.raises(ValueError, match=r"'mine'.*another StateManager"):
                await m.put_state(state)
            with pytest.raises(ValueError, match="another StateManager"):
                await m.put_states([State("ok", lambda: 0), state])
        assert m.stats()["by_status"]["QUEUED"] == 0
        await other.join()


async def test_a_lazy_argument_returning_a_foreign_handle_fails_the_state() -> None:
    async with StateManager() as other, StateManager() as m:
        h = await other.put_state(State("theirs", lambda: 1))
        await h
        b = await m.put_state(State("b", double, lazy_args=(lambda: h,)))
        await m.join()
    assert isinstance(b.exception(), ValueError)
    assert "another StateManager" in str(b.exception())


def test_after_must_hold_handles() -> None:
    with pytest.raises(TypeError, match=r"'s'.*'after'"):
        State("s", lambda: 0, after=(1,))
    with pytest.raises(TypeError, match=r"'s'.*'after'"):
        State("s", lambda: 0, after="x")  # type: ignore[arg-type]


async def test_a_chain_a_thousand_deep_runs_without_a_recursion_limit() -> None:
    async with StateManager() as m:
        first = await m.put_state(State("s0", lambda: 0))
        handles = [first]
        for i in range(1, 1000):
            handles.append(await m.put_state(State(f"s{i}", operator.add,
                                                   args=(handles[-1], 1))))
        assert await handles[-1] == 999


async def test_a_failure_at_the_root_of_a_thousand_deep_chain_reaches_its_end() -> None:
    async with StateManager() as m:
        handles = [await m.put_state(State("s0", after_event(asyncio.Event(), 0), True))]
        handles += await m.put_states([State(f"s{i}", operator.pos, after=(handles[0],))
                                       for i in range(1, 2)])
        for i in range(2, 1000):
            handles.append(await m.put_state(State(f"s{i}", operator.pos,
                                                   args=(handles[-1],))))
        await asyncio.sleep(0.01)
        assert all(h.status is StateStatus.WAITING for h in handles[1:])
        handles[0].cancel()
        await asyncio.wait_for(m.join(), 20)
    assert all(isinstance(h.exception(), DependencyError) for h in handles[1:])


async def test_enter_state_waits_for_its_dependencies() -> None:
    m = StateManager()
    StateManager._instance = m
    try:
        async with m:
            release = asyncio.Event()
            a = await m.put_state(State("a", after_event(release, 4), True))
            waiter = asyncio.ensure_future(State("b", double, args=(a,)).enter_state())
            await asyncio.sleep(0.01)
            assert not waiter.done()
            release.set()
            assert await asyncio.wait_for(waiter, 2) == 8
    finally:
        StateManager._reset_instance()


# -- every executor (dask: tests/test_dask_executor.py, for its leak check) ----------------

def _executor(name: str) -> Any:
    from statepool import executors

    if name == "process":
        return executors.LokyExecutor(max_workers=1)
    if name == "aioprocess":
        return executors.AioProcessExecutor(processes=1)
    if name == "thread":
        return executors.ThreadExecutor(max_workers=2)
    return executors.InlineExecutor()


@pytest.mark.parametrize("name", ["inline", "thread", "process", "aioprocess"])
async def test_dependencies_on_every_executor(name: str) -> None:
    ex = _executor(name)
    blocking = name != "inline"
    func = coro_add if name in ("inline", "aioprocess") else add
    async with StateManager(executors={name: ex}) as m:
        a = await m.put_state(State("a", lambda: 20))
        b = await m.put_state(State("b", func, blocking, executor=name, args=(a, 1)))
        c = await m.put_state(State("c", func, blocking, executor=name,
                                    lazy_kwargs={"a": b, "b": lambda: 2}))
        bad = await m.put_state(State("bad", func, blocking, executor=name, args=("x", 1)))
        d = await m.put_state(State("d", func, blocking, executor=name, args=(bad, 1)))
        assert await asyncio.wait_for(_wait(c), 60) == 23
        await asyncio.wait_for(m.join(), 60)
    assert isinstance(bad.exception(), TypeError)
    err = d.exception()
    assert isinstance(err, DependencyError) and isinstance(err.__cause__, TypeError)


# -- a Hypothesis property over random DAGs -----------------------------------------------

dag = st.lists(
    st.fixed_dictionaries({
        "fails": st.booleans(),
        "edges": st.lists(st.integers(0, 10_000), max_size=3),
        "as_arg": st.booleans(),
        "blocking": st.booleans(),
        "sleep": st.sampled_from([0.0, 0.0, 0.001]),
        "cancel": st.sampled_from([False, False, False, True]),
    }),
    min_size=1, max_size=30,
)


@given(dag)
def test_random_dags_every_handle_ends_and_failures_propagate(nodes: list[dict]) -> None:
    async def scenario() -> None:
        ended: dict[int, float] = {}
        started: dict[int, float] = {}
        loop = asyncio.get_running_loop()
        async with StateManager() as m:
            handles: list[Any] = []
            for i, node in enumerate(nodes):
                deps = sorted({e % i for e in node["edges"]}) if i else []
                dep_handles = [handles[d] for d in deps]

                async def body(*args: Any, i: int = i, node: dict = node) -> int:
                    started[i] = loop.time()
                    await asyncio.sleep(node["sleep"])
                    ended[i] = loop.time()
                    if node["fails"]:
                        raise Boom(i)
                    return i

                if node["as_arg"]:
                    state = State(f"n{i}", body, node["blocking"], args=tuple(dep_handles))
                else:
                    state = State(f"n{i}", body, node["blocking"], after=tuple(dep_handles))
                handle = await m.put_state(state)
                if node["cancel"]:
                    handle.cancel()
                handles.append(handle)
                node["deps"] = deps
            await asyncio.wait_for(m.join(), 20)
        for i, (handle, node) in enumerate(zip(handles, nodes, strict=True)):
            assert handle.status in TERMINAL
            deps = node["deps"]
            if node["cancel"]:
                assert handle.status is StateStatus.CANCELLED
                assert i not in started
                continue
            bad = [d for d in deps if handles[d].status is not StateStatus.SUCCEEDED]
            if bad:
                assert i not in started
                assert handle.status is StateStatus.FAILED
                err = handle.exception()
                assert isinstance(err, DependencyError)
                assert err.dependency_name in {f"n{d}" for d in bad}
            else:
                assert i in started
                for d in deps:  # it ran only after every dependency ended well
                    assert ended[d] <= started[i]
                expected = StateStatus.FAILED if node["fails"] else StateStatus.SUCCEEDED
                assert handle.status is expected
                if node["fails"]:
                    assert isinstance(handle.exception(), Boom)

    asyncio.run(scenario())
