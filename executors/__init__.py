"""Executors: where a state's work runs (installed as ``statepool.executors``).

One module per single-file backend (``inline``, ``thread``), one folder per backend of several
modules (``process``, ``aioprocess``, ``dask``), ``_wire`` for what the process backends share.
Every name but the interface is imported on first access, so that a worker process importing a
backend's worker module pays only for what it serves with.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import Executor, PreparedCall, Submitted

if TYPE_CHECKING:
    from .aioprocess import AioProcessExecutor
    from .dask import DaskExecutor
    from .inline import InlineExecutor
    from .process import LokyExecutor
    from .registry import ENTRY_POINT_GROUP, create, known_names, register
    from .thread import ThreadExecutor

__all__ = [
    "ENTRY_POINT_GROUP",
    "AioProcessExecutor",
    "DaskExecutor",
    "Executor",
    "InlineExecutor",
    "LokyExecutor",
    "PreparedCall",
    "Submitted",
    "ThreadExecutor",
    "create",
    "known_names",
    "register",
]

_BACKENDS = {"LokyExecutor": "process", "AioProcessExecutor": "aioprocess",
             "DaskExecutor": "dask", "InlineExecutor": "inline", "ThreadExecutor": "thread"}
_REGISTRY = {"ENTRY_POINT_GROUP", "create", "known_names", "register"}


def __getattr__(name: str) -> Any:
    if name in _BACKENDS:
        from .registry import builtin_class

        return builtin_class(_BACKENDS[name])
    if name in _REGISTRY:
        return getattr(importlib.import_module(f"{__name__}.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
