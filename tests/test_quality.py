"""The habits CI keeps: ruff and mypy --strict over the library (configured in pyproject.toml)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_is_clean() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "engine", "executors", "benchmarks",
                 "tests", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def installed_tree(tmp: pathlib.Path) -> pathlib.Path:
    """The packages as they install (statepool/engine, statepool/executors), as links."""
    (tmp / "statepool").mkdir()
    for package in ("engine", "executors"):
        (tmp / "statepool" / package).symlink_to(ROOT / package)
    (tmp / "benchmarks").symlink_to(ROOT / "benchmarks")
    return tmp


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean(tmp_path: pathlib.Path) -> None:
    tree = installed_tree(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--strict",
         "-p", "statepool.engine", "-p", "statepool.executors", "-p", "benchmarks"],
        cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_wheel_installs_only_statepool(tmp_path: pathlib.Path) -> None:
    result = run(sys.executable, "-m", "pip", "wheel", "--no-deps",
                 "-q", "-w", str(tmp_path), ".")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("statepool-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"statepool"}


def test_top_level_names_are_not_importable_outside_the_repository(
        tmp_path: pathlib.Path) -> None:
    code = ("import importlib.util, statepool.engine, statepool.executors\n"
            "print([importlib.util.find_spec(n) is None for n in ('engine', 'executors')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "[True, True]", out.stdout + out.stderr


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
