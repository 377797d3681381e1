"""The ``"process"`` executor's waiting line and workers: which calls go where, and what comes
back. ``LokyExecutor`` (``executors.loky``) builds on :class:`Dispatch` and adds the lifecycle:
starting and replacing workers, deaths, shutdown.

Everything here runs on the event loop thread but :meth:`Dispatch._pack_off_loop` (the helper
thread), and never blocks: sockets are non-blocking, large batches are pickled and their
out-of-band buffers written on the helper thread, large outcomes unpickled there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import pickle
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from statepool.engine.errors import SerializationError

from .._wire import shm
from .._wire.remote import INLINE_LOADS_LIMIT, OK, loads_outcome, remote_error
from ..base import PreparedCall, fail_future
from .batch import ALPHA, MAX_BATCH, SLOW_S, Batch, CostModel, Job, take
from .pool import Frame, Worker
from .worker import BAD, BATCH, BYE, DONE, FRAME, READY, RUNNING, SKIP, SlotTable

__all__ = ["RING", "Dispatch", "Phase"]

logger = logging.getLogger(__name__)
_loads = pickle.loads

RING = 2 * MAX_BATCH  # slots per worker: the calls of two batches
_START_POLL_S = 0.005  # how often a cancelled call that has not started yet is looked at
_INLINE_FRAME = 64 * 1024  # a body up to this size leaves with its header in one write
STEAL_CHECK_S = 0.01  # while a worker idles, how often the others' batches are looked at
STEAL_AFTER_S = 0.02  # a batch runs at least this long before its calls are asked back...
STEAL_FACTOR = 4.0  # ...and this many times its estimated work


class Phase(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_CLOSED = Phase.CLOSED  # (an enum member looked up on its class costs 0.2 us on Python 3.11)


class Dispatch:
    """The waiting line, the workers, the cost model; batches out, answers in."""

    def __init__(self, max_workers: int) -> None:
        self.batches_sent = 0
        self.calls_sent = 0
        self._phase = Phase.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._dir = ""  # the private temporary directory: slot table, out-of-band buffers
        self._table: SlotTable | None = None
        self._workers: list[Worker | None] = [None] * max_workers
        self._start_failures = 0
        self._ready: asyncio.Future[None] | None = None  # the first worker answered
        self._pending: deque[Job] = deque()
        self._model = CostModel()
        self._pump_handle: asyncio.Handle | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self._steal_timer: asyncio.TimerHandle | None = None

    # -- sending -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand waiting calls to the workers: idle ones first, then a second batch of fast
        calls to workers running a batch of fast calls."""
        self._pump_handle = None
        pending = self._pending
        if self._phase is _CLOSED:
            return
        self._has_head()
        workers = self._usable()
        if not workers:
            return
        if not pending:
            if self._steal_timer is None:
                self._watch_for_stealing(workers)
            return
        share = -(-len(pending) // len(workers))
        model = self._model
        for worker in workers:
            if not worker.batches and self._has_head():
                self._dispatch(worker, *take(pending, model, share))
        for worker in workers:
            if len(worker.batches) == 1 and worker.batches[0].fast and self._has_head() \
                    and model.head_is_fast(pending):
                self._dispatch(worker, *take(pending, model, share))
        self._watch()
        if not pending and self._steal_timer is None:
            self._watch_for_stealing(workers)

    def _usable(self) -> list[Worker]:
        """The workers that may take calls now: the ready ones. (A call is not sent to a worker
        that is still starting: two workers started together may take 100 ms apart to be
        ready, and the call would wait for the slower one.)"""
        return [w for w in self._workers if w is not None and w.usable and w.ready]

    def _has_head(self) -> bool:
        """Is a call waiting? (Drops the cancelled ones at the head of the line.)"""
        pending = self._pending
        while pending and pending[0].over:
            pending.popleft()
        return bool(pending)

    def _dispatch(self, worker: Worker, jobs: list[Job], fast: bool, work: float) -> None:
        """Send ``jobs`` to ``worker`` as one batch."""
        table = self._table
        assert table is not None and self._helper is not None
        batch = Batch(worker, jobs, fast, work)
        self.batches_sent += 1
        self.calls_sent += len(jobs)
        first = worker.seq
        held = worker.jobs
        seq = first
        for job in jobs:
            job.seq, job.batch, job.worker = seq, batch, worker
            held[seq] = job
            seq = (seq + 1) & 0xFFFFFFFF
        worker.seq = seq
        table.reset_range(worker.base, RING, first % RING, len(jobs))
        worker.batches.append(batch)
        if len(worker.batches) == 1 and worker.ready:  # else when it says READY
            self._begin(batch)
        calls = [job.call for job in jobs]
        try:
            packed = shm.pack(calls, inline=True)
        except BaseException:  # they pickle apart, not together
            packed = None
        if packed is not None and not packed.buffers:
            self._send(worker, batch, first, packed, None)
            return
        slot = worker.reserve()
        self._helper.submit(self._pack_off_loop, worker, batch, first, calls, packed, slot)

    def _pack_off_loop(self, worker: Worker, batch: Batch, first: int,
                       calls: list[PreparedCall], packed: shm.Packed | None, slot: Any) -> None:
        """Pickle a large batch and write its out-of-band buffers (helper thread)."""
        try:
            if packed is None:
                packed = shm.pack(calls, inline=False)
                assert packed is not None
            if packed.buffers:
                packed.meta = shm.write_buffers(packed.buffers, self._dir)
                packed.path = shm.meta_path(packed.meta)
                packed.buffers = []
        except BaseException as exc:  # handed to the loop
            self._threadsafe(self._unpacked, worker, batch, slot, exc)
            return
        self._threadsafe(self._send, worker, batch, first, packed, slot)

    def _send(self, worker: Worker, batch: Batch, first: int, packed: shm.Packed,
              slot: Any) -> None:
        batch.path = packed.path
        if not worker.alive or not batch.jobs or batch.jobs[0].batch is not batch:
            shm.release(packed.path)  # its worker died meanwhile: its calls went back in line
            return
        for index, exc in packed.failed.items():  # the worker skips their place
            self._fail(batch.jobs[index], exc)
        meta, body = packed.meta, packed.body
        head = FRAME.pack(BATCH, first, len(batch.jobs), len(meta), len(meta) + len(body), 0.0)
        parts = [head + meta + body] if len(body) <= _INLINE_FRAME else [head + meta, body]
        if slot is None:
            worker.send(parts)
        else:
            worker.fill(slot, parts)

    def _unpacked(self, worker: Worker, batch: Batch, slot: Any, exc: BaseException) -> None:
        """A batch that could not be pickled off the loop: it never reaches the worker."""
        if slot is not None:
            worker.fill(slot, [])
        jobs = batch.jobs
        if not worker.alive or not jobs or jobs[0].batch is not batch:
            return
        for job in jobs:
            worker.jobs.pop(job.seq, None)
        self._batch_over(worker, batch)
        if len(jobs) > 1:  # they pickle apart, not together
            self._requeue(jobs, solo=True)
        else:
            self._fail(jobs[0], exc)
        self._pump()

    def _begin(self, batch: Batch) -> None:
        """The worker is on ``batch``: its calls start (their timeout clocks run)."""
        batch.begun = True
        assert self._loop is not None
        batch.begun_at = self._loop.time()
        pid = batch.worker.pid
        for job in batch.jobs:
            if not job.over:
                call = job.call
                call.worker = pid
                call.started()

    def _threadsafe(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(callback, *args)

    # -- answers -----------------------------------------------------------------------------

    def _on_frames(self, worker: Worker, frames: list[Frame]) -> None:
        held = worker.jobs
        costs = self._model._costs
        for kind, seq, count, aux, seconds, body in frames:
            if kind == DONE and not aux and len(body) <= INLINE_LOADS_LIMIT:
                # the common case, in line: a small result, no out-of-band buffers
                job = held.pop(seq, None)
                if job is None:
                    continue
                batch = job.batch
                assert batch is not None
                if not job.over:
                    call = job.call
                    call.ran_s = seconds
                    cost = costs.get(job.key)
                    if cost is not None and seconds < SLOW_S:  # CostModel.observe, in line
                        cost.est += ALPHA * (seconds - cost.est)
                    else:
                        self._observe(job, batch, seconds)
                    try:
                        outcome = _loads(body)
                        if outcome[0] == OK:
                            job.end(True, outcome[1])
                        else:
                            fail_future(job, remote_error(outcome), call.state_name)
                    except BaseException:  # it does not unpickle: the error that names it
                        self._settle(job, body, 0)
                batch.left -= 1
                if batch.left == 0:
                    self._batch_over(worker, batch)
            elif kind in (DONE, SKIP):
                self._answered(worker, seq, seconds if kind == DONE else None, body, aux)
            elif kind == READY:
                worker.ready = True
                self._start_failures = 0
                if worker.batches and not worker.batches[0].begun:
                    self._begin(worker.batches[0])
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
            elif kind == BAD:
                self._unloadable(worker, seq, count, body)
            elif kind == BYE:
                worker.leaving = True
        self._pump()

    def _observe(self, job: Job, batch: Batch, seconds: float) -> None:
        self._model.observe(job.key, seconds)
        if seconds >= SLOW_S:
            batch.slow = True

    def _answered(self, worker: Worker, seq: int, seconds: float | None,
                  body: bytes | bytearray, meta_len: int) -> None:
        """A ``SKIP``, or a ``DONE`` whose result is large or has out-of-band buffers (the
        common ``DONE`` is read in :meth:`_on_frames`)."""
        job = worker.jobs.pop(seq, None)
        if job is None or seconds is None or job.over:
            if meta_len:  # nobody wants the result: its file goes
                shm.release(shm.meta_path(body[:meta_len]))
            if job is None:
                return
            batch = job.batch
            if seconds is None and job.stolen and not job.over:  # skipped: it goes to
                self._requeue([job], solo=True)  # another worker
        else:
            batch = job.batch
            assert batch is not None
            job.call.ran_s = seconds
            self._observe(job, batch, seconds)
            if len(body) - meta_len <= INLINE_LOADS_LIMIT:
                self._settle(job, body, meta_len)
            else:
                assert self._helper is not None
                self._helper.submit(self._settle_off_loop, job, body, meta_len)
        assert batch is not None
        batch.left -= 1
        if batch.left == 0:
            self._batch_over(worker, batch)

    @staticmethod
    def _load(body: bytes | bytearray, meta_len: int, state_name: str) -> Any:
        """The result (or raise the exception) of a ``DONE`` body (``shm.load_outcome``)."""
        return shm.load_outcome(body, meta_len, state_name)

    def _settle(self, job: Job, body: bytes | bytearray, meta_len: int) -> None:
        try:
            value = self._load(body, meta_len, job.call.state_name)
        except BaseException as exc:  # the call's own exception
            self._fail(job, exc)
        else:
            job.end(True, value)

    def _settle_off_loop(self, job: Job, body: bytes | bytearray, meta_len: int) -> None:
        try:
            value, ok = self._load(body, meta_len, job.call.state_name), True
        except BaseException as exc:
            value, ok = exc, False
        self._threadsafe(self._settled, job, value, ok)

    def _settled(self, job: Job, value: Any, ok: bool) -> None:
        if ok:
            job.end(True, value)
        else:
            fail_future(job, value, job.call.state_name)

    def _batch_over(self, worker: Worker, batch: Batch) -> None:
        batches = worker.batches
        if batches and batches[0] is batch:
            batches.popleft()
        elif batch in batches:
            batches.remove(batch)
        if batch.path is not None:
            shm.release(batch.path)
            batch.path = None
        self._model.batch_done(batch)
        batch.jobs = []  # no cycle with its jobs (job.batch): both go without the collector
        if worker.ready and worker.batches and not worker.batches[0].begun:
            self._begin(worker.batches[0])

    def _unloadable(self, worker: Worker, seq: int, count: int, body: bytes | bytearray) -> None:
        """The worker could not unpickle a batch: alone, the call fails with that error;
        together, each goes again alone."""
        jobs = [job for i in range(count)
                if (job := worker.jobs.pop((seq + i) & 0xFFFFFFFF, None)) is not None]
        if not jobs:
            return
        batch = jobs[0].batch
        assert batch is not None
        if len(batch.jobs) == 1:
            job = jobs[0]
            try:
                loads_outcome(body)
            except SerializationError as exc:  # the worker's own: the parent names the state
                self._fail(job, unloadable(job, exc))
            except BaseException as exc:  # what the unpickling raised, its type kept
                self._fail(job, exc)
        else:
            self._requeue([job for job in jobs if not job.over], solo=True)
        batch.left -= len(jobs)
        if batch.left <= 0:
            self._batch_over(worker, batch)

    def _requeue(self, jobs: list[Job], *, solo: bool) -> None:
        for job in jobs:
            job.batch = job.worker = None
            job.solo = job.solo or solo
            job.stolen = False
        self._pending.extendleft(reversed(jobs))

    @staticmethod
    def _fail(job: Job, exc: BaseException) -> None:
        fail_future(job, exc, job.call.state_name)

    # -- cancel ----------------------------------------------------------------------------

    def _abandon(self, job: Job) -> None:
        """The task awaiting ``job`` was cancelled: skip it, or kill the worker running it."""
        worker = job.worker
        if worker is None or not worker.alive or self._phase is Phase.CLOSED:
            return  # still in line: the pump drops it
        assert self._table is not None
        self._table.cancels[worker.base + job.seq % RING] = 1
        self._kill_when_started(job, worker, job.seq)

    def _kill_when_started(self, job: Job, worker: Worker, seq: int) -> None:
        if worker.jobs.get(seq) is not job or not worker.alive:
            return  # answered (skipped, or finished: the outcome is dropped), or gone
        assert self._table is not None and self._loop is not None
        if self._table.states[worker.base + seq % RING] == RUNNING:
            job.doom = "cancel"
            logger.debug("killing worker %d running state %r (cancelled)", worker.pid,
                         job.call.state_name)
            worker.kill("to stop a cancelled call")
        else:  # it may be about to start: look again
            self._loop.call_later(_START_POLL_S, self._kill_when_started, job, worker, seq)

    # -- stealing ----------------------------------------------------------------------------

    def _watch_for_stealing(self, workers: list[Worker]) -> None:
        """Nothing waits and a worker is idle: look again soon at the batches of fast calls
        that others still run (a function measured fast may have turned slow)."""
        if any(not w.batches for w in workers) and any(
                len(w.batches) > 1 or (w.batches and w.batches[0].left > 1) for w in workers):
            assert self._loop is not None
            self._steal_timer = self._loop.call_later(STEAL_CHECK_S, self._steal)

    def _steal(self) -> None:
        """Ask back the calls not started of a batch that runs far past its estimate (and of
        the batch behind it): the worker skips them, and they go to idle workers one by one."""
        self._steal_timer = None
        workers = self._usable()
        if self._phase is Phase.CLOSED or self._has_head() or not workers:
            return
        table = self._table
        assert table is not None and self._loop is not None
        now = self._loop.time()
        for worker in workers:
            if not worker.batches or not worker.batches[0].begun:
                continue
            first = worker.batches[0]
            if now - first.begun_at < max(STEAL_FACTOR * first.work, STEAL_AFTER_S):
                continue
            waiting = [job for batch in worker.batches for job in batch.jobs
                       if worker.jobs.get(job.seq) is job and not job.over]
            for job in waiting[1:]:  # the first one may be running: it stays
                if not job.stolen:
                    job.stolen = True
                    table.cancels[worker.base + job.seq % RING] = 1
            if len(waiting) > 1:
                logger.debug("process worker %d is slow on its batch: %d call(s) it has not "
                             "started go to other workers", worker.pid, len(waiting) - 1)
        self._watch_for_stealing(workers)

    def _watch(self) -> None:
        """Calls were sent: a subclass that watches the busy workers starts now."""


def unloadable(job: Job, exc: BaseException) -> Exception:
    """The error of a call its worker could not unpickle (``exc``: the worker's), naming it."""
    call = job.call
    error = SerializationError(f"state {call.state_name!r} ({call.func_name}): {exc}")
    error.__cause__ = exc
    return error
