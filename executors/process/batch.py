"""Batches for the ``"process"`` executor: how many calls go to a worker in one frame.

A call whose function has not been measured yet, or was measured slow (``SLOW_S`` or more), goes
alone, so a CPU-heavy call never waits behind another one on a busy worker while an idle worker
could take it. Calls measured fast go together, as joblib's auto-batching does: a batch takes
calls from the head of the line while their estimated run times add up to ``TARGET_S`` at most,
no more than an equal share of the line per worker, and no more than the function's *limit*.
The limit starts at 1, doubles each time a batch of the function comes back without a slow call,
and falls back to 1 at the first slow call. Run times are measured in the worker, per call, and
kept per function (its code object: every lambda of one line shares one estimate).
"""

from __future__ import annotations

import asyncio
import functools
import types
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..base import PreparedCall

if TYPE_CHECKING:
    from .pool import Worker

__all__ = ["ALPHA", "MAX_BATCH", "SLOW_S", "TARGET_S", "Batch", "CostModel", "Job", "cost_key",
           "future_setter", "take"]

TARGET_S = 0.002  # the work a batch of fast calls aims at
SLOW_S = 0.001  # a call that takes this long goes alone
MAX_BATCH = 512  # calls in one batch at most
ALPHA = 0.25  # weight of a new measure in the running estimate
_MAX_KEYS = 4096  # functions remembered at most (the estimates start over past that)


class Abandons(Protocol):
    """A job's executor: ``_abandon(job)`` skips a cancelled call, or kills its worker."""

    def _abandon(self, job: Job) -> None: ...


