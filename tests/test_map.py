"""manager.map and run_map (SPEC: StateManager; issue 12), the is_blocking trap warning, and the
process-wide manager across several asyncio.run() calls."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import pytest

from statepool.engine import State, StateManager, run_map
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor


def _sleepy(x: float) -> float:
    time.sleep(x)
    return x


async def _aio_sleepy(x: float) -> float:
    await asyncio.sleep(x)
    return x


# -- StateManager.instance() across event loops ---------------------------------------------


def test_the_process_wide_manager_works_across_two_asyncio_runs() -> None:
    async def once(n: int) -> tuple[int, int]:
        manager = StateManager.instance()
        runner = asyncio.create_task(manager.process_states())
        handle = await manager.put_state(State("twice", _aio_sleepy, True, args=(0.01,)))
        await handle
        manager.signal_stopping()
        await runner
        return n, id(manager)

    first = asyncio.run(once(1))
    second = asyncio.run(once(2))
    assert first[1] != second[1]  # the stopped one was replaced


def test_instance_replaces_a_manager_whose_loop_closed_without_stopping() -> None:
    async def put_only() -> int:
        manager = StateManager.instance()
        await manager.put_state(State("left", _aio_sleepy, True, args=(0.01,)))
        return id(manager)

    async def run_one() -> float:
        async with StateManager.instance() as manager:
            return await (await manager.put_state(State("ok", _aio_sleepy, True, args=(0.02,))))

    old = asyncio.run(put_only())
    assert asyncio.run(run_one()) == 0.02
    assert id(StateManager.instance()) != old


async def test_instance_is_kept_while_its_loop_is_open() -> None:
    manager = StateManager.instance()
    assert StateManager.instance() is manager
    async with manager:
        assert StateManager.instance() is manager


# -- the is_blocking trap ----------------------------------------------------------------------


def _trap_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "is_blocking=True" in r.getMessage()]


def trap_executors(name: str) -> dict[str, Any]:
    return {"thread": {"thread": ThreadExecutor(2)},
            "process": {"process": LokyExecutor(max_workers=2)},
            "aioprocess": {"aioprocess": AioProcessExecutor(processes=1, childconcurrency=2)},
            }[name]


@pytest.mark.parametrize("executor", ["thread", "process", "aioprocess"])
async def test_non_blocking_states_in_line_on_a_pool_warn_once_per_function(
        executor: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    fn = _aio_sleepy if executor == "aioprocess" else _sleepy
    async with StateManager(executors=trap_executors(executor)) as manager:
        await manager.put_states([State(f"warm {i}", fn, True, args=(0.0,), executor=executor)
                                  for i in range(2)])
        await manager.join()
        handles = await manager.put_states(
            [State(f"slow {i}", fn, args=(0.02,), executor=executor) for i in range(6)])
        await manager.join()
        more = await manager.put_states(
            [State(f"again {i}", fn, args=(0.01,), executor=executor) for i in range(3)])
        await manager.join()
    assert all(h.result() == 0.02 for h in handles) and all(h.done() for h in more)
    (record,) = _trap_warnings(caplog)
    message = record.getMessage()
    assert "'slow 0'" in message and fn.__name__ in message and "manager.map" in message
    assert record.levelno == logging.WARNING


async def test_no_trap_warning_for_blocking_states_single_workers_or_mixed_functions(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    async with StateManager(executors={"thread": ThreadExecutor(2)}) as manager:
        await manager.put_states(
            [State(f"b {i}", _sleepy, True, args=(0.01,), executor="thread") for i in range(6)])
        await manager.join()
        await manager.put_states(  # alternating functions: nothing of one waits behind it
            [State(f"m {i}", _sleepy if i % 2 else os.getpid, args=(0.01,) if i % 2 else (),
                   executor="thread") for i in range(6)])
        await manager.join()
    async with StateManager(executors={"thread": ThreadExecutor(1)}) as manager:
        await manager.put_states(
            [State(f"one {i}", _sleepy, args=(0.01,), executor="thread") for i in range(4)])
        await manager.join()
    assert _trap_warnings(caplog) == []


# -- manager.map ---------------------------------------------------------------------------


def _inc(x: int) -> int:
    return x + 1


async def _aio_inc(x: int) -> int:
    return x + 1


def _odd_fails(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


async def _aio_odd_fails(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    return x


def _crash_on_three(x: int) -> int:
    if x == 3:
        os._exit(3)
    return x


MAP_EXECUTORS = ["inline", "thread", "process", "aioprocess"]


def map_executors(name: str) -> dict[str, Any]:
    return {"inline": {},
            "thread": {"thread": ThreadExecutor(2)},
            "process": {"process": LokyExecutor(max_workers=2)},
            "aioprocess": {"aioprocess": AioProcessExecutor(processes=2)},
            }[name]


def fn_for(executor: str, sync: Any, coro: Any) -> Any:
    return coro if executor in ("inline", "aioprocess") else sync


@pytest.mark.parametrize("executor", MAP_EXECUTORS)
async def test_map_yields_every_result_in_order_with_many_items_per_call(executor: str) -> None:
    fn = fn_for(executor, _inc, _aio_inc)
    async with StateManager(executors=map_executors(executor)) as manager:
        got = [r async for r in manager.map(fn, range(20_000), executor=executor)]
        assert got == list(range(1, 20_001))
        states = sum(manager.stats().by_status.values())
        assert states < 2_000, f"{states} states for 20,000 fast items: no chunking"
        fixed = [r async for r in manager.map(fn, range(10), executor=executor, chunksize=3)]
        assert fixed == list(range(1, 11))
        unordered = [r async for r in manager.map(fn, range(500), executor=executor,
                                                  ordered=False)]
        assert sorted(unordered) == list(range(1, 501))


@pytest.mark.parametrize("executor", MAP_EXECUTORS)
async def test_each_item_keeps_its_own_error_and_retries(executor: str, tmp_path: Any) -> None:
    fn = fn_for(executor, _odd_fails, _aio_odd_fails)
    async with StateManager(executors=map_executors(executor)) as manager:
        got = [r async for r in manager.map(fn, range(400), executor=executor,
                                            return_exceptions=True)]
        assert [r for r in got[::2]] == list(range(0, 400, 2))
        assert all(isinstance(r, ValueError) and str(r) == f"odd {i}"
                   for i, r in zip(range(1, 400, 2), got[1::2], strict=True))
        flaky = _Flaky(str(tmp_path))
        again = [r async for r in manager.map(flaky, range(30), executor="thread"
                                              if executor == "inline" else executor,
                                              retries=1, chunksize=10)]
        assert again == list(range(30))  # each item failed once, then passed alone


def _two_kinds(x: int) -> int:
    if x % 2:
        raise ValueError(f"odd {x}")
    if x % 3 == 0:
        raise ValueError(f"even, of three {x}")
    return x


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_items_failing_inside_chunks_log_one_traceback_per_kind_then_one_line(
        executor: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="statepool.engine")
    async with StateManager(executors=map_executors(executor)) as manager:
        got = [r async for r in manager.map(_two_kinds, range(60), executor=executor,
                                            chunksize=10, return_exceptions=True)]
    failed = [i for i in range(60) if i % 2 or i % 3 == 0]
    assert [i for i, r in enumerate(got) if isinstance(r, ValueError)] == failed
    errors = [r for r in caplog.records if r.name == "statepool.engine"]
    # one ERROR record per item, named after it
    assert sorted(r.state for r in errors) == sorted(  # type: ignore[attr-defined]
        f"_two_kinds[{i}]" for i in failed)
    # the traceback once per kind of failure (function, type, raising line): two kinds here
    with_tb = [r for r in errors if r.exc_info is not None]
    assert len(with_tb) == 2
    assert {r.getMessage().split(": ")[-1].split(" ")[0] for r in with_tb} == {"odd", "even,"}
    text = "".join(logging.Formatter().formatException(r.exc_info)  # type: ignore[arg-type]
                   for r in with_tb)
    assert 'raise ValueError(f"odd {x}")' in text  # the frames where the item raised
    assert 'raise ValueError(f"even, of three {x}")' in text
    repeats = [r for r in errors if r.exc_info is None]
    assert len(repeats) == len(failed) - 2
    assert all("of this kind; its traceback was logged with the first" in r.getMessage()
               for r in repeats)
    assert all(r.executor == executor and r.attempt == 1  # type: ignore[attr-defined]
               for r in errors)


class _Flaky:
    """Fails the first attempt of every item (a marker file per item), in any process."""

    def __init__(self, root: str) -> None:
        self.root = root

    def __call__(self, x: int) -> int:
        marker = os.path.join(self.root, f"seen-{x}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError(f"first attempt of {x}")
        return x


async def test_a_crashing_item_fails_alone_and_the_others_of_its_call_succeed() -> None:
    async with StateManager(executors=map_executors("process")) as manager:
        got = [r async for r in manager.map(_crash_on_three, range(8), executor="process",
                                            chunksize=4, return_exceptions=True)]
    from statepool.engine import WorkerCrashedError

    assert [r for i, r in enumerate(got) if i != 3] == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(got[3], WorkerCrashedError) and "[3]" in str(got[3])


@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_the_first_failure_raises_and_cancels_what_is_pending(executor: str) -> None:
    started: list[int] = []

    def slow_or_bad(x: int) -> int:
        started.append(x)
        if x == 2:
            raise KeyError("item two")
        time.sleep(0.05)
        return x

    async def aio_slow_or_bad(x: int) -> int:
        started.append(x)
        if x == 2:
            raise KeyError("item two")
        await asyncio.sleep(0.05)
        return x

    fn = fn_for(executor, slow_or_bad, aio_slow_or_bad)
    async with StateManager(executors=map_executors(executor)) as manager:
        with pytest.raises(KeyError, match="item two"):
            async for _ in manager.map(fn, range(1_000), executor=executor, window=8):
                pass
        await asyncio.sleep(0.2)
        stats = manager.stats().by_status
        assert stats.get("RUNNING", 0) == 0 and stats.get("QUEUED", 0) == 0
        assert len(started) < 50  # the window bounded what started; the rest never did


def _counting(limit: int | None, seen: list[int], fail_at: int | None = None) -> Any:
    i = 0
    while limit is None or i < limit:
        if fail_at is not None and i == fail_at:
            raise OSError(f"input broke at {i}")
        seen.append(i)
        yield i
        i += 1


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_the_input_is_read_lazily_and_a_break_cancels_what_is_pending(
        executor: str) -> None:
    seen: list[int] = []
    async with StateManager(executors=map_executors(executor)) as manager:
        got = []
        async for r in manager.map(_inc, _counting(None, seen), executor=executor):
            got.append(r)
            if len(got) == 5_000:
                break
        await asyncio.sleep(0.1)  # the finished iterator closes: its calls are cancelled
        assert got == list(range(1, 5_001))
        assert len(seen) < 5_000 + 40_000  # an endless input, read a window ahead at most
        stats = manager.stats().by_status
        assert stats.get("RUNNING", 0) == 0 and stats.get("QUEUED", 0) == 0


async def test_aclose_and_an_exception_in_the_loop_body_cancel_what_is_pending() -> None:
    async with StateManager(executors=map_executors("thread")) as manager:
        it = manager.map(_sleepy, [0.2] * 20, executor="thread")
        assert await anext(it) == 0.2  # type: ignore[call-overload]
        await it.aclose()  # type: ignore[attr-defined]
        with pytest.raises(ZeroDivisionError):
            async for _ in manager.map(_sleepy, [0.01] * 50, executor="thread", window=4):
                raise ZeroDivisionError
        await asyncio.sleep(0.05)
        stats = manager.stats().by_status
        assert stats.get("CANCELLED", 0) >= 1
        assert stats.get("QUEUED", 0) == 0 and stats.get("RUNNING", 0) <= 2


@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_an_input_that_raises_reaches_the_caller_and_cancels_what_is_pending(
        executor: str) -> None:
    seen: list[int] = []
    fn = fn_for(executor, _sleepy, _aio_sleepy)
    async with StateManager(executors=map_executors(executor)) as manager:
        got = []
        with pytest.raises(OSError, match="input broke at 7"):
            async for r in manager.map(fn, (0.3 if i > 3 else 0.0 for i in _counting(
                    20, seen, fail_at=7)), executor=executor):
                got.append(r)
        await asyncio.sleep(0.05)
        stats = manager.stats().by_status
        assert stats.get("RUNNING", 0) == 0 and stats.get("QUEUED", 0) == 0
        assert stats.get("CANCELLED", 0) >= 1


async def test_an_async_iterable_input_and_a_window_that_bounds_the_work_in_flight() -> None:
    running = [0, 0]  # now, most

    def tracked(x: int) -> int:
        running[0] += 1
        running[1] = max(running[1], running[0])
        time.sleep(0.01)
        running[0] -= 1
        return x * 10

    async def source() -> Any:
        for i in range(40):
            await asyncio.sleep(0)
            yield i

    async with StateManager(executors={"thread": ThreadExecutor(8)}) as manager:
        got = [r async for r in manager.map(tracked, source(), executor="thread", window=3)]
    assert got == [i * 10 for i in range(40)]
    assert running[1] <= 3


async def test_map_checks_its_arguments_at_once() -> None:
    manager = StateManager()
    with pytest.raises(TypeError, match="'args' is not an option"):
        manager.map(_inc, range(3), args=(1,))
    with pytest.raises(ValueError, match="'chunksize'"):
        manager.map(_inc, range(3), chunksize=0)
    with pytest.raises(ValueError, match="'window'"):
        manager.map(_inc, range(3), window=-1)
    with pytest.raises(TypeError, match="iterable"):
        manager.map(_inc, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        manager.map(_inc, range(3), timeout=-1)
    with pytest.raises(TypeError, match="callable"):
        manager.map(42, range(3))  # type: ignore[arg-type]


async def test_map_on_a_manager_that_does_not_run_warns(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="statepool.engine")
    manager = StateManager()
    it = manager.map(_aio_inc, range(3))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(it), 0.9)  # type: ignore[call-overload]
    assert any("map() waits" in r.getMessage() and "_aio_inc" in r.getMessage()
               for r in caplog.records)
    manager.signal_stopping()
    await asyncio.sleep(0.05)


async def test_a_stopping_manager_ends_the_map_with_manager_stopped_error() -> None:
    from statepool.engine import ManagerStoppedError

    async with StateManager(executors=map_executors("thread")) as manager:
        with pytest.raises(ManagerStoppedError):
            async for _ in manager.map(_sleepy, [0.05] * 100, executor="thread", window=4):
                manager.signal_stopping()


# -- run_map -------------------------------------------------------------------------------


def test_run_map_from_synchronous_code() -> None:
    assert run_map(_inc, range(1_000), executor="thread") == list(range(1, 1_001))
    assert run_map(_aio_inc, iter(range(5))) == [1, 2, 3, 4, 5]
    got = run_map(_odd_fails, range(4), return_exceptions=True,
                  executors={"process": LokyExecutor(max_workers=1)}, executor="process")
    assert got[0] == 0 and isinstance(got[1], ValueError)
    with pytest.raises(ValueError, match="odd 1"):
        run_map(_odd_fails, range(4), executor="thread")


async def test_run_map_inside_a_running_loop_is_a_runtime_error_naming_manager_map() -> None:
    with pytest.raises(RuntimeError, match=r"manager\.map"):
        run_map(_inc, range(3))


@pytest.mark.parametrize("executor", ["thread", "process"])
async def test_map_over_handles_waits_for_each_and_takes_its_result(executor: str) -> None:
    from statepool.engine import DependencyError

    async with StateManager(executors=map_executors(executor)) as manager:
        first = await manager.put_states(
            [State(f"first {i}", _odd_fails, True, args=(i,), executor=executor)
             for i in range(6)])
        got = [r async for r in manager.map(_inc, first, executor=executor,
                                            return_exceptions=True)]
    assert got[0::2] == [1, 3, 5]
    assert all(isinstance(r, DependencyError) for r in got[1::2])
    assert "'first 1'" in str(got[1])


async def test_a_retry_policy_counts_the_attempt_made_inside_a_chunk(tmp_path: Any) -> None:
    from statepool.engine import Retry

    flaky = _Flaky(str(tmp_path))
    async with StateManager(executors=map_executors("thread")) as manager:
        got = [r async for r in manager.map(flaky, range(8), executor="thread", chunksize=4,
                                            retries=Retry(1, delay=0.01, on=RuntimeError))]
        assert got == list(range(8))
        failing = [r async for r in manager.map(_odd_fails, range(4), executor="thread",
                                                chunksize=4, return_exceptions=True,
                                                retries=Retry(2, on=KeyError))]
    assert isinstance(failing[1], ValueError)  # not retried: `on` refuses it
