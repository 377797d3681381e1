"""Backends found by name: the built-in ones, ``register()`` and the entry-point group.

Built-in backends are imported only when first used, so that importing statepool does not import
loky, aiomultiprocess or distributed. Other packages add backends through the entry-point group
``statepool.executors`` (the entry point loads a factory: a class or function taking no argument).
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from .base import Executor

__all__ = ["ENTRY_POINT_GROUP", "create", "known_names", "register"]

ENTRY_POINT_GROUP = "statepool.executors"
logger = logging.getLogger(__name__)

ExecutorFactory = Callable[[], Executor]

# name -> "module:attribute" of a built-in backend; the extra to install when its import fails
_BUILTINS: dict[str, tuple[str, str | None]] = {
    "inline": ("statepool.executors.inline:InlineExecutor", None),
    "thread": ("statepool.executors.thread:ThreadExecutor", None),
    "process": ("statepool.executors.process.executor:LokyExecutor", None),
    "aioprocess": ("statepool.executors.aioprocess.executor:AioProcessExecutor", None),
    "dask": ("statepool.executors.dask.executor:DaskExecutor", "dask"),
}
_registered: dict[str, ExecutorFactory] = {}
_lock = threading.Lock()
_entry_points_loaded = False


def register(name: str, factory: ExecutorFactory) -> None:
    """Make ``executor=name`` build its executor with ``factory()`` (replaces an earlier one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"executor name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"executor factory for {name!r} must be callable, got {factory!r}")
    with _lock:
        _registered[name] = factory


def entry_points(group: str) -> list[Any]:
    """The installed entry points of ``group`` (imported here: importlib.metadata is slow)."""
    from importlib.metadata import entry_points as _entry_points

    return list(_entry_points(group=group))


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):  # imports importlib.metadata lazily
            if ep.name not in _registered and ep.name not in _BUILTINS:
                _registered[ep.name] = _LazyEntryPoint(ep.name, ep.value)


class _LazyEntryPoint:
    """A factory that loads its entry point on first call."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value

    def __call__(self) -> Executor:
        factory: ExecutorFactory = _import(self.value)
        return factory()


def _import(target: str) -> ExecutorFactory:
    module, _, attr = target.partition(":")
    obj: ExecutorFactory = getattr(importlib.import_module(module), attr)
    return obj


def known_names() -> list[str]:
    """Every executor name that ``create()`` accepts, sorted."""
    _load_entry_points()
    return sorted({*_BUILTINS, *_registered})


def is_known(name: str) -> bool:
    if name in _BUILTINS or name in _registered:
        return True
    _load_entry_points()
    return name in _registered


def builtin_class(name: str) -> ExecutorFactory:
    """Import a built-in backend's class, answering a missing extra with its pip line."""
    target, extra = _BUILTINS[name]
    try:
        return _import(target)
    except ImportError as exc:
        if extra is None:
            raise
        raise ImportError(
            f"executor {name!r} needs the {extra!r} extra: pip install 'statepool[{extra}]'"
        ) from exc


def create(name: str) -> Executor:
    """Build a new executor for ``name``; an unknown name lists the known ones."""
    factory = _registered.get(name)
    if factory is None and name in _BUILTINS:
        factory = builtin_class(name)
    if factory is None:
        _load_entry_points()
        factory = _registered.get(name)
    if factory is None:
        raise ValueError(
            f"unknown executor {name!r}; known executors: {', '.join(known_names())}"
        )
    executor = factory()
    if not isinstance(executor, Executor):
        raise TypeError(f"executor factory for {name!r} returned {executor!r}, not an Executor")
    return executor
