"""CPU scaling and payload: real work, where processes must beat the GIL and carry data.

* cpu: K pure-Python tasks of about 80 ms each; the speedup over running them one after another
  in this process (measured just before, in each repetition), and the parallel efficiency
  (speedup / workers). Threads are measured too, to show the GIL. The same tasks on twice as
  many workers as cores (oversubscribed), for statepool ``"process"`` and loky.
* cpu, blas: 16 states of six 900 x 900 numpy matrix products (BLAS threads), wall time, on
  the same workers and on twice as many (oversubscribed): statepool ``"process"`` against joblib
  (which limits its workers' BLAS threads) and ``ProcessPoolExecutor`` (which does not).
* payload: one call carrying a numpy array (10 MB and 100 MB; statepool passes it as a lazy
  argument), in milliseconds per call.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from . import work
from .baselines import Backend
from .cases import rows
from .harness import Case, Config, Figure, Runner, now, repeat, templates

__all__ = ["cpu_cases", "payload_cases"]

_CPU_BASELINES = (
    "ThreadPoolExecutor",
    "ProcessPoolExecutor",
    "loky (direct)",
    "aiomultiprocess apply",
    "joblib.Parallel (sync)",
    "dask Client.submit",
)
_CPU_EXECUTORS = ("thread", "process", "aioprocess", "dask")
_PAYLOAD_BASELINES = _CPU_BASELINES
_PAYLOAD_EXECUTORS = _CPU_EXECUTORS
_SERIAL = "serial (one process)"


def cpu_cases(cfg: Config) -> list[Case]:
    """The serial reference first: it calibrates the task and is the reference row."""
    task_s = 0.02 if cfg.quick else 0.08
    k = cfg.size(4 * cfg.workers, 2 * cfg.workers)
    shared: dict[str, Any] = {}
    serial = templates("cpu", _SERIAL, "baseline", None, [("serial time", "ms", False)])
    cases = [Case("cpu", _SERIAL, serial, _serial(cfg, k, task_s, shared))]
    metrics = [("speedup", "x", True), ("efficiency", "%", True)]
    for label, factory, kind, base in rows(_CPU_BASELINES, _CPU_EXECUTORS):
        figs = templates("cpu", label, kind, base, metrics)
        cases.append(Case("cpu", label, figs, _scaling(cfg, factory, k, shared)))
    over = 2 * cfg.workers  # oversubscribed: twice as many workers as cores, the same tasks
    for label, factory, kind, base in rows(("loky (direct)",), ("process",)):
        figs = templates("cpu", label, kind, base, [(f"speedup, {over} workers", "x", True)])
        cases.append(Case("cpu", label, figs, _scaling(cfg, factory, k, shared, over)))
    return cases + _blas_cases(cfg)


_BLAS_SUBJECTS = (("ProcessPoolExecutor", None), ("joblib.Parallel (sync)", None),
                  ("statepool process", "joblib.Parallel (sync)"))


def _blas_cases(cfg: Config) -> list[Case]:
    """The blas rows: the same states on ``workers`` and ``2 x workers``."""
    found = {label: factory for label, factory, _, _ in rows(_CPU_BASELINES, ("process",))}
    states, size = cfg.size(16, 4), cfg.size(900, 200)
    pools = (cfg.workers,) if cfg.quick else (cfg.workers, 2 * cfg.workers)
    metrics = [(f"blas time, {w} workers", "ms", False) for w in pools]
    cases = []
    for label, base in _BLAS_SUBJECTS:
        if label not in found:
            continue
        figs = templates("cpu", label, "statepool" if base else "baseline", base, metrics)
        cases.append(Case("cpu", label, figs, _blas(cfg, found[label], pools, states, size)))
    return cases


def _blas(cfg: Config, factory: Callable[[int], Backend], pools: tuple[int, ...], states: int,
          size: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        args = [(seed, size) for seed in range(states)]
        for fig, workers in zip(figs, pools, strict=True):
            async with factory(workers) as backend:
                async def once(backend: Backend = backend) -> float:
                    t0 = now()
                    results = await backend.gather("blas", args)
                    elapsed = now() - t0
                    if len(results) != states or not all(0 < r <= 1 for r in results):
                        raise RuntimeError(f"{backend.label}: wrong results for the blas states")
                    return elapsed * 1e3

                fig.repetitions = await repeat(cfg, once)
            fig.params = {"states": states, "size": size, "products": 6, "workers": workers}

    return run


def _serial(cfg: Config, k: int, task_s: float, shared: dict[str, Any]) -> Runner:
    async def run(figs: list[Figure]) -> None:
        turns = work.calibrate_burn(task_s)

        async def once() -> float:
            t0 = now()
            for _ in range(k):
                work.burn(turns)
            return now() - t0

        times = await repeat(cfg, once)
        shared["turns"] = turns
        figs[0].repetitions = [t * 1e3 for t in times]
        figs[0].params = {"tasks": k, "loop_turns": turns,
                          "task_ms": 1e3 * statistics.median(times) / k}

    return run


def _scaling(cfg: Config, factory: Callable[[int], Backend], k: int,
             shared: dict[str, Any], workers: int | None = None) -> Runner:
    """Each repetition runs the K tasks serially here, then on the pool: the speedup is the
    ratio of the two, taken moments apart, so that a change in the machine's load between
    repetitions hits both sides."""

    async def run(figs: list[Figure]) -> None:
        if "turns" not in shared:
            raise RuntimeError("no serial reference: the serial case did not run")
        turns = shared["turns"]
        expected = work.burn(turns)
        pool = cfg.workers if workers is None else workers
        async with factory(pool) as backend:
            async def once() -> tuple[float, float]:
                t0 = now()
                for _ in range(k):
                    work.burn(turns)
                serial = now() - t0
                t0 = now()
                results = await backend.gather("burn", [(turns,)] * k)
                elapsed = now() - t0
                if results != [expected] * k:
                    raise RuntimeError(f"{backend.label}: wrong results for the CPU tasks")
                return serial, elapsed

            pairs = await repeat(cfg, once)
        figs[0].repetitions = [s / t for s, t in pairs]
        if len(figs) > 1:
            figs[1].repetitions = [100.0 * s / t / pool for s, t in pairs]
        for fig in figs:
            fig.params = {"tasks": k, "workers": pool,
                          "serial_ms": [s * 1e3 for s, _ in pairs],
                          "parallel_ms": [t * 1e3 for _, t in pairs]}

    return run


def payload_cases(cfg: Config) -> list[Case]:
    sizes_mb = (1, 10) if cfg.quick else (10, 100)
    metrics = [(f"time per call, {mb} MB", "ms", False) for mb in sizes_mb]
    cases = []
    for label, factory, kind, base in rows(_PAYLOAD_BASELINES, _PAYLOAD_EXECUTORS):
        figs = templates("payload", label, kind, base, metrics)
        cases.append(Case("payload", label, figs, _payload(cfg, factory, sizes_mb)))
    return cases


def _payload(cfg: Config, factory: Callable[[int], Backend], sizes_mb: tuple[int, ...]) -> Runner:
    async def run(figs: list[Figure]) -> None:
        import numpy as np

        async with factory(cfg.workers) as backend:
            await backend.call("noop")  # the pool is warm before the first payload
            for fig, mb in zip(figs, sizes_mb, strict=True):
                arr = np.ones(mb * 2**20 // 8, dtype=np.float64)

                async def once(arr: Any = arr) -> float:
                    t0 = now()
                    got = await backend.call("nbytes", arr, lazy=True)
                    elapsed = now() - t0
                    if got != arr.nbytes:
                        raise RuntimeError(f"{backend.label}: answered {got} for {arr.nbytes}")
                    return elapsed * 1e3

                fig.repetitions = await repeat(cfg, once)
                fig.params = {"bytes": arr.nbytes, "dtype": "float64", "workers": cfg.workers}
                del arr

    return run
