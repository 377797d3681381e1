"""Large arrays to ``"process"`` workers out of band: the worker maps a file of the executor's
temporary directory instead of unpickling a copy; the file goes when the call is over, the
directory when the executor shuts down, and nothing lands in ``/dev/shm``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import _crashers
import pytest

from statepool.engine import State, StateManager
from statepool.engine.errors import WorkerCrashedError
from statepool.executors import LokyExecutor
from statepool.executors._wire.shm import OOB_MIN
from statepool.executors.base import PreparedCall

np = pytest.importorskip("numpy")


def prepared(name: str, fn: Any, *args: Any) -> PreparedCall:
    return PreparedCall(name, getattr(fn, "__name__", "?"), fn, args)


def oob_files(ex: LokyExecutor) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(name for name in os.listdir(ex._dir) if name.startswith("oob-"))
    return []


@contextlib.contextmanager
def nothing_new_in_dev_shm() -> Iterator[None]:
    """Nothing of this process appears in /dev/shm (others' entries are not ours to judge)."""
    def ours() -> set[str]:
        with contextlib.suppress(FileNotFoundError):
            return {n for n in os.listdir("/dev/shm") if str(os.getpid()) in n}
        return set()

    before = ours()
    yield
    assert ours() <= before


@contextlib.asynccontextmanager
async def pool(max_workers: int = 2) -> AsyncIterator[LokyExecutor]:
    ex = LokyExecutor(max_workers)
    await ex.start()
    try:
        with nothing_new_in_dev_shm():
            yield ex
    finally:
        directory = ex._dir
        await ex.shutdown(cancel=True)
        assert not os.path.exists(directory), "the temporary directory was left behind"


async def until(predicate: Any) -> None:
    deadline = time.monotonic() + 20.0
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def wait_for_pid(path: str) -> int:
    await until(lambda: Path(path).exists())
    return int(Path(path).read_text())


def big(mb: int = 8) -> Any:
    arr = np.arange(mb * 2**20 // 8, dtype=np.float64)
    assert arr.nbytes >= OOB_MIN
    return arr


async def test_the_worker_sees_the_same_array_without_a_copy() -> None:
    arr = big()
    async with pool() as ex:
        total, mapped, writable, pid = await ex.run(prepared("facts", _crashers.array_facts,
                                                              arr))
        assert total == float(arr.sum())
        assert mapped  # a view of the mapped file, not an unpickled copy
        assert writable  # copy-on-write: the function may change its argument...
        assert arr[0] == 0.0  # ...without touching ours
        assert pid in ex.worker_pids()
        assert oob_files(ex) == []


async def test_many_arrays_in_one_batch_arrive_exact() -> None:
    arrays = [np.full(OOB_MIN // 8 + i, float(i)) for i in range(40)]
    async with pool() as ex:
        for _ in range(2):  # the second time, as batches of fast calls
            sums = await asyncio.gather(*(ex.run(prepared(f"a{i}", _crashers.array_facts, a))
                                          for i, a in enumerate(arrays)))
            assert [s[0] for s in sums] == [float(a.sum()) for a in arrays]
        assert ex.batches_sent < 80
        assert oob_files(ex) == []


async def test_small_arrays_stay_in_band() -> None:
    async with pool() as ex:
        total, mapped, _, _ = await ex.run(prepared("small", _crashers.array_facts,
                                                    np.ones(1000)))
        assert total == 1000.0 and not mapped


async def test_the_file_goes_when_the_call_crashes_its_worker(tmp_path: Path) -> None:
    async with pool() as ex:
        with pytest.raises(WorkerCrashedError):
            await ex.run(prepared("crash", _crashers.exit_holding, big()))
        assert oob_files(ex) == []
        assert await ex.run(prepared("after", _crashers.identity, 3)) == 3


async def test_the_file_goes_when_a_running_call_is_cancelled(tmp_path: Path,
                                                             pids_gone: Any) -> None:
    async with pool() as ex:
        path = str(tmp_path / "hold.pid")
        task = asyncio.ensure_future(ex.run(prepared("hold", _crashers.hold_array, path, big(),
                                                     30.0)))
        pid = await wait_for_pid(path)
        assert len(oob_files(ex)) == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert pids_gone([pid], 2.0)
        await until(lambda: oob_files(ex) == [])


async def test_the_file_goes_when_a_waiting_call_is_cancelled(tmp_path: Path) -> None:
    async with pool(1) as ex:
        busy_path = str(tmp_path / "busy.pid")
        busy = asyncio.ensure_future(ex.run(prepared("busy", _crashers.announce_then, busy_path,
                                                     "sleep", 0.5)))
        await wait_for_pid(busy_path)
        queued = asyncio.ensure_future(ex.run(prepared("queued", _crashers.array_facts, big())))
        await asyncio.sleep(0.05)
        queued.cancel()
        assert isinstance(await busy, int)
        await asyncio.gather(queued, return_exceptions=True)
        await until(lambda: oob_files(ex) == [])
        assert ex.kills == 0


async def test_a_lazy_array_through_the_manager() -> None:
    arr = big(16)
    ex = LokyExecutor(2)
    with nothing_new_in_dev_shm():
        async with StateManager(executors={"process": ex}) as manager:
            handle = await manager.put_state(State(
                "lazy", _crashers.array_facts, True, lazy_args=[lambda: arr],
                executor="process"))
            total, mapped, _, _ = await handle
            assert total == float(arr.sum()) and mapped
            assert oob_files(ex) == []
            directory = ex._dir
    assert not os.path.exists(directory)


async def test_an_array_result_comes_back_mapped_and_its_file_goes() -> None:
    async with pool() as ex:
        result = await ex.run(prepared("make", np.arange, 2**20, None, None, np.float64))
        assert result.shape == (2**20,) and result[-1] == 2**20 - 1
        base = result
        while getattr(base, "base", None) is not None:
            base = base.base
        while isinstance(base, memoryview):
            base = base.obj
        assert type(base).__name__ == "mmap"  # no copy in the parent
        result[0] = 7.0  # copy-on-write: writable
        assert oob_files(ex) == []  # removed as soon as it was mapped


async def test_a_large_bytes_argument_travels_out_of_band() -> None:
    data = bytes(range(256)) * (OOB_MIN // 256 + 1)
    async with pool() as ex:
        assert await ex.run(prepared("len", len, data)) == len(data)
        assert await ex.run(prepared("same", _crashers.identity, data)) == data
        assert oob_files(ex) == []


def test_a_function_remembered_by_reference_goes_by_value_once_its_module_is_registered(
        ) -> None:
    """remote.Pickler remembers that cloudpickle pickles a function by reference; registering
    its module with ``cloudpickle.register_pickle_by_value`` makes it go by value again."""
    import pickle

    import cloudpickle

    from statepool.executors._wire.remote import cloud_dumps

    by_reference = pickle.dumps(_crashers.identity, protocol=pickle.HIGHEST_PROTOCOL)
    assert cloud_dumps(_crashers.identity) == by_reference
    assert cloud_dumps(_crashers.identity) == by_reference  # remembered: the same bytes
    cloudpickle.register_pickle_by_value(_crashers)
    try:
        by_value = cloud_dumps(_crashers.identity)
        assert by_value != by_reference and len(by_value) > 2 * len(by_reference)
        assert pickle.loads(by_value)(7) == 7
    finally:
        cloudpickle.unregister_pickle_by_value(_crashers)
    assert cloud_dumps(_crashers.identity) == by_reference
