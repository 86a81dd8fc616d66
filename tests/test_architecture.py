"""The package's shape: imports point down the floors of docs/architecture.md, no import cycle, no
production import of the test helpers, no link outside the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


#: The floors of docs/architecture.md ("Floors"), bottom first: a module may import its own floor and
#: the floors below, never one above. A package entry covers its submodules; every module needs a floor.
#: The top-level scripts (generate_data.py, erase_pipeline.py, evaluate.py, compare.py) are floor 6.
FLOORS: dict[int, tuple[str, ...]] = {
    1: ("coerasing", "coerasing.sampling", "coerasing.objectives", "coerasing.params", "coerasing.ip_adapter",
        "coerasing.images", "coerasing.models", "coerasing.formats", "coerasing.checkpoints", "coerasing.files",
        "coerasing.config", "coerasing.flags", "coerasing.choices", "coerasing.cli", "coerasing.errors",
        "coerasing.stats", "coerasing.grid", "coerasing.acceleration", "coerasing.convert",
        "coerasing.inspect_checkpoint", "coerasing.testing"),
    2: ("coerasing.methods", "coerasing.train", "coerasing.generation", "coerasing.reference_images",
        "coerasing.textual_inversion"),
    3: ("coerasing.eval",),
    4: ("coerasing.toy",),
    5: ("coerasing.compare",),
}

#: A string that names a package module (``"coerasing.toy.detector:factory"``) is an import too: a plug-in
#: string must not hide an upward import.
_MODULE_STRING = re.compile(r"coerasing(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")


def floor_of(module: str) -> int | None:
    """The floor of ``module``: the entry of :data:`FLOORS` that is its longest prefix."""
    best: tuple[int, int] | None = None
    for floor, names in FLOORS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), floor)
    return best[1] if best else None


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package modules that ``source`` (module ``name``) imports, at any depth, or names in a string."""
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and _MODULE_STRING.fullmatch(node.value)):
            targets = [node.value.partition(":")[0]]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("coerasing"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, at any depth (function-level imports and module strings included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", set(modules))
            for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module on a higher floor, as ``a (floor i) → b (floor j)``."""
    found = []
    for module, imports in sorted(graph.items()):
        for target in sorted(imports):
            if target in _parents(module):
                continue  # a package's own ``__init__`` (``from . import TOY_GUIDANCE``)
            mine, theirs = floor_of(module), floor_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                found.append(f"{module} (floor {mine}) → {target} (floor {theirs})")
    return found


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


def test_every_module_has_a_floor():
    assert [m for m in sorted(import_graph()) if floor_of(m) is None] == []


def test_imports_point_down_the_floors():
    assert upward_imports(import_graph()) == []


def test_the_method_layer_never_imports_an_evaluation_world():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith(("coerasing.toy", "coerasing.eval", "coerasing.compare")))
                 for m, targets in graph.items() if m.startswith("coerasing.methods")}
    assert {m: t for m, t in offenders.items() if t} == {}


@pytest.mark.parametrize("source", [
    "from ..toy.world import SHAPES",
    "def f():\n    import coerasing.toy.detector",
    "PLUGINS = {'toy': 'coerasing.toy.detector:detector_from_spec'}",
])
def test_the_floor_check_finds_upward_imports(source):
    modules = {"coerasing.eval.detectors", "coerasing.toy", "coerasing.toy.world", "coerasing.toy.detector"}
    found = imports_of(source, "coerasing.eval.detectors", False, modules)
    assert upward_imports({"coerasing.eval.detectors": found})[0].startswith("coerasing.eval.detectors (floor 3) →")


def test_docstrings_that_name_modules_are_not_imports():
    source = '"""See :mod:`coerasing.compare` and coerasing.toy.detector."""\nX = 1\n'
    assert imports_of(source, "coerasing.methods.base", False, {"coerasing.toy.detector", "coerasing.compare"}) == set()


def test_the_diagram_of_docs_architecture_lists_the_same_floors():
    """docs/architecture.md's floor diagram names each floor's packages and modules as :data:`FLOORS` does."""
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks: dict[int, str] = {}
    current = None
    for line in text.split("```")[1].splitlines():
        if match := re.match(r"floor (\d) ", line):
            current = int(match.group(1))
            blocks[current] = line
        elif line.startswith(" ") and current is not None:
            blocks[current] += "\n" + line
    assert sorted(blocks) == [*sorted(FLOORS), max(FLOORS) + 1]  # the scripts on top
    for floor, names in FLOORS.items():
        for name in names[1:] if floor == 1 else names:
            short = name.removeprefix("coerasing.").replace(".", "/")
            assert re.search(rf"(?:^|[\s,]|coerasing/){re.escape(short)}(\.py|/)", blocks[floor]), (floor, short)


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
