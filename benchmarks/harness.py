"""The measuring harness: run settings, figures and the repetition loop.

A *figure* is one number (throughput, latency, speedup...) for one subject (a statepool executor
or a baseline), kept with every repetition. The figure's value is the median of its repetitions,
taken after warm-up runs that are not kept. A statepool figure names the baseline it is compared
with; its ``ratio`` is its median over the baseline's median, in the figure's unit.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = [
    "SUITES",
    "Case",
    "Config",
    "Figure",
    "NotAvailable",
    "Runner",
    "mode_templates",
    "now",
    "percentile",
    "repeat",
    "templates",
    "usable_cores",
]

SUITES = ("dispatch", "latency", "cpu", "payload", "coldstart", "memory", "logging", "events",
          "scheduling", "pipeline")

T = TypeVar("T")
Runner = Callable[[list["Figure"]], Awaitable[None]]
now = time.perf_counter


class NotAvailable(Exception):
    """A subject cannot be measured here (its executor or library is missing)."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    """How big and how often: ``--quick`` shrinks every size, never the repetition count."""

    quick: bool = False
    workers: int = field(default_factory=usable_cores)
    repetitions: int = 5
    warmup: int = 1
    suites: tuple[str, ...] = SUITES
    figure_timeout_s: float = 120.0
    quiet_below_pct: float | None = None  # before each row, wait for other processes to calm
    quiet_wait_s: float = 20.0

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    """One measured number with its repetitions; ``skipped``/``error`` say why there is none."""

    suite: str
    metric: str
    subject: str
    unit: str
    higher_is_better: bool
    kind: str = "baseline"  # "statepool" or "baseline"
    repetitions: list[float] = field(default_factory=list)
    baseline: str | None = None
    ratio: float | None = None
    skipped: str | None = None
    error: str | None = None
    noise_pct: float | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.suite}/{self.metric}/{self.subject}"

    @property
    def median(self) -> float | None:
        return statistics.median(self.repetitions) if self.repetitions else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median of the repetitions: how much the runs disagreed."""
        med = self.median
        if not med or len(self.repetitions) < 2:
            return None
        return (max(self.repetitions) - min(self.repetitions)) / abs(med)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["name"] = self.name
        out["median"] = self.median
        out["spread"] = self.spread
        return out


@dataclass
class Case:
    """One subject of one suite: ``run(figures)`` fills the repetitions of its figures."""

    suite: str
    subject: str
    figures: list[Figure]
    run: Runner


def templates(
    suite: str, subject: str, kind: str, baseline: str | None,
    metrics: list[tuple[str, str, bool]],
) -> list[Figure]:
    """Empty figures for ``(metric, unit, higher_is_better)``; ``baseline`` is a subject."""
    return [
        Figure(suite, metric, subject, unit, higher, kind,
               baseline=f"{suite}/{metric}/{baseline}" if baseline else None)
        for metric, unit, higher in metrics
    ]


def mode_templates(suite: str, subject: str, modes: tuple[str, ...]) -> list[Figure]:
    """Throughput figures of ``subject`` in each of ``modes``, the first one the baseline of
    the others (the logging and events suites: modes interleaved within each repetition)."""
    metric = [("throughput", "calls/s", True)]
    return [*templates(suite, f"{subject}, {modes[0]}", "baseline", None, metric),
            *[fig for mode in modes[1:] for fig in templates(
                suite, f"{subject}, {mode}", "statepool", f"{subject}, {modes[0]}", metric)]]


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank, so p99 of 100 samples is the 99th."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def repeat(cfg: Config, body: Callable[[], Awaitable[T]]) -> list[T]:
    """Run ``body`` ``cfg.warmup`` times unrecorded, then ``cfg.repetitions`` times recorded.

    The heap is collected before each run (outside what ``body`` times), so that the garbage one
    subject left is not charged to the next.
    """
    for _ in range(cfg.warmup):
        gc.collect()
        await body()
    out = []
    for _ in range(cfg.repetitions):
        gc.collect()
        out.append(await body())
    return out
