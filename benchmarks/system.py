"""The machine a run measured: cores, memory, Python, library versions, start methods."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import platform
import subprocess
import sys
from typing import Any

import psutil

from .harness import usable_cores

__all__ = ["LIBRARIES", "machine_info"]

LIBRARIES = ("loky", "cloudpickle", "aiomultiprocess", "distributed", "numpy", "joblib",
             "psutil", "rich", "matplotlib")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _statepool_revision() -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "engine",
                                "executors"], capture_output=True, text=True, timeout=5,
                               check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    revision = out.stdout.strip()
    if revision and dirty.stdout.strip():
        revision += " with uncommitted changes in engine/ or executors/"
    return revision or None


def machine_info() -> dict[str, Any]:
    mem = psutil.virtual_memory()
    return {
        "cpu": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": usable_cores(),
        "memory_gb": round(mem.total / 2**30, 1),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "multiprocessing_start_method": multiprocessing.get_start_method(allow_none=True)
        or multiprocessing.get_context().get_start_method(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "statepool_revision": _statepool_revision(),
        "libraries": {name: _version(name) for name in LIBRARIES},
    }
