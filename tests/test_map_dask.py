"""manager.map on Dask (issue 12): each item its own result and error, chunks on a cluster."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from conftest import LEAK_GRACE_S, _wait_until, live_children

from statepool.engine import StateManager

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


def _odd_fails(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def test_dask_maps_with_chunks_and_per_item_errors() -> None:
    from statepool.executors import DaskExecutor

    async with StateManager(executors={"dask": DaskExecutor(n_workers=1)}) as manager:
        got = [r async for r in manager.map(_odd_fails, range(3_000), executor="dask",
                                            return_exceptions=True)]
        states = sum(manager.stats().by_status.values())
    assert got[::2] == list(range(0, 3_000, 2))
    assert all(isinstance(r, ValueError) for r in got[1::2])
    assert states < 300  # many items per Dask task
