"""The first code a ``"process"`` worker runs: a script (``runpy.run_path``), not a module.

The worker imports only what it serves with: ``statepool.executors`` and
``statepool.executors.process`` keep their ``__init__`` light (their classes are imported on
first access), so ``from statepool.executors.process.worker import worker_main`` costs the
worker, cloudpickle and the wire format, nothing of the parent's side.
"""

from __future__ import annotations

import os
import sys

__all__: list[str] = []

RUN_NAME = "__statepool_worker__"

# the modules a worker imports, relative to executors/ (compile_ahead compiles them)
_WORKER_MODULES = ("__init__", "base", "process/__init__", "process/worker",
                   "_wire/__init__", "_wire/initializer", "_wire/lifeline", "_wire/remote",
                   "_wire/shm", "_wire/threads", "_wire/logrelay", "_wire/faults")


def compile_ahead(prefix: str) -> None:
    """Compile the modules a worker imports into ``prefix``, a ``sys.pycache_prefix`` tree.

    Where bytecode is never written (``PYTHONDONTWRITEBYTECODE``), every worker would compile
    them from source as it starts (about 10 ms of CPU each); the parent does it once, while the
    first workers start, and they read the result. A stale file is ignored (its header holds
    the source's size and time)."""
    import py_compile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tag = sys.implementation.cache_tag
    for name in _WORKER_MODULES:
        source = os.path.join(root, f"{name}.py")
        folder, base = os.path.split(source)
        target = os.path.join(prefix, folder.lstrip(os.sep), f"{base[:-3]}.{tag}.pyc")
        py_compile.compile(source, cfile=target, doraise=False, quiet=2)


if __name__ == RUN_NAME:
    if globals().get("PYCACHE"):
        sys.pycache_prefix = globals()["PYCACHE"]  # see compile_ahead
    if globals().get("OBSERVE"):  # the parent's log relay and faulthandler's file
        from statepool.executors._wire import faults, logrelay

        logrelay.install(globals()["OBSERVE"].get("log"))
        faults.install(globals()["OBSERVE"].get("faults"))
    from statepool.executors.process.worker import worker_main

    worker_main(*globals()["ARGS"])
