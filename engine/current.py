"""Where ``State.enter_state`` finds the process-wide manager, without importing it.

``engine/manager.py`` imports ``engine/state.py``; so that the state does not import the manager
back, the manager module registers ``StateManager.instance`` here when it is imported (as
``statepool.engine`` always does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .handle import StateHandle

__all__ = ["Runner", "manager", "provide"]


class Runner(Protocol):
    async def _enter_now(self, state: Any) -> StateHandle: ...


_get: Callable[[], Runner] | None = None


def provide(get: Callable[[], Runner]) -> None:
    """Register how the process-wide manager is found (``StateManager.instance``)."""
    global _get
    _get = get


def manager() -> Runner:
    if _get is None:
        raise RuntimeError("statepool.engine.manager is not imported: "
                           "import State from statepool.engine")
    return _get()
