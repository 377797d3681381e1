"""Executors: where a state's work runs. One backend per module, found by name.

``inline`` and ``thread`` are imported here; ``LokyExecutor``, ``AioProcessExecutor`` and
``DaskExecutor`` are imported on first access, so that ``import executors`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Executor, PreparedCall
from .inline import InlineExecutor
from .registry import ENTRY_POINT_GROUP, create, known_names, register
from .thread import ThreadExecutor

if TYPE_CHECKING:
    from .aioprocess import AioProcessExecutor
    from .dask import DaskExecutor
    from .loky import LokyExecutor

__all__ = [
    "ENTRY_POINT_GROUP",
    "AioProcessExecutor",
    "DaskExecutor",
    "Executor",
    "InlineExecutor",
    "LokyExecutor",
    "PreparedCall",
    "ThreadExecutor",
    "create",
    "known_names",
    "register",
]

_LAZY = {"LokyExecutor": "process", "AioProcessExecutor": "aioprocess", "DaskExecutor": "dask"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .registry import builtin_class

        return builtin_class(_LAZY[name])
    raise AttributeError(f"module 'executors' has no attribute {name!r}")
