"""statepool's side of every suite: one ``Backend`` per executor, driven by the public API only.

A row whose executor is missing, or answers ``ImportError``, ``NotImplementedError`` or
``AttributeError`` while it is built or started, is skipped with the reason shown in the table
("executor not available: ..."), so that the suite runs at every stage of the project.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .baselines import Args, Backend, dask_tcp, has_dask, quiet_dask
from .harness import NotAvailable

__all__ = [
    "BASELINE_OF",
    "EXECUTORS",
    "GATHER_ROW",
    "UNAVAILABLE",
    "StatepoolBackend",
    "rows",
    "statepool_factories",
]

EXECUTORS = ("inline", "thread", "process", "aioprocess", "dask")
UNAVAILABLE = (ImportError, NotImplementedError, AttributeError)
_CLASSES = {
    "inline": "InlineExecutor",
    "thread": "ThreadExecutor",
    "process": "LokyExecutor",
    "aioprocess": "AioProcessExecutor",
    "dask": "DaskExecutor",
}


def make_executor(name: str, workers: int) -> Any:
    """A fresh executor instance for ``name`` with ``workers`` slots (public classes only)."""
    import statepool.executors as executors

    cls = getattr(executors, _CLASSES[name])
    if name == "inline":
        return cls()
    if name == "dask":
        quiet_dask()
        # the baseline's cluster has the same security (baselines.dask_security)
        tcp = {"cluster_kwargs": {"security": None}} if dask_tcp() else {}
        return cls(n_workers=workers, threads_per_worker=1, **tcp)
    if name == "aioprocess":
        return cls(processes=workers)
    return cls(max_workers=workers)


def _const(value: Any) -> Callable[[], Any]:
    """A lazy argument: resolved on the loop just before the state runs."""
    return lambda: value


class StatepoolBackend(Backend):
    """A ``StateManager`` owning one executor; every call is a ``State`` put on its queue.

    A batch is awaited through ``manager.join()``, or with ``awaits="gather"`` through
    ``asyncio.gather(*handles)`` (the line most users write: handles are asyncio futures)."""

    kind = "statepool"

    def __init__(self, workers: int, executor: str, awaits: str = "join") -> None:
        super().__init__(workers)
        self.executor = executor
        self.awaits = awaits
        self.label = f"statepool {executor}" + (" gather(*handles)" if awaits == "gather" else "")
        self.coro = executor in ("inline", "aioprocess")
        self.remote = executor in ("process", "aioprocess", "dask")
        self._manager: Any = None

    async def open(self) -> None:
        try:
            from statepool.engine import State, StateManager

            self._State = State
            manager = StateManager(executors={self.executor: make_executor(
                self.executor, self.workers)})
            self._manager = await manager.__aenter__()
        except UNAVAILABLE as exc:
            raise NotAvailable(
                f"executor not available: {type(exc).__name__}: {exc}") from exc

    def state(self, name: str, args: Args, lazy: bool) -> Any:
        fn = self.fn(name)
        if lazy:
            return self._State(name, fn, True, lazy_args=[_const(a) for a in args],
                               executor=self.executor)
        return self._State(name, fn, True, args=args, executor=self.executor)

    async def gather(self, name: str, args: list[Args], *, lazy: bool = False) -> list[Any]:
        manager = self._manager
        try:
            handles = await manager.put_states([self.state(name, a, lazy) for a in args])
            if self.awaits == "gather":
                return list(await asyncio.gather(*handles))
            await manager.join()
        except UNAVAILABLE as exc:
            raise NotAvailable(
                f"executor not available: {type(exc).__name__}: {exc}") from exc
        return [h.result() for h in handles]

    async def call(self, name: str, *args: Any, lazy: bool = False) -> Any:
        try:
            handle = await self._manager.put_state(self.state(name, args, lazy))
            return await handle
        except UNAVAILABLE as exc:
            raise NotAvailable(
                f"executor not available: {type(exc).__name__}: {exc}") from exc

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            await manager.__aexit__(et, e, tb)


GATHER_ROW = "statepool inline gather(*handles)"


def statepool_factories(names: tuple[str, ...] = EXECUTORS, *, gather_row: bool = False,
                        ) -> dict[str, Callable[[int], Backend]]:
    """statepool rows by label; dask only when ``distributed`` is importable; with
    ``gather_row``, inline states awaited through ``asyncio.gather(*handles)`` too."""
    out: dict[str, Callable[[int], Backend]] = {}
    for name in names:
        if name == "dask" and not has_dask():
            continue
        out[f"statepool {name}"] = lambda w, name=name: StatepoolBackend(w, name)  # type: ignore[misc]
        if name == "inline" and gather_row:
            out[GATHER_ROW] = lambda w: StatepoolBackend(w, "inline", "gather")
    return out


# The baseline each statepool row is compared with (its ratio): the library it stands for.
BASELINE_OF = {
    "statepool inline": "asyncio gather(create_task)",
    GATHER_ROW: "asyncio gather(create_task)",
    "statepool thread": "ThreadPoolExecutor",
    "statepool process": "loky (direct)",
    "statepool aioprocess": "aiomultiprocess apply",
    "statepool dask": "dask Client.submit",
}

Row = tuple[str, Callable[[int], Backend], str, "str | None"]


def rows(baselines: tuple[str, ...], executors: tuple[str, ...], *,
         gather_row: bool = False) -> list[Row]:
    """``(label, factory, kind, baseline label)``: first the baselines that no statepool row is
    compared with, then each compared baseline followed at once by its statepool row.

    A statepool row runs right after its baseline so that the two share the machine's state as
    far as possible (other processes' load drifts over minutes). Rows that need
    ``distributed`` are left out when it is not importable.
    """
    from .baselines import baseline_factories

    found = baseline_factories()
    mine = statepool_factories(executors, gather_row=gather_row)
    paired = {BASELINE_OF[label] for label in mine}
    out: list[Row] = [(label, found[label], "baseline", None)
                      for label in baselines if label in found and label not in paired]
    for label, factory in mine.items():
        base = BASELINE_OF[label]
        if base in baselines and base in found and label != GATHER_ROW:
            out.append((base, found[base], "baseline", None))
        out.append((label, factory, "statepool", base))
    return out
