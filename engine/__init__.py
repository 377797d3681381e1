"""statepool's engine: states, their handles and the manager that runs them."""

from __future__ import annotations

from .errors import (
    DependencyError,
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
from .retry import Retry
from .runmap import run_map
from .state import State
from .wrap import wrap_with_tryexcept

__all__ = [
    "DependencyError",
    "EngineError",
    "LazyArgumentError",
    "ManagerStats",
    "ManagerStoppedError",
    "Retry",
    "SerializationError",
    "State",
    "StateEvent",
    "StateHandle",
    "StateManager",
    "StateStatus",
    "StateTimeoutError",
    "WorkerCrashedError",
    "run_map",
    "wrap_with_tryexcept",
]
