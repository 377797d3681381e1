"""A Hypothesis rule-based machine over put / cancel / gate / kill worker / stop.

Invariants checked after every step: each handle has one status, a terminal status never changes,
the manager's counts add up to what was put, and every outcome is one the state allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from statepool.engine import (
    ManagerStoppedError,
    State,
    StateHandle,
    StateManager,
    StateStatus,
    StateTimeoutError,
    WorkerCrashedError,
)
from statepool.executors import AioProcessExecutor, Executor, LokyExecutor, ThreadExecutor

PROCESS_KINDS = ["aioprocess", "process"]


class Boom(Exception):
    pass


def plain_work(i: int, outcome: str) -> int:
    if outcome == "raise":
        raise Boom(i)
    if outcome == "slow":
        time.sleep(0.3)
    return i


async def coro_work(i: int, outcome: str) -> int:
    if outcome == "raise":
        raise Boom(i)
    if outcome == "slow":
        await asyncio.sleep(0.3)
    return i


def build_executors() -> dict[str, Executor]:
    return {"thread": ThreadExecutor(max_workers=2),
            "aioprocess": AioProcessExecutor(processes=2),
            "process": LokyExecutor(max_workers=2)}


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.executors = build_executors()
        self.manager = StateManager(executors=self.executors, shutdown_grace=0.5)
        self.main = self.loop.create_task(self.manager.process_states())
        self.handles: list[tuple[StateHandle, str, int, bool]] = []  # handle, outcome, i, retry
        self.terminal: dict[int, StateStatus] = {}
        self.gates: list[asyncio.Event] = []
        self.stopped = False
        self.counter = 0

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    @initialize()
    def settle(self) -> None:
        self.run(asyncio.sleep(0.01))

    @rule(kind=st.sampled_from(["inline", "thread", *PROCESS_KINDS]),
          outcome=st.sampled_from(["ok", "ok", "raise", "slow", "timeout"]),
          blocking=st.booleans(), gated=st.booleans(), retries=st.integers(0, 1))
    def put(self, kind: str, outcome: str, blocking: bool, gated: bool, retries: int) -> None:
        self.counter += 1
        i = self.counter
        is_coro = kind in ("inline", "aioprocess")
        func = coro_work if is_coro else plain_work
        if kind == "inline":
            blocking = True  # a slow inline state would hold the queue; fine, but keep runs short
        gate = None
        if gated:
            gate = asyncio.Event()
            self.gates.append(gate)
        timeout = 0.1 if outcome == "timeout" else 20.0
        state = State(f"s{i}-{kind}-{outcome}", func, blocking, executor=kind,
                      args=(i, "slow" if outcome == "timeout" else outcome), event=gate,
                      timeout=timeout, retries=retries)

        async def put() -> None:
            if self.stopped:
                with pytest.raises(ManagerStoppedError):
                    await self.manager.put_state(state)
                return
            handle = await self.manager.put_state(state)
            self.handles.append((handle, outcome, i, retries > 0))

        self.run(put())

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        handle, _, _, _ = data.draw(st.sampled_from(self.handles))
        was_done = handle.done()
        assert handle.cancel() is not was_done

    @precondition(lambda self: self.gates)
    @rule(data=st.data())
    def open_gate(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.gates)).set()

    @rule(kind=st.sampled_from(PROCESS_KINDS), pick=st.integers(0, 7))
    def kill_worker(self, kind: str, pick: int) -> None:
        executor = self.executors.get(kind)
        pids = sorted(executor.worker_pids()) if executor is not None else []
        if pids:  # the draw never depends on timing: hypothesis replays must draw alike
            pid = pids[pick % len(pids)]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @rule(seconds=st.sampled_from([0.0, 0.05, 0.2]))
    def advance(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    @precondition(lambda self: not self.stopped)
    @rule()
    def stop(self) -> None:
        self.stopped = True
        self.manager.signal_stopping()
        self.run(asyncio.wait_for(asyncio.shield(self.main), 15))
        assert all(h.done() for h, _, _, _ in self.handles)

    @invariant()
    def statuses_are_consistent(self) -> None:
        by_status = self.manager.stats()["by_status"]
        assert sum(by_status.values()) == len(self.handles)
        for handle, outcome, i, _retry in self.handles:
            key = id(handle)
            if key in self.terminal:
                assert handle.status is self.terminal[key], "a terminal status changed"
            if not handle.done():
                continue
            self.terminal[key] = handle.status
            if handle.status is StateStatus.SUCCEEDED:
                assert handle.result() == i
                assert outcome in ("ok", "slow")
            elif handle.status is StateStatus.FAILED:
                exc = handle.exception()
                assert isinstance(exc, (Boom, StateTimeoutError, WorkerCrashedError)), repr(exc)
                if isinstance(exc, Boom):
                    assert outcome == "raise"
                if isinstance(exc, StateTimeoutError):
                    assert outcome == "timeout"

    def teardown(self) -> None:
        try:
            if not self.stopped:
                self.manager.signal_stopping()
            self.run(asyncio.wait_for(asyncio.shield(self.main), 15))
            assert all(h.done() for h, _, _, _ in self.handles)
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


ManagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("STATEPOOL_STATEFUL_EXAMPLES", "20")),
    stateful_step_count=25, deadline=None)
TestManagerMachine = pytest.mark.timeout(300)(ManagerMachine.TestCase)
