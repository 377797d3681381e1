"""The seed's usage example, runnable: python examples/quickstart.py"""

import asyncio
import logging
import time

from statepool.engine import State, StateManager


async def database_migration() -> str:
    await asyncio.sleep(0.1)  # async migration logic
    return "migrated"


def file_processing(n: int) -> int:
    return sum(i * i for i in range(n))  # CPU-intensive processing


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manager = StateManager.instance()
    runner = asyncio.create_task(manager.process_states())

    ready = asyncio.Event()
    state1 = State("DB Migration", database_migration, is_blocking=True)
    state2 = State("File Processing", file_processing, is_blocking=True,
                   executor="process", lazy_args=(lambda: 2_000_000,))
    state3 = State("Report", lambda: time.strftime("%H:%M:%S"), event_to_wait=ready)

    h1, h2, h3 = await manager.put_states([state1, state2, state3])
    logging.info("migration: %s", await h1)
    logging.info("processing: %s", await h2)
    ready.set()  # the gate: Report starts only now
    logging.info("report at %s", await h3)
    logging.info("stats: %s", dict(manager.stats()))

    manager.signal_stopping()
    await runner


if __name__ == "__main__":
    asyncio.run(main())
