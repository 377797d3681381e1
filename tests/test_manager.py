"""StateManager semantics: order, blocking, gates, lazy args, retries, timeouts, cancel, stop."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time

import pytest

from statepool.engine import (
    LazyArgumentError,
    ManagerStoppedError,
    State,
    StateManager,
    StateStatus,
    StateTimeoutError,
    wrap_with_tryexcept,
)

TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


def recorder() -> tuple[list[str], type]:
    log: list[str] = []

    class Rec:
        @staticmethod
        def coro(name: str, delay: float = 0.0):  # type: ignore[no-untyped-def]
            async def run() -> str:
                log.append(f"start {name}")
                await asyncio.sleep(delay)
                log.append(f"end {name}")
                return name

            return run

    return log, Rec


async def test_fifo_and_non_blocking_states_run_one_after_another() -> None:
    log, rec = recorder()
    async with StateManager() as m:
        handles = await m.put_states(
            [State(n, rec.coro(n, 0.01)) for n in ("a", "b", "c")])
    assert [await h for h in handles] == ["a", "b", "c"]
    assert log == ["start a", "end a", "start b", "end b", "start c", "end c"]


async def test_blocking_states_run_side_by_side() -> None:
    both = asyncio.Event()
    seen: list[str] = []

    async def waits_for_other(name: str) -> str:
        seen.append(name)
        if len(seen) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return name

    async with StateManager() as m:
        h1 = await m.put_state(State("one", waits_for_other, True, args=("one",)))
        h2 = await m.put_state(State("two", waits_for_other, True, args=("two",)))
        assert await h1 == "one" and await h2 == "two"


async def test_blocking_thread_states_overlap_in_time() -> None:
    barrier = threading.Barrier(3, timeout=5)

    def meet() -> int:
        return barrier.wait()

    async with StateManager() as m:
        handles = await m.put_states([State(f"t{i}", meet, True) for i in range(3)])
        assert sorted([await h for h in handles]) == [0, 1, 2]


async def test_gate_holds_the_queue_until_set() -> None:
    log, rec = recorder()
    gate = asyncio.Event()
    async with StateManager() as m:
        h_gated = await m.put_state(State("gated", rec.coro("gated"), event_to_wait=gate))
        h_after = await m.put_state(State("after", rec.coro("after"), True))
        for _ in range(20):
            await asyncio.sleep(0)
        assert h_gated.status is StateStatus.WAITING
        assert h_after.status is StateStatus.QUEUED and log == []
        gate.set()
        await m.join()
    assert log.index("start gated") < log.index("start after")
    assert h_gated.result() == "gated" and h_after.result() == "after"


async def test_lazy_args_resolved_after_gate_on_loop_thread_in_callers_context() -> None:
    gate = asyncio.Event()
    seen: dict[str, object] = {}

    def lazy() -> str:
        seen["gate_was_set"] = gate.is_set()
        seen["thread"] = threading.get_ident()
        seen["request_id"] = request_id.get()
        return "lazy"

    async def later() -> int:
        return 42

    def work(a: str, b: int, *, k: str) -> tuple[str, int, str]:
        return a, b, k

    async with StateManager() as m:
        request_id.set("req-7")
        handle = await m.put_state(State("s", work, True, lazy_args=(lazy, later),
                                         lazy_kwargs={"k": lambda: request_id.get()},
                                         event=gate))
        request_id.set("changed-after-put")
        await asyncio.sleep(0.01)
        assert "thread" not in seen  # not resolved before the gate opens
        gate.set()
        assert await handle == ("lazy", 42, "req-7")
    assert seen == {"gate_was_set": True, "thread": threading.get_ident(),
                    "request_id": "req-7"}


async def test_lazy_args_are_resolved_per_attempt() -> None:
    calls = []

    def lazy() -> int:
        calls.append(1)
        return len(calls)

    def flaky(n: int) -> int:
        if n < 3:
            raise RuntimeError(f"attempt {n}")
        return n

    async with StateManager() as m:
        handle = await m.put_state(State("flaky", flaky, lazy_args=(lazy,), retries=2))
        assert await handle == 3
    assert handle.attempts == 3


async def test_lazy_argument_error_names_state_and_index(caplog) -> None:
    def broken() -> int:
        raise KeyError("missing")

    async with StateManager() as m:
        h1 = await m.put_state(State("needs-lazy", print, lazy_args=(1, broken)))
        h2 = await m.put_state(State("needs-kw", print, lazy_kwargs={"key": broken}))
        await m.join()
    for handle, where in ((h1, "lazy_args[1]"), (h2, "lazy_kwargs['key']")):
        exc = handle.exception()
        assert isinstance(exc, LazyArgumentError)
        assert handle.state.name in str(exc) and where in str(exc)
        assert isinstance(exc.__cause__, KeyError)


async def test_errors_are_kept_logged_once_and_do_not_stop_the_loop(caplog) -> None:
    def boom() -> None:
        raise ValueError("boom")

    caplog.set_level(logging.ERROR, logger="statepool")
    async with StateManager() as m:
        bad = await m.put_state(State("bad-state", boom))
        good = await m.put_state(State("good-state", lambda: "ok"))
        await m.join()
    assert isinstance(bad.exception(), ValueError)
    with pytest.raises(ValueError, match="boom"):
        await bad
    assert good.result() == "ok"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert errors[0].name == "statepool.engine"
    assert "bad-state" in msg and "boom" in msg and "inline" in msg
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is ValueError


async def test_retries_count_attempts_and_warn(caplog) -> None:
    attempts = []

    def fails_twice() -> str:
        attempts.append(1)
        if len(attempts) <= 2:
            raise OSError("transient")
        return "ok"

    caplog.set_level(logging.WARNING, logger="statepool")
    async with StateManager() as m:
        handle = await m.put_state(State("retry-me", fails_twice, True, retries=2))
        always = await m.put_state(State("never", lambda: 1 / 0, retries=1))
        await m.join()
    assert handle.result() == "ok" and handle.attempts == 3
    assert isinstance(always.exception(), ZeroDivisionError) and always.attempts == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


async def test_inline_timeout_cancels_the_coroutine() -> None:
    cancelled = asyncio.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with StateManager() as m:
        handle = await m.put_state(State("slow", slow, timeout=0.05))
        after = await m.put_state(State("after", lambda: "ran"))
        await m.join()
    assert isinstance(handle.exception(), StateTimeoutError)
    assert isinstance(handle.exception(), TimeoutError)
    assert "slow" in str(handle.exception())
    assert cancelled.is_set() and after.result() == "ran"


async def test_timeout_clock_starts_when_the_state_runs_not_when_queued() -> None:
    gate = asyncio.Event()

    async def quick() -> str:
        await asyncio.sleep(0.05)
        return "in time"

    async with StateManager() as m:
        handle = await m.put_state(State("gated", quick, event=gate, timeout=0.5))
        await asyncio.sleep(0.7)  # longer than the timeout, while gated
        gate.set()
        assert await handle == "in time"


async def test_thread_timeout_is_reported_and_thread_abandoned(caplog) -> None:
    release = threading.Event()

    def stuck() -> str:
        release.wait(10)
        return "late"

    caplog.set_level(logging.WARNING, logger="statepool")
    try:
        async with StateManager() as m:
            handle = await m.put_state(State("stuck", stuck, True, timeout=0.1))
            after = await m.put_state(State("after", lambda: "ran", True))
            with pytest.raises(StateTimeoutError):
                await handle
            assert await after == "ran"
    finally:
        release.set()
    assert handle.status is StateStatus.FAILED
    assert any("abandoned" in r.getMessage() and "stuck" in r.getMessage()
               for r in caplog.records)


async def test_cancel_queued_gated_and_running() -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(30)

    async with StateManager() as m:
        running = await m.put_state(State("running", forever, True))
        gated = await m.put_state(State("gated", forever, event=gate))
        queued = await m.put_state(State("queued", forever))
        await started.wait()
        assert gated.status is StateStatus.WAITING
        assert queued.cancel() and queued.status is StateStatus.CANCELLED
        assert gated.cancel() and running.cancel()
        assert not running.cancel()  # already terminal
        await m.join()
        for h in (running, gated, queued):
            assert h.status is StateStatus.CANCELLED
            with pytest.raises(asyncio.CancelledError):
                await h
            with pytest.raises(asyncio.CancelledError):
                h.result()
        after = await m.put_state(State("after", lambda: 1))
        assert await after == 1


async def test_cancel_running_thread_state_marks_it_at_once() -> None:
    release = threading.Event()
    entered = threading.Event()

    def stuck() -> str:
        entered.set()
        release.wait(10)
        return "discarded"

    try:
        async with StateManager() as m:
            handle = await m.put_state(State("t", stuck, True))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            assert handle.cancel()
            assert handle.status is StateStatus.CANCELLED
            release.set()
    finally:
        release.set()
    assert handle.status is StateStatus.CANCELLED


async def test_handle_timestamps_and_result_before_done() -> None:
    gate = asyncio.Event()
    async with StateManager() as m:
        handle = await m.put_state(State("s", lambda: 1, event=gate))
        with pytest.raises(asyncio.InvalidStateError):
            handle.result()
        with pytest.raises(asyncio.InvalidStateError):
            handle.exception()
        gate.set()
        await handle
    assert handle.queued_at <= handle.started_at <= handle.finished_at  # type: ignore[operator]
    assert handle.exception() is None


async def test_same_state_twice_runs_twice_with_two_handles() -> None:
    count = []
    state = State("twice", lambda: count.append(1) or len(count))
    async with StateManager() as m:
        h1, h2 = await m.put_states([state, state])
        assert h1 is not h2
        assert {await h1, await h2} == {1, 2}


async def test_put_non_state_and_put_after_stop() -> None:
    m = StateManager()
    with pytest.raises(TypeError, match="State"):
        await m.put_state("not a state")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await m.put_states([State("ok", print), 42])  # type: ignore[list-item]
    assert m.stats()["by_status"]["QUEUED"] == 0  # nothing queued by the failed batch
    task = asyncio.create_task(m.process_states())
    m.signal_stopping()
    m.signal_stopping()  # idempotent
    await asyncio.wait_for(task, 5)
    with pytest.raises(ManagerStoppedError, match="'late'"):
        await m.put_state(State("late", print))


async def test_second_process_states_is_a_runtime_error() -> None:
    async with StateManager() as m:
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already running"):
            await m.process_states()
        assert await (await m.put_state(State("still", lambda: "works"))) == "works"


async def test_stop_cancels_queued_and_running_and_returns() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(30)

    m = StateManager()
    main = asyncio.create_task(m.process_states())
    running = await m.put_state(State("runs", forever))  # non-blocking: holds the queue
    queued = await m.put_states([State(f"q{i}", forever) for i in range(5)])
    await started.wait()
    m.signal_stopping()
    await asyncio.wait_for(main, 5)
    assert running.status is StateStatus.CANCELLED
    assert all(h.status is StateStatus.CANCELLED for h in queued)


async def test_signal_stopping_from_another_thread() -> None:
    m = StateManager()
    main = asyncio.create_task(m.process_states())
    handle = await m.put_state(State("svc", asyncio.sleep, True, args=(30,)))
    await asyncio.sleep(0.01)
    thread = threading.Thread(target=m.signal_stopping)
    thread.start()
    await asyncio.wait_for(main, 5)
    thread.join()
    assert handle.status is StateStatus.CANCELLED


async def test_stop_gives_threads_the_grace_period_then_reports_them(caplog) -> None:
    release = threading.Event()

    def stubborn() -> None:
        release.wait(10)

    caplog.set_level(logging.WARNING, logger="statepool")
    m = StateManager(shutdown_grace=0.2)
    main = asyncio.create_task(m.process_states())
    handle = await m.put_state(State("stubborn", stubborn, True))
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    m.signal_stopping()
    await asyncio.wait_for(main, 5)
    took = time.monotonic() - t0
    release.set()
    assert 0.15 <= took < 2.2
    assert handle.status is StateStatus.CANCELLED
    assert any("abandoned" in r.getMessage() and "stubborn" in r.getMessage()
               for r in caplog.records)


async def test_max_queue_holds_producers() -> None:
    gate = asyncio.Event()
    m = StateManager(max_queue=3)
    async with m:
        await m.put_state(State("gated", lambda: 0, event=gate))
        await asyncio.sleep(0.01)  # the gated one leaves QUEUED for WAITING
        await m.put_states([State(f"s{i}", lambda: 0) for i in range(3)])
        blocked = asyncio.create_task(m.put_state(State("fourth", lambda: 4)))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        assert m.stats()["by_status"]["QUEUED"] == 3
        gate.set()
        handle = await asyncio.wait_for(blocked, 5)
        assert await handle == 4


async def test_join_waits_for_every_handle() -> None:
    async with StateManager() as m:
        handles = await m.put_states(
            [State(f"s{i}", asyncio.sleep, True, args=(0.01 * (i % 3), i)) for i in range(10)])
        await m.join()
        assert all(h.done() for h in handles)
        assert sorted(h.result() for h in handles) == list(range(10))


async def test_async_with_stops_at_once_on_exception() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.sleep(30)

    with pytest.raises(KeyError):
        async with StateManager() as m:
            handle = await m.put_state(State("svc", forever, True))
            await started.wait()
            raise KeyError("user error")
    assert handle.status is StateStatus.CANCELLED


async def test_stats_snapshot() -> None:
    release = asyncio.Event()
    async with StateManager() as m:
        await m.put_state(State("ok", lambda: 1))
        await m.put_state(State("bad", lambda: 1 / 0))
        svc = await m.put_state(State("svc", release.wait, True))
        await asyncio.sleep(0.02)
        stats = m.stats()
        as_dict = dict(stats)
        assert set(as_dict) == {"by_status", "by_executor", "running"}
        assert as_dict["by_status"]["SUCCEEDED"] == 1
        assert as_dict["by_status"]["FAILED"] == 1
        assert as_dict["by_status"]["RUNNING"] == 1
        assert as_dict["by_executor"] == {"inline": 3}
        (running,) = as_dict["running"]
        assert running["name"] == "svc" and running["executor"] == "inline"
        assert running["age"] >= 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.by_status = {}  # type: ignore[misc]
        release.set()
        await svc


async def test_debug_logging_enter_and_exit(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="statepool")
    async with StateManager() as m:
        await m.put_state(State("traced", lambda: 1))
    lines = [r.getMessage() for r in caplog.records if "traced" in r.getMessage()]
    assert any(line.startswith("enter 'traced'") and "inline" in line for line in lines)
    assert any(line.startswith("exit 'traced'") and "SUCCEEDED" in line for line in lines)


async def test_instance_is_a_resettable_singleton() -> None:
    a = StateManager.instance()
    assert StateManager.instance() is a
    StateManager._reset_instance()
    b = StateManager.instance()
    assert b is not a
    with pytest.raises(ManagerStoppedError):
        await a.put_state(State("x", print))


async def test_wrap_with_tryexcept(caplog) -> None:
    async def acoro(x: int) -> int:
        return x * 2

    def bad() -> None:
        raise ValueError("nope")

    caplog.set_level(logging.ERROR, logger="statepool")
    assert await wrap_with_tryexcept(acoro, 4)() == 8
    assert await wrap_with_tryexcept(lambda a, b=0: a + b, 1, b=2)() == 3
    assert await wrap_with_tryexcept(bad)() is None
    (record,) = caplog.records
    assert "bad" in record.getMessage() and record.exc_info[0] is ValueError


# -- plain function states on the loop: called by the main loop, no task of their own ------

cvar: contextvars.ContextVar[str] = contextvars.ContextVar("cvar", default="unset")


async def test_a_plain_function_state_runs_in_a_copy_of_its_context_and_ends_at_once() -> None:
    cvar.set("caller")
    seen: list[str] = []

    def touch(i: int) -> int:
        seen.append(cvar.get())
        cvar.set(f"state{i}")  # stays in this state's own copy
        return i

    async with StateManager() as m:
        handles = await m.put_states([State(f"s{i}", touch, args=(i,)) for i in range(3)])
        assert await asyncio.gather(*handles) == [0, 1, 2]
    assert seen == ["caller"] * 3
    assert cvar.get() == "caller"
    assert all(h.status is StateStatus.SUCCEEDED and h.attempts == 1 for h in handles)
    assert all(h.started_at is not None and h.finished_at is not None for h in handles)


async def test_a_plain_function_state_that_raises_fails_alone(caplog) -> None:
    async with StateManager() as m:
        bad = await m.put_state(State("bad", lambda: 1 / 0))
        good = await m.put_state(State("good", lambda: "ok"))
        assert await good == "ok"
        with pytest.raises(ZeroDivisionError):
            await bad
    assert bad.status is StateStatus.FAILED
    assert sum("'bad'" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_system_exit_from_a_plain_function_state_leaves_the_loop(
        kind: type[BaseException]) -> None:
    seen: dict[str, object] = {}

    def leave() -> None:
        raise kind()

    async def main() -> None:
        async with StateManager() as m:
            seen["h"] = await m.put_state(State("leave", leave))
            await asyncio.sleep(10)

    began = time.monotonic()
    with pytest.raises(kind):
        asyncio.run(main())
    assert time.monotonic() - began < 5
    assert seen["h"].status is StateStatus.FAILED  # type: ignore[attr-defined]
