"""Run the chosen suites case by case, then report, write JSON and charts, and check cleanup.

Each case runs under its own ``asyncio.run`` (a fresh event loop) and a time limit. A case whose
subject is not available is marked skipped with the reason; one that fails is marked with its
error and the run goes on. The exit status is 0 when every case ran or was skipped, 1 when a
case failed, 2 when a process was left behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .baselines import shutdown_joblib
from .harness import Case, Config, Figure, NotAvailable
from .noise import Noise, NoiseMeter, descendants
from .report import console, link_baselines, print_report, write_json
from .suite_calls import dispatch_cases, latency_cases
from .suite_events import events_cases, write_timelines
from .suite_pipeline import pipeline_cases
from .suite_sched import scheduling_cases
from .suite_system import coldstart_cases, logging_cases, memory_cases
from .suite_work import cpu_cases, payload_cases
from .system import machine_info

__all__ = ["SUITE_CASES", "run"]

SUITE_CASES: dict[str, Callable[[Config], list[Case]]] = {
    "dispatch": dispatch_cases,
    "latency": latency_cases,
    "cpu": cpu_cases,
    "payload": payload_cases,
    "coldstart": coldstart_cases,
    "memory": memory_cases,
    "logging": logging_cases,
    "events": events_cases,
    "scheduling": scheduling_cases,
    "pipeline": pipeline_cases,
}
_SHM = "/dev/shm"


def _shm() -> set[str]:
    try:
        return set(os.listdir(_SHM))
    except OSError:
        return set()


def run_case(case: Case, cfg: Config) -> None:
    """Fill the case's figures, or mark them skipped / failed with the reason."""
    try:
        asyncio.run(asyncio.wait_for(case.run(case.figures), cfg.figure_timeout_s))
    except NotAvailable as exc:
        _mark(case.figures, skipped=str(exc))
        return
    except asyncio.TimeoutError:
        _mark(case.figures, error=f"no result within {cfg.figure_timeout_s:.0f} s")
        return
    except Exception as exc:
        _mark(case.figures, error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc())
        return
    short = [f for f in case.figures
             if not (f.skipped or f.error) and len(f.repetitions) < cfg.repetitions]
    if short:
        _mark(short, error=f"{len(short[0].repetitions)} of {cfg.repetitions} repetitions")


def wait_for_quiet(cfg: Config) -> float | None:
    """Wait (``cfg.quiet_wait_s`` at most) until other processes use under
    ``cfg.quiet_below_pct`` of the CPU over a 0.5 s window; answer the last window's figure."""
    if cfg.quiet_below_pct is None:
        return None
    deadline = time.monotonic() + cfg.quiet_wait_s
    while True:
        meter = NoiseMeter()
        time.sleep(0.5)
        others = meter.stop().others_pct
        if others < cfg.quiet_below_pct or time.monotonic() > deadline:
            return others


def _mark(figs: list[Figure], *, skipped: str | None = None, error: str | None = None,
          tb: str | None = None) -> None:
    for fig in figs:
        if skipped is not None:
            fig.skipped = skipped
        else:
            fig.error = error
            if tb:
                fig.params["traceback"] = tb
        fig.repetitions = []


def _cleanup(shm_before: set[str]) -> dict[str, Any]:
    """Wait up to 10 s for every child to exit; kill and report those that do not."""
    deadline = time.monotonic() + 10.0
    while True:
        left = [p for p in descendants() if not _is_tracker(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    report = []
    for proc in left:
        try:
            report.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:200]})
            proc.kill()
        except psutil.Error:
            continue
    ours = _ours(_shm() - shm_before)
    joblib = [n for n in ours if n.startswith(_JOBLIB_SHM)]
    return {"children_left": report, "shm_left": [n for n in ours if n not in joblib],
            "shm_removed_at_exit": joblib}


_JOBLIB_SHM = "joblib_memmapping_folder_"


def _ours(names: set[str]) -> list[str]:
    """The /dev/shm names this run made: loky and joblib put the creator's PID in theirs.

    Other processes on the machine (tests running beside the benchmark) create entries too;
    names without our PID cannot be told apart and are not reported. joblib's memmapping
    folders are removed by its resource tracker when this process exits.
    """
    pid = str(os.getpid())
    return sorted(n for n in names if pid in re.split(r"[-_.]", n))


def _is_tracker(proc: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return True


def run(cfg: Config, json_path: str | None, plot_dir: str | None) -> int:
    out, err = console(), console(stderr=True)
    shm_before, started, t0 = _shm(), time.time(), time.monotonic()
    machine = machine_info()
    by_suite = {suite: SUITE_CASES[suite](cfg) for suite in cfg.suites}
    figures: list[Figure] = []
    sections: dict[str, dict[str, Any]] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        bar = progress.add_task("", total=sum(len(c) for c in by_suite.values()))
        for suite, cases in by_suite.items():
            spans: list[Noise] = []
            for case in cases:
                progress.update(bar, description=f"{suite}: {case.subject}")
                wait_for_quiet(cfg)
                meter = NoiseMeter()
                run_case(case, cfg)
                noise = meter.stop()
                spans.append(noise)
                for fig in case.figures:
                    fig.noise_pct = noise.others_pct
                    fig.params["case_wall_s"] = round(noise.wall_s, 3)
                    if fig.error:
                        err.print(f"[red]{fig.name}: {fig.error}[/red]")
                figures.extend(case.figures)
                progress.advance(bar)
            sections[suite] = {"noise": Noise.combine(spans).to_json(), "cases": len(cases)}
    link_baselines(figures)
    shutdown_joblib()
    cleanup = _cleanup(shm_before)
    duration = time.monotonic() - t0
    print_report(out, cfg, machine, figures, sections, cleanup, duration)
    if json_path:
        write_json(json_path, cfg, machine, figures, sections, cleanup,
                   {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                    "duration_s": duration})
        out.print(f"figures written to {json_path}")
    if plot_dir:
        from .plots import write_plots

        for path in write_plots(plot_dir, figures, cfg.workers):
            out.print(f"chart written to {path}")
        for path in write_timelines(plot_dir):  # the events suite's pipeline (if it ran)
            out.print(f"trace written to {path}")
    if cleanup["children_left"]:
        return 2
    return 1 if any(fig.error for fig in figures) else 0
