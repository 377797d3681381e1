"""The error tree of statepool.

::

    EngineError                         every error statepool raises of its own
    ├── WorkerCrashedError  (RuntimeError)   the process running the state died
    ├── StateTimeoutError   (TimeoutError)   the state ran past its ``timeout``
    ├── SerializationError  (pickle.PicklingError)  cloudpickle cannot carry an object
    ├── LazyArgumentError                    a lazy argument raised (``__cause__`` is why)
    ├── DependencyError                      a dependency failed or was cancelled (``__cause__``)
    ├── InitializerError    (RuntimeError)   the initializer of the state's worker raised
    └── ManagerStoppedError (RuntimeError)   the manager no longer accepts states

An exception raised by the state's own function is kept as it is (its type unchanged); when it
was raised in a worker process, the worker's traceback is attached as its ``__cause__``.
"""

from __future__ import annotations

import pickle

__all__ = [
    "DependencyError",
    "EngineError",
    "InitializerError",
    "LazyArgumentError",
    "ManagerStoppedError",
    "SerializationError",
    "StateTimeoutError",
    "WorkerCrashedError",
]


class EngineError(Exception):
    """Root of every error statepool raises of its own."""


class WorkerCrashedError(EngineError, RuntimeError):
    """The worker process running a state died (exit, signal, segfault, out of memory)."""

    def __init__(self, message: str, *, state_name: str = "", exitcode: int | None = None):
        super().__init__(message)
        self.state_name = state_name
        self.exitcode = exitcode

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_crash, (str(self), self.state_name, self.exitcode))


def _rebuild_crash(message: str, state_name: str, exitcode: int | None) -> WorkerCrashedError:
    return WorkerCrashedError(message, state_name=state_name, exitcode=exitcode)


class StateTimeoutError(EngineError, TimeoutError):
    """A state ran past its ``timeout``."""


class SerializationError(EngineError, pickle.PicklingError):
    """The function, an argument or the result of a state cannot be pickled."""


class LazyArgumentError(EngineError):
    """A lazy argument raised while it was resolved; the original error is ``__cause__``."""


class ManagerStoppedError(EngineError, RuntimeError):
    """The manager is stopping or stopped and accepts no more states."""


class DependencyError(EngineError):
    """A dependency of a state failed or was cancelled, so the state did not run.

    ``state_name`` and ``dependency_name`` name both states and ``dependency_status`` is the
    dependency's terminal status name (``"FAILED"`` or ``"CANCELLED"``); ``__cause__`` is the
    dependency's exception (a ``CancelledError`` for a cancelled one).
    """

    def __init__(self, message: str, *, state_name: str = "", dependency_name: str = "",
                 dependency_status: str = "") -> None:
        super().__init__(message)
        self.state_name = state_name
        self.dependency_name = dependency_name
        self.dependency_status = dependency_status

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_dependency,
                (str(self), self.state_name, self.dependency_name, self.dependency_status))


def _rebuild_dependency(message: str, state_name: str, dependency_name: str,
                        dependency_status: str) -> DependencyError:
    return DependencyError(message, state_name=state_name, dependency_name=dependency_name,
                           dependency_status=dependency_status)


class InitializerError(EngineError, RuntimeError):
    """The ``initializer`` of the worker (thread, process, child) given the state raised, so the
    worker cannot run states: each call it is given fails with this error, which names the
    state and the initializer (``initializer``); ``__cause__`` is the initializer's error, or its
    traceback as text when it was raised in another process."""

    def __init__(self, message: str, *, state_name: str = "", initializer: str = "") -> None:
        super().__init__(message)
        self.state_name = state_name
        self.initializer = initializer

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_initializer_error, (str(self), self.state_name, self.initializer))


def _rebuild_initializer_error(message: str, state_name: str,
                               initializer: str) -> InitializerError:
    return InitializerError(message, state_name=state_name, initializer=initializer)
