"""Shutdown under fire: stop while thousands of states are queued, running, hung and gated."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.executors import ThreadExecutor

TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}
GRACE = 0.5


_OWNER = re.compile(r"(?:joblib_memmapping_folder_|loky-)(\d+)[_-]")


def shm_entries() -> set[str]:
    """/dev/shm entries this process may have made: those naming another PID (joblib's folders,
    loky's semaphores of other processes on a shared machine) are left out."""
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:  # pragma: no cover - no /dev/shm on this system
        return set()
    mine = str(os.getpid())
    return {n for n in names if (m := _OWNER.search(n)) is None or m.group(1) == mine}


def hung_in_c(seconds: float) -> str:
    time.sleep(seconds)  # C code: no thread can interrupt it
    return "woke"


async def napping_coroutine() -> None:
    await asyncio.sleep(60)


def states_under_fire(gate: asyncio.Event, extra: list[State]) -> list[State]:
    states: list[State] = []
    for i in range(3000):
        kind = i % 6
        if kind == 0:
            states.append(State(f"svc{i}", napping_coroutine, True))
        elif kind == 1:
            states.append(State(f"quick{i}", lambda i=i: i, True, executor="thread"))
        elif kind == 2:
            states.append(State(f"gated{i}", lambda: 0, True, event=gate))
        else:
            states.append(State(f"queued{i}", napping_coroutine))  # holds the queue
    # a few threads hung in C code, which the grace period must give up on
    hung = [State(f"hung{i}", hung_in_c, True, args=(GRACE + 1.0,)) for i in range(3)]
    return hung + extra + states


@pytest.mark.timeout(60)
async def test_stop_under_fire_returns_in_time_and_ends_every_state() -> None:
    gate = asyncio.Event()
    shm_before = shm_entries()
    threads_before = set(threading.enumerate())
    pool = ThreadExecutor(max_workers=4)
    m = StateManager(executors={"thread": pool}, shutdown_grace=GRACE)
    main = asyncio.create_task(m.process_states())
    handles = await m.put_states(states_under_fire(gate, []))
    while m.stats()["by_status"]["RUNNING"] < 3:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    m.signal_stopping()
    await asyncio.wait_for(main, GRACE + 5)
    took = time.monotonic() - started
    assert took < GRACE + 2.0, f"stop took {took:.2f} s"
    assert all(h.status in TERMINAL for h in handles)
    by_status = m.stats()["by_status"]
    assert by_status["QUEUED"] == by_status["WAITING"] == by_status["RUNNING"] == 0
    assert sum(by_status[s.name] for s in TERMINAL) == len(handles)
    assert [h.status for h in handles[:3]] == [StateStatus.CANCELLED] * 3
    assert sorted(pool.abandoned) == ["hung0", "hung1", "hung2"]
    ours = [t for t in threading.enumerate()
            if t not in threads_before and t.name.startswith("statepool")]
    assert len(ours) <= 3  # only the reported, abandoned ones
    assert shm_entries() <= shm_before
