"""``statepool.engine.trace``: the trace-event JSON (Chrome / Perfetto) and the timeline PNG.

The JSON is checked against the trace-event format: an object with ``traceEvents``; complete
events (``ph: X``) with name, cat, pid, tid, ``ts`` and ``dur`` in microseconds; metadata events
(``ph: M``) naming one thread per worker. One slice per attempt, with the state's name, outcome
and attempt in its args; the queue and dispatch waits as slices of their own.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import time
from typing import Any

import _crashers
import pytest

from statepool.engine import State, StateManager, trace
from statepool.executors import LokyExecutor, ThreadExecutor

REQUIRED_X = {"name", "ph", "ts", "dur", "pid", "tid", "args"}
REQUIRED_M = {"name", "ph", "pid", "tid", "args"}


async def aok() -> int:
    await asyncio.sleep(0.01)
    return 1


def flaky(i: int) -> int:
    time.sleep(0.02)
    if i == 3:
        raise ValueError("three")
    return i


async def run_a_small_pipeline() -> tuple[trace.Recording, dict[str, Any]]:
    executors = {"process": LokyExecutor(2), "thread": ThreadExecutor(2)}
    async with StateManager(executors=executors) as m:
        await (await m.put_state(State("warm", _crashers.identity, True, args=(0,),
                                       executor="process")))
        with trace.record(m) as rec:
            handles = await m.put_states(
                [State(f"p{i}", flaky, True, args=(i,), executor="process") for i in range(6)]
                + [State("retried", _crashers.raise_boom, True, executor="process", retries=1)]
                + [State(f"t{i}", time.sleep, True, args=(0.03,), executor="thread")
                   for i in range(3)]
                + [State("loop", aok)])
            await asyncio.wait_for(asyncio.gather(*handles, return_exceptions=True), 30)
        pids = set(m._executors["process"].worker_pids())
    assert len(rec) > 0
    return rec, {"pids": pids}


def check_trace_event_format(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace-event format's rules for what we write; returns the complete events."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    slices = []
    for event in doc["traceEvents"]:
        assert event["ph"] in ("X", "M"), event
        if event["ph"] == "M":
            assert set(event) >= REQUIRED_M and event["name"] in (
                "process_name", "thread_name", "thread_sort_index")
            continue
        assert set(event) >= REQUIRED_X, event
        assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0
        assert isinstance(event["dur"], (int, float)) and event["dur"] > 0
        assert isinstance(event["pid"], int) and isinstance(event["tid"], int)
        slices.append(event)
    return slices


async def test_the_chrome_trace_has_a_slice_per_attempt_and_a_track_per_worker(
        tmp_path: pathlib.Path) -> None:
    rec, facts = await run_a_small_pipeline()
    path = tmp_path / "run.json"
    rec.write_chrome_trace(path)
    doc = json.loads(path.read_text())
    slices = check_trace_event_format(doc)
    names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert len(set(names.values())) == len(names)  # one track per worker
    runs = [e for e in slices if e["cat"] not in ("queued", "dispatch")]
    by_state: dict[str, list[dict[str, Any]]] = {}
    for e in runs:
        by_state.setdefault(e["args"]["state"], []).append(e)
    assert [e["args"]["outcome"] for e in by_state["retried"]] == ["retrying", "failed"]
    assert [e["args"]["attempt"] for e in by_state["retried"]] == [1, 2]
    assert by_state["p3"][0]["args"]["outcome"] == "failed"
    assert "ValueError: three" in by_state["p3"][0]["args"]["error"]
    assert by_state["p0"][0]["args"]["outcome"] == "succeeded"
    for state, slices_of in by_state.items():
        tracks = {names[e["tid"]] for e in slices_of}
        if state.startswith("p"):
            assert all(t.startswith("process pid ") for t in tracks)
            assert {int(t.rsplit(" ", 1)[1]) for t in tracks} <= facts["pids"]
        elif state.startswith("t"):
            assert all(t.startswith("statepool-thread-") for t in tracks)
        elif state == "loop":
            assert tracks == {trace.LOOP_TRACK}
    assert len(runs) == 6 + 2 + 3 + 1  # one slice per attempt
    # microseconds: the slices of a 20 ms call last about 20,000 us
    assert 15_000 <= by_state["p0"][0]["dur"] <= 5_000_000
    waits = [e for e in slices if e["cat"] in ("queued", "dispatch")]
    assert waits and all(names[e["tid"]] == trace.QUEUE_TRACK for e in waits)
    assert any(e["cat"] == "dispatch" for e in waits)  # six calls waited for two workers


async def test_the_timeline_png_is_drawn(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("matplotlib")
    rec, _ = await run_a_small_pipeline()
    path = tmp_path / "run.png"
    rec.plot_timeline(path, title="a small pipeline")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


async def test_attempts_pairs_events_and_keeps_states_that_never_started() -> None:
    m = StateManager()
    gate = asyncio.Event()
    with trace.record(m) as rec:
        h = await m.put_state(State("held", aok, event=gate))
        runner = asyncio.ensure_future(m.process_states())
        await asyncio.sleep(0.02)
        m.signal_stopping()
        await asyncio.wait_for(runner, 10)
    assert h.cancelled()
    (run,) = rec.attempts()
    assert (run.name, run.outcome, run.worker) == ("held", "cancelled", trace.QUEUE_TRACK)
    doc = trace.chrome_trace(rec.events)
    check_trace_event_format(doc)
