"""``python -m benchmarks.memprobe KIND N``: the RSS that N queued calls take, in a fresh process.

Run in its own interpreter so that each repetition starts from the same heap. KIND is
``statepool`` (N states queued behind a gate state whose event is not set), ``tasks`` (N
``asyncio`` tasks started and suspended on an event) or ``queue`` (N ``(function, args)`` items
on an ``asyncio.Queue``). Prints one JSON object: ``rss_before``, ``rss_after``, ``queued``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
from typing import Any

import psutil

from .work import anoop

__all__ = ["probe"]

_WARM = 1_000


def _rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


async def _statepool(n: int) -> dict[str, Any]:
    from statepool.engine import State, StateManager

    gate = asyncio.Event()
    async with StateManager() as manager:
        await manager.put_states([State("warm", anoop, True) for _ in range(_WARM)])
        await manager.join()
        before = _rss()
        await manager.put_state(State("gate", anoop, event=gate))
        handles = await manager.put_states([State("queued", anoop, True) for _ in range(n)])
        for _ in range(3):
            await asyncio.sleep(0)  # the main loop takes the gate and waits on it
        after = _rss()
        queued = manager.stats().by_status["QUEUED"]
        manager.signal_stopping()
    del handles
    return {"rss_before": before, "rss_after": after, "queued": queued}


async def _tasks(n: int) -> dict[str, Any]:
    event = asyncio.Event()

    async def waiter() -> None:
        await event.wait()

    await asyncio.gather(*[asyncio.create_task(anoop()) for _ in range(_WARM)])
    before = _rss()
    tasks = [asyncio.create_task(waiter()) for _ in range(n)]
    await asyncio.sleep(0)  # every task starts and suspends on the event
    after = _rss()
    queued = sum(not t.done() for t in tasks)
    event.set()
    await asyncio.gather(*tasks)
    return {"rss_before": before, "rss_after": after, "queued": queued}


async def _queue(n: int) -> dict[str, Any]:
    queue: asyncio.Queue[tuple[Any, tuple[Any, ...]]] = asyncio.Queue()
    before = _rss()
    for _ in range(n):
        queue.put_nowait((anoop, ()))
    after = _rss()
    return {"rss_before": before, "rss_after": after, "queued": queue.qsize()}


_KINDS = {"statepool": _statepool, "tasks": _tasks, "queue": _queue}


def probe(kind: str, n: int) -> dict[str, Any]:
    return asyncio.run(_KINDS[kind](n))


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], int(sys.argv[2]))))
