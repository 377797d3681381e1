"""A rate-limited pipeline: python examples/rate_limited.py

A service takes two calls at a time ("api": 2); its calls fail now and then and are retried with
backoff; urgent items go first among those waiting for the service; the parse stage receives
each fetch's result through its handle and waits, without holding the queue, until it is there.
"""

import asyncio
import logging

from statepool.engine import Retry, State, StateManager

failed: set[int] = set()


def fetch(item: int) -> bytes:  # a flaky call to a service that allows two at a time
    if item % 3 == 0 and item not in failed:
        failed.add(item)
        raise ConnectionError(f"item {item}: try again")
    return bytes(item)


def parse(data: bytes) -> int:
    return len(data)


async def main() -> int:
    async with StateManager(limits={"api": 2}) as manager:
        fetched = [await manager.put_state(State(
            f"fetch {i}", fetch, True, executor="thread", args=(i,), tags=("api",),
            retries=Retry(5, delay=0.05, backoff=2.0, jitter=0.1, on=ConnectionError),
            priority=1 if i % 4 == 0 else 0))  # urgent: first among those waiting for "api"
            for i in range(10)]
        parsed = [await manager.put_state(State(f"parse {i}", parse, args=(h,)))
                  for i, h in enumerate(fetched)]  # each gets its fetch's result
        total = sum([await h for h in parsed])
        logging.getLogger("example").info("total %d, by tag %s", total,
                                          manager.stats()["by_tag"])
        return total


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main())
