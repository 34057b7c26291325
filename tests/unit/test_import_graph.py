"""Imports run one way (STYLE.md section 2): read every module's imports with `ast`, without importing it.

Nodes are the packages and top-level modules of `dreambooth` (`dreambooth.eval.report` is the node
`eval`, `dreambooth.finetune` the node `finetune`). Every import counts, including those inside
functions and under `TYPE_CHECKING`: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import dreambooth

PACKAGE = Path(dreambooth.__file__).parent
GROUND_FLOOR = frozenset({
    "config", "_config_io", "data", "models", "identifier", "seeding", "devices", "files", "layout",
})
"""What everything else stands on; `_config_io` is config's private reader and writer."""

Edge = tuple[str, str, str]  # (importing node, imported node, "module.py:line" of the import)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Absolute names of the `dreambooth` modules (or their attributes) imported anywhere in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds `module`
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            # `from dreambooth import finetune` imports the node `finetune`; `from x import name` imports `x`.
            yield from (
                (f"{target}.{alias.name}" if target == "dreambooth" else target, node.lineno)
                for alias in node.names
            )


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "dreambooth":
        return None
    return parts[1] if len(parts) > 1 else "dreambooth"


def import_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in _imported(tree, module, is_package=path.name == "__init__.py"):
            source, target = _node(module), _node(name)
            if target is not None and target != source:
                edges.append((source, target, f"{path.relative_to(PACKAGE).as_posix()}:{line}"))
    return edges


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the node graph as its edges, or None if the graph is acyclic."""
    graph: dict[str, dict[str, str]] = {}
    for source, target, where in edges:
        graph.setdefault(source, {}).setdefault(target, where)
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        for target in graph.get(node, {}):
            if (cycle := visit(target, [*path, node])) is not None:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if (cycle := visit(start, [])) is not None:
            return [(a, b, graph[a][b]) for a, b in zip(cycle, cycle[1:])]
    return None


def test_the_import_graph_is_read() -> None:
    edges = {(a, b) for a, b, _ in import_edges()}
    assert ("finetune", "training") in edges and ("cli", "finetune") in edges and ("data", "models") in edges


def test_no_cycle_between_packages_and_top_level_modules() -> None:
    cycle = find_cycle(import_edges())
    assert cycle is None, "import cycle: " + ", ".join(f"{a} -> {b} ({where})" for a, b, where in cycle)


def test_the_ground_floor_imports_nothing_above_it() -> None:
    upward = [
        f"{a} -> {b} ({where})" for a, b, where in import_edges()
        if a in GROUND_FLOOR and b not in GROUND_FLOOR
    ]
    assert not upward, "the ground floor imports from above it:\n  " + "\n  ".join(upward)


def test_a_cycle_is_found_and_reported() -> None:
    edges = [("a", "b", "a.py:1"), ("b", "c", "b.py:2"), ("c", "a", "c.py:3"), ("c", "d", "c.py:4")]
    assert find_cycle(edges) == [("a", "b", "a.py:1"), ("b", "c", "b.py:2"), ("c", "a", "c.py:3")]
    assert find_cycle(edges[:2]) is None
