"""A run's events as a Chrome / Perfetto trace and as a timeline chart.

Three lines give both for a block of code::

    with trace.record(manager) as rec:
        ...                                   # put states, map, join
    trace.write_chrome_trace(rec.events, "run.json")   # open in https://ui.perfetto.dev
    trace.plot_timeline(rec.events, "run.png")

The trace has one track (a *thread*, in the trace-event format) per worker: the loop itself, each
thread, each worker process, each Dask worker. Each attempt of a state is one slice on its
worker's track, named after the state, with its outcome, attempt and phases in ``args``; the time
it spent queued, waiting and being dispatched shows as slices on a ``queue`` track, so the gaps
are visible. ``plot_timeline`` draws the same as a Gantt chart (matplotlib, from the ``bench``
extra): a row per worker, a bar per attempt coloured by outcome, the waits as thin grey bars.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .events import StateEvent

if TYPE_CHECKING:
    from .manager import StateManager

__all__ = ["Attempt", "Recording", "attempts", "plot_timeline", "record", "write_chrome_trace"]

LOOP_TRACK = "event loop"
QUEUE_TRACK = "queue / waits"
COLOURS = {"succeeded": "#2e9d5b", "failed": "#d63b3b", "retrying": "#f0a030",
           "cancelled": "#8c8c8c", "running": "#4a7fd0"}
WAIT_COLOUR, DISPATCH_COLOUR = "#cfcfcf", "#8a8a8a"
_ENDS = ("retrying", "succeeded", "failed", "cancelled")


@dataclass
class Attempt:
    """One attempt of one state: where it ran, from when to when, and how it ended."""

    name: str
    handle_id: int
    attempt: int
    worker: str
    executor: str
    start: float  # loop clock, seconds
    end: float
    outcome: str  # succeeded / failed / cancelled / retrying (failed, retried) / running
    queued_at: float | None = None  # when it was put (first attempt) or retried
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _track(worker: Any, executor: str) -> str:
    if worker is None:
        return LOOP_TRACK if executor in ("inline", "") else f"{executor}"
    if isinstance(worker, int):
        return f"{executor} pid {worker}"
    return str(worker)


def attempts(events: Iterable[StateEvent]) -> list[Attempt]:
    """Pair each ``started`` event with what ended that attempt (a state still running when
    the events stop ends at the last event's time, outcome ``running``)."""
    out: list[Attempt] = []
    open_: dict[int, Attempt] = {}
    since: dict[int, float] = {}  # handle -> when it was put, or when its retry was decided
    last = 0.0
    for event in events:
        key = id(event.handle)
        last = max(last, event.time)
        kind = event.kind
        if kind == "queued":
            since[key] = event.time
        elif kind == "started":
            open_[key] = Attempt(event.name, key, event.attempt,
                                 _track(event.worker, event.executor), event.executor,
                                 event.time, event.time, "running", since.pop(key, None))
        elif kind in _ENDS:
            current = open_.pop(key, None)
            if current is None:  # it never started: cancelled or failed in the queue
                if kind != "retrying":
                    start = since.pop(key, event.time)
                    out.append(Attempt(event.name, key, event.attempt, QUEUE_TRACK,
                                       event.executor, start, event.time, kind, start,
                                       _error(event)))
                continue
            current.end = event.time
            current.outcome = kind
            current.error = _error(event)
            if event.worker is not None:  # known at the end only (some executors)
                current.worker = _track(event.worker, event.executor)
            if kind != "retrying":
                current.timings = event.timings or {}
            else:
                since[key] = event.time
            out.append(current)
    for current in open_.values():
        current.end = last
        out.append(current)
    out.sort(key=lambda a: a.start)
    return out


def _error(event: StateEvent) -> str | None:
    if event.error is None:
        return None
    return f"{type(event.error).__name__}: {event.error}"[:200]


def write_chrome_trace(events: Iterable[StateEvent], path: str | os.PathLike[str]) -> None:
    """Write ``events`` as Chrome / Perfetto trace-event JSON (``{"traceEvents": [...]}``):
    complete events (``"ph": "X"``) in microseconds, one thread per worker, named by metadata
    events. Opens in https://ui.perfetto.dev and chrome://tracing."""
    with open(path, "w") as f:
        json.dump(chrome_trace(list(events)), f)


def chrome_trace(events: Sequence[StateEvent]) -> dict[str, Any]:
    """The trace-event document of :func:`write_chrome_trace`."""
    runs = attempts(events)
    origin = min((e.time for e in events), default=0.0)
    pid = os.getpid()
    tids: dict[str, int] = {QUEUE_TRACK: 0}
    for run in runs:
        tids.setdefault(run.worker, len(tids))
    trace: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": "statepool"}},
    ]
    for track, tid in tids.items():
        trace.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                      "args": {"name": track}})
        trace.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                      "args": {"sort_index": tid}})

    def us(t: float) -> float:
        return round((t - origin) * 1e6, 3)

    for run in runs:
        args: dict[str, Any] = {"state": run.name, "outcome": run.outcome,
                                "attempt": run.attempt, "executor": run.executor,
                                "worker": run.worker}
        if run.error:
            args["error"] = run.error
        args.update({f"{k} (s)": round(v, 6) for k, v in run.timings.items()})
        trace.append({"name": run.name, "cat": run.outcome, "ph": "X", "pid": pid,
                      "tid": tids[run.worker], "ts": us(run.start),
                      "dur": max(us(run.end) - us(run.start), 0.001), "args": args,
                      "cname": _CNAME.get(run.outcome, "generic_work")})
        if run.queued_at is not None and run.start > run.queued_at and run.worker != QUEUE_TRACK:
            split = _dispatch_from(run)
            for what, begin, end in (("queued", run.queued_at, split),
                                     ("dispatch", split, run.start)):
                if end > begin:
                    trace.append({"name": f"{run.name} ({what})", "cat": what, "ph": "X",
                                  "pid": pid, "tid": 0, "ts": us(begin),
                                  "dur": max(us(end) - us(begin), 0.001),
                                  "args": {"state": run.name, "attempt": run.attempt,
                                           "then": "started on " + run.worker},
                                  "cname": "grey" if what == "queued" else "yellow"})
    return {"traceEvents": trace, "displayTimeUnit": "ms",
            "otherData": {"generator": "statepool.engine.trace"}}


