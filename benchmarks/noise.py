"""The noise figure: how much CPU other processes used while a section ran.

The machine's busy CPU time (``psutil.cpu_times``) over a span, less the CPU time of this process
and of its descendants (live ones read through psutil, finished ones through ``os.times``), is
what the rest of the machine used. It is given as a share of all cores over the span's wall time:
0 % is a quiet machine; on 2 cores, 50 % means another process held one core the whole time.
A section's figure combines the spans of its rows (the waits of ``--wait-quiet`` are left out).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

__all__ = ["Noise", "NoiseMeter", "descendants", "our_cpu_seconds"]


def descendants() -> list[psutil.Process]:
    """This process's live descendants (not zombies)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def our_cpu_seconds() -> float:
    """CPU seconds used so far by this process and every descendant, live or reaped."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for proc in psutil.Process().children(recursive=True):
        try:
            c = proc.cpu_times()
            total += c.user + c.system
        except psutil.Error:
            continue
    return total


def _busy_seconds() -> float:
    c = psutil.cpu_times()
    return float(c.user + c.system + getattr(c, "nice", 0.0) + getattr(c, "irq", 0.0) \
        + getattr(c, "softirq", 0.0) + getattr(c, "steal", 0.0))


@dataclass(frozen=True)
class Noise:
    wall_s: float
    others_pct: float  # share of all cores used by other processes
    ours_pct: float  # share of all cores used by the benchmark and its workers

    def to_json(self) -> dict[str, float]:
        return {"wall_s": self.wall_s, "others_pct": self.others_pct, "ours_pct": self.ours_pct}

    @staticmethod
    def combine(spans: list[Noise]) -> Noise:
        """The noise over several spans, as if they were one (each weighted by its length)."""
        wall = sum(n.wall_s for n in spans) or 1e-9
        return Noise(wall, sum(n.others_pct * n.wall_s for n in spans) / wall,
                     sum(n.ours_pct * n.wall_s for n in spans) / wall)


class NoiseMeter:
    """``start()`` then ``stop()`` -> :class:`Noise` for the span between them."""

    def __init__(self) -> None:
        self.cores = psutil.cpu_count() or 1
        self.start()

    def start(self) -> None:
        self._t0, self._busy0, self._ours0 = time.monotonic(), _busy_seconds(), our_cpu_seconds()

    def stop(self) -> Noise:
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = _busy_seconds() - self._busy0
        ours = our_cpu_seconds() - self._ours0
        capacity = wall * self.cores
        others = max(0.0, busy - ours)
        return Noise(wall, 100.0 * others / capacity, 100.0 * min(ours, capacity) / capacity)
