"""Load and back-pressure: 100,000 states through the manager without memory growing."""

from __future__ import annotations

import asyncio
import gc

import psutil
import pytest

from statepool.engine import State, StateHandle, StateManager, StateStatus
from statepool.executors import ThreadExecutor

N = 100_000


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def produce(m: StateManager, state: State, n: int, batch: int) -> int:
    """Put ``n`` puts of ``state`` in batches, keeping no handle; return the sum of results."""
    total = 0
    pending: list[StateHandle] = []
    for start in range(0, n, batch):
        handles = await m.put_states([state] * min(batch, n - start))
        pending.extend(handles)
        if len(pending) >= 4 * batch:
            total += sum([await h for h in pending])
            pending.clear()
    total += sum([await h for h in pending])
    return total


@pytest.mark.parametrize("executor", ["inline", "thread"])
@pytest.mark.timeout(240)
async def test_100k_states_memory_stays_flat(executor: str) -> None:
    async def one() -> int:
        return 1

    def plain() -> int:
        return 1

    state = State(f"load-{executor}", one if executor == "inline" else plain, True,
                  executor=executor)
    async with StateManager(executors={"thread": ThreadExecutor(max_workers=4)},
                            max_queue=2_000) as m:
        await produce(m, state, 5_000, 500)  # warm-up: pools, allocator arenas
        before = rss()
        assert await produce(m, state, N, 1_000) == N
        grown = rss() - before
        stats = m.stats()["by_status"]
    assert stats["SUCCEEDED"] == N + 5_000
    # holding every handle of 100k states would take > 25 MB; the queue bound keeps it flat
    assert grown < 12 * 2**20, f"RSS grew {grown / 2**20:.1f} MB"


async def test_max_queue_holds_producers_instead_of_growing() -> None:
    gate = asyncio.Event()
    peak = 0

    async def producer(m: StateManager, n: int) -> list[StateHandle]:
        nonlocal peak
        out = []
        for i in range(n):
            out.append(await m.put_state(State(f"p{i}", lambda: 1)))
            peak = max(peak, m.stats()["by_status"]["QUEUED"])
        return out

    async with StateManager(max_queue=50) as m:
        await m.put_state(State("gate", lambda: 0, event=gate))
        producers = [asyncio.create_task(producer(m, 200)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(p.done() for p in producers)  # held by back-pressure
        assert m.stats()["by_status"]["QUEUED"] == 50
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*producers), 20)
        await m.join()
    assert peak <= 50
    assert all(h.status is StateStatus.SUCCEEDED for hs in results for h in hs)
    assert sum(len(hs) for hs in results) == 600


async def test_producers_held_by_back_pressure_are_released_by_stop() -> None:
    gate = asyncio.Event()
    m = StateManager(max_queue=2)
    main = asyncio.create_task(m.process_states())
    await m.put_state(State("gated", lambda: 0, event=gate))
    await asyncio.sleep(0.01)
    await m.put_states([State("a", lambda: 1), State("b", lambda: 2)])
    blocked = asyncio.create_task(m.put_state(State("c", lambda: 3)))
    await asyncio.sleep(0.02)
    assert not blocked.done()
    m.signal_stopping()
    from statepool.engine import ManagerStoppedError

    with pytest.raises(ManagerStoppedError):
        await asyncio.wait_for(blocked, 5)
    await asyncio.wait_for(main, 5)


def triple(i: int) -> int:
    return 3 * i


@pytest.mark.timeout(240)
async def test_20k_process_states_memory_stays_flat() -> None:
    from statepool.executors import LokyExecutor

    async with StateManager(executors={"process": LokyExecutor(max_workers=2)},
                            max_queue=2_000) as m:
        warm = await m.put_states([State("warm", triple, True, executor="process", args=(1,))
                                   for _ in range(500)])
        assert [await h for h in warm] == [3] * 500
        before = rss()
        total = 0
        for start in range(0, 20_000, 1_000):
            handles = await m.put_states(
                [State("p", triple, True, executor="process", args=(i,))
                 for i in range(start, start + 1_000)])
            total += sum([await h for h in handles])
        grown = rss() - before
    assert total == 3 * sum(range(20_000))
    assert grown < 12 * 2**20, f"RSS grew {grown / 2**20:.1f} MB"
