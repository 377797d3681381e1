"""Hypothesis: random mixes of states end, each once, with the right outcome."""

from __future__ import annotations

import asyncio
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from statepool.engine import State, StateManager, StateStatus

TERMINAL = {StateStatus.SUCCEEDED, StateStatus.FAILED, StateStatus.CANCELLED}


class Boom(Exception):
    pass


spec = st.fixed_dictionaries({
    "kind": st.sampled_from(["coro", "plain"]),
    "executor": st.sampled_from(["default", "inline", "thread"]),
    "blocking": st.booleans(),
    "outcome": st.sampled_from(["ok", "raise", "flaky"]),
    "cancel": st.booleans(),
    "retries": st.integers(0, 2),
    "sleep": st.sampled_from([0.0, 0.0, 0.001]),
})


def build(i: int, s: dict, runs: Counter) -> State:
    failures_left = {"n": 1}

    def body() -> int:
        runs[i] += 1
        if s["outcome"] == "raise":
            raise Boom(i)
        if s["outcome"] == "flaky" and failures_left["n"]:
            failures_left["n"] -= 1
            raise Boom(i)
        return i

    if s["kind"] == "coro":
        async def func() -> int:
            await asyncio.sleep(s["sleep"])
            return body()
    else:
        def func() -> int:
            return body()

    executor = None if s["executor"] == "default" else s["executor"]
    if executor == "inline" and s["blocking"] and s["kind"] == "plain":
        executor = "thread"  # the one combination State rejects
    return State(f"s{i}", func, s["blocking"], executor=executor, retries=s["retries"])


@given(st.lists(spec, min_size=1, max_size=25))
def test_every_state_ends_once_with_the_right_outcome(specs: list[dict]) -> None:
    async def scenario() -> None:
        runs: Counter = Counter()
        async with StateManager() as m:
            states = [build(i, s, runs) for i, s in enumerate(specs)]
            handles = []
            for state, s in zip(states, specs, strict=True):
                handle = await m.put_state(state)
                if s["cancel"]:
                    handle.cancel()
                handles.append(handle)
            await asyncio.wait_for(m.join(), 10)
            stats = m.stats()["by_status"]
        assert sum(stats[s.name] for s in TERMINAL) == len(handles)
        assert stats["QUEUED"] == stats["WAITING"] == stats["RUNNING"] == 0
        for i, (handle, s) in enumerate(zip(handles, specs, strict=True)):
            assert handle.status in TERMINAL
            if s["cancel"]:
                assert handle.status is StateStatus.CANCELLED
                assert runs[i] == 0  # cancelled right after put: never started
                continue
            assert runs[i] == handle.attempts <= s["retries"] + 1
            if s["outcome"] == "ok" or (s["outcome"] == "flaky" and s["retries"] >= 1):
                assert handle.status is StateStatus.SUCCEEDED and handle.result() == i
            else:
                assert handle.status is StateStatus.FAILED
                assert isinstance(handle.exception(), Boom)
                assert runs[i] == s["retries"] + 1

    asyncio.run(scenario())
