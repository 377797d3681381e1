"""Lifecycle events (``manager.events()``, ``add_listener``), ``handle.timings``, task names.

Every executor's states go through the same event order: queued, waiting (gated), started,
retrying and started again, then one terminal event; the worker is the executor's own (a
thread name, a PID). Slow readers lose the oldest events and are told how many; a raising
listener is logged once and removed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

import _crashers
import pytest

from statepool.engine import State, StateEvent, StateManager, StateStatus
from statepool.engine.errors import StateTimeoutError, WorkerCrashedError
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor

# one state's kinds, in order: retries repeat "started, retrying"; a retry delay may wait
ORDER = re.compile(r"queued( waiting)?( started( retrying( waiting)?)?)*"
                   r"( started)? (succeeded|failed|cancelled)")


def kinds_by_state(events: list[StateEvent]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for event in events:
        out.setdefault(event.name, []).append(event.kind)
    return out


def assert_order(kinds: list[str]) -> None:
    assert ORDER.fullmatch(" ".join(kinds)), kinds


async def aok(x: int = 1) -> int:
    await asyncio.sleep(0)
    return x


async def aboom() -> None:
    await asyncio.sleep(0)
    raise ValueError("boom")


async def asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def executors_for(name: str) -> dict[str, Any]:
    if name == "thread":
        return {"thread": ThreadExecutor(2)}
    if name == "process":
        return {"process": LokyExecutor(2)}
    if name == "aioprocess":
        return {"aioprocess": AioProcessExecutor(processes=1, childconcurrency=4)}
    return {}


def funcs_for(name: str) -> dict[str, Any]:
    """ok / boom / slow callables right for the executor (coroutines where they must be)."""
    if name in ("inline", "aioprocess"):
        return {"ok": aok, "boom": aboom, "slow": asleep}
    return {"ok": _crashers.identity, "boom": _crashers.raise_boom, "slow": time.sleep}


def worker_ok(name: str, worker: Any) -> bool:
    if name == "inline":
        return worker is None
    if name == "thread":
        return isinstance(worker, str) and worker.startswith("statepool-thread")
    return isinstance(worker, int) and worker > 0 and worker != os.getpid()


@pytest.mark.parametrize("executor", ["inline", "thread", "process", "aioprocess"])
async def test_event_order_on_every_executor(executor: str) -> None:
    f = funcs_for(executor)
    blocking = executor != "inline"
    slow = 0.8 if executor == "thread" else 5.0  # a thread cannot be killed: it runs on
    events: list[StateEvent] = []
    async with StateManager(executors=executors_for(executor)) as m:
        stream = m.events()
        m.add_listener(events.append)
        gate = asyncio.Event()
        opts: dict[str, Any] = {"executor": executor}
        h_ok = await m.put_state(State("ok", f["ok"], blocking, args=(5,), **opts))
        h_boom = await m.put_state(State("boom", f["boom"], blocking, **opts))
        h_retry = await m.put_state(State("retry", f["boom"], blocking, retries=2, **opts))
        h_late = await m.put_state(State("timeout", f["slow"], True, args=(slow,), timeout=0.3,
                                         **opts))
        h_gated = await m.put_state(State("gated", f["ok"], True, args=(2,), event=gate, **opts))
        h_cancel = await m.put_state(State("cancel", f["slow"], True, args=(slow,), **opts))
        await asyncio.sleep(0.05)
        gate.set()
        for _ in range(400):  # cancel it once it runs
            if any(e.name == "cancel" and e.kind == "started" for e in events):
                break
            await asyncio.sleep(0.01)
        h_cancel.cancel()
        h_stop = await m.put_state(State("stop", f["slow"], True, args=(slow,), **opts))
        await asyncio.wait_for(asyncio.gather(h_ok, h_boom, h_retry, h_late, h_gated,
                                              h_cancel, return_exceptions=True), 30)
        for _ in range(400):
            if any(e.name == "stop" and e.kind == "started" for e in events):
                break
            await asyncio.sleep(0.01)
        m.signal_stopping()
    seen = [e async for e in stream]  # the iterator ends at stop, with the same events
    assert [(e.name, e.kind) for e in seen] == [(e.name, e.kind) for e in events]
    by = kinds_by_state(events)
    for kinds in by.values():
        assert_order(kinds)
    assert by["ok"] == ["queued", "started", "succeeded"]
    assert by["boom"] == ["queued", "started", "failed"]
    assert by["retry"] == ["queued"] + ["started", "retrying"] * 2 + ["started", "failed"]
    assert by["timeout"][-1] == "failed"
    assert by["gated"] == ["queued", "waiting", "started", "succeeded"]
    assert by["cancel"] == ["queued", "started", "cancelled"]
    assert by["stop"] == ["queued", "started", "cancelled"]
    assert h_stop.status is StateStatus.CANCELLED
    ends = {e.name: e for e in events if e.kind in ("succeeded", "failed", "cancelled")}
    assert isinstance(ends["timeout"].error, StateTimeoutError)
    assert ends["boom"].error is h_boom.exception()
    assert ends["ok"].error is None and ends["ok"].handle is h_ok
    assert ends["retry"].attempt == 3 == h_retry.attempts
    retrying = [e for e in events if e.kind == "retrying"]
    assert [e.attempt for e in retrying] == [1, 2]
    assert all(isinstance(e.error, Exception) and e.delay == 0.0 for e in retrying)
    for e in events:
        assert e.executor == executor
        if e.kind in ("started", "succeeded", "failed", "retrying") and e.name != "timeout":
            assert worker_ok(executor, e.worker), (e, e.worker)
    times = [e.time for e in events if e.name == "retry"]
    assert times == sorted(times)
    assert ends["ok"].timings is not None and set(ends["ok"].timings) == {
        "queued", "waiting", "resolving", "dispatch", "running", "returning"}


@pytest.mark.parametrize("executor", ["process", "aioprocess"])
async def test_a_crashed_process_state_fails_with_its_worker(executor: str) -> None:
    import _logging_work

    events: list[StateEvent] = []
    crash: Any = _crashers.call_os_exit if executor == "process" else _logging_work.alast_words
    after: Any = _crashers.identity if executor == "process" else aok
    async with StateManager(executors=executors_for(executor)) as m:
        m.add_listener(events.append)
        h = await m.put_state(State("crash", crash, True, args=(7,), executor=executor))
        with pytest.raises(WorkerCrashedError):
            await asyncio.wait_for(h, 30)
        ok = await m.put_state(State("after", after, True, args=(1,), executor=executor))
        assert await asyncio.wait_for(ok, 30) == 1  # on a new worker
    by = kinds_by_state(events)
    assert by["crash"] == ["queued", "started", "failed"]
    assert by["after"] == ["queued", "started", "succeeded"]
    ends = [e for e in events if e.name == "crash"]
    assert isinstance(ends[-1].error, WorkerCrashedError)
    assert isinstance(ends[1].worker, int) and ends[1].worker == ends[2].worker


async def test_queued_states_cancelled_at_stop_end_with_an_event() -> None:
    events: list[StateEvent] = []
    m = StateManager()
    m.add_listener(events.append)
    gate = asyncio.Event()
    h1 = await m.put_state(State("held", aok, event=gate))
    h2 = await m.put_state(State("behind", aok))
    runner = asyncio.ensure_future(m.process_states())
    await asyncio.sleep(0.02)
    m.signal_stopping()
    await asyncio.wait_for(runner, 10)
    assert h1.cancelled() and h2.cancelled()
    by = kinds_by_state(events)
    assert by == {"held": ["queued", "waiting", "cancelled"], "behind": ["queued", "cancelled"]}


async def test_a_slow_reader_loses_the_oldest_and_is_told_how_many() -> None:
    async with StateManager() as m:
        stream = m.events(buffer=5)
        await m.put_states([State(f"s{i}", aok) for i in range(10)])  # 30 events
        await m.join()
        assert stream.pending() == 5
        first = await stream.__anext__()
        assert first.dropped == 25
        rest = [await stream.__anext__() for _ in range(4)]
        assert [e.dropped for e in rest] == [0, 0, 0, 0]
        assert [(e.name, e.kind) for e in [first, *rest]] == [
            ("s7", "succeeded"), ("s8", "started"), ("s8", "succeeded"), ("s9", "started"),
            ("s9", "succeeded")]
        await m.put_state(State("next", aok))
        await m.join()
        nxt = await stream.__anext__()
        assert (nxt.name, nxt.kind, nxt.dropped) == ("next", "queued", 0)
        await stream.aclose()
    with pytest.raises(ValueError, match="buffer"):
        m.events(buffer=0)


async def test_several_subscribers_each_get_every_event() -> None:
    async with StateManager() as m:
        a, b = m.events(), m.events()
        got: list[StateEvent] = []
        remove = m.add_listener(got.append)
        await m.put_states([State("x", aok), State("y", aboom)])
        await m.join()
        remove()
        await m.put_state(State("z", aok))
        await m.join()
    kinds_a = [(e.name, e.kind) async for e in a]
    kinds_b = [(e.name, e.kind) async for e in b]
    assert kinds_a == kinds_b
    assert [n for n, _ in kinds_a].count("z") == 3
    assert [(e.name, e.kind) for e in got] == [k for k in kinds_a if k[0] != "z"]


async def test_a_raising_listener_is_logged_once_and_removed(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def bad(event: StateEvent) -> None:
        calls.append(event.kind)
        raise RuntimeError("listener bug")

    good: list[StateEvent] = []
    caplog.set_level(logging.ERROR, logger="statepool.engine")
    async with StateManager() as m:
        m.add_listener(bad)
        m.add_listener(good.append)
        handles = await m.put_states([State(f"s{i}", aok, args=(i,)) for i in range(3)])
        await m.join()
        assert [await h for h in handles] == [0, 1, 2]
        assert m._books.hub is not None
    assert calls == ["queued"]
    assert len(good) == 9
    records = [r for r in caplog.records if "listener" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is not None
    assert "listener bug" in str(records[0].exc_info[1])


async def test_no_subscriber_no_hub_and_the_iterator_ends_after_stop() -> None:
    m = StateManager()
    assert m._books.hub is None
    stream = m.events()
    assert m._books.hub is not None
    await stream.aclose()
    assert m._books.hub is None  # back to one attribute check
    remove = m.add_listener(lambda e: None)
    remove()
    assert m._books.hub is None
    async with m:
        await m.put_state(State("a", aok))
    assert [e async for e in m.events()] == []  # a stopped manager: nothing will come
    assert m.add_listener(print)() is None


async def test_timings_name_each_phase() -> None:
    async def lazy() -> int:
        await asyncio.sleep(0.05)
        return 1

    async with StateManager(executors={"process": LokyExecutor(1)}) as m:
        gate = asyncio.Event()
        h_gated = await m.put_state(State("gated", asleep, True, args=(0.05,), event=gate))
        await asyncio.sleep(0.1)
        gate.set()
        h_lazy = await m.put_state(State("lazy", aok, lazy_args=[lazy]))
        h_proc = await m.put_state(State("proc", time.sleep, True, args=(0.2,),
                                         executor="process"))
        h_plain = await m.put_state(State("plain", aok))
        await asyncio.wait_for(asyncio.gather(h_gated, h_lazy, h_proc, h_plain), 30)
    t = h_gated.timings
    assert t["waiting"] >= 0.08 and t["running"] >= 0.04
    assert h_lazy.timings["resolving"] >= 0.04
    p = h_proc.timings
    assert 0.19 <= p["running"] < 2.0 and p["dispatch"] >= 0.0 and p["returning"] >= 0.0
    total = h_proc.finished_at - h_proc.queued_at  # type: ignore[operator]
    assert abs(sum(p.values()) - total) < 0.01
    assert set(h_plain.timings) == {"queued", "waiting", "resolving", "dispatch", "running",
                                    "returning"}
    assert h_plain.timings["dispatch"] == 0.0


async def test_tasks_are_named_after_their_state() -> None:
    names: set[str] = set()

    async def look() -> None:
        names.update(t.get_name() for t in asyncio.all_tasks())
        await asyncio.sleep(0)

    async with StateManager() as m:
        await m.put_state(State("plain-state", look))
        await m.put_state(State("lazy-state", look, lazy_args=[lambda: None][:0],
                                timeout=5.0))
        await m.join()
    assert {"plain-state", "lazy-state"} <= names


# -- the records about states ----------------------------------------------------------------


async def test_failures_log_one_traceback_per_kind_then_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="statepool.engine")
    async with StateManager() as m:
        await m.put_states([State(f"s{i}", aboom) for i in range(5)])
        await m.put_state(State("other", _crashers.raise_boom, True, executor="thread"))
        await m.join()
    errors = [r for r in caplog.records if r.name == "statepool.engine"]
    assert len(errors) == 6  # one ERROR record per failure
    with_tb = [r for r in errors if r.exc_info is not None]
    assert [r.state for r in with_tb] == ["s0", "other"]  # type: ignore[attr-defined]
    repeats = [r for r in errors if r.exc_info is None]
    assert [r.state for r in repeats] == ["s1", "s2", "s3", "s4"]  # type: ignore[attr-defined]
    assert "failure 5 of this kind" in repeats[-1].getMessage()
    assert "ValueError: boom" in repeats[-1].getMessage()
    for r in errors:
        assert {"state", "executor", "attempt", "worker"} <= set(vars(r))
    assert errors[-1].worker.startswith("statepool-thread")  # type: ignore[attr-defined]
    assert errors[-1].attempt == 1 and errors[-1].executor == "thread"  # type: ignore[attr-defined]


async def test_the_debug_exit_line_carries_the_timings(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="statepool.engine")
    async with StateManager() as m:
        await (await m.put_state(State("timed", aok)))
    exits = [r for r in caplog.records if r.getMessage().startswith("exit 'timed'")]
    assert len(exits) == 1
    assert "queued " in exits[0].getMessage() and "returning " in exits[0].getMessage()
    assert exits[0].state == "timed"  # type: ignore[attr-defined]


async def test_cheap_process_states_get_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    async with StateManager(executors={"process": LokyExecutor(1)}) as m:
        for i in range(20):
            await (await m.put_state(State("tiny", _crashers.identity, True, args=(i,),
                                           executor="process")))
    hints = [r for r in caplog.records if "in its worker and cost" in r.getMessage()]
    assert len(hints) == 1
    assert "state 'tiny' (identity) ran" in hints[0].getMessage()
    assert "chunksize" in hints[0].getMessage()

