"""The package layout: every module imports on its own in a fresh interpreter, in
dependency order, imports run one way down the data path, and no module is too long."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import minnorm_audit

PACKAGE_DIR = Path(minnorm_audit.__file__).resolve().parent
MAX_MODULE_LINES = 520
# A cohesive module may be longer: one class is not split to meet a count.
LONGER_MODULES = {"minnorm/optimizer.py": 1000}  # Minnorm: one class, the math beside it

# Down the data path: a package on the left may import those on its right, never back.
# data/ and minnorm/ are independent of each other; training/ uses both; report/ only
# reads what the run wrote.
FORBIDDEN_IMPORTS = {
    "data": ("training", "minnorm", "audit", "score_run", "write_run", "report", "clean", "cli"),
    "minnorm": ("data", "training", "audit", "score_run", "write_run", "report", "clean", "cli"),
    "training": ("audit", "score_run", "write_run", "clean", "cli"),
    "scoring": ("data", "training", "minnorm", "audit", "report", "clean", "cli"),
    "calibration": ("data", "training", "minnorm", "audit", "report", "clean", "cli"),
    "report": ("data", "training", "minnorm", "audit", "score_run", "write_run", "clean", "cli"),
}


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts))
    return names


def internal_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (top-level and lazy), as dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    package = package[:-1] if package[-1] != "__init__" else package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("minnorm_audit"):
                target = node.module.split(".")
            else:
                continue
            found.add(".".join(target))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("minnorm_audit"))
    return found


def test_imports_follow_the_data_path() -> None:
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR)
        top = relative.parts[0].removesuffix(".py")
        for forbidden in FORBIDDEN_IMPORTS.get(top, ()):
            for target in internal_imports(path):
                parts = target.split(".")
                if len(parts) > 1 and parts[1] == forbidden:
                    offenders.append(f"{relative} imports {target}")
    assert offenders == []


def dependency_order() -> list[str]:
    """The package's modules, each after every module it imports; raises on a cycle."""
    graph: dict[str, set[str]] = {}
    names = set(module_names())
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        source = ".".join(parts)
        if source.endswith("__main__"):
            continue
        # An import of a package's name counts as an edge to its __init__ only when it is
        # a module; "from .x import name" where x is a package adds x.
        graph[source] = {t for t in internal_imports(path) if t in names and t != source}
    return topological_order(graph)


def topological_order(graph: dict[str, set[str]]) -> list[str]:
    """Modules ordered so each comes after what it imports; AssertionError names a cycle.

    Edges from a package to its own modules (re-exports) and from a module to a package
    above it (``__version__``) are not dependencies of the import order.
    """
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = trail[trail.index(node):] + [node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if target.startswith(node + ".") or node.startswith(target + "."):
                continue
            visit(target, trail + [node])
        state[node] = 2
        order.append(node)

    for name in sorted(graph):
        visit(name, [])
    return order


def test_a_cycle_is_found_and_named() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p": {"p.a"}}
    with pytest.raises(AssertionError, match="p.a -> p.b -> p.c -> p.a"):
        topological_order(graph)
    assert topological_order({"p.a": {"p.b"}, "p.b": set()}) == ["p.b", "p.a"]


def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter() -> None:
    # dependency_order() fails on a cycle in the static graph (lazy imports included);
    # importing in that order in one fresh interpreter then proves that each module
    # needs nothing but what came before it.
    order = dependency_order()
    assert len(order) > 30, order
    script = (
        "import importlib, json, sys\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    importlib.import_module(name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(order)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


def test_no_module_is_too_long() -> None:
    lengths = {
        str(path.relative_to(PACKAGE_DIR)): len(path.read_text(encoding="utf-8").splitlines())
        for path in PACKAGE_DIR.rglob("*.py")
    }
    assert {name: n for name, n in lengths.items() if n > LONGER_MODULES.get(name, MAX_MODULE_LINES)} == {}
