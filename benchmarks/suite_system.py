"""Cold start, memory and logging: what statepool costs beyond the calls themselves.

* coldstart: from nothing to the first result of a process call (a fresh pool each repetition;
  the warm-up repetition pays the module imports), the memory of the idle pool's processes once
  it has answered (RSS, and USS: the pages only they hold), and the time its shutdown takes;
* memory: RSS per queued state with 100,000 states queued, each repetition in a fresh
  interpreter (``benchmarks.memprobe``), against pending asyncio tasks and queue items;
* logging: inline dispatch with the ``engine`` logger at INFO (DEBUG off) and at DEBUG into
  /dev/null, against logging disabled; repetitions interleaved so that drift hits all three.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable

import psutil

from .baselines import Backend
from .cases import StatepoolBackend, rows
from .harness import (
    Case,
    Config,
    Figure,
    NotAvailable,
    Runner,
    mode_templates,
    now,
    repeat,
    templates,
)
from .noise import descendants

__all__ = ["coldstart_cases", "logging_cases", "memory_cases"]

_COLD_BASELINES = ("ProcessPoolExecutor", "loky (direct)", "aiomultiprocess apply",
                   "dask Client.submit")
_COLD_EXECUTORS = ("process", "aioprocess", "dask")


def coldstart_cases(cfg: Config) -> list[Case]:
    """One case per statepool row and its baseline, their repetitions taken in turn."""
    metrics = [("first result", "ms", False), ("idle pool RSS", "MB", False),
               ("idle pool USS", "MB", False), ("shutdown", "ms", False)]
    cases: list[Case] = []
    factories: dict[str, Callable[[int], Backend]] = {}
    for label, factory, kind, base in rows(_COLD_BASELINES, _COLD_EXECUTORS):
        figs = templates("coldstart", label, kind, base, metrics)
        factories[label] = factory
        last = cases[-1] if cases else None
        if kind == "statepool" and last is not None and base is not None \
                and last.subject == base:
            cases[-1] = Case("coldstart", f"{base} / {label}", last.figures + figs,
                             _Coldstart(cfg, [factories[base], factory]))
        else:
            cases.append(Case("coldstart", label, figs, _Coldstart(cfg, [factory])))
    return cases


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return True


async def _pool_processes(before: set[int]) -> list[psutil.Process]:
    """The processes the pool started, once their number has held still for 150 ms (1 s max)."""
    seen: list[int] = []
    stable, deadline = 0, now() + 1.0
    while stable < 3 and now() < deadline:
        procs = [p for p in descendants() if p.pid not in before and not _is_tracker(p)]
        pids = sorted(p.pid for p in procs)
        stable = stable + 1 if pids == seen else 0
        seen = pids
        await asyncio.sleep(0.05)
    return [p for p in descendants() if p.pid in seen]


def _memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """RSS and USS summed over ``procs``. RSS counts pages shared with other processes (a
    forked worker's copy-on-write pages of its parent); USS counts only each one's own."""
    rss = uss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        uss += getattr(info, "uss", 0)
    return rss, uss


async def _cold_once(cfg: Config, factory: Callable[[int], Backend]) -> tuple[float, ...]:
    """A fresh pool: first result (ms), idle RSS and USS (MB), shutdown (ms), processes."""
    before = {p.pid for p in descendants()}
    t0 = now()
    backend = factory(cfg.workers)
    await backend.open()
    try:
        await backend.call("noop")
        first = now() - t0
        procs = await _pool_processes(before)
        rss, uss = _memory(procs)
    finally:
        t1 = now()
        await backend.__aexit__(None, None, None)
    return first * 1e3, rss / 2**20, uss / 2**20, (now() - t1) * 1e3, float(len(procs))


class _Coldstart:
    """Runs the subjects' repetitions in turn (A B A B ...), so that a change in the machine's
    load hits both; a subject that is not available or fails leaves the other one running."""

    def __init__(self, cfg: Config, factories: list[Callable[[int], Backend]]) -> None:
        self.cfg, self.factories = cfg, factories

    async def __call__(self, figs: list[Figure]) -> None:
        cfg, n = self.cfg, len(figs) // len(self.factories)
        groups = [figs[i * n:(i + 1) * n] for i in range(len(self.factories))]
        reps: list[list[tuple[float, ...]]] = [[] for _ in self.factories]
        live = list(range(len(self.factories)))
        for turn in range(cfg.warmup + cfg.repetitions):
            for j in list(live):
                try:
                    rep = await _cold_once(cfg, self.factories[j])
                except Exception as exc:
                    if len(self.factories) == 1:
                        raise
                    live.remove(j)
                    _fail(groups[j], exc)
                    continue
                if turn >= cfg.warmup:
                    reps[j].append(rep)
        for j in live:
            for i, fig in enumerate(groups[j]):
                fig.repetitions = [r[i] for r in reps[j]]
                fig.params = {"workers": cfg.workers, "interleaved_with_partner": len(live) > 1,
                              "pool_processes": [int(r[-1]) for r in reps[j]]}


def _fail(figs: list[Figure], exc: Exception) -> None:
    for fig in figs:
        if isinstance(exc, NotAvailable):
            fig.skipped = str(exc)
        else:
            fig.error = f"{type(exc).__name__}: {exc}"
            fig.params["traceback"] = "".join(traceback.format_exception(exc))


_MEM_SUBJECTS = (
    ("asyncio create_task (pending)", "tasks", "baseline", None),
    ("asyncio.Queue items", "queue", "baseline", None),
    ("statepool queued states", "statepool", "statepool", "asyncio create_task (pending)"),
)


def memory_cases(cfg: Config) -> list[Case]:
    n = cfg.size(100_000, 10_000)
    cases = []
    for label, kind_arg, kind, base in _MEM_SUBJECTS:
        figs = templates("memory", label, kind, base, [("RSS per queued call", "B", False)])
        cases.append(Case("memory", label, figs, _queued_memory(cfg, kind_arg, n)))
    return cases


def _queued_memory(cfg: Config, kind: str, n: int) -> Runner:
    async def once() -> float:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.memprobe", kind, str(n),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memprobe {kind} failed: {err.decode()[-2000:]}")
        got = json.loads(out)
        if got["queued"] != n:
            raise RuntimeError(f"memprobe {kind}: {got['queued']} of {n} calls were queued")
        return float(got["rss_after"] - got["rss_before"]) / n

    async def run(figs: list[Figure]) -> None:
        figs[0].repetitions = await repeat(cfg, once)
        figs[0].params = {"queued": n, "fresh_interpreter": True}

    return run


_LOG_MODES = ("logging disabled", "engine logger at INFO", "engine logger at DEBUG to /dev/null")


def logging_cases(cfg: Config) -> list[Case]:
    n = cfg.size(20_000, 1_000)
    subject = "statepool inline"
    figs = mode_templates("logging", subject, _LOG_MODES)
    return [Case("logging", subject, figs, _logging(cfg, n))]


class _Logging:
    """Set the ``engine`` logger for one mode; ``restore()`` puts everything back."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("statepool.engine")
        self.level = self.logger.level
        self.sink = open(os.devnull, "w")  # noqa: SIM115 - closed by restore()
        self.handler = logging.StreamHandler(self.sink)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def set(self, mode: str) -> None:
        self.restore_levels()
        if mode == _LOG_MODES[0]:
            logging.disable(logging.CRITICAL)
        elif mode == _LOG_MODES[1]:
            self.logger.setLevel(logging.INFO)
        else:
            self.logger.setLevel(logging.DEBUG)
            self.logger.addHandler(self.handler)

    def restore_levels(self) -> None:
        logging.disable(logging.NOTSET)
        self.logger.setLevel(self.level)
        self.logger.removeHandler(self.handler)

    def restore(self) -> None:
        self.restore_levels()
        self.sink.close()


def _logging(cfg: Config, n: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        modes = _Logging()
        args: list[tuple[()]] = [()] * n
        reps: dict[str, list[float]] = {mode: [] for mode in _LOG_MODES}
        try:
            async with StatepoolBackend(cfg.workers, "inline") as backend:
                async def once() -> None:
                    for mode in _LOG_MODES:
                        modes.set(mode)
                        gc.collect()  # the last mode's garbage is not this one's cost
                        t0 = now()
                        await backend.gather("noop", args)
                        reps[mode].append(n / (now() - t0))
                    modes.restore_levels()

                await repeat(cfg, once)
        finally:
            modes.restore()
        for fig, mode in zip(figs, _LOG_MODES, strict=True):
            fig.repetitions = reps[mode][cfg.warmup:]
            fig.params = {"calls_per_repetition": n, "interleaved": True}

    return run
