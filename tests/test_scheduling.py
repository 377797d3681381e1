"""Tags and limits, and priorities: StateManager(limits=...), State(tags=..., priority=...)."""

from __future__ import annotations

import asyncio
import itertools
import os
import pathlib
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statepool.engine import DependencyError, Retry, State, StateManager, StateStatus

TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}


class Boom(Exception):
    pass


class Monitor:
    """Running counts per tag, recorded by the states' own code at every start and end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.starts: list[str] = []

    def start(self, name: str, tags: tuple[str, ...]) -> None:
        with self.lock:
            self.starts.append(name)
            for tag in tags:
                self.running[tag] = self.running.get(tag, 0) + 1
                self.peak[tag] = max(self.peak.get(tag, 0), self.running[tag])

    def end(self, tags: tuple[str, ...]) -> None:
        with self.lock:
            for tag in tags:
                self.running[tag] -= 1


def work(name: str, seconds: float, fail: bool) -> str:
    time.sleep(seconds)
    if fail:
        raise Boom(name)
    return name


def watched(mon: Monitor, name: str, tags: tuple[str, ...], seconds: float = 0.0,
            fail: bool = False) -> Any:
    def run() -> str:
        mon.start(name, tags)
        try:
            return work(name, seconds, fail)
        finally:
            mon.end(tags)

    return run


async def _wait(handle: Any) -> Any:
    return await handle


# -- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("limits", [[("db", 1)], {"": 1}, {3: 1}, {"db": 0}, {"db": -1},
                                    {"db": 1.5}, {"db": True}, {"db": "2"}])
def test_bad_limits_name_the_field(limits: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="'limits'"):
        StateManager(limits=limits)


@pytest.mark.parametrize("tags", ["db", ("",), (3,), ("db", None), 5])
def test_bad_tags_name_the_state_and_field(tags: Any) -> None:
    with pytest.raises((TypeError, ValueError), match=r"'s'.*'tags'"):
        State("s", lambda: 0, tags=tags)


@pytest.mark.parametrize("priority", [1.0, "1", None, True, [1]])
def test_bad_priority_names_the_state_and_field(priority: Any) -> None:
    with pytest.raises(TypeError, match=r"'s'.*'priority'"):
        State("s", lambda: 0, priority=priority)


def test_tags_are_kept_once_in_order() -> None:
    assert State("s", lambda: 0, tags=["b", "a", "b"]).tags == ("b", "a")


# -- limits -------------------------------------------------------------------------------

async def test_a_limit_caps_running_states_and_waiters_take_slots_in_order() -> None:
    mon = Monitor()
    async with StateManager(limits={"db": 2}) as m:
        handles = await m.put_states([
            State(f"s{i}", watched(mon, f"s{i}", ("db",), 0.1), True, executor="thread",
                  tags=("db",)) for i in range(8)])
        for _ in range(100):  # the main loop has taken them all
            if m.stats()["by_tag"].get("db", {}).get("waiting") == 6:
                break
            await asyncio.sleep(0.001)
        assert m.stats()["by_tag"]["db"] == {"running": 2, "waiting": 6, "limit": 2}
        assert sum(h.status is StateStatus.WAITING for h in handles) == 6
        await m.join()
    assert mon.peak["db"] <= 2
    assert sorted(mon.starts[:2]) == ["s0", "s1"]  # the first two take the two slots
    assert m.stats()["by_tag"]["db"] == {"running": 0, "waiting": 0, "limit": 2}


async def test_waiters_take_a_slot_in_fifo_order() -> None:
    mon = Monitor()
    async with StateManager(limits={"db": 1}) as m:
        await m.put_states([
            State(f"s{i}", watched(mon, f"s{i}", ("db",), 0.002), True, executor="thread",
                  tags=("db",)) for i in range(8)])
        await m.join()
    assert mon.peak["db"] == 1
    assert mon.starts == [f"s{i}" for i in range(8)]


async def test_a_state_waiting_for_a_slot_does_not_hold_the_queue() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def hold() -> None:
        await release.wait()

    async with StateManager(limits={"gpu": 1}) as m:
        holder = await m.put_state(State("holder", hold, True, tags=("gpu",)))
        waiter = await m.put_state(State("waiter", lambda: order.append("waiter"),
                                         tags=("gpu",)))
        free = await m.put_state(State("free", lambda: order.append("free")))
        await free
        assert waiter.status is StateStatus.WAITING
        release.set()
        await waiter
        assert holder.status is StateStatus.SUCCEEDED
    assert order == ["free", "waiter"]


async def test_waiters_of_higher_priority_take_a_freed_slot_first() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def hold() -> None:
        await release.wait()

    async def rec(name: str) -> None:
        order.append(name)

    async with StateManager(limits={"t": 1}) as m:
        await m.put_state(State("holder", hold, True, tags=("t",)))
        await m.put_states([State(n, rec, True, args=(n,), tags=("t",), priority=p)
                            for n, p in (("low", 0), ("high", 5), ("low2", 0), ("mid", 2))])
        await asyncio.sleep(0.01)
        release.set()
        await m.join()
    assert order == ["high", "mid", "low", "low2"]


async def test_two_tags_are_taken_all_at_once_so_two_such_states_never_deadlock() -> None:
    mon = Monitor()
    async with StateManager(limits={"a": 1, "b": 1}) as m:
        handles = []
        for i in range(6):
            tags = ("a", "b") if i % 2 else ("b", "a")
            handles.append(await m.put_state(State(
                f"s{i}", watched(mon, f"s{i}", tags, 0.005), True, executor="thread",
                tags=tags)))
        await asyncio.wait_for(m.join(), 10)
    assert all(h.status is StateStatus.SUCCEEDED for h in handles)
    assert mon.peak == {"a": 1, "b": 1}


async def test_a_single_tag_state_goes_ahead_of_a_two_tag_state_that_cannot_start() -> None:
    release = asyncio.Event()

    async def hold() -> None:
        await release.wait()

    async with StateManager(limits={"a": 1, "b": 1}) as m:
        await m.put_state(State("holds-b", hold, True, tags=("b",)))
        both = await m.put_state(State("both", lambda: "both", tags=("a", "b")))
        only_a = await m.put_state(State("only-a", lambda: "a", tags=("a",)))
        assert await asyncio.wait_for(_wait(only_a), 2) == "a"  # a had room: it did not wait
        assert both.status is StateStatus.WAITING
        release.set()
        assert await both == "both"


async def test_set_limit_while_running_starts_the_waiters_that_now_fit() -> None:
    release = asyncio.Event()
    started: list[str] = []

    async def hold(name: str) -> None:
        started.append(name)
        await release.wait()

    async with StateManager(limits={"db": 1}) as m:
        handles = await m.put_states([State(f"s{i}", hold, True, args=(f"s{i}",), tags=("db",))
                                      for i in range(4)])
        await asyncio.sleep(0.01)
        assert started == ["s0"]
        m.set_limit("db", 3)
        await asyncio.sleep(0.01)
        assert started == ["s0", "s1", "s2"]
        assert m.stats()["by_tag"]["db"] == {"running": 3, "waiting": 1, "limit": 3}
        m.set_limit("db", None)  # no limit: a label
        await asyncio.sleep(0.01)
        assert len(started) == 4
        with pytest.raises(ValueError, match="'db'"):
            m.set_limit("db", 0)
        release.set()
        await m.join()
    assert all(h.status is StateStatus.SUCCEEDED for h in handles)


async def test_a_cancelled_waiter_frees_nothing_it_did_not_hold() -> None:
    mon = Monitor()
    release = threading.Event()

    def hold() -> None:
        mon.start("holder", ("t",))
        release.wait(5)
        mon.end(("t",))

    async with StateManager(limits={"t": 1}) as m:
        await m.put_state(State("holder", hold, True, executor="thread", tags=("t",)))
        w1 = await m.put_state(State("w1", watched(mon, "w1", ("t",)), True, executor="thread",
                                     tags=("t",)))
        w2 = await m.put_state(State("w2", watched(mon, "w2", ("t",)), True, executor="thread",
                                     tags=("t",)))
        await asyncio.sleep(0.01)
        assert w1.cancel() and w1.status is StateStatus.CANCELLED
        await asyncio.sleep(0.01)
        assert w2.status is StateStatus.WAITING  # the holder still holds the only slot
        assert m.stats()["by_tag"]["t"] == {"running": 1, "waiting": 1, "limit": 1}
        release.set()
        assert await w2 == "w2"
    assert mon.peak["t"] == 1 and "w1" not in mon.starts


async def test_a_state_waiting_to_retry_gives_its_slot_to_another() -> None:
    order: list[str] = []
    tries: list[int] = []

    async def flaky() -> str:
        tries.append(1)
        order.append(f"flaky{len(tries)}")
        if len(tries) == 1:
            raise Boom("first")
        return "ok"

    async def other() -> None:
        order.append("other")

    async with StateManager(limits={"t": 1}) as m:
        f = await m.put_state(State("flaky", flaky, True, tags=("t",),
                                    retries=Retry(1, delay=0.5)))
        o = await m.put_state(State("other", other, True, tags=("t",)))
        await o
        assert f.status is StateStatus.WAITING
        assert await f == "ok"
    assert order == ["flaky1", "other", "flaky2"]


async def test_tags_without_a_limit_are_labels_in_stats() -> None:
    release = asyncio.Event()
    async with StateManager(limits={"db": 4}) as m:
        h = await m.put_state(State("s", release.wait, True, tags=("db", "eu")))
        await asyncio.sleep(0.01)
        assert m.stats()["by_tag"] == {"db": {"running": 1, "waiting": 0, "limit": 4},
                                       "eu": {"running": 1, "waiting": 0, "limit": None}}
        release.set()
        await h
    assert "by_tag" not in dict(StateManager().stats())  # no tags, no limits: no key


async def test_a_failed_dependency_of_a_tagged_state_takes_no_slot() -> None:
    async with StateManager(limits={"t": 1}) as m:
        bad = await m.put_state(State("bad", lambda: 1 / 0))
        dep = await m.put_state(State("dep", lambda x: x, args=(bad,), tags=("t",)))
        ok = await m.put_state(State("ok", lambda: "ok", tags=("t",)))
        assert await ok == "ok"
        await m.join()
    assert isinstance(dep.exception(), DependencyError)
    assert m.stats()["by_tag"]["t"]["running"] == 0


@pytest.mark.parametrize("name", ["process", "aioprocess"])
async def test_limits_hold_across_executors(name: str, tmp_path: pathlib.Path) -> None:
    from statepool import executors

    ex: Any = (executors.LokyExecutor(max_workers=2) if name == "process"
               else executors.AioProcessExecutor(processes=2))
    mon = Monitor()
    func = record_interval_async if name == "aioprocess" else record_interval
    async with StateManager(executors={name: ex}, limits={"t": 2}) as m:
        handles = [await m.put_state(State(f"p{i}", func, True, executor=name, tags=("t",),
                                           args=(str(tmp_path / "log"), f"p{i}", 0.05)))
                   for i in range(4)]
        handles += [await m.put_state(State(f"th{i}", watched(mon, f"th{i}", ("t",), 0.05),
                                            True, executor="thread", tags=("t",)))
                    for i in range(2)]
        await asyncio.wait_for(m.join(), 60)
    assert all(h.status is StateStatus.SUCCEEDED for h in handles)
    intervals = read_intervals(tmp_path / "log")
    intervals += [(h.started_at, h.finished_at) for h in handles[4:]]  # loop clock: unused
    assert peak_overlap(read_intervals(tmp_path / "log")) <= 2
    assert mon.peak["t"] <= 2


# -- processes record their intervals in a file (monotonic clock, one per machine) ----------

def record_interval(path: str, name: str, seconds: float, fail: bool = False) -> str:
    start = time.monotonic()
    try:
        return work(name, seconds, fail)
    finally:
        with open(path, "a") as f:
            f.write(f"{name} {start!r} {time.monotonic()!r}\n")


async def record_interval_async(path: str, name: str, seconds: float) -> str:
    return record_interval(path, name, seconds)


def read_intervals(path: pathlib.Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        _, start, end = line.split()
        out.append((float(start), float(end)))
    return out


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start (+1)
        now += step
        peak = max(peak, now)
    return peak


# -- Hypothesis: random tagged mixes with a monitor ---------------------------------------

TAGS = ("a", "b", "c")
MIX = st.fixed_dictionaries({
    "limits": st.dictionaries(st.sampled_from(TAGS), st.integers(1, 3)),
    "states": st.lists(st.fixed_dictionaries({
        "tags": st.lists(st.sampled_from(TAGS), min_size=1, max_size=3, unique=True),
        "seconds": st.sampled_from([0.0, 0.001, 0.003]),
        "fail": st.sampled_from([False, False, True]),
        "retries": st.sampled_from([0, 1, "delay"]),
        "cancel": st.sampled_from(["no", "no", "no", "at_put", "later"]),
        "priority": st.sampled_from([0, 0, 1, -1]),
    }), min_size=1, max_size=12),
})


def _retries(spec: dict) -> Any:
    return Retry(1, delay=0.002) if spec["retries"] == "delay" else spec["retries"]


async def _scenario(m: StateManager, mix: dict, executor: str, log: pathlib.Path | None,
                    prefix: str = "") -> None:
    """One random mix on ``m`` (tags named ``prefix + tag``, so that one manager serves many)."""
    limits = {prefix + tag: n for tag, n in mix["limits"].items()}
    for tag, n in limits.items():
        m.set_limit(tag, n)
    mon = Monitor()
    stop = asyncio.Event()
    seen_fitting: list[Any] = []

    async def sample() -> None:  # every turn of the loop: no waiter whose tags have room
        slots = m._slots
        while not stop.is_set():
            with slots.lock:  # threads free slots too: a snapshot between two of their steps
                seen_fitting.extend(handle for handle in slots.waiters
                                    if not handle.done() and slots._fits(handle.state.tags))
            for tag, row in m.stats()["by_tag"].items():
                if row["limit"] is not None:
                    assert row["running"] <= row["limit"], (tag, row)
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    handles = []
    for i, spec in enumerate(mix["states"]):
        tags = tuple(prefix + tag for tag in spec["tags"])
        if executor == "thread":
            func = watched(mon, f"s{i}", tags, spec["seconds"], spec["fail"])
            args: tuple[Any, ...] = ()
        else:
            func = record_interval
            args = (str(log), f"s{i}", spec["seconds"], spec["fail"])
        handle = await m.put_state(State(f"s{i}", func, True, executor=executor, args=args,
                                         tags=tags, retries=_retries(spec),
                                         priority=spec["priority"]))
        if spec["cancel"] == "at_put":
            handle.cancel()
        handles.append(handle)
    await asyncio.sleep(0.002)
    for handle, spec in zip(handles, mix["states"], strict=True):
        if spec["cancel"] == "later" and handle.status is not StateStatus.RUNNING:
            handle.cancel()  # queued or waiting: a running thread cannot be stopped
    await asyncio.wait_for(m.join(), 30)
    stop.set()
    await sampler
    assert not seen_fitting, f"waited while its tags had room: {seen_fitting}"
    assert all(row["running"] == 0 and row["waiting"] == 0
               for row in m.stats()["by_tag"].values())
    assert all(h.status in TERMINAL for h in handles)
    for handle, spec in zip(handles, mix["states"], strict=True):
        if spec["cancel"] == "at_put":
            assert handle.status is StateStatus.CANCELLED
        elif handle.status is StateStatus.SUCCEEDED:
            assert not spec["fail"]
        elif handle.status is StateStatus.FAILED:
            assert spec["fail"]
            assert handle.attempts == (1 if spec["retries"] == 0 else 2)
    if executor == "thread":
        peaks = mon.peak
    else:
        assert log is not None
        intervals: dict[str, list[tuple[float, float]]] = {}
        for line in (log.read_text().splitlines() if log.exists() else []):
            name, start, end = line.split()
            for tag in mix["states"][int(name[1:])]["tags"]:
                intervals.setdefault(prefix + tag, []).append((float(start), float(end)))
        peaks = {tag: peak_overlap(iv) for tag, iv in intervals.items()}
    for tag, limit in limits.items():
        assert peaks.get(tag, 0) <= limit, (tag, peaks, limits)


@given(mix=MIX)
def test_random_tagged_mixes_on_threads_never_exceed_a_limit(mix: dict) -> None:
    from statepool.executors import ThreadExecutor

    async def scenario() -> None:
        async with StateManager(executors={"thread": ThreadExecutor(max_workers=4)}) as m:
            await _scenario(m, mix, "thread", None)

    asyncio.run(scenario())


def test_random_tagged_mixes_on_processes_never_exceed_a_limit(tmp_path: pathlib.Path) -> None:
    """One manager and one process pool for every example (a pool per example is seconds)."""
    from statepool.executors import LokyExecutor

    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="hypothesis-loop")
    runner.start()

    def on_loop(coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def build() -> StateManager:
        return await StateManager(executors={"process": LokyExecutor(max_workers=2)}).__aenter__()

    examples = itertools.count()

    @settings(max_examples=min(10, int(os.environ.get("STATEPOOL_HYPOTHESIS_EXAMPLES", "40"))))
    @given(mix=MIX)
    def one(mix: dict) -> None:
        n = next(examples)
        on_loop(_scenario(m, mix, "process", tmp_path / f"log{n}", prefix=f"x{n}-"))

    try:
        m = on_loop(build())
        try:
            one()
        finally:
            on_loop(m.__aexit__(None, None, None))
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


# -- priorities ---------------------------------------------------------------------------

def _recorder() -> tuple[list[str], Any]:
    order: list[str] = []

    async def rec(name: str) -> None:
        order.append(name)

    return order, rec


async def test_higher_priority_first_fifo_among_equals() -> None:
    order, rec = _recorder()
    m = StateManager()  # not running yet: everything is queued first
    specs = [("a", 0), ("b", 1), ("c", -1), ("d", 1), ("e", 0), ("f", 5), ("g", -1), ("h", 0)]
    await m.put_states([State(n, rec, args=(n,), priority=p) for n, p in specs[:4]])
    for n, p in specs[4:]:
        await m.put_state(State(n, rec, args=(n,), priority=p))
    async with m:
        await m.join()
    assert order == ["f", "b", "d", "a", "e", "h", "c", "g"]


async def test_priority_order_under_concurrent_puts() -> None:
    order, rec = _recorder()
    gate = asyncio.Event()
    expected: list[tuple[int, int, str]] = []
    seq = itertools.count()

    async def producer(k: int) -> None:
        for i in range(30):
            p = (i * 7 + k) % 5 - 2
            name = f"p{k}-{i}"
            expected.append((-p, next(seq), name))  # the order they were put in, per priority
            await m.put_state(State(name, rec, args=(name,), priority=p))
            if i % 4 == 0:
                await asyncio.sleep(0)

    async with StateManager() as m:
        await m.put_state(State("gate", rec, args=("gate",), event=gate))  # holds the queue
        await asyncio.gather(*(producer(k) for k in range(4)))
        gate.set()
        await m.join()
    assert order[0] == "gate"
    assert order[1:] == [name for _, _, name in sorted(expected)]


async def test_a_gate_holds_the_states_behind_it_in_priority_order() -> None:
    order, rec = _recorder()
    gate = asyncio.Event()
    async with StateManager() as m:
        await m.put_state(State("gated", rec, args=("gated",), event=gate, priority=1))
        await asyncio.sleep(0.01)  # the gated state is taken: it holds the queue now
        await m.put_states([State(n, rec, args=(n,), priority=p)
                            for n, p in (("x", 0), ("y", 9), ("z", 0), ("w", 3))])
        await asyncio.sleep(0.01)
        assert order == []  # nothing passed the gate, not even priority 9
        gate.set()
        await m.join()
    assert order == ["gated", "y", "w", "x", "z"]


async def test_priorities_on_the_thread_and_plain_paths() -> None:
    order: list[str] = []
    from statepool.executors import ThreadExecutor

    m = StateManager(executors={"thread": ThreadExecutor(max_workers=1)})
    hs = await m.put_states([State(n, order.append, True, executor="thread", args=(n,),
                                   priority=p) for n, p in (("lo", -1), ("hi", 2), ("mid", 0))])
    async with m:
        await m.join()
    assert order == ["hi", "mid", "lo"]
    assert all(h.status is StateStatus.SUCCEEDED for h in hs)


async def test_stop_cancels_states_queued_at_every_priority() -> None:
    m = StateManager()
    hs = await m.put_states([State(f"s{p}", lambda: 0, priority=p) for p in (-1, 0, 1)])
    m.signal_stopping()
    await m.process_states()
    assert all(h.status is StateStatus.CANCELLED for h in hs)


async def test_the_rate_limited_example_runs() -> None:
    import runpy

    example = pathlib.Path(__file__).resolve().parent.parent / "examples" / "rate_limited.py"
    namespace = runpy.run_path(str(example))
    assert await namespace["main"]() == sum(range(10))


async def test_states_granted_a_slot_while_the_manager_stops_end_cancelled() -> None:
    release = threading.Event()

    def hold() -> None:
        release.wait(5)

    async with StateManager(limits={"t": 1}) as m:
        holder = await m.put_state(State("holder", hold, True, executor="thread", tags=("t",)))
        waiters = await m.put_states([State(f"w{i}", lambda: 0, tags=("t",)) for i in range(3)])
        await asyncio.sleep(0.01)
        m.signal_stopping()
        release.set()
    assert holder.status is StateStatus.CANCELLED
    assert all(w.status is StateStatus.CANCELLED for w in waiters)
    assert m.stats()["by_status"]["WAITING"] == 0


@pytest.mark.parametrize("retries", [0, 1])  # the fast path, and the ordinary one
async def test_a_state_cancelled_before_its_task_ran_gives_its_slot_back(retries: int) -> None:
    async def noop() -> str:
        return "ran"

    async def yields_once() -> str:  # with eager task start (3.12+) the first step runs at once
        await asyncio.sleep(0)
        return "ran"

    async with StateManager(limits={"t": 1}) as m:
        w = await m.put_state(State("w", yields_once, True, tags=("t",), retries=retries))
        await asyncio.sleep(0)  # the main loop took it, took its slot, made its task...
        assert w.status is not StateStatus.SUCCEEDED
        assert w.cancel()  # ...which is cancelled before its first step
        await asyncio.sleep(0.01)
        assert m.stats()["by_tag"]["t"]["running"] == 0
        nxt = await m.put_state(State("next", noop, True, tags=("t",)))
        assert await asyncio.wait_for(_wait(nxt), 2) == "ran"


async def test_a_thread_waiter_starts_on_the_thread_that_freed_its_slot_with_no_loop_turn() -> None:
    """A waiting thread state's call is prepared on the executor: the thread that ends the
    holder admits it at once, while the event loop is blocked (it cannot take a turn)."""
    from statepool.executors import ThreadExecutor

    go, b_started = threading.Event(), threading.Event()
    mon = Monitor()

    def a() -> None:
        mon.start("a", ("t",))
        go.wait(5)
        mon.end(("t",))

    def b() -> None:
        mon.start("b", ("t",))
        b_started.set()
        mon.end(("t",))

    async with StateManager(executors={"thread": ThreadExecutor(max_workers=2)},
                            limits={"t": 1}) as m:
        ha = await m.put_state(State("a", a, True, executor="thread", tags=("t",)))
        hb = await m.put_state(State("b", b, True, executor="thread", tags=("t",)))
        for _ in range(200):
            if hb.status is StateStatus.WAITING and ha.status is StateStatus.RUNNING:
                break
            await asyncio.sleep(0.005)
        assert hb.status is StateStatus.WAITING
        assert m.stats()["by_tag"]["t"] == {"running": 1, "waiting": 1, "limit": 1}
        go.set()
        assert b_started.wait(5)  # the loop thread is blocked here: no turn of the loop
        assert await asyncio.wait_for(_wait(hb), 5) is None
        assert ha.status is StateStatus.SUCCEEDED
    assert mon.peak["t"] == 1 and mon.starts == ["a", "b"]
    assert m.stats()["by_tag"]["t"] == {"running": 0, "waiting": 0, "limit": 1}


async def test_a_cancelled_thread_waiter_never_runs_and_the_next_one_does() -> None:
    go = threading.Event()
    ran: list[str] = []

    def hold() -> None:
        go.wait(5)

    async with StateManager(limits={"t": 1}) as m:
        holder = await m.put_state(State("h", hold, True, executor="thread", tags=("t",)))
        w1 = await m.put_state(State("w1", ran.append, True, args=("w1",), executor="thread",
                                     tags=("t",)))
        w2 = await m.put_state(State("w2", ran.append, True, args=("w2",), executor="thread",
                                     tags=("t",)))
        await asyncio.sleep(0.02)
        assert w1.cancel()
        go.set()
        await asyncio.wait_for(m.join(), 5)
    assert holder.status is StateStatus.SUCCEEDED and w2.status is StateStatus.SUCCEEDED
    assert w1.status is StateStatus.CANCELLED and ran == ["w2"]
    assert m.stats()["by_tag"]["t"]["running"] == 0
