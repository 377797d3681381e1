"""Retry(times, *, delay, backoff, max_delay, jitter, on): waits, predicates, parked waiting."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
from typing import Any

import pytest

from statepool.engine import Retry, State, StateManager, StateStatus, StateTimeoutError


class Flaky(Exception):
    pass


def failing(times: int, exc: type[BaseException] = Flaky) -> tuple[list[float], Any]:
    """A coroutine function that fails ``times`` times, recording the loop time of each call."""
    calls: list[float] = []

    async def func() -> int:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= times:
            raise exc(len(calls))
        return len(calls)

    return calls, func


# -- the policy itself ------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "field"), [
    ({"times": -1}, "times"), ({"times": 1.5}, "times"), ({"times": True}, "times"),
    ({"times": 1, "delay": -1}, "delay"), ({"times": 1, "delay": float("nan")}, "delay"),
    ({"times": 1, "delay": "1"}, "delay"), ({"times": 1, "backoff": 0.5}, "backoff"),
    ({"times": 1, "max_delay": -0.1}, "max_delay"), ({"times": 1, "jitter": 1.5}, "jitter"),
    ({"times": 1, "jitter": -0.1}, "jitter"), ({"times": 1, "on": 3}, "on"),
    ({"times": 1, "on": (ValueError, 3)}, "on"), ({"times": 1, "on": ()}, "on"),
])
def test_bad_fields_name_the_field(kwargs: dict, field: str) -> None:
    times = kwargs.pop("times")
    with pytest.raises((TypeError, ValueError), match=f"'{field}'"):
        Retry(times, **kwargs)


def test_bad_retries_name_the_state_and_field() -> None:
    for bad in ("3", -1, 1.0, True, None, [Retry(1)]):
        with pytest.raises((TypeError, ValueError), match=r"'s'.*'retries'"):
            State("s", lambda: 0, retries=bad)  # type: ignore[arg-type]
    state = State("s", lambda: 0, retries=Retry(3, delay=1))
    assert state.retries == 3  # the count, as with an int


def test_waits_grow_are_capped_and_spread() -> None:
    r = Retry(5, delay=0.1, backoff=2.0, max_delay=0.5)
    assert [r.wait_after(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    j = Retry(5, delay=1.0, jitter=0.25)
    assert j.wait_after(1, rand=lambda: 0.0) == pytest.approx(0.75)
    assert j.wait_after(1, rand=lambda: 1.0) == pytest.approx(1.25)
    assert j.wait_after(1, rand=lambda: 0.5) == pytest.approx(1.0)
    waits = {j.wait_after(1) for _ in range(200)}
    assert len(waits) > 1 and all(0.75 <= w <= 1.25 for w in waits)
    assert Retry(3).wait_after(2) == 0.0
    assert Retry(3, delay=1.0, backoff=10.0).wait_after(10_000) > 0  # no overflow error


def test_on_takes_classes_tuples_and_predicates() -> None:
    assert Retry(1, on=ValueError).accepts(ValueError())
    assert not Retry(1, on=ValueError).accepts(TypeError())
    assert Retry(1, on=(KeyError, TypeError)).accepts(KeyError())
    assert Retry(1, on=lambda e: "again" in str(e)).accepts(RuntimeError("try again"))
    assert not Retry(1, on=lambda e: "again" in str(e)).accepts(RuntimeError("no"))
    assert Retry(1).accepts(Exception())


# -- in the manager -----------------------------------------------------------------------

async def test_the_delay_before_each_attempt_on_the_loop_clock() -> None:
    calls, func = failing(3)
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(3, delay=0.02, backoff=2.0)))
        assert await h == 4
    assert h.attempts == 4 and len(calls) == 4
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    for gap, want in zip(gaps, (0.02, 0.04, 0.08), strict=True):
        assert want - 0.002 <= gap < want + 0.5  # the loop clock: not earlier than asked


async def test_an_int_retries_at_once() -> None:
    calls, func = failing(2)
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=2))
        assert await h == 3
    assert calls[-1] - calls[0] < 0.05


async def test_a_state_waiting_to_retry_does_not_hold_the_queue_or_a_worker() -> None:
    _calls, func = failing(1)
    order: list[str] = []
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(1, delay=1.0)))
        await asyncio.sleep(0.02)
        assert h.status is StateStatus.WAITING and h.attempts == 1
        stats = m.stats()
        assert stats["by_status"]["WAITING"] == 1 and stats["running"] == []
        nxt = await m.put_state(State("next", lambda: order.append("next")))
        await nxt  # it ran while f waits to retry
        assert h.status is StateStatus.WAITING
        assert await h == 2
    assert order == ["next"]


async def test_a_thread_state_waiting_to_retry_leaves_its_worker_free() -> None:
    from statepool.executors import ThreadExecutor

    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise Flaky("first")
        return "ok"

    async with StateManager(executors={"thread": ThreadExecutor(max_workers=1)}) as m:
        h = await m.put_state(State("f", flaky, True, retries=Retry(1, delay=1.0)))
        for _ in range(200):
            if h.status is StateStatus.WAITING:
                break
            await asyncio.sleep(0.005)
        other = await m.put_state(State("other", lambda: "other", True))
        assert await asyncio.wait_for(_wait(other), 0.8) == "other"
        assert h.status is StateStatus.WAITING
        assert await h == "ok"


async def _wait(handle: Any) -> Any:
    return await handle


async def test_cancel_during_the_wait_ends_it_at_once() -> None:
    calls, func = failing(5)
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(5, delay=10.0)))
        await asyncio.sleep(0.02)
        assert h.status is StateStatus.WAITING
        assert h.cancel()
        assert h.status is StateStatus.CANCELLED
        with pytest.raises(asyncio.CancelledError):
            await h
        await asyncio.sleep(0.05)
    assert len(calls) == 1


async def test_a_stop_during_the_wait_cancels_it() -> None:
    calls, func = failing(5)
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(5, delay=10.0)))
        await asyncio.sleep(0.02)
        m.signal_stopping()
    assert h.status is StateStatus.CANCELLED and len(calls) == 1


async def test_on_picks_the_failures_that_are_retried() -> None:
    calls, func = failing(3, TypeError)
    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(3, on=ValueError)))
        with pytest.raises(TypeError):
            await h
        _calls2, func2 = failing(2, ValueError)
        h2 = await m.put_state(State("g", func2, retries=Retry(3, on=(KeyError, ValueError))))
        assert await h2 == 3
        _calls3, func3 = failing(3, Flaky)
        h3 = await m.put_state(State("p", func3, retries=Retry(5, on=lambda e: e.args[0] < 2)))
        with pytest.raises(Flaky):
            await h3
    assert h.attempts == 1 and len(calls) == 1
    assert h3.attempts == 2  # the predicate refused the second failure


async def test_a_raising_predicate_fails_the_state_with_its_own_error(caplog) -> None:
    _calls, func = failing(1)

    def bad(exc: BaseException) -> bool:
        raise RuntimeError("predicate")

    async with StateManager() as m:
        h = await m.put_state(State("f", func, retries=Retry(2, on=bad)))
        with pytest.raises(Flaky):
            await h
    assert any("predicate 'on' raised" in r.getMessage() for r in caplog.records)


async def test_a_timeout_counts_as_a_failure() -> None:
    runs: list[int] = []

    async def slow() -> str:
        runs.append(1)
        if len(runs) == 1:
            await asyncio.sleep(10)
        return "ok"

    async with StateManager() as m:
        h = await m.put_state(State("t", slow, timeout=0.05,
                                    retries=Retry(1, delay=0.01, on=StateTimeoutError)))
        assert await h == "ok"
    assert h.attempts == 2


async def test_the_retrying_event_carries_the_delay() -> None:
    _calls, func = failing(2)
    seen: list[Any] = []
    async with StateManager() as m:
        remove = m.add_listener(seen.append)
        h = await m.put_state(State("f", func, retries=Retry(2, delay=0.01, backoff=3.0)))
        await h
        remove()
    retrying = [e for e in seen if e.kind == "retrying"]
    assert [e.delay for e in retrying] == pytest.approx([0.01, 0.03])
    assert all(isinstance(e.error, Flaky) for e in retrying)
    kinds = [e.kind for e in seen]
    assert kinds[0] == "queued" and kinds[-1] == "succeeded" and "waiting" in kinds


async def test_lazy_arguments_are_resolved_afresh_each_attempt() -> None:
    resolved: list[int] = []

    def lazy() -> int:
        resolved.append(1)
        return len(resolved)

    def check(n: int) -> int:
        if n < 3:
            raise Flaky(n)
        return n

    async with StateManager() as m:
        h = await m.put_state(State("l", check, lazy_args=(lazy,),
                                    retries=Retry(3, delay=0.001)))
        assert await h == 3


# -- every executor ---------------------------------------------------------------------------

def flaky_file(path: str) -> int:
    """Fails until it has been called three times (the count lives in a file)."""
    p = pathlib.Path(path)
    n = int(p.read_text()) + 1 if p.exists() else 1
    p.write_text(str(n))
    if n < 3:
        raise Flaky(n)
    return n


async def aflaky_file(path: str) -> int:
    return flaky_file(path)


@pytest.mark.parametrize("name", ["thread", "process", "aioprocess"])
async def test_retry_with_a_delay_on_every_executor(name: str, tmp_path: pathlib.Path) -> None:
    from statepool import executors

    ex: Any = {"thread": lambda: executors.ThreadExecutor(max_workers=1),
               "process": lambda: executors.LokyExecutor(max_workers=1),
               "aioprocess": lambda: executors.AioProcessExecutor(processes=1)}[name]()
    func = aflaky_file if name == "aioprocess" else flaky_file
    async with StateManager(executors={name: ex}) as m:
        h = await m.put_state(State("f", func, True, executor=name,
                                    args=(str(tmp_path / "n"),),
                                    retries=Retry(3, delay=0.01, on=Flaky)))
        assert await asyncio.wait_for(_wait(h), 60) == 3
    assert h.attempts == 3
