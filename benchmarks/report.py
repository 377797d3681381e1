"""The report: one rich table per suite on the terminal, and every figure as JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .harness import Config, Figure

__all__ = ["console", "fmt", "link_baselines", "print_report", "write_json"]


def console(stderr: bool = False) -> Console:
    """A console 140 columns wide when the output is not a terminal (files, CI logs)."""
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=None if probe.is_terminal else 140)


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def link_baselines(figures: Sequence[Figure]) -> None:
    """Fill each figure's ratio: its median over the median of the figure it names."""
    by_name = {fig.name: fig for fig in figures}
    for fig in figures:
        if fig.baseline is None:
            continue
        base = by_name.get(fig.baseline)
        mine, theirs = fig.median, base.median if base is not None else None
        fig.ratio = mine / theirs if mine is not None and theirs else None


def _ratio_text(fig: Figure) -> Text:
    if fig.ratio is None:
        return Text("")
    better = fig.ratio >= 1 if fig.higher_is_better else fig.ratio <= 1
    return Text(f"{fig.ratio:.2f}x", style="green" if better else "red")


def _suite_table(suite: str, figs: list[Figure], noise: dict[str, Any] | None) -> Table:
    title = f"[bold]{suite}[/bold]"
    if noise is not None:
        title += (f"  (noise: other processes used {noise['others_pct']:.0f}% of the CPU "
                  f"over {noise['wall_s']:.0f} s)")
    table = Table(title=title, title_justify="left")
    table.add_column("subject", no_wrap=True)
    table.add_column("figure", no_wrap=True)
    table.add_column("median", justify="right", no_wrap=True)
    table.add_column("spread", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("noise", justify="right", no_wrap=True)
    table.add_column("baseline / note", overflow="fold")
    for fig in figs:
        subject = Text(fig.subject, style="bold cyan" if fig.kind == "statepool" else "")
        figure = f"{fig.metric} {'↑' if fig.higher_is_better else '↓'}"
        if fig.skipped or fig.error:
            why = fig.skipped or f"error: {fig.error}"
            style = "yellow" if fig.skipped else "bold red"
            table.add_row(subject, figure, "-", "-", "", "", Text(why[:160], style=style))
            continue
        spread = f"{100 * fig.spread:.0f}%" if fig.spread is not None else "-"
        base = fig.baseline.split("/", 2)[2] if fig.baseline else ""
        row_noise = f"{fig.noise_pct:.0f}%" if fig.noise_pct is not None else "-"
        table.add_row(subject, figure, f"{fmt(fig.median)} {fig.unit}", spread,
                      _ratio_text(fig), row_noise, base)
    return table


def print_report(out: Console, cfg: Config, machine: dict[str, Any],
                 figures: Sequence[Figure], sections: dict[str, dict[str, Any]],
                 cleanup: dict[str, Any], duration_s: float) -> None:
    libs = ", ".join(f"{k} {v}" for k, v in machine["libraries"].items() if v)
    out.print(f"[bold]statepool benchmarks[/bold] ({'quick' if cfg.quick else 'full'} run, "
              f"{cfg.workers} workers, median of {cfg.repetitions} after {cfg.warmup} warm-up, "
              f"{duration_s:.0f} s)")
    out.print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores "
              f"({machine['logical_cores']} logical), {machine['memory_gb']} GB, "
              f"{machine['python']}, {machine['platform']}")
    out.print(f"libraries: {libs}; statepool {machine['statepool_revision']}")
    for suite in cfg.suites:
        figs = [f for f in figures if f.suite == suite]
        if figs:
            out.print(_suite_table(suite, figs, sections.get(suite, {}).get("noise")))
    out.print("↑ higher is better, ↓ lower is better. spread: (max - min) / median of the "
              "repetitions. ratio: statepool's median over its baseline's (green: statepool "
              "is ahead, red: behind). noise: share of all cores that other processes used "
              "while the row was measured.")
    left = cleanup.get("children_left") or []
    shm = cleanup.get("shm_left") or []
    if left:
        out.print(f"[bold red]processes left behind (killed):[/bold red] {left}")
    if shm:
        out.print(f"[yellow]left in /dev/shm by this run:[/yellow] {shm}")
    if not left and not shm:
        out.print("cleanup: every pool shut down, no child process left, nothing new in /dev/shm")
    joblib = cleanup.get("shm_removed_at_exit") or []
    if joblib:
        out.print(f"/dev/shm: {len(joblib)} joblib memmapping folder(s), which joblib's resource "
                  "tracker removes when this process exits")


def write_json(path: str, cfg: Config, machine: dict[str, Any], figures: Sequence[Figure],
               sections: dict[str, dict[str, Any]], cleanup: dict[str, Any],
               extra: dict[str, Any]) -> None:
    doc = {
        "schema": 1,
        **extra,
        "config": {**asdict(cfg), "suites": list(cfg.suites)},
        "machine": machine,
        "sections": sections,
        "figures": [fig.to_json() for fig in figures],
        "cleanup": cleanup,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
