"""BaseExceptions and misuse that used to kill the main loop or leave a handle for ever.

SPEC (Errors): whatever a state raises, ``BaseException`` subclasses included, the state ends in
one terminal status and the main loop goes on; only ``KeyboardInterrupt``/``SystemExit`` raised by
a state's own code on the loop thread leave ``process_states()``, after failing the state.
(The crash table, ``test_crash_table.py``, runs every kind on every executor.)
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest

from statepool.engine import State, StateManager, StateStatus

DEADLINE_S = 10.0


async def _until_done(*handles: Any) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not all(h.done() for h in handles):
        assert time.monotonic() < deadline, f"not done: {handles}"
        await asyncio.sleep(0.005)


class Mine(BaseException):
    pass


@pytest.mark.parametrize("kind", [GeneratorExit, Mine, StopIteration])
@pytest.mark.parametrize("options", [{}, {"timeout": 30.0}, {"retries": 1}],
                         ids=["plain", "timeout", "retries"])
@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_a_base_exception_fails_the_state_and_the_loop_goes_on(
        kind: type[BaseException], options: dict[str, Any], executor: str) -> None:
    def fn() -> None:
        raise kind("x")

    async def coro() -> None:
        raise kind("x")

    func = coro if executor == "inline" else fn
    async with StateManager() as m:
        bad = await m.put_state(State("bad", func, executor == "thread", executor=executor,
                                      **options))
        good = await m.put_state(State("good", lambda: 1, True))
        assert await asyncio.wait_for(good, DEADLINE_S) == 1
        await _until_done(bad)
    assert bad.status is StateStatus.FAILED  # not CANCELLED, not RUNNING
    assert bad.attempts == 1 + options.get("retries", 0)
    exc = bad.exception()
    assert isinstance(exc, (kind, RuntimeError))  # a coroutine's StopIteration: PEP 479


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt])
def test_keyboard_interrupt_and_system_exit_from_the_loop_thread_leave_it(
        kind: type[BaseException]) -> None:
    seen: dict[str, Any] = {}

    async def leave() -> None:
        raise kind()

    async def main() -> None:
        async with StateManager() as m:
            seen["h"] = await m.put_state(State("leave", leave, timeout=30.0))
            await asyncio.sleep(DEADLINE_S)

    with pytest.raises(kind):
        asyncio.run(main())
    assert seen["h"].status is StateStatus.FAILED


async def test_an_event_of_another_loop_as_a_gate_fails_its_state_only() -> None:
    other: dict[str, asyncio.Event] = {}

    def bind_elsewhere() -> None:
        async def bind() -> None:
            event = asyncio.Event()
            waiter = asyncio.ensure_future(event.wait())  # binds the event to this loop
            await asyncio.sleep(0)
            waiter.cancel()
            other["event"] = event

        asyncio.run(bind())

    thread = threading.Thread(target=bind_elsewhere)
    thread.start()
    thread.join()
    began = time.monotonic()
    async with StateManager() as m:
        gated = await m.put_state(State("gated", lambda: 1, event=other["event"]))
        behind = await m.put_state(State("behind", lambda: 2))
        assert await asyncio.wait_for(behind, DEADLINE_S) == 2
        await _until_done(gated)
    assert time.monotonic() - began < DEADLINE_S
    assert gated.status is StateStatus.FAILED
    message = str(gated.exception())
    assert "'gated'" in message and "'event'" in message


@pytest.mark.parametrize("timeout", [math.nan, math.inf, -math.inf, 10**400, 0, -1])
def test_a_timeout_that_is_not_finite_seconds_is_a_value_error_naming_the_field(
        timeout: Any) -> None:
    with pytest.raises(ValueError, match="'timeout'") as info:
        State("t", lambda: 1, timeout=timeout)
    assert "'t'" in str(info.value)



class _Big:
    """An argument we watch through a weak reference."""


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
@pytest.mark.parametrize("blocking", [False, True])
async def test_no_stale_references(executor: str, blocking: bool) -> None:
    """Once a state has ended and the caller dropped its handle, the manager (its main loop
    waiting for the next put) holds nothing of it: CPython's and loky's
    ``test_no_stale_references``."""
    import gc
    import weakref

    if executor == "inline" and blocking:
        pytest.skip("a blocking plain function cannot run inline")
    if executor == "process" and not blocking:
        blocking = True
    arg = _Big()
    watch = weakref.ref(arg)
    func: Any = _noop_async if executor == "inline" else _noop
    from statepool.executors import LokyExecutor

    given = {"process": LokyExecutor(1)} if executor == "process" else {}
    async with StateManager(executors=given) as m:
        handle = await m.put_state(State("s", func, blocking, args=(arg,), executor=executor))
        await asyncio.wait_for(handle, DEADLINE_S)
        del handle, arg
        deadline = time.monotonic() + 5.0
        while watch() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # the main loop goes back to waiting for a put
            gc.collect()
        assert watch() is None, gc.get_referrers(watch())


def _noop(x: object) -> None:
    return None


async def _noop_async(x: object) -> None:
    return None


async def test_states_behind_a_gated_blocking_thread_state_start_after_it_started() -> None:
    """SPEC: while a gated state waits, the queue holds; the states behind it start only after
    it has started. A thread state starts when a thread picks it up, not when it is handed
    to the pool: with the pool's only thread busy, the state behind waits for it."""
    import threading as _threading

    from statepool.executors import ThreadExecutor

    release = _threading.Event()
    gate = asyncio.Event()
    pool = ThreadExecutor(max_workers=1, long_after=60)
    try:
        async with StateManager(executors={"thread": pool}) as m:
            busy = await m.put_state(State("busy", release.wait, True, args=(10,)))
            gated = await m.put_state(State("gated", lambda: "gated", True, event=gate))
            behind = await m.put_state(State("behind", lambda: "behind"))
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.sleep(0.2)
            assert not behind.done()  # the gated state has not started: the queue holds
            release.set()
            assert await asyncio.wait_for(behind, DEADLINE_S) == "behind"
            assert await asyncio.wait_for(gated, DEADLINE_S) == "gated"
            await asyncio.wait_for(busy, DEADLINE_S)
        assert gated.started_at is not None and behind.started_at is not None
        assert gated.started_at <= behind.started_at
    finally:
        release.set()


async def test_stop_while_a_gated_blocking_state_waits_for_a_thread_returns() -> None:
    import threading as _threading

    from statepool.executors import ThreadExecutor

    release = _threading.Event()
    pool = ThreadExecutor(max_workers=1, long_after=60, shutdown_grace=0.2)
    gate = asyncio.Event()
    gate.set()
    try:
        m = StateManager(executors={"thread": pool}, shutdown_grace=0.2)
        main = asyncio.ensure_future(m.process_states())
        await m.put_state(State("busy", release.wait, True, args=(10,)))
        gated = await m.put_state(State("gated", lambda: 1, True, event=gate, timeout=30.0))
        await asyncio.sleep(0.1)
        m.signal_stopping()
        release.set()
        await asyncio.wait_for(main, DEADLINE_S)
        assert gated.done()
    finally:
        release.set()
