"""The package's shape: no import cycle, no production import of the test helpers, no link outside the repo."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "coerasing"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, *([target] if target else [])])
    return target or ""


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at any depth (function-level imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("coerasing"):
                    graph[name].add(target)
    return graph


def _parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A dependency cycle between modules (a package and its own submodules excepted), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt in _parents(node):
                continue  # importing a name of one's own package (``from . import TOY_GUIDANCE``)
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, " → ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_production_import_of_the_test_helpers():
    graph = import_graph()
    users = sorted(name for name, imports in graph.items() if "coerasing.testing" in imports)
    assert users == [], users


#: Names of the planning documents that live beside a checkout, never in it (docs/architecture.md,
#: "Self-contained"); the folder's name is assembled so that this file does not point there itself.
OUTSIDE_MARKERS = ("METHOD.md", "BASELINES.md", "/".join(("..", "sha" + "red")))


def test_no_reference_to_files_outside_the_repository():
    offenders = []
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("*.md"), *PACKAGE.rglob("*.py"),
                 *(REPO_ROOT / "docs").rglob("*.md"), *(REPO_ROOT / "configs").rglob("*.yaml"),
                 *(REPO_ROOT / "tests").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        if path.name != "test_architecture.py" and any(s in text for s in OUTSIDE_MARKERS):
            offenders.append(str(path.relative_to(REPO_ROOT)))
    assert offenders == []
