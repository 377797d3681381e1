"""The ``"process"`` executor's batches: many fast calls to a frame, and what a crash, a cancel
or an argument that does not load does to the calls that share a batch.

The tests see which calls went together through a spy on ``LokyExecutor._dispatch``, and prime
the cost model so that a function counts as fast from its first call (else batches form only
after a few round trips, at sizes that depend on this machine's timings).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import time
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import _crashers
import pytest

from statepool.engine.errors import WorkerCrashedError
from statepool.executors import LokyExecutor
from statepool.executors.base import PreparedCall
from statepool.executors.process import dispatch as _loky_dispatch
from statepool.executors.process.batch import MAX_BATCH, SLOW_S, CostModel, Job, cost_key
from statepool.executors.process.pool import Worker

DEADLINE_S = 20.0


def prepared(name: str, fn: Callable[..., Any], *args: Any) -> PreparedCall:
    return PreparedCall(name, getattr(fn, "__name__", "?"), fn, args,
                        is_coro=inspect.iscoroutinefunction(fn))


class Spy:
    """Every batch the executor sends: ``(worker pid, [state names])``."""

    def __init__(self, ex: LokyExecutor) -> None:
        self.batches: list[tuple[int, list[str]]] = []
        dispatch = ex._dispatch

        def spy(worker: Worker, jobs: list[Job], fast: bool, work: float) -> None:
            self.batches.append((worker.pid, [job.call.state_name for job in jobs]))
            dispatch(worker, jobs, fast, work)

        ex._dispatch = spy  # type: ignore[method-assign]

    def batch_of(self, name: str) -> tuple[int, list[str]]:
        found = [b for b in self.batches if name in b[1]]
        assert found, f"{name} was never sent"
        return found[0]


def prime(ex: LokyExecutor, fn: Callable[..., Any], seconds: float = 1e-5) -> None:
    """Make ``fn`` count as fast, with the largest batch limit."""
    model: CostModel = ex._model
    model.observe(cost_key(fn), seconds)
    model._costs[cost_key(fn)].limit = MAX_BATCH


@pytest.fixture
def no_stealing(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that check who ran what by the batches sent: no batch is asked back (on a
    loaded machine, a batch primed as fast runs past its estimate)."""
    monkeypatch.setattr(_loky_dispatch, "STEAL_AFTER_S", 3600.0)


@contextlib.asynccontextmanager
async def pool(max_workers: int = 2) -> AsyncIterator[tuple[LokyExecutor, Spy]]:
    ex = LokyExecutor(max_workers)
    spy = Spy(ex)
    await ex.start()
    while len([w for w in ex._workers if w is not None and w.ready]) < max_workers:
        await asyncio.sleep(0.01)  # every worker answers: the first batches go to both
    try:
        yield ex, spy
    finally:
        await ex.shutdown(cancel=True)
        assert ex.worker_pids() == []


