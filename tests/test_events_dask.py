"""Lifecycle events on Dask (issue 13): the order, and the Dask worker's address."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import _crashers
import pytest
from conftest import LEAK_GRACE_S, _wait_until, live_children
from test_events import kinds_by_state

from statepool.engine import State, StateEvent, StateManager

pytest.importorskip("distributed")

SHARED_THREADS = ("Dask-Offload",)  # distributed's module-level pool, alive until exit


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """conftest's check, less distributed's offload thread."""
    threads_before = set(threading.enumerate())
    children_before = live_children()
    yield
    StateManager._reset_instance()

    def new_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in threads_before and t.is_alive()
                and not t.name.startswith(SHARED_THREADS)]

    _wait_until(lambda: not new_threads() and not live_children() - children_before,
                LEAK_GRACE_S)
    assert not new_threads(), [t.name for t in new_threads()]
    assert not live_children() - children_before


async def test_event_order_on_dask_with_the_worker_address() -> None:
    from statepool.executors.dask import DaskExecutor

    events: list[StateEvent] = []
    async with StateManager(executors={"dask": DaskExecutor(n_workers=1)}) as m:
        m.add_listener(events.append)
        ok = await m.put_state(State("ok", _crashers.identity, True, args=(3,), executor="dask"))
        bad = await m.put_state(State("bad", _crashers.raise_boom, True, executor="dask",
                                      retries=1))
        assert await asyncio.wait_for(ok, 60) == 3
        with pytest.raises(Exception, match="boom"):
            await asyncio.wait_for(bad, 60)
    by = kinds_by_state(events)
    assert by["ok"] == ["queued", "started", "succeeded"]
    assert by["bad"] == ["queued", "started", "retrying", "started", "failed"]
    end = next(e for e in events if e.name == "ok" and e.kind == "succeeded")
    assert isinstance(end.worker, str) and "://" in end.worker  # the Dask worker's address
    assert ok.timings["running"] > 0.0
