"""Pipelines (issue 12): ``manager.map`` against the libraries a user would pick for one.

* pipeline: the two-stage CPU pipeline of ``benchmarks.pipeline_work`` (1,000 blobs of 64 KB,
  hashed and compressed, then verified and counted, then merged; 12 with ``--quick``) with
  statepool ``map`` (the second stage reads the first one's results as they come), joblib,
  mpire and ``ProcessPoolExecutor`` + ``run_in_executor``, same workers: wall time, and the lines
  of code of each variant (the pool and the two stages);
* map throughput: ``map`` over 200,000 trivial items on ``"process"`` (10,000 with ``--quick``)
  against ``joblib.Parallel(n_jobs=workers)`` on the same items, in items/s, with the parent
  process's CPU per item (``time.process_time``: this process only, not its workers);
* map memory: RSS after 1,000,000 trivial items through ``map`` on ``"thread"`` (200,000 with
  ``--quick``) minus RSS after the first 10,000, in MB (must stay under 20).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import psutil

from . import pipeline_work as pw
from .harness import Case, Config, Figure, NotAvailable, Runner, now, repeat, templates

__all__ = ["pipeline_cases"]

_ORDER = ("mpire WorkerPool.map", "ProcessPoolExecutor + run_in_executor", "joblib.Parallel",
          "statepool map")
_BASE = "joblib.Parallel"
_MAP_BASE = "joblib.Parallel (n_jobs=workers)"
_MAP = "statepool map (process)"


def pipeline_cases(cfg: Config) -> list[Case]:
    n = cfg.size(1_000, 12)
    cases = []
    for label in _ORDER:
        statepool = label.startswith("statepool")
        figs = templates("pipeline", label, "statepool" if statepool else "baseline",
                         _BASE if statepool else None,
                         [("wall time", "ms", False), ("lines of code", "lines", False)])
        cases.append(Case("pipeline", label, figs, _pipeline(cfg, label, n)))
    items = cfg.size(200_000, 10_000)
    metrics = [("map throughput", "items/s", True), ("parent CPU per item", "us", False)]
    cases.append(Case("pipeline", _MAP_BASE, templates("pipeline", _MAP_BASE, "baseline", None,
                                                        metrics), _joblib_items(cfg, items)))
    cases.append(Case("pipeline", _MAP, templates("pipeline", _MAP, "statepool", _MAP_BASE,
                                                  metrics), _map_items(cfg, items)))
    total = cfg.size(1_000_000, 60_000)
    memory = templates("pipeline", "statepool map (thread)", "statepool", None,
                       [("map memory growth", "MB", False)])
    cases.append(Case("pipeline", "statepool map (thread)", memory, _map_memory(cfg, total)))
    return cases


def _pipeline(cfg: Config, label: str, n: int) -> Runner:
    open_pool, run_pipeline = pw.VARIANTS[label]

    async def run(figs: list[Figure]) -> None:
        want = pw.expected(n)
        try:
            pool = open_pool(cfg.workers)
        except ImportError as exc:
            raise NotAvailable(f"{label}: not installed ({exc})") from exc
        entered = await _enter(pool)
        try:
            async def once() -> float:
                t0 = now()
                got = run_pipeline(entered, n)
                if inspect.isawaitable(got):
                    got = await got
                elapsed = now() - t0
                if got.total() != want:
                    raise RuntimeError(f"{label}: counted {got.total()} words, not {want}")
                return elapsed * 1e3

            figs[0].repetitions = await repeat(cfg, once)
        finally:
            await _exit(pool)
        # a count, not a measure: the same value for each repetition
        figs[1].repetitions = [float(pw.lines_of(open_pool, run_pipeline))] * cfg.repetitions
        for fig in figs:
            fig.params = {"blobs": n, "blob_bytes": pw.BLOB, "workers": cfg.workers}

    return run


async def _enter(pool: Any) -> Any:
    if hasattr(pool, "__aenter__"):
        return await pool.__aenter__()
    if hasattr(pool, "__enter__"):
        return pool.__enter__()
    return pool


async def _exit(pool: Any) -> None:
    if hasattr(pool, "__aexit__"):
        await pool.__aexit__(None, None, None)
    elif hasattr(pool, "__exit__"):
        pool.__exit__(None, None, None)
    if hasattr(pool, "shutdown") and not hasattr(pool, "__aexit__"):
        pool.shutdown(wait=True)


def _joblib_items(cfg: Config, items: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        try:
            from joblib import Parallel, delayed
        except ImportError as exc:
            raise NotAvailable(f"joblib not installed: {exc}") from exc
        parallel = Parallel(n_jobs=cfg.workers)

        async def once() -> tuple[float, float]:
            return _timed(lambda: parallel(delayed(pw.trivial)(i) for i in range(items)), items)

        _record(figs, await repeat(cfg, once), items, cfg.workers)

    return run


def _map_items(cfg: Config, items: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        from statepool.engine import StateManager
        from statepool.executors import LokyExecutor

        ex = LokyExecutor(max_workers=cfg.workers)
        async with StateManager(executors={"process": ex}) as manager:
            async def once() -> tuple[float, float]:
                t0, c0 = now(), time.process_time()
                got = [r async for r in manager.map(pw.trivial, range(items),
                                                    executor="process")]
                wall, cpu = now() - t0, time.process_time() - c0
                _check(got, items)
                return items / wall, cpu / items * 1e6

            _record(figs, await repeat(cfg, once), items, cfg.workers)

    return run


def _timed(body: Callable[[], list[Any]], items: int) -> tuple[float, float]:
    t0, c0 = now(), time.process_time()
    got = body()
    wall, cpu = now() - t0, time.process_time() - c0
    _check(got, items)
    return items / wall, cpu / items * 1e6


def _check(got: list[Any], items: int) -> None:
    if len(got) != items or got[0] != 1 or got[-1] != items:
        raise RuntimeError(f"map: {len(got)} results for {items} items, or the wrong ones")


def _record(figs: list[Figure], reps: list[tuple[float, float]], items: int,
            workers: int) -> None:
    figs[0].repetitions = [r for r, _ in reps]
    figs[1].repetitions = [c for _, c in reps]
    for fig in figs:
        fig.params = {"items": items, "workers": workers, "work": "x + 1"}


def _map_memory(cfg: Config, total: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        from statepool.engine import StateManager

        proc = psutil.Process()

        async def once() -> float:
            async with StateManager() as manager:
                seen, early = 0, 0
                async for _ in manager.map(pw.trivial, range(total), executor="thread"):
                    seen += 1
                    if seen == 10_000:
                        early = proc.memory_info().rss
                late = proc.memory_info().rss
            if seen != total:
                raise RuntimeError(f"map memory: {seen} results for {total} items")
            return float(late - early) / 2**20

        figs[0].repetitions = await repeat(cfg, once)
        figs[0].params = {"items": total, "first": 10_000, "executor": "thread",
                          "must_be_below_mb": 20}

    return run