async def until(predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def names(i: int) -> str:
    return f"c{i}"


# -- batches ---------------------------------------------------------------------------------


async def test_fast_calls_travel_in_batches_and_answer_in_order() -> None:
    async with pool() as (ex, spy):
        calls = [prepared(f"t{i}", _crashers.twice, i) if i % 3 else
                 prepared(f"s{i}", _crashers.identity, f"x{i}") for i in range(3000)]
        for _ in range(3):  # the cost model learns; the batches grow
            results = await asyncio.gather(*(ex.run(c) for c in calls))
            assert results == [i * 2 if i % 3 else f"x{i}" for i in range(3000)]
        assert ex.calls_sent == 9000
        assert ex.batches_sent < 9000 / 10
        assert max(len(b) for _, b in spy.batches) > 50
        assert ex.crashes == ex.kills == 0


async def test_slow_calls_go_alone_and_in_parallel() -> None:
    async with pool() as (ex, spy):
        await asyncio.gather(*(ex.run(prepared("warm", _crashers.spin, 0.05)) for _ in range(2)))
        assert ex._model.estimate(cost_key(_crashers.spin)) >= SLOW_S  # type: ignore[operator]
        spy.batches.clear()
        began = time.perf_counter()
        await asyncio.gather(*(ex.run(prepared(f"spin{i}", _crashers.spin, 0.3))
                               for i in range(4)))
        took = time.perf_counter() - began
        assert all(len(b) == 1 for _, b in spy.batches)
        assert len({pid for pid, _ in spy.batches}) == 2
        assert took < 1.1, f"4 x 0.3 s on 2 workers took {took:.2f} s"


async def test_an_unseen_function_goes_alone() -> None:
    async with pool() as (ex, spy):
        await asyncio.gather(*(ex.run(prepared(f"n{i}", _crashers.twice, i)) for i in range(6)))
        assert [len(b) for _, b in spy.batches[:2]] == [1, 1]


# -- a crash inside a batch -------------------------------------------------------------------


@pytest.mark.usefixtures("no_stealing")
async def test_a_crash_inside_a_batch_blames_its_call_keeps_the_finished_reruns_the_rest(
        tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, spy):
        prime(ex, _crashers.logged)
        n, guilty = 40, 10
        results = await asyncio.gather(
            *(ex.run(prepared(names(i), _crashers.logged, log, i, 0.0, i == guilty))
              for i in range(n)), return_exceptions=True)
        crash = results[guilty]
        assert isinstance(crash, WorkerCrashedError), crash
        assert "'c10' (logged) crashed its worker process" in str(crash) and crash.exitcode == 3
        assert [r for i, r in enumerate(results) if i != guilty] == \
            [i * 2 for i in range(n) if i != guilty]
        lines = _crashers.read_log(log)
        ran = sorted(i for _, i in lines)
        assert ran == list(range(n)), "a call ran twice, or never"
        pid_of = dict((i, pid) for pid, i in lines)
        dead_pid, batch = spy.batch_of(names(guilty))
        where = batch.index(names(guilty))
        assert 0 < where < len(batch) - 1, f"the crasher is not inside its batch: {batch}"
        before, after = batch[:where], batch[where + 1:]
        assert all(pid_of[int(name[1:])] == dead_pid for name in before)  # finished: kept
        assert all(pid_of[int(name[1:])] != dead_pid for name in after)  # unstarted: elsewhere
        assert ex.crashes == 1
        assert await ex.run(prepared("next", _crashers.identity, 1)) == 1


async def _one_bad_argument(ex: LokyExecutor, log: str, n: int, guilty: int,
                            bad: Any) -> list[Any]:
    """Calls c0..c<n-1>, primed as fast, of which ``guilty`` gets ``bad`` as its argument;
    every result or exception, in order."""
    prime(ex, _crashers.logged)
    return await asyncio.gather(
        *(ex.run(prepared(names(i), _crashers.logged, log, i, bad if i == guilty else 0.0))
          for i in range(n)), return_exceptions=True)


async def test_an_argument_that_kills_its_worker_as_it_loads_fails_alone(
        tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, _spy):
        n, guilty = 12, 6
        results = await _one_bad_argument(ex, log, n, guilty, _crashers.KillsOnLoad())
        assert isinstance(results[guilty], WorkerCrashedError)
        assert "before it could start it" in str(results[guilty])
        assert [r for i, r in enumerate(results) if i != guilty] == \
            [i * 2 for i in range(n) if i != guilty]
        assert sorted(i for _, i in _crashers.read_log(log)) == \
            [i for i in range(n) if i != guilty]


@pytest.mark.usefixtures("no_stealing")
async def test_an_argument_that_does_not_load_fails_only_its_call(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, spy):
        n, guilty = 12, 6
        results = await _one_bad_argument(ex, log, n, guilty, _crashers.Unloadable())
        assert isinstance(results[guilty], ValueError)
        assert "refuses to load" in str(results[guilty])
        assert [r for i, r in enumerate(results) if i != guilty] == \
            [i * 2 for i in range(n) if i != guilty]
        assert len(spy.batch_of(names(guilty))[1]) > 1  # it was sent in a batch first
        assert sorted(i for _, i in _crashers.read_log(log)) == \
            [i for i in range(n) if i != guilty]
        assert ex.crashes == ex.kills == 0


# -- cancel inside a batch --------------------------------------------------------------------


async def _batch_behind_a_sleeper(ex: LokyExecutor, log: str, n: int,
                                  sleeper: int) -> list[asyncio.Task[Any]]:
    """Calls c0..c<n-1> of which ``sleeper`` sleeps 1 s; returns once it sleeps."""
    prime(ex, _crashers.logged)
    tasks = [asyncio.ensure_future(ex.run(prepared(
        names(i), _crashers.logged, log, i, 1.0 if i == sleeper else 0.0))) for i in range(n)]
    await until(lambda: any(i == sleeper for _, i in _crashers.read_log(log)))
    return tasks


@pytest.mark.usefixtures("no_stealing")
async def test_cancelling_a_call_not_started_in_its_batch_skips_it(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, spy):
        tasks = await _batch_behind_a_sleeper(ex, log, 12, sleeper=2)
        _, batch = spy.batch_of("c2")
        assert "c5" in batch, f"c2 and c5 went apart: {spy.batches}"
        tasks[5].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[5], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 5] == \
            [i * 2 for i in range(12) if i != 5]
        assert 5 not in [i for _, i in _crashers.read_log(log)]
        assert ex.crashes == ex.kills == 0


