"""The work every benchmark runs, in importable functions (pickled by reference).

Each task comes as a plain function and as a coroutine function, so that every backend runs the
same code: thread and process pools take the plain one, asyncio and aiomultiprocess the other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ablas", "aburn", "anbytes", "anoop", "awhere", "blas", "burn", "calibrate_burn",
           "nbytes", "noop", "task", "where"]


def noop() -> None:
    """The trivial task: dispatch cost only."""
    return None


async def anoop() -> None:
    return None


def burn(n: int) -> int:
    """Pure-Python CPU work that holds the GIL: ``n`` loop turns."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


async def aburn(n: int) -> int:
    return burn(n)


def blas(seed: int, size: int, products: int = 6) -> float:
    """numpy work that runs in BLAS threads: ``products`` ``size x size`` matrix products."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a, b = rng.random((size, size)), rng.random((size, size))
    for _ in range(products):
        a = a @ b
        a /= a.max()
    return float(a[0, 0])


async def ablas(seed: int, size: int, products: int = 6) -> float:
    return blas(seed, size, products)


def nbytes(arr: Any) -> int:
    """Touch an array that was carried to the worker and answer its size (a small result)."""
    return int(arr.nbytes)


async def anbytes(arr: Any) -> int:
    return nbytes(arr)


def where() -> int:
    """The PID of the process that ran the call."""
    return os.getpid()


async def awhere() -> int:
    return os.getpid()


_TASKS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "noop": (noop, anoop),
    "burn": (burn, aburn),
    "blas": (blas, ablas),
    "nbytes": (nbytes, anbytes),
    "where": (where, awhere),
}


def task(name: str, *, coro: bool) -> Callable[..., Any]:
    """The function for task ``name``: its coroutine form when ``coro`` is true."""
    plain, coroutine = _TASKS[name]
    return coroutine if coro else plain


def calibrate_burn(target_s: float, probe: int = 200_000) -> int:
    """Loop turns that make ``burn`` take about ``target_s`` seconds here (best of 3 probes)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        burn(probe)
        best = min(best, time.perf_counter() - t0)
    return max(1_000, int(probe * target_s / best))


# -- the events suite's small pipeline (benchmarks/suite_events.py) -------------------------


def pack_blob(i: int, size: int, marker_dir: str) -> tuple[int, str, bytes]:
    """Stage 1 (a process): make blob ``i``, hash and compress it. Item 5 fails on its first
    attempt (it leaves a marker, the retry passes); item 11 always fails: the timeline shows
    both."""
    import hashlib
    import zlib

    if i == 11:
        raise ValueError(f"blob {i} is corrupt")
    if i == 5:
        marker = os.path.join(marker_dir, "blob-5")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise OSError(f"blob {i}: a transient read error")
    seed = hashlib.sha256(str(i).encode()).digest()
    data = (seed * (size // len(seed) + 1))[: size // 2] + os.urandom(size // 2)
    for _ in range(1 + i % 3):  # uneven work: the bars differ in length
        packed = zlib.compress(data, 6)
    return i, hashlib.sha256(data).hexdigest(), packed


def check_blob(item: tuple[int, str, bytes]) -> tuple[int, int]:
    """Stage 2 (a thread): decompress, check the digest, count the bytes (zlib and hashlib
    release the GIL on large buffers: two threads run side by side)."""
    import hashlib
    import zlib

    i, digest, packed = item
    data = zlib.decompress(packed)
    for _ in range(4):
        ok = hashlib.sha256(data).hexdigest() == digest
    if not ok:
        raise ValueError(f"blob {i}: digest mismatch")
    return i, len(data)
