"""A soak: mixed states on every executor but Dask, under random cancels, timeouts, crashes and
external kills, with the parent's RSS, descriptors and threads sampled every ``--every`` seconds.
Not part of the benchmark suites, nor of pytest (it runs for minutes):

    python -m benchmarks.soak --minutes 30 --out soak.jsonl

Every sample is a JSON line; the summary at the end gives, per metric, the first and last
sample after warm-up, the maximum and the least-squares slope per hour over the second half
(what "must not trend up" is judged on), and checks that every state put ended in exactly one
terminal status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any

import psutil

from statepool.engine import State, StateHandle, StateManager, StateStatus
from statepool.executors import AioProcessExecutor, LokyExecutor, ThreadExecutor
from statepool.executors.base import Executor

__all__ = ["main"]

IN_FLIGHT = 24  # states kept running at once


# -- what the states do (module level: workers import them by reference) ---------------------


def quick(x: int) -> int:
    return x * 2


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def burn(n: int) -> int:
    return sum(i * i for i in range(n))


def fail(message: str) -> None:
    raise ValueError(message)


def base_exception(kind: str) -> None:
    raise {"exit": SystemExit, "generator": GeneratorExit, "stop": StopIteration}[kind](kind)


def crash(code: int) -> None:
    os._exit(code)


def big(n: int) -> bytes:
    return b"x" * n


async def aquick(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


async def aslow(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


async def afail(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


async def acrash(code: int) -> None:
    os._exit(code)


async def abase(kind: str) -> None:
    base_exception(kind)


def _unpicklable() -> Any:
    return threading.Lock()


# -- the mix -----------------------------------------------------------------------------------


def make_state(rng: random.Random, i: int) -> State:
    executor = rng.choice(["inline", "thread", "process", "aioprocess"])
    roll = rng.random()
    name = f"s{i}"
    opts: dict[str, Any] = {}
    if rng.random() < 0.15:
        opts["timeout"] = rng.choice([0.05, 0.5, 5.0])
    if rng.random() < 0.1:
        opts["retries"] = 1
    if executor == "inline":
        fn: Any = aquick if roll < 0.6 else aslow if roll < 0.85 else afail
        arg: Any = i if fn is aquick else rng.uniform(0.0, 0.2) if fn is aslow else name
        return State(name, fn, fn is aslow, args=(arg,), executor="inline", **opts)
    if executor == "aioprocess":
        if roll < 0.5:
            return State(name, aquick, True, args=(i,), executor=executor, **opts)
        if roll < 0.8:
            return State(name, aslow, True, args=(rng.uniform(0.0, 0.3),), executor=executor,
                         **opts)
        if roll < 0.9:
            return State(name, afail, True, args=(name,), executor=executor, **opts)
        if roll < 0.95:
            return State(name, abase, True, args=(rng.choice(["exit", "stop"]),),
                         executor=executor, **opts)
        return State(name, acrash, True, args=(3,), executor=executor, **opts)
    choices: list[tuple[float, Any, tuple[Any, ...]]] = [
        (0.45, quick, (i,)), (0.65, slow, (rng.uniform(0.0, 0.3),)),
        (0.8, burn, (rng.randint(1_000, 200_000),)), (0.88, fail, (name,)),
        (0.93, base_exception, (rng.choice(["exit", "generator", "stop"]),)),
        (0.96, big, (rng.choice([10, 100_000, 3_000_000]),)),
    ]
    if executor == "process":
        choices.append((0.985, crash, (rng.choice([1, 3]),)))
        choices.append((1.0, _unpicklable, ()))
    else:
        choices.append((1.0, quick, (i,)))
    for limit, fn, args in choices:
        if roll < limit:
            return State(name, fn, True, args=args, executor=executor, **opts)
    return State(name, quick, True, args=(i,), executor=executor, **opts)


# -- sampling ----------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (>= 2.33)
        return None


_LIBC = _libc()
_THREADS_STARTED = [0]  # threads started in this process since the soak began


def _count_thread_starts() -> None:
    real = threading.Thread.start

    def start(self: threading.Thread) -> None:
        _THREADS_STARTED[0] += 1
        real(self)

    threading.Thread.start = start  # type: ignore[method-assign]


def malloc_stats() -> dict[str, float]:
    """glibc's heap (all arenas): bytes in use, free but kept, and mmapped (MiB)."""
    if _LIBC is None:
        return {}
    info = _LIBC.mallinfo2()
    mib = 2**20
    return {"heap_mib": round(info.arena / mib, 2), "in_use_mib": round(info.uordblks / mib, 2),
            "free_kept_mib": round(info.fordblks / mib, 2),
            "mmapped_mib": round(info.hblkhd / mib, 2)}