@pytest.mark.usefixtures("no_stealing")
async def test_cancelling_a_running_call_kills_only_its_worker_the_rest_reruns(
        tmp_path: Path, pids_gone: Any) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, spy):
        tasks = await _batch_behind_a_sleeper(ex, log, 12, sleeper=2)
        victim, batch = spy.batch_of("c2")
        assert len(batch) > 2
        other = next(pid for pid in ex.worker_pids() if pid != victim)
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 2] == \
            [i * 2 for i in range(12) if i != 2]
        assert pids_gone([victim], 1.0)
        assert other in ex.worker_pids()  # the other worker was not touched
        counts: dict[int, int] = {}
        for _, i in _crashers.read_log(log):
            counts[i] = counts.get(i, 0) + 1
        assert all(counts[i] == 1 for i in range(12)), counts
        assert ex.kills == 1 and ex.crashes == 0


# -- a batch that turns out slow ---------------------------------------------------------------


async def test_calls_of_a_batch_that_turns_slow_go_to_an_idle_worker(tmp_path: Path) -> None:
    log = str(tmp_path / "log")
    async with pool() as (ex, spy):
        prime(ex, _crashers.logged)  # measured fast...
        n = 12
        slow = {2, 3, 4, 5, 6}  # ...but these take 0.3 s, and went in one batch
        began = time.perf_counter()
        results = await asyncio.gather(*(ex.run(prepared(
            names(i), _crashers.logged, log, i, 0.3 if i in slow else 0.0)) for i in range(n)))
        took = time.perf_counter() - began
        assert results == [i * 2 for i in range(n)]
        _, batch = spy.batch_of("c2")
        assert {"c2", "c3", "c4", "c5", "c6"} <= set(batch), spy.batches
        lines = _crashers.read_log(log)
        assert sorted(i for _, i in lines) == list(range(n))  # each ran once
        ran_on = {pid for pid, i in lines if i in slow}
        assert len(ran_on) >= 2, "the slow calls all ran on the worker that got them"
        assert took < 1.4, f"{took:.2f} s: 5 x 0.3 s were not shared"
        assert ex.crashes == ex.kills == 0


# -- what an ended call keeps -----------------------------------------------------------------


class _Arg:
    """An argument the test holds a weak reference to (a bytearray of 3 in the worker)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return bytearray, (3,)


async def test_ended_calls_free_their_arguments_without_the_garbage_collector() -> None:
    """Neither a job and its batch, nor a job and the engine's handle, keep each other (and the
    call's arguments) alive once the call ended: with the collector off, the arguments go."""
    from statepool.engine import State, StateManager

    ex = LokyExecutor(2)
    async with StateManager(executors={"process": ex}) as manager:
        await ex.start()
        prime(ex, len)  # batches of several calls
        gc.collect()
        gc.disable()
        try:
            args = [_Arg() for _ in range(20)]
            refs = [weakref.ref(a) for a in args]
            handles = await manager.put_states(
                [State(f"s{i}", len, True, args=(a,), executor="process")
                 for i, a in enumerate(args)])
            results = await asyncio.gather(*(ex.run(prepared(f"r{i}", len, _Arg()))
                                             for i in range(20)))  # run()'s path too
            await manager.join()
            assert results == [3] * 20 and [h.result() for h in handles] == [3] * 20
            assert ex.batches_sent < ex.calls_sent  # some went together
            del args, handles
            alive = sum(ref() is not None for ref in refs)
            assert alive == 0, f"{alive} of 20 arguments still alive"
            for worker in ex._workers:
                assert worker is not None and not worker.jobs and not worker.batches
        finally:
            gc.enable()
