"""Caps on the thread pools of BLAS and OpenMP libraries inside worker processes.

numpy, scipy and scikit-learn run their heavy calls in BLAS (OpenBLAS, MKL, BLIS, Accelerate) or
OpenMP thread pools that use every core by default: two workers on two cores would run 2 x 2
threads that fight for the cores (16 workers on 16 cores, 256). As joblib does for its workers,
``"process"`` and ``"aioprocess"`` start theirs with the variables these libraries read at load
time set to ``max(1, usable cores // workers)`` (a variable the user set in the parent is kept),
or to the executor's ``inner_threads``; ``inner_threads=None`` leaves them alone.

A library loaded before the variables could act (in an ``"aioprocess"`` child, what the main
module imports as the child re-imports it) is limited at run time through ``threadpoolctl``:
:func:`apply_loaded` in the worker, once its own start-up and the initializer are over.

Imported by the workers: keep it light (``threadpoolctl`` is imported only when needed).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Literal

__all__ = [
    "MARK",
    "VARIABLES",
    "InnerThreads",
    "ThreadCap",
    "apply_loaded",
    "check",
    "set_here",
    "usable_cores",
    "worker_env",
]

#: what the common libraries read (joblib's list, ``MAX_NUM_THREADS_VARS``): OpenMP, OpenBLAS,
#: MKL, BLIS, Apple Accelerate (vecLib), numba, numexpr
VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_TBB_IPC = "ENABLE_IPC"  # TBB schedulers of several processes coordinate (as joblib sets it)
#: set in a worker's environment when statepool set the limits: :func:`apply_loaded` acts
MARK = "STATEPOOL_INNER_THREADS"

#: the executors' ``inner_threads`` option
InnerThreads = int | Literal["auto"] | None

# threadpoolctl's name of a library -> the variable that holds its limit
_RUNTIME = {"openblas": "OPENBLAS_NUM_THREADS", "mkl": "MKL_NUM_THREADS",
            "blis": "BLIS_NUM_THREADS", "openmp": "OMP_NUM_THREADS"}
# modules whose presence means a BLAS or OpenMP library may be loaded already
_USERS = ("numpy", "scipy", "sklearn", "torch", "numexpr", "numba", "threadpoolctl")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def check(value: object, owner: str) -> InnerThreads:
    """``value`` as an ``inner_threads`` option, or ``ValueError`` naming ``owner``'s field."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: 'inner_threads' must be an int >= 1, 'auto' or None, "
                         f"got {value!r}")
    return value


def worker_env(inner_threads: InnerThreads, workers: int,
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables to add to the environment of each of ``workers`` workers.

    ``"auto"``: ``max(1, usable cores // workers)``, except for a variable already set in
    ``environ`` (the parent's), which keeps its value. An int: that, for every variable.
    ``None``: nothing (the libraries are left alone)."""
    if inner_threads is None:
        return {}
    environ = os.environ if environ is None else environ
    if inner_threads == "auto":
        default = str(max(1, usable_cores() // max(1, workers)))
        env = {var: environ.get(var, default) for var in VARIABLES}
    else:
        env = dict.fromkeys(VARIABLES, str(inner_threads))
    if _TBB_IPC not in environ:
        env[_TBB_IPC] = "1"
    env[MARK] = "1"
    return env


def _limits(environ: Mapping[str, str]) -> dict[str, int]:
    out = {}
    for api, var in _RUNTIME.items():
        try:
            out[api] = int(environ[var])
        except (KeyError, ValueError):
            continue
    return out


def apply_loaded(environ: Mapping[str, str] | None = None) -> bool:
    """In a worker whose limits statepool set: limit the BLAS / OpenMP libraries already loaded
    to them (through threadpoolctl). Answers whether threadpoolctl was asked.

    Cheap when nothing of the kind is loaded (a look at ``sys.modules``): threadpoolctl scans
    the loaded shared libraries, a few milliseconds, only when one of numpy, scipy... is."""
    environ = os.environ if environ is None else environ
    if environ.get(MARK) != "1" or not any(name in sys.modules for name in _USERS):
        return False
    limits = _limits(environ)
    if not limits:
        return False
    _limit(limits)
    return True


def _limit(limits: Mapping[str, int]) -> None:
    """Each loaded library of threadpoolctl's ``internal_api`` in ``limits`` to its limit (kept
    for the life of the process: nothing restores it)."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    for api, limit in limits.items():
        chosen = controller.select(internal_api=api)
        if chosen.lib_controllers:
            chosen.limit(limits=limit)


def set_here(env: Mapping[str, str]) -> None:
    """In a worker that could not be started with ``env`` (``"aioprocess"``: multiprocessing's
    spawn gives a child the parent's environment, nothing more): set it now, before any state
    or initializer, then limit what is loaded already."""
    os.environ.update(env)
    apply_loaded()


class ThreadCap:
    """``"thread"``'s ``inner_threads``: the BLAS / OpenMP pools of *this* process limited
    through threadpoolctl while the executor runs.

    A BLAS pool (OpenBLAS on pthreads, MKL...) belongs to the whole process and takes its limit
    from one thread (threadpoolctl lets only the first thread that sets it do so): the loop
    thread sets it, in :meth:`ensure_process` as calls are put, and :meth:`restore` puts it back
    at shutdown. It holds for every thread of the process meanwhile, the parent's own numpy
    calls included. OpenMP's limit is per calling thread: each pool thread sets its own, in
    :meth:`ensure_thread` before a call. Both cost a look at ``len(sys.modules)`` unless a
    module was imported since they last looked (a library imported by a state is limited from
    the next call on)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen = threading.local()
        self._count = -1
        self._restores: list[Callable[[], None]] = []

    def ensure_process(self) -> None:
        """Loop thread: the process-wide pools."""
        count = len(sys.modules)
        if count != self._count:
            self._count = count
            if any(name in sys.modules for name in _USERS):
                from threadpoolctl import threadpool_limits

                limiter = threadpool_limits(limits=self.limit, user_api="blas")
                self._restores.append(limiter.restore_original_limits)

    def ensure_thread(self) -> None:
        """A pool thread: its own OpenMP limit."""
        count = len(sys.modules)
        if getattr(self._seen, "count", -1) != count:
            self._seen.count = count
            if any(name in sys.modules for name in _USERS):
                from threadpoolctl import threadpool_limits

                threadpool_limits(limits=self.limit, user_api="openmp")

    def restore(self) -> None:
        """Loop thread, at shutdown: the process-wide pools as they were."""
        restores, self._restores = self._restores, []
        self._count = -1
        for undo in reversed(restores):
            undo()
