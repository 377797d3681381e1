"""Dispatch and latency: trivial calls through each executor and each baseline.

* dispatch: a batch of trivial calls put at once and run side by side (``is_blocking=True``
  states, as ``gather`` does), in calls per second, and the CPU time this process spent per
  call meanwhile (all its threads: the parent's cost of a call, what the workers do excluded);
* latency: one call's round trip on a warm pool, one after another; the median and the p99 of
  each repetition's samples.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .baselines import Backend
from .cases import GATHER_ROW, rows
from .harness import Case, Config, Figure, Runner, now, percentile, repeat, templates

__all__ = ["dispatch_cases", "latency_cases"]

_BASELINES = (
    "asyncio gather(create_task)",
    "asyncio.Queue consumer",
    "ThreadPoolExecutor",
    "ProcessPoolExecutor",
    "loky (direct)",
    "aiomultiprocess apply",
    "aiomultiprocess starmap",
    "joblib.Parallel (sync)",
    "dask Client.submit",
)
_EXECUTORS = ("inline", "thread", "process", "aioprocess", "dask")

# calls per repetition (full run), chosen so that a repetition takes 0.1-1 s here
_BATCH = {
    "asyncio gather(create_task)": 20_000, "asyncio.Queue consumer": 20_000,
    "statepool inline": 20_000, GATHER_ROW: 20_000, "joblib.Parallel (sync)": 20_000,
    "ThreadPoolExecutor": 5_000, "statepool thread": 5_000,
    "ProcessPoolExecutor": 1_000, "loky (direct)": 1_000, "statepool process": 1_000,
    "aiomultiprocess apply": 2_000, "aiomultiprocess starmap": 2_000,
    "statepool aioprocess": 2_000,
    "dask Client.submit": 200, "statepool dask": 200,
}
# round trips per repetition (full run)
_TRIPS = {
    "asyncio gather(create_task)": 500, "asyncio.Queue consumer": 500,
    "statepool inline": 500, "ThreadPoolExecutor": 500, "statepool thread": 500,
    "ProcessPoolExecutor": 200, "loky (direct)": 200, "statepool process": 200,
}
_SLOW_TRIPS = 30  # aiomultiprocess, dask, joblib: about 10-15 ms a round trip


def dispatch_cases(cfg: Config) -> list[Case]:
    cases = []
    for label, factory, kind, base in rows(_BASELINES, _EXECUTORS, gather_row=True):
        n = _BATCH[label] if not cfg.quick else max(30, _BATCH[label] // 20)
        figs = templates("dispatch", label, kind, base, [("throughput", "calls/s", True),
                                                         ("parent CPU per call", "us", False)])
        cases.append(Case("dispatch", label, figs, _dispatch(cfg, factory, n)))
    return cases


def _dispatch(cfg: Config, factory: Callable[[int], Backend], n: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        args: list[tuple[()]] = [()] * n
        async with factory(cfg.workers) as backend:
            async def once() -> tuple[float, float]:
                c0, t0 = time.process_time(), now()
                results = await backend.gather("noop", args)
                elapsed, cpu = now() - t0, time.process_time() - c0
                if len(results) != n:
                    raise RuntimeError(f"{backend.label}: {len(results)} results for {n} calls")
                return n / elapsed, cpu / n * 1e6

            reps = await repeat(cfg, once)
            figs[0].repetitions = [rate for rate, _ in reps]
            figs[1].repetitions = [cpu for _, cpu in reps]
            await backend.check_placement()
        for fig in figs:
            fig.params = {"calls_per_repetition": n, "workers": cfg.workers,
                          "runs_in_other_processes": backend.remote}

    return run


def latency_cases(cfg: Config) -> list[Case]:
    cases = []
    metrics = [("round trip median", "us", False), ("round trip p99", "us", False)]
    baselines = tuple(b for b in _BASELINES if b != "aiomultiprocess starmap")
    for label, factory, kind, base in rows(baselines, _EXECUTORS):
        m = _TRIPS.get(label, _SLOW_TRIPS)
        m = m if not cfg.quick else max(10, m // 10)
        figs = templates("latency", label, kind, base, metrics)
        cases.append(Case("latency", label, figs, _latency(cfg, factory, m)))
    return cases


def _latency(cfg: Config, factory: Callable[[int], Backend], m: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        async with factory(cfg.workers) as backend:
            async def once() -> list[float]:
                samples = []
                for _ in range(m):
                    t0 = now()
                    await backend.call("noop")
                    samples.append((now() - t0) * 1e6)
                return samples

            reps = await repeat(cfg, once)
        figs[0].repetitions = [percentile(s, 50) for s in reps]
        figs[1].repetitions = [percentile(s, 99) for s in reps]
        for fig in figs:
            fig.params = {"round_trips_per_repetition": m, "workers": cfg.workers}

    return run
