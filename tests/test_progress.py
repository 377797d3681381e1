"""``statepool.engine.progress``: the rich bar over a manager's events and over a ``map``,
rendered into a recording console; shown only on a terminal unless asked."""

from __future__ import annotations

import asyncio
import io

import pytest

from statepool.engine import State, StateManager, progress

rich_console = pytest.importorskip("rich.console")


def recording(terminal: bool = True) -> rich_console.Console:
    return rich_console.Console(file=io.StringIO(), force_terminal=terminal, width=140,
                                record=True, color_system=None)


async def aok(x: int) -> int:
    await asyncio.sleep(0.001)
    return x


async def abad(x: int) -> int:
    await asyncio.sleep(0.001)
    raise ValueError(x)


async def test_the_bar_counts_a_managers_states() -> None:
    console = recording()
    async with StateManager() as m:
        with progress.bar(m, "demo", console=console, refresh=0.01) as bar:
            await m.put_states([State(f"ok{i}", aok, True, args=(i,)) for i in range(8)]
                               + [State(f"bad{i}", abad, True, args=(i,)) for i in range(2)])
            await m.join()
            await asyncio.sleep(0.05)  # a redraw on the timer
        assert (bar.done, bar.failed, bar.running, bar.total) == (8, 2, 0, 10)
    text = console.export_text()
    assert "demo" in text and "10/10" in text
    assert "8 done" in text and "2 failed" in text and "0 running" in text
    assert "/s" in text and "ETA" in text


async def test_the_bar_is_quiet_off_a_terminal_unless_asked() -> None:
    quiet, asked = recording(terminal=False), recording(terminal=False)
    async with StateManager() as m:
        with progress.bar(m, console=quiet):
            await (await m.put_state(State("a", aok, args=(1,))))
        with progress.bar(m, console=asked, show=True):
            await (await m.put_state(State("b", aok, args=(1,))))
    assert quiet.export_text() == ""
    assert "1/1" in asked.export_text()


async def test_map_progress_counts_items_and_failures() -> None:
    console = recording()
    async with StateManager() as m:
        got = [r async for r in m.map(
            aok, range(30), progress={"console": console, "refresh": 0.01})]
        assert got == list(range(30))
        results = [r async for r in progress.track(
            m.map(abad, range(3), return_exceptions=True), total=3, console=console,
            description="bad ones", show=True)]
    assert all(isinstance(r, ValueError) for r in results)
    text = console.export_text()
    assert "aok" in text and "30/30" in text and "30 done" in text
    assert "bad ones" in text and "3 failed" in text
