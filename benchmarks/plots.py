"""PNG charts of a run (matplotlib, Agg backend): throughput, latency, CPU scaling, payload."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .harness import Figure

__all__ = ["write_plots"]

_STATEPOOL, _BASELINE = "#1f77b4", "#b0b0b0"


def _measured(figures: Sequence[Figure], suite: str, metric: str) -> list[Figure]:
    return [f for f in figures if f.suite == suite and f.metric == metric and f.repetitions]


def _bars(ax: Any, figs: list[Figure], *, log: bool, xlabel: str) -> None:
    """Horizontal bars at the medians, whiskers from the fastest to the slowest repetition."""
    labels = [f.subject for f in figs]
    med = [f.median or 0.0 for f in figs]
    lo = [m - min(f.repetitions) for m, f in zip(med, figs, strict=True)]
    hi = [max(f.repetitions) - m for m, f in zip(med, figs, strict=True)]
    colors = [_STATEPOOL if f.kind == "statepool" else _BASELINE for f in figs]
    ax.barh(labels, med, xerr=[lo, hi], color=colors, capsize=3)
    _mark_statepool(ax, [f.kind for f in figs])
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def _mark_statepool(ax: Any, kinds: list[str]) -> None:
    """statepool's rows get blue bold tick labels."""
    for tick, kind in zip(ax.get_yticklabels(), kinds, strict=True):
        if kind == "statepool":
            tick.set_color(_STATEPOOL)
            tick.set_fontweight("bold")


def _figure(plt: Any, rows: int) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.38 * rows))
    return fig, ax


def _save(fig: Any, plt: Any, out_dir: str, name: str, written: list[str]) -> None:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)


def write_plots(out_dir: str, figures: Sequence[Figure], workers: int) -> list[str]:
    """Write one chart per suite that has figures; answer the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written: list[str] = []
    disp = _measured(figures, "dispatch", "throughput")
    if disp:
        fig, ax = _figure(plt, len(disp))
        _bars(ax, disp, log=True, xlabel="trivial calls per second (log; blue: statepool)")
        ax.set_title(f"Dispatch throughput, {workers} workers")
        _save(fig, plt, out_dir, "dispatch.png", written)
    lat = _measured(figures, "latency", "round trip median")
    if lat:
        p99 = {f.subject: f.median for f in _measured(figures, "latency", "round trip p99")}
        fig, ax = _figure(plt, len(lat))
        _bars(ax, lat, log=True, xlabel="round trip, µs (log; dots: p99)")
        ax.scatter([p99.get(f.subject) or 0 for f in lat], range(len(lat)), color="black", s=12,
                   zorder=3)
        ax.set_title("Latency of one call on a warm pool")
        _save(fig, plt, out_dir, "latency.png", written)
    cpu = _measured(figures, "cpu", "speedup")
    if cpu:
        fig, ax = _figure(plt, len(cpu))
        _bars(ax, cpu, log=False, xlabel="speedup over serial (x)")
        ax.axvline(workers, color="green", linestyle="--", label=f"ideal ({workers} workers)")
        ax.axvline(1.0, color="red", linestyle=":", label="serial")
        ax.legend(loc="lower right")
        ax.set_title("CPU scaling: pure-Python tasks")
        _save(fig, plt, out_dir, "cpu_scaling.png", written)
    payload = [f for f in figures if f.suite == "payload" and f.repetitions]
    if payload:
        _payload_chart(plt, payload, out_dir, written)
    return written


def _payload_chart(plt: Any, payload: list[Figure], out_dir: str, written: list[str]) -> None:
    metrics = list(dict.fromkeys(f.metric for f in payload))
    subjects = list(dict.fromkeys(f.subject for f in payload))
    fig, ax = _figure(plt, len(subjects) * len(metrics) // 2 + 3)
    height = 0.8 / len(metrics)
    by_key = {(f.subject, f.metric): f for f in payload}
    for i, metric in enumerate(metrics):
        ys = [j + i * height for j in range(len(subjects))]
        vals = [(by_key[(s, metric)].median or 0.0) if (s, metric) in by_key else 0.0
                for s in subjects]
        ax.barh(ys, vals, height=height, label=metric)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(subjects))], subjects)
    kinds = {f.subject: f.kind for f in payload}
    _mark_statepool(ax, [kinds[s] for s in subjects])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per call carrying a numpy array (log; blue labels: statepool)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(metrics))
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Payload: a numpy array as an argument")
    _save(fig, plt, out_dir, "payload.png", written)
