"""Scheduling: what tags, limits and priorities cost.

* dispatch with a tag: trivial inline and thread states (as the dispatch suite puts them), all
  holding one tag limited to the pool size, then to more than the batch (the tag's bookkeeping
  alone), against the same states without a tag; repetitions interleaved so that drift hits all
  three. With the limit at the pool size at most that many states are in flight, so each turn of
  the loop starts that many; untagged states go to the pool all at once;
* priority put cost: ``put_states`` of states of mixed priorities (a third each at 0, above and
  below it) onto a manager that does not run, per state, with 10,000 and with 100,000 queued:
  the heap's O(log n) shows as a ratio close to 1 (O(n) would be about 10x). The garbage
  collector is paused while the put is timed: its passes walk every live object, so with it the
  cost per state grows with the heap (100,000 handles), whatever the queue does.
"""

from __future__ import annotations

import gc
import itertools
from typing import Any

from .cases import make_executor
from .harness import Case, Config, Figure, Runner, now, repeat, templates
from .work import anoop, noop

__all__ = ["scheduling_cases"]

_TAG = "pool"


def scheduling_cases(cfg: Config) -> list[Case]:
    cases = []
    for executor in ("inline", "thread"):
        n = cfg.size(20_000 if executor == "inline" else 5_000, 500)
        subject = f"statepool {executor}"
        variants = [f"{subject}, one tag limited to {cfg.workers}",
                    f"{subject}, one tag limited to {n:,} (never full)"]
        figs = [*templates("scheduling", subject, "baseline", None,
                           [("dispatch", "calls/s", True)])]
        for variant in variants:
            figs += templates("scheduling", variant, "statepool", subject,
                              [("dispatch", "calls/s", True)])
        cases.append(Case("scheduling", f"{subject} with tags", figs,
                          _tagged(cfg, executor, n)))
    small, large = cfg.size(10_000, 1_000), cfg.size(100_000, 10_000)
    base = f"statepool put, {small:,} mixed priorities"
    figs = [*templates("scheduling", base, "baseline", None, [("put cost", "us/state", False)]),
            *templates("scheduling", f"statepool put, {large:,} mixed priorities", "statepool",
                       base, [("put cost", "us/state", False)])]
    cases.append(Case("scheduling", "priority put cost", figs, _put_cost(cfg, small, large)))
    return cases


def _states(executor: str, n: int, tags: tuple[str, ...]) -> list[Any]:
    from statepool.engine import State

    fn = anoop if executor == "inline" else noop
    return [State("noop", fn, True, executor=executor, tags=tags) for _ in range(n)]


def _tagged(cfg: Config, executor: str, n: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        from statepool.engine import StateManager

        limits = (None, cfg.workers, n)  # no tag; the pool size; a limit never reached
        reps: dict[int | None, list[float]] = {limit: [] for limit in limits}
        manager = StateManager(executors={executor: make_executor(executor, cfg.workers)})
        async with manager:
            async def once() -> None:
                for limit in limits:
                    if limit is not None:
                        manager.set_limit(_TAG, limit)
                    states = _states(executor, n, () if limit is None else (_TAG,))
                    gc.collect()
                    t0 = now()
                    handles = await manager.put_states(states)
                    await manager.join()
                    reps[limit].append(n / (now() - t0))
                    if any(h.exception() is not None for h in handles):
                        raise RuntimeError(f"scheduling: a {executor} state failed")

            await repeat(cfg, once)
        for fig, limit in zip(figs, limits, strict=True):
            fig.repetitions = reps[limit][cfg.warmup:]
            fig.params = {"calls_per_repetition": n, "limit": limit, "interleaved": True}

    return run


def _put_cost(cfg: Config, small: int, large: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        from statepool.engine import State, StateManager

        reps: dict[int, list[float]] = {small: [], large: []}
        priorities = itertools.cycle((0, 3, -2, 1, 0, -1, 5, 0, -4))

        async def once() -> None:
            for n in (small, large):
                states = [State("queued", anoop, priority=next(priorities)) for _ in range(n)]
                manager = StateManager()  # not running: every state stays queued
                gc.collect()
                gc.disable()  # its passes walk every live object: they grow with the heap
                try:
                    t0 = now()
                    await manager.put_states(states)
                    reps[n].append((now() - t0) / n * 1e6)
                finally:
                    gc.enable()
                assert len(manager._queue) == n
                manager.signal_stopping()
                await manager.process_states()  # cancels them all

        await repeat(cfg, once)
        for fig, n in zip(figs, (small, large), strict=True):
            fig.repetitions = reps[n][cfg.warmup:]
            fig.params = {"queued": n, "priorities": "a third each at 0, above and below",
                          "gc": "paused while timed"}

    return run
