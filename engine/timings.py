"""What a handle remembers of its last attempt, for ``handle.timings`` and the events.

A state on a fast path (engine/fastpath.py) keeps no marks: its timings come from the handle's
own timestamps. The ordinary path, a wait or a call built for an executor makes a
:class:`Marks` on the handle; the call stays on it only until the attempt is settled (its
``worker`` and ``ran_s`` are copied, the call and its arguments are let go).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from statepool.executors.base import PreparedCall

    from .handle import StateHandle

__all__ = ["PHASES", "Marks", "marks_of", "timings_of", "worker_of"]

#: the phases of ``handle.timings``, in the order a state goes through them
PHASES = ("queued", "waiting", "resolving", "dispatch", "running", "returning")


class Marks:
    """Clock marks of one handle: when it left the queue, how long it waited, and its last
    attempt's resolving start (``t0``), dispatch start (``t1``), worker and worker run time."""

    __slots__ = ("call", "left_at", "ran_s", "t0", "t1", "wait_from", "waited", "worker")

    def __init__(self) -> None:
        self.left_at: float | None = None
        self.waited = 0.0
        self.wait_from: float | None = None
        self.t0: float | None = None
        self.t1: float | None = None
        self.call: PreparedCall | None = None
        self.worker: int | str | None = None
        self.ran_s: float | None = None

    def attempt(self, now: float) -> None:
        """A new attempt starts resolving its arguments at ``now``."""
        self.settle()
        if self.left_at is None:
            self.left_at = now
        self.t0 = self.t1 = now
        self.worker = self.ran_s = None

    def settle(self) -> None:
        """Copy what the executor said about the call, and let the call go."""
        call = self.call
        if call is not None:
            self.call = None
            self.worker = call.worker
            self.ran_s = call.ran_s

    def current_worker(self) -> int | str | None:
        call = self.call
        return call.worker if call is not None else self.worker


def marks_of(handle: StateHandle) -> Marks:
    marks = handle._marks
    if marks is None:
        marks = handle._marks = Marks()
    return marks


def worker_of(handle: StateHandle) -> int | str | None:
    marks = handle._marks
    return marks.current_worker() if marks is not None else None


def timings_of(handle: StateHandle, now: float) -> dict[str, float]:
    """Seconds in each phase of ``handle``'s last attempt (``now`` ends an unfinished one)."""
    out = dict.fromkeys(PHASES, 0.0)
    queued_at = handle.queued_at
    started = handle.started_at
    end = handle.finished_at if handle.finished_at is not None else now
    marks = handle._marks
    if marks is None:  # a fast path: queued, then running on the loop or a thread
        if started is None:
            out["queued"] = max(0.0, end - queued_at)
        else:
            out["queued"] = max(0.0, started - queued_at)
            out["running"] = max(0.0, end - started)
        return out
    call = marks.call
    ran = call.ran_s if call is not None else marks.ran_s
    left = marks.left_at
    if left is None:
        left = started if started is not None else end
    out["queued"] = max(0.0, left - queued_at)
    waited = marks.waited
    if marks.wait_from is not None:  # waiting now
        waited += max(0.0, end - marks.wait_from)
    out["waiting"] = waited
    t0, t1 = marks.t0, marks.t1
    if t0 is None or t1 is None:  # no attempt of its own (a thread fast path, or never ran)
        if started is not None:
            _running(out, ran, started, end)
        return out
    out["resolving"] = max(0.0, t1 - t0)
    if started is None or started < t0:  # the last attempt never started in its executor
        out["dispatch"] = max(0.0, end - t1)
        return out
    out["dispatch"] = max(0.0, started - t1)
    _running(out, ran, started, end)
    return out


def _running(out: dict[str, float], ran: float | None, started: float, end: float) -> None:
    total = max(0.0, end - started)
    if ran is None:
        out["running"] = total
    else:
        out["running"] = ran
        out["returning"] = max(0.0, total - ran)
