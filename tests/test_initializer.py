"""initializer / initargs on ThreadExecutor, LokyExecutor ("process") and AioProcessExecutor
(SPEC: executors; issue 12): once per worker before its first call, lambdas carried to worker
processes, a coroutine initializer only on aioprocess, a raising initializer fails the states
given to that worker with an error naming it, and nothing respawns in a loop."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

from statepool.engine import State, StateManager
from statepool.engine.errors import InitializerError
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor

_local = threading.local()
_thread_inits: list[str] = []


def _init_thread(tag: str) -> None:
    _local.tag = tag
    _thread_inits.append(threading.current_thread().name)


def _thread_tag() -> str:
    return f"{_local.tag} on {threading.current_thread().name}"


def _env_tag() -> tuple[str, int]:
    return os.environ.get("STATEPOOL_TEST_INIT", "unset"), os.getpid()


async def _aio_env_tag() -> tuple[str, int]:
    return os.environ.get("STATEPOOL_TEST_INIT", "unset"), os.getpid()


def _count_init(path: str) -> None:
    with open(os.path.join(path, f"init-{os.getpid()}"), "a") as f:
        f.write("x")


async def _aio_init(value: str, path: str) -> None:
    await asyncio.sleep(0.01)
    os.environ["STATEPOOL_TEST_INIT"] = value
    _count_init(path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _broken_init() -> None:
    raise LookupError("no model file")


async def _aio_broken_init() -> None:
    raise LookupError("no model file")


async def test_thread_initializer_runs_once_in_each_thread_before_its_first_call() -> None:
    _thread_inits.clear()
    ex = ThreadExecutor(2, initializer=_init_thread, initargs=("ready",))
    async with StateManager(executors={"thread": ex}) as manager:
        handles = await manager.put_states(
            [State(f"t{i}", _thread_tag, True, executor="thread") for i in range(20)])
        await manager.join()
    tags = {h.result() for h in handles}
    assert all(t.startswith("ready on ") for t in tags)
    assert len(_thread_inits) == len(set(_thread_inits))  # once per thread
    assert {t.split(" on ")[1] for t in tags} <= set(_thread_inits)


async def test_process_initializer_a_lambda_runs_once_per_worker(tmp_path: Any) -> None:
    path = str(tmp_path)
    ex = LokyExecutor(max_workers=2, initializer=lambda v, p: (
        os.environ.__setitem__("STATEPOOL_TEST_INIT", v), _count_init(p)),
        initargs=("loaded", path))
    async with StateManager(executors={"process": ex}) as manager:
        handles = await manager.put_states(
            [State(f"p{i}", _env_tag, True, executor="process") for i in range(12)])
        await manager.join()
    assert {h.result()[0] for h in handles} == {"loaded"}
    pids = {h.result()[1] for h in handles}
    marks = {name: _read(os.path.join(path, name)) for name in os.listdir(path)}
    assert set(marks) >= {f"init-{pid}" for pid in pids}
    assert all(v == "x" for v in marks.values())  # once in each worker


async def test_aioprocess_awaits_a_coroutine_initializer(tmp_path: Any) -> None:
    ex = AioProcessExecutor(processes=1, initializer=_aio_init, initargs=["async", str(tmp_path)])
    async with StateManager(executors={"aioprocess": ex}) as manager:
        handles = await manager.put_states(
            [State(f"a{i}", _aio_env_tag, True, executor="aioprocess") for i in range(5)])
        await manager.join()
    assert {h.result()[0] for h in handles} == {"async"}
    assert len(os.listdir(tmp_path)) == 1


def test_bad_initializers_fail_at_construction() -> None:
    with pytest.raises(TypeError, match=r"ThreadExecutor.*coroutine function"):
        ThreadExecutor(initializer=_aio_broken_init)
    with pytest.raises(TypeError, match=r"LokyExecutor.*coroutine function"):
        LokyExecutor(initializer=_aio_broken_init)
    with pytest.raises(TypeError, match="'initializer' must be callable"):
        LokyExecutor(initializer=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'initargs' given without"):
        ThreadExecutor(initargs=(1,))
    with pytest.raises(TypeError, match="'initargs' must be a tuple"):
        AioProcessExecutor(initializer=_broken_init, initargs=42)  # type: ignore[arg-type]
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be pickled"):
        LokyExecutor(initializer=_init_thread, initargs=(lock,))


@pytest.mark.parametrize("executor", ["thread", "process", "aioprocess"])
async def test_a_raising_initializer_fails_the_states_naming_it_and_does_not_respawn(
        executor: str) -> None:
    if executor == "thread":
        ex: Any = ThreadExecutor(2, initializer=_broken_init)
        fn: Any = _thread_tag
    elif executor == "process":
        ex, fn = LokyExecutor(max_workers=2, initializer=_broken_init), _env_tag
    else:
        ex, fn = AioProcessExecutor(processes=2, initializer=_aio_broken_init), _aio_env_tag
    async with StateManager(executors={executor: ex}) as manager:
        handles = await manager.put_states(
            [State(f"s{i}", fn, True, executor=executor) for i in range(6)])
        await manager.join()
        pids = set(ex.worker_pids())
        more = await manager.put_states(
            [State(f"again{i}", fn, True, executor=executor) for i in range(6)])
        await manager.join()
        assert set(ex.worker_pids()) == pids  # the same workers: none was started again
    for handle in [*handles, *more]:
        error = handle.exception()
        assert isinstance(error, InitializerError), error
        assert f"'{handle.state.name}'" in str(error) and "_broken_init" in str(error)
        assert "no model file" in str(error) and error.initializer.endswith("_broken_init")
        assert error.__cause__ is not None
        assert "LookupError" in repr(error.__cause__) or "LookupError" in str(error.__cause__)
    if executor == "process":
        assert ex.crashes == 0
