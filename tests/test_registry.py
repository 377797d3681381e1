"""The executor registry and the public exports."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

import statepool.engine as engine
import statepool.executors as executors
from statepool.engine import State, StateManager
from statepool.executors import Executor, InlineExecutor, PreparedCall, registry


class Doubling(Executor):
    name = "doubling"

    async def run(self, call: PreparedCall) -> Any:
        call.started()
        return 2 * call()

    async def shutdown(self, *, cancel: bool) -> None:
        self.closed = True


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ValueError) as info:
        registry.create("warp-drive")
    for name in ("inline", "thread", "process", "aioprocess", "dask"):
        assert name in str(info.value)


async def test_register_a_backend_and_use_it_by_name() -> None:
    registry.register("doubling", Doubling)
    try:
        assert "doubling" in registry.known_names()
        async with StateManager() as m:
            handle = await m.put_state(State("d", lambda: 21, executor="doubling"))
            assert await handle == 42
            assert m.stats()["by_executor"] == {"doubling": 1}
    finally:
        registry._registered.pop("doubling", None)


def test_register_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        registry.register("", Doubling)
    with pytest.raises(TypeError):
        registry.register("x", 42)  # type: ignore[arg-type]


def test_factory_must_build_an_executor() -> None:
    registry.register("liar", lambda: object())  # type: ignore[arg-type,return-value]
    try:
        with pytest.raises(TypeError, match="not an Executor"):
            registry.create("liar")
    finally:
        registry._registered.pop("liar", None)


def test_entry_point_group_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEP:
        name = "from-plugin"
        value = "statepool.executors.inline:InlineExecutor"

    def fake_entry_points(group: str) -> list[FakeEP]:
        assert group == "statepool.executors"
        return [FakeEP()]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "from-plugin" in registry.known_names()
        assert isinstance(registry.create("from-plugin"), InlineExecutor)
    finally:
        registry._registered.pop("from-plugin", None)


def test_missing_extra_names_the_pip_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_import(name: str, *args: Any, **kwargs: Any) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(registry.importlib, "import_module", broken_import)
    with pytest.raises(ImportError, match=r"pip install 'statepool\[dask\]'"):
        registry.create("dask")


@pytest.mark.parametrize("module", ["statepool.engine", "statepool.executors"])
def test_all_names_are_exported(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert getattr(mod, name) is not None


def test_error_tree() -> None:
    from statepool.engine import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.EngineError)
    assert issubclass(errors.StateTimeoutError, TimeoutError)
    assert engine.EngineError is errors.EngineError
    assert executors.Executor is Executor
