"""``"process"``: CPU-bound states in worker processes that loky starts (see docs/process.md).

``executor`` holds :class:`LokyExecutor` and its lifecycle; ``dispatch`` sends calls and reads
outcomes; ``pool`` starts and stops workers; ``batch`` groups fast calls; ``worker`` and ``boot``
run in the worker. This ``__init__`` stays light: a worker imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executor import LokyExecutor

__all__ = ["LokyExecutor"]


def __getattr__(name: str) -> Any:
    if name == "LokyExecutor":
        from .executor import LokyExecutor

        return LokyExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