def sample(started: float, counts: Counter[str], kills: int, cancels: int) -> dict[str, Any]:
    me = psutil.Process()
    return {
        "t": round(time.monotonic() - started, 1),
        "rss_mib": round(me.memory_info().rss / 2**20, 2),
        "fds": me.num_fds(),
        "threads": threading.active_count(),
        "threads_started": _THREADS_STARTED[0],
        "children": len(me.children(recursive=True)),
        **malloc_stats(),
        "ended": dict(counts),
        "external_kills": kills,
        "cancels": cancels,
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if not var:
        return 0.0
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600.0


def summary(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    after = [s for s in samples if s["t"] >= warmup] or samples
    half = after[len(after) // 2:]
    out: dict[str, Any] = {}
    for key in ("rss_mib", "fds", "threads", "threads_started", "children", "heap_mib",
                "in_use_mib", "free_kept_mib", "mmapped_mib"):
        if key not in after[0]:
            continue
        out[key] = {
            "first": after[0][key], "last": after[-1][key],
            "max": max(s[key] for s in after),
            "slope_per_hour_2nd_half": round(slope_per_hour([(s["t"], s[key]) for s in half]), 3),
        }
    return out


# -- the run -----------------------------------------------------------------------------------


async def soak(minutes: float, every: float, out: str | None, seed: int,
               trim: bool = False) -> int:
    """``trim``: ``malloc_trim(0)`` before each sample (is a growth memory that glibc keeps?)"""
    rng = random.Random(seed)
    _count_thread_starts()
    executors: dict[str, Executor] = {
        "thread": ThreadExecutor(4), "process": LokyExecutor(2),
        "aioprocess": AioProcessExecutor(2, 4),
    }
    process, aio = executors["process"], executors["aioprocess"]
    counts: Counter[str] = Counter()
    live: set[StateHandle] = set()
    samples: list[dict[str, Any]] = []
    kills = cancels = put = 0
    started = time.monotonic()
    end = started + minutes * 60.0
    sink = open(out, "w") if out else None  # noqa: SIM115 - closed below
    try:
        async with StateManager(executors=executors, shutdown_grace=1.0) as m:
            next_sample = started
            next_kill = started + 5.0
            while time.monotonic() < end:
                for handle in [h for h in live if h.done()]:
                    live.discard(handle)
                    counts[handle.status.name] += 1
                while len(live) < IN_FLIGHT:
                    live.add(await m.put_state(make_state(rng, put)))
                    put += 1
                if rng.random() < 0.05 and live:
                    victim = rng.choice(sorted(live, key=id))
                    if victim.cancel():
                        cancels += 1
                now = time.monotonic()
                if now >= next_kill:  # an external SIGKILL of a random worker
                    pids = process.worker_pids() + aio.worker_pids()
                    if pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(rng.choice(pids), signal.SIGKILL)
                            kills += 1
                    next_kill = now + rng.uniform(3.0, 8.0)
                if now >= next_sample:
                    if trim and _LIBC is not None:
                        _LIBC.malloc_trim(0)
                    row = sample(started, counts, kills, cancels)
                    samples.append(row)
                    if sink is not None:
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                    print(json.dumps(row), flush=True)
                    next_sample = now + every
                await asyncio.sleep(0.01)
            await asyncio.wait_for(m.join(), 120)
        for handle in live:
            counts[handle.status.name] += 1
    finally:
        if sink is not None:
            sink.close()
    stuck = [h for h in live if not h.done()]
    result = {
        "minutes": minutes, "states": put, "ended": dict(counts), "not_terminal": len(stuck),
        "external_kills": kills, "cancels": cancels,
        "metrics": summary(samples, warmup=min(60.0, minutes * 60.0 / 4)),
    }
    print(json.dumps(result, indent=2))
    total = sum(counts.values())
    return 0 if not stuck and total == put and all(
        k in {s.name for s in StateStatus if s.terminal} for k in counts) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--out", default=None, help="JSON lines file of the samples")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--trim", action="store_true",
                        help="malloc_trim(0) before each sample (glibc): memory it kept free")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # thousands of expected failures
    return asyncio.run(soak(args.minutes, args.every, args.out, args.seed, args.trim))


if __name__ == "__main__":
    sys.exit(main())
