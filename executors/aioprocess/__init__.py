"""``"aioprocess"``: coroutine states in aiomultiprocess children (see docs/aioprocess.md).

``executor`` holds :class:`AioProcessExecutor`; ``worker`` is the parent's side of one child;
``line`` the calls waiting for a free slot; ``child`` runs in the child. This ``__init__`` stays
light: a child imports this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executor import AioProcessExecutor

__all__ = ["AioProcessExecutor"]


def __getattr__(name: str) -> Any:
    if name == "AioProcessExecutor":
        from .executor import AioProcessExecutor

        return AioProcessExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
