"""The package's import contract (docs/architecture.md, "Floors"), read from the source with `ast`.

Every import counts, function-level ones included: a room imports only rooms on its own floor or
below, every module sits on a floor, and no module imports one that imports it back (directly or
through others). Failing messages name the importing module, the line and the imported module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ernie_vilg"

# room (first name under ernie_vilg/) -> floor; the package's own __init__ is the top
FLOORS: dict[str, int] = {
    "config": 0, "runtime": 0, "safe_pickle": 0, "checkpoint_io": 0, "safetensors_file": 0,
    "data": 1, "text": 1,
    "vq": 2, "models": 2,
    "generation": 3, "metrics": 3,
    "training": 4,
    "stages": 5,
    "convert": 6, "pipeline": 6, "experiments": 6, "quickstart": 6, "demo": 6, "cli": 6,
    "__init__": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported ernie_vilg module) for every import statement anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ernie_vilg"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "ernie_vilg":
            for alias in node.names:  # `from ernie_vilg.generation import pipelines` names a module
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; the contract reads absolute ones")
    return [(line, name) for line, name in found if name in modules]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[int, str]]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_module_sits_on_a_floor(graph) -> None:
    assert sorted({room(m) for m in graph} - set(FLOORS)) == []


def test_no_room_imports_a_room_above_it(graph) -> None:
    bad = [f"{m}:{line} imports {target} (floor {FLOORS[room(target)]} > {FLOORS[room(m)]})"
           for m, edges in graph.items() for line, target in edges
           if FLOORS[room(target)] > FLOORS[room(m)]]
    assert bad == []


def strongly_connected(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Tarjan's components with more than one module, or with a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or any(t == v for _, t in graph[v]):
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back(graph) -> None:
    # a package's __init__ importing its own submodules (stages -> stages.vq -> ...) is not a
    # cycle unless a submodule imports the package itself back
    assert strongly_connected(graph) == []


def test_the_contract_catches_a_floor_violation_and_a_cycle() -> None:
    """The checks above on a made-up graph, so a silent pass cannot come from a broken reader."""
    fake = {"ernie_vilg.data.x": [(3, "ernie_vilg.stages.y")], "ernie_vilg.stages.y": [(5, "ernie_vilg.data.x")]}
    up = [(m, t) for m, edges in fake.items() for _, t in edges if FLOORS[room(t)] > FLOORS[room(m)]]
    assert up == [("ernie_vilg.data.x", "ernie_vilg.stages.y")]
    assert strongly_connected(fake) == [["ernie_vilg.data.x", "ernie_vilg.stages.y"]]
    # and the reader sees function-level imports
    modules = all_modules()
    edges = imports_of(PACKAGE / "stages" / "__init__.py", modules)
    assert any(t == "ernie_vilg.training.distributed" for _, t in edges)  # imported inside `prepare`


def test_every_test_file_is_placed_in_the_tests_readme() -> None:
    """tests/README.md maps test files to the package's rooms; a new test file must be placed."""
    import re

    tests = Path(__file__).resolve().parent
    listed = set(re.findall(r"`(test_\w+\.py)`", (tests / "README.md").read_text(encoding="utf-8")))
    actual = {p.name for p in tests.glob("test_*.py")}
    assert sorted(actual - listed) == [] and sorted(listed - actual) == []
