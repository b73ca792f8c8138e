"""The import graph runs one way: kd_core <- data_gen, distill <- kd_recipes, with no cycle between modules.

Every import counts, function-level ones included (a lazy import still couples two modules). ``__main__`` modules
are entry points that nothing imports, so their imports are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

ROOT = REPO_ROOT
PACKAGES = ("kd_core", "data_gen", "distill", "kd_recipes")
# package -> the packages it may import
ALLOWED = {
    "kd_core": {"kd_core"},
    "data_gen": {"kd_core", "data_gen"},
    "distill": {"kd_core", "distill"},
    "kd_recipes": {"kd_core", "data_gen", "distill", "kd_recipes"},
}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that ``path`` imports; ``from pkg import name`` counts as ``pkg.name`` when that is a
    module, else as ``pkg``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                found.add(qualified if qualified in known else node.module)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imported_modules(path, known) for name, path in known.items()}


def test_packages_import_only_downwards():
    wrong = [f"{source} imports {target}" for source, targets in import_graph().items() for target in targets
             if target.split(".")[0] not in ALLOWED[source.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if target == node or target not in graph or (node.startswith(target + ".")):
                continue  # a package's own __init__ re-exporting its modules is not a cycle through them
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
