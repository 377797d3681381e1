"""statepool's engine: states, their handles and the manager that runs them."""

from __future__ import annotations

from .errors import (
    EngineError,
    LazyArgumentError,
    ManagerStoppedError,
    SerializationError,
    StateTimeoutError,
    WorkerCrashedError,
)
from .events import StateEvent
from .handle import StateHandle, StateStatus
from .manager import ManagerStats, StateManager
from .state import State
from .wrap import wrap_with_tryexcept

__all__ = [
    "EngineError",
    "LazyArgumentError",
    "ManagerStats",
    "ManagerStoppedError",
    "SerializationError",
    "State",
    "StateEvent",
    "StateHandle",
    "StateManager",
    "StateStatus",
    "StateTimeoutError",
    "WorkerCrashedError",
    "wrap_with_tryexcept",
]
