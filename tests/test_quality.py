"""The habits CI keeps: ruff and mypy --strict over the library (configured in pyproject.toml)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "engine", "executors", "benchmarks",
                 "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_print_in_library_code() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in ("engine", "executors")
        for path in (ROOT / package).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line.lstrip().startswith("print(")
    ]
    assert offenders == []


def test_package_is_typed() -> None:
    assert (ROOT / "engine" / "py.typed").exists()
    assert (ROOT / "executors" / "py.typed").exists()
