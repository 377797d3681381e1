"""Events: what watching a run costs, and a picture of one.

* events: inline dispatch (the trivial state, as in the dispatch suite) with nobody listening,
  with one listener, with one ``manager.events()`` reader, and with a progress bar drawn into
  /dev/null as on a terminal; repetitions interleaved so that drift hits all four alike. The
  issue's bar: no subscriber costs nothing measurable, one subscriber at most 10%.
* a small two-stage pipeline (hash and compress blobs on processes, check them on threads,
  merge on the loop; one item fails once and is retried, one fails for good), recorded with
  ``trace.record``: with ``--plot DIR`` its Perfetto trace (``pipeline_trace.json``) and its
  timeline (``pipeline_timeline.png``) are written beside the other charts.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from typing import Any

from .cases import StatepoolBackend, make_executor
from .harness import Case, Config, Figure, Runner, mode_templates, now, repeat, templates

__all__ = ["TIMELINES", "events_cases", "write_timelines"]

_MODES = ("no subscriber", "one listener", "one events() reader", "a progress bar")
#: (file stem, events) of the pipelines this run recorded, for write_timelines
TIMELINES: list[tuple[str, list[Any]]] = []


def events_cases(cfg: Config) -> list[Case]:
    n = cfg.size(20_000, 1_000)
    subject = "statepool inline"
    figs = mode_templates("events", subject, _MODES)
    pipeline = templates("events", "a small pipeline, recorded", "statepool", None,
                         [("wall time", "s", False)])
    return [Case("events", subject, figs, _overhead(cfg, n)),
            Case("events", "pipeline timeline", pipeline, _pipeline(cfg))]


class _Watch:
    """One mode's subscriber on a manager; ``stop()`` removes it."""

    def __init__(self, manager: Any, mode: str) -> None:
        self.manager = manager
        self.mode = mode
        self.count = 0
        self.remove: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.bar: Any = None
        self.sink: Any = None

    def _count(self, event: Any) -> None:
        self.count += 1

    async def start(self) -> None:
        if self.mode == _MODES[1]:
            self.remove = self.manager.add_listener(self._count)
        elif self.mode == _MODES[2]:
            stream = self.manager.events()

            async def read() -> None:
                async for _ in stream:
                    self.count += 1

            self.stream = stream
            self.reader = asyncio.ensure_future(read())
        elif self.mode == _MODES[3]:
            from rich.console import Console

            from statepool.engine import progress

            self.sink = open(os.devnull, "w")  # noqa: SIM115 - closed by stop()
            console = Console(file=self.sink, force_terminal=True, width=120)
            self.bar = progress.Bar("bench", console=console, show=True).start()
            self.remove = self.manager.add_listener(self.bar.on_event)

    async def drain(self) -> None:
        """The reader has read every event (its cost is part of the figure)."""
        if self.reader is not None:
            while self.stream.pending():
                await asyncio.sleep(0)

    async def stop(self) -> None:
        if self.remove is not None:
            self.remove()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.wait([self.reader])
            await self.stream.aclose()
        if self.bar is not None:
            self.bar.stop()
            self.sink.close()


def _overhead(cfg: Config, n: int) -> Runner:
    async def run(figs: list[Figure]) -> None:
        args: list[tuple[()]] = [()] * n
        reps: dict[str, list[float]] = {mode: [] for mode in _MODES}
        backend = StatepoolBackend(cfg.workers, "inline")
        async with backend:
            manager = backend._manager

            async def once() -> None:
                for mode in _MODES:
                    watch = _Watch(manager, mode)
                    await watch.start()
                    gc.collect()
                    t0 = now()
                    await backend.gather("noop", args)
                    await watch.drain()
                    reps[mode].append(n / (now() - t0))
                    await watch.stop()

            await repeat(cfg, once)
        for fig, mode in zip(figs, _MODES, strict=True):
            fig.repetitions = reps[mode][cfg.warmup:]
            fig.params = {"calls_per_repetition": n, "interleaved": True}

    return run


def _pipeline(cfg: Config) -> Runner:
    async def run(figs: list[Figure]) -> None:
        from statepool.engine import State, StateManager, trace

        from . import work

        items = cfg.size(48, 12)
        size = cfg.size(1 << 20, 1 << 17)
        workers = max(2, min(cfg.workers, 4))
        engine_log = logging.getLogger("statepool.engine")
        level = engine_log.level
        engine_log.setLevel(logging.CRITICAL)  # the two failures are on purpose: no traceback
        try:
            async with StateManager(executors={"process": make_executor("process", workers),
                                               "thread": make_executor("thread", 2)}) as m:
                await (await m.put_state(State("warm-up", work.noop, True,
                                               executor="process")))

                async def once() -> float:
                    with tempfile.TemporaryDirectory(prefix="statepool-bench-") as marks:
                        t0 = now()
                        with trace.record(m) as rec:
                            packed = await _stage1(m, work, items, size, marks)
                            checks = await m.put_states(
                                [State(f"check {p[0]}", work.check_blob, True, args=(p,),
                                       executor="thread") for p in packed])
                            counted = await asyncio.gather(*checks)

                            async def merge() -> int:
                                return sum(c for _, c in counted)

                            assert await (await m.put_state(State("merge", merge))) > 0
                        wall = now() - t0
                    TIMELINES[:] = [("pipeline", rec.events)]  # the last run's
                    return wall

                walls = await repeat(cfg, once)
        finally:
            engine_log.setLevel(level)
        figs[0].repetitions = walls
        figs[0].params = {"items": items, "blob_bytes": size, "process_workers": workers,
                          "events": len(TIMELINES[0][1])}

    return run


async def _stage1(m: Any, work: Any, items: int, size: int, marks: str) -> list[Any]:
    from statepool.engine import State

    handles = await m.put_states(
        [State(f"pack {i}", work.pack_blob, True, args=(i, size, marks), executor="process",
               retries=1) for i in range(items)])
    done = await asyncio.gather(*handles, return_exceptions=True)
    return [r for r in done if not isinstance(r, BaseException)]


def write_timelines(out_dir: str) -> list[str]:
    """The recorded pipelines' Perfetto traces and timeline PNGs, into ``out_dir``."""
    from statepool.engine import trace

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, events in TIMELINES:
        path = os.path.join(out_dir, f"{stem}_trace.json")
        trace.write_chrome_trace(events, path)
        written.append(path)
        path = os.path.join(out_dir, f"{stem}_timeline.png")
        trace.plot_timeline(events, path, title="a small pipeline: pack blobs on processes, "
                            "check them on threads, merge on the loop")
        written.append(path)
    return written
