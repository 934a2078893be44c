"""The layout holds: three floors (core < stages < backends < pipeline < cli), no import
cycle (imports inside functions included), no private name used across modules.

Read from the source with ``ast``; nothing is imported. ``backends/`` installs as
``ampq_pass.backends`` (pyproject's package-dir), so its files are read under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: floor of each top-level part; an import may only go to the same floor or lower
FLOORS = {"core": 0, "stages": 1, "backends": 2, "pipeline": 3, "cli": 4, "": 5}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "backends":
        parts = ["ampq_pass"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    files = list((ROOT / "ampq_pass").rglob("*.py")) + list((ROOT / "backends").glob("*.py"))
    return {module_name(p): p for p in files}


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name or "", line)`` for every import of ``module`` that names
    a module of the package, at module level or inside functions alike."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:  # from package import module
                    out.append((sub, "", node.lineno))
                elif base in known:
                    out.append((base, a.name, node.lineno))
    return out


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS[parts[1] if len(parts) > 1 else ""]


def import_graph(files: dict[str, Path]) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(files)
    known = set(files)
    for module, path in files.items():
        for target, name, line in imports_of(module, path, known):
            if target != module:
                g.add_edge(module, target, name=name, line=line)
    return g


def violations(g: nx.DiGraph) -> list[str]:
    """Every cycle, upward import and cross-module private name of the import graph."""
    found = [f"import cycle: {' -> '.join(c + [c[0]])}" for c in nx.simple_cycles(g)]
    for a, b, data in g.edges(data=True):
        if floor(b) > floor(a):
            found.append(f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)}) at line {data['line']}")
        if data["name"].startswith("_") and not data["name"].startswith("__"):
            found.append(f"{a} uses private name {b}.{data['name']} (line {data['line']})")
    return found


def test_layout_has_no_cycle_upward_import_or_private_name():
    files = source_files()
    assert {"ampq_pass.core.model", "ampq_pass.stages.rewrite", "ampq_pass.pipeline", "ampq_pass.cli.main",
            "ampq_pass.backends.ort"} <= set(files)
    assert violations(import_graph(files)) == []


def test_every_module_sits_on_a_floor():
    for module in source_files():
        assert floor(module) in FLOORS.values(), module


@pytest.mark.parametrize("edges, expected", [
    ([("ampq_pass.core.a", "ampq_pass.core.b", ""), ("ampq_pass.core.b", "ampq_pass.core.a", "")], "import cycle"),
    ([("ampq_pass.core.a", "ampq_pass.stages.b", "")], "imports ampq_pass.stages.b"),
    ([("ampq_pass.stages.a", "ampq_pass.core.b", "_helper")], "private name"),
])
def test_the_checks_can_fail(edges, expected):
    g = nx.DiGraph()
    for a, b, name in edges:
        g.add_edge(a, b, name=name, line=1)
    assert any(expected in v for v in violations(g))
