"""The first code a ``"process"`` worker runs: a script (``runpy.run_path``), not a module.

Importing ``executors._loky_worker`` the usual way runs ``executors/__init__.py`` first, which
imports every in-process backend (the thread backend imports asyncio): about 40 ms of a worker's
start that it never needs. This script registers ``executors`` as a package whose
``__init__.py`` runs the first time a name it defines is looked up (a worker that never uses
one never pays for it), imports ``executors._loky_worker``, and serves. Nothing else changes:
submodules import as usual, and ``import executors`` in a state's code gets the whole package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from typing import Any

__all__: list[str] = []

RUN_NAME = "__statepool_worker__"


class _DeferredPackage(types.ModuleType):
    """A package whose ``__init__`` runs on the first lookup of a name that is missing."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):  # introspection, not a real use
            raise AttributeError(name)
        self.__class__ = types.ModuleType  # type: ignore[assignment]  # once: a plain package
        spec = self.__spec__
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(self)
        return getattr(self, name)


def defer_package(name: str, directory: str) -> None:
    """Register ``name`` (the package in ``directory``) with its ``__init__`` deferred."""
    if name in sys.modules:
        return
    init = os.path.join(directory, "__init__.py")
    spec = importlib.util.spec_from_file_location(name, init,
                                                  submodule_search_locations=[directory])
    assert spec is not None
    module = _DeferredPackage(name)
    module.__spec__ = spec
    module.__file__ = init
    module.__path__ = [directory]
    module.__package__ = name
    module.__loader__ = spec.loader
    sys.modules[name] = module


def compile_ahead(prefix: str) -> None:
    """Compile the modules a worker imports into ``prefix``, a ``sys.pycache_prefix`` tree.

    Where bytecode is never written (``PYTHONDONTWRITEBYTECODE``), every worker would compile
    them from source as it starts (about 10 ms of CPU each); the parent does it once, while the
    first workers start, and they read the result. A stale file is ignored (its header holds
    the source's size and time)."""
    import py_compile

    here = os.path.dirname(os.path.abspath(__file__))
    tag = sys.implementation.cache_tag
    for name in ("_loky_worker", "_remote", "_shm", "base"):
        source = os.path.join(here, f"{name}.py")
        target = os.path.join(prefix, here.lstrip(os.sep), f"{name}.{tag}.pyc")
        py_compile.compile(source, cfile=target, doraise=False, quiet=2)


if __name__ == RUN_NAME:
    if globals().get("PYCACHE"):
        sys.pycache_prefix = globals()["PYCACHE"]  # see compile_ahead
    defer_package("executors", os.path.dirname(os.path.abspath(__file__)))
    from executors._loky_worker import worker_main

    worker_main(*globals()["ARGS"])