class Job:
    """One call on its way through the executor (it may be sent more than once), and its outcome.

    To the engine's ``submit()`` path it stands for the state's task (``cancel()``, ``done()``);
    ``run()`` awaits an asyncio future that ``on_done`` sets. It ends once: ``end(ok, value)``
    (``set_result`` and ``set_exception`` for :func:`~statepool.executors.base.fail_future`), or
    ``cancel()``, which also skips the call or kills the worker running it (``owner._abandon``).
    Once it has ended it holds no reference to its ``on_done`` (the engine's handle, which holds
    it), and a batch over lets go of its jobs: an ended call's arguments go without the garbage
    collector."""

    # the fields every call sets; the others are class defaults until a call sets them (in
    # its __dict__, made then): creating a job is a good part of a trivial call's cost
    __slots__ = ("__dict__", "_on_done", "_owner", "batch", "call", "key", "over", "seq",
                 "worker")

    solo = False  # goes alone (its batch could not be loaded, or its worker died)
    stolen = False  # asked back from a worker too slow on its batch, to go elsewhere
    reruns = 0  # sent again after its worker died with no call to blame
    doom: str | None = None  # why the executor killed its worker: "cancel", "memory"
    rss = 0  # the worker's memory when it was killed for max_memory
    _waiters: list[asyncio.Future[None]] | None = None  # see waiter()

    def __init__(self, call: PreparedCall, on_done: Callable[[bool, Any], None],
                 owner: Abandons) -> None:
        self.call = call
        fn = call.fn
        self.key = fn.__code__ if type(fn) is types.FunctionType else cost_key(fn)
        self._on_done: Callable[[bool, Any], None] | None = on_done
        self._owner = owner  # its executor (a bound method per job would cost more)
        self.over = False  # ended: a result, an error, or cancelled
        self.worker: Worker | None = None  # while sent, or about to be
        self.batch: Batch | None = None
        self.seq = 0  # its sequence number on that worker

    def done(self) -> bool:
        return self.over

    def set_result(self, value: Any) -> None:
        self.end(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self.end(False, exc)

    def cancel(self) -> bool:
        """The state was cancelled (or the executor closes): skip the call, or kill the worker
        that runs it, as when ``run()``'s task is cancelled."""
        if self.over:
            return False
        self.end(False, asyncio.CancelledError())
        self._owner._abandon(self)
        return True

    def end(self, ok: bool, value: Any) -> None:
        """``on_done(ok, value)``, once (later calls change nothing)."""
        if self.over:
            return
        self.over = True
        on_done, self._on_done = self._on_done, None
        assert on_done is not None
        on_done(ok, value)
        if self._waiters is not None:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        """A future done when this is (for a shutdown that waits for every call)."""
        fut = asyncio.get_running_loop().create_future()
        if self.over:
            fut.set_result(None)
        else:
            self._waiters = [*(self._waiters or ()), fut]
        return fut

    def __repr__(self) -> str:
        return f"<Job {self.call.state_name!r} seq={self.seq} worker={self.worker}>"


def future_setter(fut: asyncio.Future[Any]) -> Callable[[bool, Any], None]:
    """An ``on_done`` that sets ``fut`` (``run()``'s path), unless it is done (cancelled)."""

    def on_done(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    return on_done


class Batch:
    """Calls sent to one worker in one frame, run there in order."""

    __slots__ = ("begun", "begun_at", "fast", "jobs", "left", "path", "slow", "work", "worker")

    def __init__(self, worker: Worker, jobs: list[Job], fast: bool, work: float) -> None:
        self.worker = worker
        self.jobs = jobs
        self.left = len(jobs)  # calls not answered yet
        self.fast = fast  # its calls were all measured fast
        self.work = work  # their estimated run time, in seconds (0.0: not known)
        self.slow = False  # one of its calls was measured slow
        self.begun = False  # the worker is on it: its calls' clocks run
        self.begun_at = 0.0  # since when (loop time)
        self.path: str | None = None  # the file of its out-of-band buffers

    def __repr__(self) -> str:
        return f"<Batch of {len(self.jobs)} left={self.left} fast={self.fast}>"


def cost_key(fn: Callable[..., Any]) -> object:
    """What run times are kept under: the code object of ``fn`` (through partials and bound
    methods), else the callable's type (a callable object), else ``fn`` itself (a builtin)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is None:
        code = getattr(getattr(fn, "__func__", None), "__code__", None)
    if code is not None:
        return code
    if isinstance(fn, types.BuiltinFunctionType):
        return fn
    return type(fn)


class _Cost:
    __slots__ = ("est", "limit")

    def __init__(self, est: float) -> None:
        self.est = est  # seconds per call, running estimate
        self.limit = 1  # calls per batch at most


class CostModel:
    """Measured run times per function, and the batch limits they allow."""

    def __init__(self) -> None:
        self._costs: dict[object, _Cost] = {}

    def estimate(self, key: object) -> float | None:
        cost = self._costs.get(key)
        return None if cost is None else cost.est

    def observe(self, key: object, seconds: float) -> None:
        cost = self._costs.get(key)
        if cost is None:
            if len(self._costs) >= _MAX_KEYS:
                self._costs.clear()
            self._costs[key] = _Cost(seconds)
        elif seconds >= SLOW_S:  # slow: believe it at once, and send it alone from now on
            cost.est = max(cost.est, seconds)
            cost.limit = 1
        else:
            cost.est += ALPHA * (seconds - cost.est)

    def batch_done(self, batch: Batch) -> None:
        """A batch came back: the functions in it may go in bigger batches unless one was slow."""
        if batch.slow:
            return
        for key in {job.key for job in batch.jobs}:
            cost = self._costs.get(key)
            if cost is not None and cost.est < SLOW_S:
                cost.limit = min(2 * cost.limit, MAX_BATCH)

    def head_is_fast(self, pending: deque[Job]) -> bool:
        """Would the next batch be one of fast calls?"""
        job = pending[0]
        cost = self._costs.get(job.key)
        return not job.solo and cost is not None and cost.est < SLOW_S

    def __repr__(self) -> str:
        return f"<CostModel {len(self._costs)} functions>"


def take(pending: deque[Job], model: CostModel, share: int) -> tuple[list[Job], bool, float]:
    """The next batch from the head of ``pending`` (whose head is not done): its jobs, whether
    they are all fast, and their estimated run time."""
    head = pending.popleft()
    costs = model._costs
    cost = costs.get(head.key)
    if head.solo or cost is None or cost.est >= SLOW_S:
        return [head], False, 0.0 if cost is None else cost.est
    limit = min(share, cost.limit, MAX_BATCH)
    jobs = [head]
    total = cost.est
    key = head.key
    # calls of the same function first, in a tight loop: as many as the target allows
    same = min(limit, 1 + int((TARGET_S - total) / cost.est) if cost.est > 0 else limit)
    while pending and len(jobs) < same:
        job = pending[0]
        if job.key is not key or job.solo:
            break
        pending.popleft()
        if not job.over:
            jobs.append(job)
    total += (len(jobs) - 1) * cost.est
    while pending and len(jobs) < limit:
        job = pending[0]
        if job.over:
            pending.popleft()
            continue
        other = cost if job.key is key else costs.get(job.key)
        if job.solo or other is None or other.est >= SLOW_S or len(jobs) >= other.limit \
                or total + other.est > TARGET_S:
            break
        jobs.append(pending.popleft())
        total += other.est
    return jobs, True, total
