"""The two-stage CPU pipeline of issue 12, and each library's version of it.

Stage 1 (``pack``) makes a blob of 64 KB of words from a seed, hashes it (SHA-256) and
zlib-compresses it; stage 2 (``count``) decompresses, verifies the hash and counts the words;
``merge`` adds the counts up. Each variant below is what a user of that library writes, and the
``pipeline`` suite counts its lines (:func:`lines_of`): the ``open_*`` function that makes the
pool and the ``run_*`` function that runs the two stages with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["VARIANTS", "count", "expected", "lines_of", "merge", "pack", "trivial"]

BLOB = 64 * 1024
_WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "ve", "zo")
          for b in ("ra", "de", "fin", "gol", "hu", "ji", "pek", "wu")]


def pack(seed: int) -> bytes:
    """Stage 1: a blob of words from ``seed``, its SHA-256 digest ahead of it, compressed."""
    words = random.Random(seed).choices(_WORDS, k=BLOB // 5)
    blob = " ".join(words).encode()[:BLOB]
    return hashlib.sha256(blob).digest() + zlib.compress(blob, 6)


def count(packed: bytes) -> Counter[bytes]:
    """Stage 2: decompress, verify the digest, count the words."""
    digest, blob = packed[:32], zlib.decompress(packed[32:])
    if hashlib.sha256(blob).digest() != digest:
        raise ValueError("a blob does not match its digest")
    return Counter(blob.split())


def merge(counts: Iterable[Counter[bytes]]) -> Counter[bytes]:
    total: Counter[bytes] = Counter()
    for c in counts:
        total.update(c)
    return total


def expected(n: int) -> int:
    """How many words the pipeline counts over ``n`` blobs (the check of every variant)."""
    return sum(count(pack(seed)).total() for seed in range(n))


def trivial(x: int) -> int:
    """The trivial item of the map-throughput row."""
    return x + 1


# -- the variants (what a user writes; their lines are counted) ---------------------------------


def open_statepool(workers: int) -> Any:
    from statepool.engine import StateManager
    from statepool.executors import LokyExecutor
    return StateManager(executors={"process": LokyExecutor(max_workers=workers)})


async def run_statepool(manager: Any, n: int) -> Counter[bytes]:
    packed = manager.map(pack, range(n), executor="process")
    return merge([c async for c in manager.map(count, packed, executor="process")])


def open_joblib(workers: int) -> Any:
    from joblib import Parallel
    return Parallel(n_jobs=workers)


def run_joblib(parallel: Any, n: int) -> Counter[bytes]:
    from joblib import delayed
    packed = parallel(delayed(pack)(seed) for seed in range(n))
    return merge(parallel(delayed(count)(p) for p in packed))


def open_mpire(workers: int) -> Any:
    from mpire import WorkerPool  # type: ignore[attr-defined]
    return WorkerPool(n_jobs=workers)


def run_mpire(pool: Any, n: int) -> Counter[bytes]:
    packed = pool.map(pack, range(n))
    return merge(pool.map(count, packed))


def open_ppe(workers: int) -> Any:
    from concurrent.futures import ProcessPoolExecutor
    return ProcessPoolExecutor(max_workers=workers)


async def run_ppe(executor: Any, n: int) -> Counter[bytes]:
    loop = asyncio.get_running_loop()
    packed = await asyncio.gather(*[loop.run_in_executor(executor, pack, s) for s in range(n)])
    counts = await asyncio.gather(*[loop.run_in_executor(executor, count, p) for p in packed])
    return merge(counts)


#: row label -> (open, run)
VARIANTS: dict[str, tuple[Callable[[int], Any], Callable[..., Any]]] = {
    "statepool map": (open_statepool, run_statepool),
    "joblib.Parallel": (open_joblib, run_joblib),
    "mpire WorkerPool.map": (open_mpire, run_mpire),
    "ProcessPoolExecutor + run_in_executor": (open_ppe, run_ppe),
}


def lines_of(*functions: Callable[..., Any]) -> int:
    """Lines of code of ``functions`` (their ``def`` lines included; blank and comment lines
    and docstrings not)."""
    total = 0
    for fn in functions:
        lines = inspect.getsource(fn).splitlines()
        doc = fn.__doc__ or ""
        in_doc = False
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if doc and (text.startswith('"""') or in_doc):
                in_doc = not (text.endswith('"""') and (len(text) > 3 or in_doc))
                continue
            total += 1
    return total
