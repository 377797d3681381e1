"""Functions the log relay tests run in workers (importable, so workers load them by name)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

log = logging.getLogger("user.work")


def chatty(n: int) -> int:
    log.debug("debug %d", n)
    log.info("info %d", n)
    log.warning("warning %d", n, extra={"color": "red"})
    try:
        raise KeyError(n)
    except KeyError:
        log.exception("failed on %d", n)
    return n


def from_a_thread() -> int:
    thread = threading.Thread(target=lambda: log.warning("from a thread"))
    thread.start()
    thread.join()
    return 1


def last_words(code: int = 3) -> None:
    for i in range(50):
        log.warning("last words %d", i)
    os._exit(code)


async def achatty(n: int) -> int:
    await asyncio.sleep(0)
    log.info("async info %d", n)
    log.debug("async debug %d", n)
    return n


async def alast_words(code: int = 3) -> None:
    await asyncio.sleep(0)
    for i in range(50):
        log.warning("last words %d", i)
    os._exit(code)


def busy(seconds: float) -> int:
    """Pure-Python work for ``seconds``: a stall with a Python stack to show."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += sum(range(100))
    return n


async def abusy(seconds: float) -> int:
    return busy(seconds)
