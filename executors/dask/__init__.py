"""``"dask"``: states on a Dask cluster (see docs/dask.md); needs ``statepool[dask]``.

``executor`` holds :class:`DaskExecutor`; ``scatter`` caches large arguments on the cluster;
``support`` builds what runs on the workers. This ``__init__`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .executor import DaskExecutor

__all__ = ["DaskExecutor"]


def __getattr__(name: str) -> Any:
    if name == "DaskExecutor":
        from .executor import DaskExecutor

        return DaskExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
