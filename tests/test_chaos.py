"""Chaos: thousands of process states while workers are SIGKILLed from outside.

Every handle ends in exactly one terminal status; every failure is a WorkerCrashedError naming its
own state (a state that was running in a killed worker); the others succeed with the right value;
the manager runs new states afterwards. Set STATEPOOL_SOAK=600 to run the same for ten minutes.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest

from statepool.engine import State, StateManager, StateStatus, WorkerCrashedError
from statepool.executors import AioProcessExecutor, Executor, LokyExecutor

SOAK_S = float(os.environ.get("STATEPOOL_SOAK", "0"))
N_STATES = 2000
TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}


def mixed_work(i: int) -> int:
    kind = i % 10
    if kind == 0:  # CPU-bound, about 10 ms
        deadline = time.perf_counter() + 0.01
        while time.perf_counter() < deadline:
            pass
    elif kind == 1:
        time.sleep(0.005)
    return i * 3


async def mixed_coro(i: int) -> int:
    if i % 10 == 1:
        await asyncio.sleep(0.005)
    return mixed_work(i) if i % 10 == 0 else i * 3


def build(kind: str) -> tuple[Executor, int]:
    """The executor and how many states one worker can hold at once."""
    if kind == "process":
        return LokyExecutor(max_workers=2), 1
    return AioProcessExecutor(processes=2, childconcurrency=4), 4


async def kill_workers(executor: Executor, killed: list[int], stop: asyncio.Event,
                       workers: int = 2) -> None:
    """SIGKILL a random worker every few tenths of a second, plus the time the last killed
    worker took to be replaced: under load (a spawn of 0.6 s) the workers are not killed
    faster than they come back, which would leave the states no worker to run on."""
    rng = random.Random(1234)
    replaced_s = 0.0  # how long the last killed worker took to be replaced
    while not stop.is_set():
        pause = rng.uniform(0.1, 0.2) if len(killed) < 2 else rng.uniform(0.3, 0.6)
        try:
            await asyncio.wait_for(stop.wait(), pause + replaced_s)
        except asyncio.TimeoutError:
            pids = executor.worker_pids()
            if not pids:
                continue
            pid = rng.choice(sorted(pids))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
            began = time.monotonic()
            while not stop.is_set():  # until the pool is whole again
                now = executor.worker_pids()
                if pid not in now and len(now) >= workers:
                    break
                await asyncio.sleep(0.01)
            replaced_s = time.monotonic() - began


async def one_round(m: StateManager, kind: str, executor: Executor, n: int,
                    per_worker: int) -> tuple[int, int]:
    func = mixed_work if kind == "process" else mixed_coro
    states = [State(f"{kind}-{i}", func, True, executor=kind, args=(i,), retries=i % 2)
              for i in range(n)]
    killed: list[int] = []
    stop = asyncio.Event()
    handles = await m.put_states(states)
    killer = asyncio.create_task(kill_workers(executor, killed, stop))
    try:
        await asyncio.wait_for(m.join(), 240)
    finally:
        stop.set()
        await killer
    failed = 0
    for i, handle in enumerate(handles):
        assert handle.status in TERMINAL
        if handle.status is StateStatus.SUCCEEDED:
            assert handle.result() == i * 3
            continue
        assert handle.status is StateStatus.FAILED, handle
        exc = handle.exception()
        assert isinstance(exc, WorkerCrashedError), repr(exc)
        assert handle.state.name in str(exc)
        assert handle.attempts == handle.state.retries + 1
        failed += 1
    by_status = m.stats()["by_status"]
    assert by_status["QUEUED"] == by_status["RUNNING"] == by_status["WAITING"] == 0
    # a kill fails at most the states its worker held (once more for states given a retry)
    assert failed <= len(killed) * per_worker, (failed, len(killed))
    return failed, len(killed)


@pytest.mark.parametrize("kind", ["process", "aioprocess"])
@pytest.mark.timeout(300 + SOAK_S * 1.5)
async def test_chaos_kills_fail_only_the_states_they_hit(kind: str) -> None:
    executor, per_worker = build(kind)
    async with StateManager(executors={kind: executor}) as m:
        failed, killed = await one_round(m, kind, executor, N_STATES, per_worker)
        assert killed >= 2, "the chaos task never killed a worker"
        deadline = time.monotonic() + SOAK_S
        rounds = 1
        while time.monotonic() < deadline:  # the soak: keep going with fresh rounds
            f, k = await one_round(m, kind, executor, N_STATES, per_worker)
            failed, killed, rounds = failed + f, killed + k, rounds + 1
        after = await m.put_state(State("after-chaos", mixed_work, True, executor=kind,
                                        args=(7,)) if kind == "process" else
                                  State("after-chaos", mixed_coro, True, executor=kind,
                                        args=(7,)))
        assert await asyncio.wait_for(after, 30) == 21
    if SOAK_S:
        import logging

        logging.getLogger("statepool.engine").warning(
            "soak %s: %d rounds of %d states, %d workers killed, %d states failed",
            kind, rounds, N_STATES, killed, failed)