_CNAME = {"succeeded": "good", "failed": "terrible", "retrying": "bad", "cancelled": "grey",
          "running": "generic_work"}


def plot_timeline(events: Iterable[StateEvent], path: str | os.PathLike[str], *,
                  title: str | None = None) -> None:
    """Draw ``events`` as a PNG Gantt chart: a row per worker, a bar per attempt coloured by
    outcome (with the state's name where it fits), the time each attempt waited before it
    started as a thin grey bar (queue, gate, dispatch), a failure marked with a cross.
    Needs matplotlib (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:  # pragma: no cover - matplotlib is in the bench/test extras
        raise ImportError("plot_timeline needs matplotlib: pip install matplotlib "
                          "(or statepool[bench])") from exc
    events = list(events)
    runs = attempts(events)
    origin = min((e.time for e in events), default=0.0)
    rows = sorted({r.worker for r in runs if r.worker != QUEUE_TRACK}, key=_row_order)
    if any(r.worker == QUEUE_TRACK for r in runs):
        rows.append(QUEUE_TRACK)
    index = {row: i for i, row in enumerate(rows)}
    span = max((r.end for r in runs), default=origin) - origin or 1.0
    fig, (top, ax) = plt.subplots(
        2, 1, sharex=True, figsize=(12, max(3.5, 0.55 * len(rows) + 2.6)), dpi=110,
        gridspec_kw={"height_ratios": [1.2, max(2.0, 0.55 * len(rows))]})
    times, queued, dispatch, running = _levels(runs, origin, span / 1500)
    stacked = [q + d for q, d in zip(queued, dispatch, strict=True)]
    top.fill_between(times, queued, step="post", color=WAIT_COLOUR, linewidth=0,
                     label="queued or waiting")
    top.fill_between(times, queued, stacked, step="post", color=DISPATCH_COLOUR, linewidth=0,
                     label="dispatched, waiting for a worker")
    top.step(times, running, where="post", color=COLOURS["running"], linewidth=1.2,
             label="running")
    top.set_ylabel("states", fontsize=8)
    top.set_ylim(0, max([*stacked, *running, 1]) * 1.2)
    top.legend(loc="upper right", fontsize=7, frameon=False, ncol=3)
    top.grid(axis="x", color="#eeeeee")
    top.tick_params(labelsize=7)
    for run in runs:
        y = index[run.worker]
        bad = run.outcome in ("failed", "retrying")
        start = run.start - origin
        width = max(run.end - run.start, span / (120 if bad else 600))  # a failure shows
        ax.barh(y, width, left=start, height=0.7, color=COLOURS.get(run.outcome, "#4a7fd0"),
                edgecolor="white" if not bad else "black", linewidth=0.6, zorder=4 if bad else 2)
        if width > span / 25:
            ax.text(start + width / 2, y, _label(run), ha="center", va="center", fontsize=7,
                    color="white", clip_on=True, zorder=5)
        elif bad:  # too narrow for its name: the name above it
            ax.text(start + width / 2, y - 0.42, _label(run), ha="center", va="bottom",
                    fontsize=6.5, color=COLOURS[run.outcome], fontweight="bold", zorder=5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first event")
    ax.set_xlim(0, span * 1.01)
    ax.grid(axis="x", color="#eeeeee", zorder=0)
    ax.set_axisbelow(True)
    counts = {k: sum(1 for r in runs if r.outcome == k) for k in COLOURS}
    ax.legend(handles=[Patch(color=c, label=f"{k} ({counts[k]})") for k, c in COLOURS.items()
                       if counts[k]],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.02 * (6 / max(len(rows), 1))),
              ncol=6, fontsize=8, frameon=False)
    top.set_title(title or f"{len(runs)} attempts on {len(rows)} tracks", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _levels(runs: list[Attempt], origin: float,
            merge: float) -> tuple[list[float], list[int], list[int], list[int]]:
    """How many states are queued (or waiting), dispatched and waiting for a worker, and
    running, over time: a step at each change (changes closer than ``merge`` s are one)."""
    changes: list[tuple[float, int, int, int]] = []
    for run in runs:
        if run.worker == QUEUE_TRACK:  # never started: it waited all along
            changes += [(run.start, 1, 0, 0), (run.end, -1, 0, 0)]
            continue
        if run.queued_at is not None and run.start > run.queued_at:
            split = _dispatch_from(run)
            changes += [(run.queued_at, 1, 0, 0), (split, -1, 1, 0), (run.start, 0, -1, 0)]
        changes += [(run.start, 0, 0, 1), (run.end, 0, 0, -1)]
    changes.sort()
    times, queued, dispatch, running = [0.0], [0], [0], [0]
    q = d = r = 0
    for t, dq, dd, dr in changes:
        q, d, r = q + dq, d + dd, r + dr
        if t - origin - times[-1] < merge and len(times) > 1:  # one change with the last
            queued[-1], dispatch[-1], running[-1] = q, d, r
            continue
        times.append(t - origin)
        queued.append(q)
        dispatch.append(d)
        running.append(r)
    return times, queued, dispatch, running


def _dispatch_from(run: Attempt) -> float:
    """When the attempt's dispatch began (its ``dispatch`` timing before its start)."""
    assert run.queued_at is not None
    dispatch = run.timings.get("dispatch", 0.0)
    return max(run.queued_at, run.start - dispatch)


def _row_order(track: str) -> tuple[int, str]:
    return (0 if track == LOOP_TRACK else 1, track)


def _label(run: Attempt) -> str:
    return run.name if run.attempt <= 1 else f"{run.name} #{run.attempt}"


class Recording:
    """The events of a manager while a ``with trace.record(manager)`` block runs."""

    def __init__(self) -> None:
        self.events: list[StateEvent] = []

    def __len__(self) -> int:
        return len(self.events)

    def attempts(self) -> list[Attempt]:
        return attempts(self.events)

    def write_chrome_trace(self, path: str | os.PathLike[str]) -> None:
        write_chrome_trace(self.events, path)

    def plot_timeline(self, path: str | os.PathLike[str], **options: Any) -> None:
        plot_timeline(self.events, path, **options)


@contextmanager
def record(manager: StateManager) -> Iterator[Recording]:
    """Record ``manager``'s events while the block runs (a listener: nothing is dropped)."""
    rec = Recording()
    remove = manager.add_listener(rec.events.append)
    try:
        yield rec
    finally:
        remove()
