"""The house rules, checked on the source: what the engine imports, no import circles, no
private asyncio or CPython names (SPEC: Layout; issue: one namespace and a house to walk)."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"engine": "statepool.engine", "executors": "statepool.executors"}


def modules() -> dict[str, pathlib.Path]:
    """Installed module name -> source file, for every module of the two packages."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def runtime_imports(name: str, path: pathlib.Path) -> set[str]:
    """Modules of ours that ``name`` imports at run time (anywhere but under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                module = ".".join(stem + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    ours = modules()
    return {m for m in out if m in ours and m != name}


def test_the_engine_knows_executors_only_through_base_and_the_registry() -> None:
    allowed = {"statepool.executors", "statepool.executors.base", "statepool.executors.registry"}
    for name, path in modules().items():
        if name.startswith("statepool.engine"):
            wrong = {m for m in runtime_imports(name, path)
                     if m.startswith("statepool.executors")} - allowed
            assert not wrong, f"{name} imports {sorted(wrong)}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["statepool.engine", "statepool.executors.process",
                                     "statepool.executors.aioprocess", "statepool.executors.dask",
                                     "statepool.executors._wire"])
def test_no_import_circle_inside_a_package(package: str) -> None:
    mods = {n: p for n, p in modules().items() if n == package or n.startswith(package + ".")}
    graph = {n: {m for m in runtime_imports(n, p) if m in mods and m != package}
             for n, p in mods.items() if n != package}
    assert _cycle(graph) is None, _cycle(graph)


def test_one_folder_per_backend_of_several_modules() -> None:
    flat = sorted(p.name for p in (ROOT / "executors").glob("*.py"))
    assert flat == ["__init__.py", "base.py", "inline.py", "registry.py", "thread.py"]
    for backend in ("process", "aioprocess", "dask", "_wire"):
        assert (ROOT / "executors" / backend / "__init__.py").exists()


PRIVATE = ("_asyncio", "_current_tasks", "_swap_current_task", "_enter_task", "_leave_task",
           "_register_task", "_unregister_task")


def test_no_private_asyncio_or_cpython_names() -> None:
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom):
                    names.append(node.module or "")
                assert not any(n.split(".")[0] == "_asyncio" for n in names), name
            if isinstance(node, ast.Attribute):
                assert node.attr not in PRIVATE, f"{name}: {ast.unparse(node)}"
                owner = ast.unparse(node.value)
                if owner.split(".")[0] == "asyncio" and node.attr.startswith("_"):
                    pytest.fail(f"{name} uses a private asyncio name: {ast.unparse(node)}")
