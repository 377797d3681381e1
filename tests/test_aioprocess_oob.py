"""``"aioprocess"``: large arrays, ``bytes`` and ``bytearray`` travel out of band (``_wire.shm``).

Arguments and results of ``shm.OOB_MIN`` bytes or more go through a file of the executor's
private directory, mapped copy-on-write by the other side, not through the socket: the child
sees the parent's data without a copy and may write to it without touching the parent's; every
file is gone once its call is over, cancelled or not; the directory goes at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import pytest

from statepool.engine import State, StateManager, StateStatus
from statepool.executors._wire import shm
from statepool.executors.aioprocess.executor import AioProcessExecutor
from statepool.executors.base import PreparedCall

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BIG = 2 * shm.OOB_MIN // 8  # float64 items: twice the out-of-band threshold


async def checksum_and_scribble(arr: Any) -> tuple[float, bool]:
    """The sum, then a write to the array (copy-on-write: the parent's stays as it was)."""
    total = float(arr.sum())
    base = arr.base
    while base is not None and not isinstance(base, memoryview):
        base = getattr(base, "base", None)
    arr[0] = -1.0
    return total, isinstance(base, memoryview)  # it arrived over a mapping, not a copy


async def echo(value: Any) -> Any:
    return value


async def fresh(n: int) -> Any:
    import numpy as np

    return np.arange(n, dtype=np.float64)


async def hold(release: str, arr: Any) -> int:
    while not os.path.exists(release):
        await asyncio.sleep(0.005)
    return int(arr.nbytes)


def call(fn: Any, *args: Any) -> PreparedCall:
    return PreparedCall(fn.__name__, fn.__name__, fn, args, {}, is_coro=True)


@contextlib.asynccontextmanager
async def pool() -> AsyncIterator[AioProcessExecutor]:
    ex = AioProcessExecutor(1)
    await ex.start()
    try:
        yield ex
    finally:
        await ex.shutdown(cancel=True)


def files(ex: AioProcessExecutor) -> list[str]:
    assert ex._dir is not None
    return os.listdir(ex._dir)


async def test_array_argument_is_mapped_not_copied_and_the_parents_stays() -> None:
    arr = np.ones(BIG)
    async with pool() as ex:
        total, mapped = await ex.run(call(checksum_and_scribble, arr))
        assert total == BIG and mapped
        assert arr[0] == 1.0
        assert files(ex) == []


async def test_array_bytes_bytearray_results_come_back_whole() -> None:
    async with pool() as ex:
        got = await ex.run(call(fresh, BIG))
        assert isinstance(got, np.ndarray) and got.shape == (BIG,) and got[-1] == BIG - 1
        got[0] = 5.0  # writable (a copy-on-write mapping)
        for value in (bytes(range(256)) * (BIG // 32), bytearray(b"x" * 2 * shm.OOB_MIN)):
            back = await ex.run(call(echo, value))
            assert type(back) is type(value) and back == value
        assert files(ex) == []
        folder = ex._dir
        assert folder is not None and os.path.isdir(folder)
    assert not os.path.exists(folder)


async def test_small_values_stay_in_band() -> None:
    async with pool() as ex:
        assert await ex.run(call(echo, b"small")) == b"small"
        assert ex._dir is None or files(ex) == []


async def test_cancelled_call_leaves_no_file(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with pool() as ex:
        task = asyncio.ensure_future(ex.run(call(hold, str(release), np.ones(BIG))))
        while not files(ex):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.touch()
        assert files(ex) == []


async def test_call_cancelled_while_its_buffers_are_written_leaves_no_file(
        tmp_path: Path) -> None:
    """Cancelled before the helper thread has written its file: the file goes once written."""
    release = tmp_path / "release"
    release.touch()
    async with pool() as ex:
        assert await ex.run(call(echo, b"warm")) == b"warm"
        for _ in range(3):
            task = asyncio.ensure_future(ex.run(call(hold, str(release), np.ones(8 * BIG))))
            await asyncio.sleep(0)  # it is pickling on the helper thread now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(500):  # the helper thread finishes writing, then the file goes
            if not files(ex):
                break
            await asyncio.sleep(0.01)
        assert files(ex) == []


async def test_through_the_manager() -> None:
    arr = np.ones(BIG)
    async with StateManager(executors={"aioprocess": AioProcessExecutor(1)}) as manager:
        handle = await manager.put_state(State("big", echo, True, args=(arr,),
                                               executor="aioprocess"))
        back = await handle
    assert handle.status is StateStatus.SUCCEEDED
    assert np.array_equal(back, arr)
