"""The tlhelpers modules import each other in one direction only.

The graph is built from the source with ast: the imports a module runs
when it is imported (its body, including top-level if/try/with blocks
and class bodies), not those inside functions, which run when called,
nor those under ``if TYPE_CHECKING:``.
"""

import ast
from pathlib import Path

import pytest

import tlhelpers

PACKAGE = "tlhelpers"


def _is_type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_nodes(body):
    """Yield the statements of a body that run when the module loads."""
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _import_time_nodes(stmt.orelse)
            continue
        yield stmt
        for field in ("body", "orelse", "finalbody"):
            yield from _import_time_nodes(getattr(stmt, field, []) or [])
        for handler in getattr(stmt, "handlers", []) or []:
            yield from _import_time_nodes(handler.body)


def _targets(node, modules):
    """Return the package modules one import statement loads."""
    found = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1:
                found.add(parts[1])
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from . import x, from .x import y
            base = node.module.split(".")[0] if node.module else None
        elif node.module and node.module.split(".")[0] == PACKAGE:
            parts = node.module.split(".")
            base = parts[1] if len(parts) > 1 else None
        else:
            return found
        if base is not None:
            found.add(base)
        else:
            found |= {alias.name for alias in node.names}
    return found & modules


def import_graph(package_dir):
    """Return {module: modules of the package it imports at load time}."""
    files = {p.stem: p for p in Path(package_dir).glob("*.py")
             if p.stem != "__init__"}
    modules = set(files)
    graph = {}
    for name, path in sorted(files.items()):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        deps = set()
        for stmt in _import_time_nodes(tree.body):
            deps |= _targets(stmt, modules)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph):
    """Return one import cycle as a list [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep, path + [dep])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_tlhelpers_modules_import_without_cycles():
    graph = import_graph(Path(tlhelpers.__file__).parent)
    cycle = find_cycle(graph)
    assert cycle is None, (
        "tlhelpers modules import each other in a cycle: "
        + " -> ".join(cycle) + "; move one of these imports into the "
        "function that needs it, or the shared code into a lower module")


def test_the_graph_sees_the_package_as_it_is():
    """A sanity check of the parser on the real package: the documented
    layering (training on models) is found, and a function-level import
    (strategies imports training when called) is not counted."""
    graph = import_graph(Path(tlhelpers.__file__).parent)
    assert {"config", "models", "training", "strategies"} <= set(graph)
    assert "models" in graph["training"]
    assert "training" not in graph["strategies"]


def test_every_import_form_counts_and_function_imports_do_not(tmp_path):
    sources = {
        "a": "import tlhelpers.b\n",
        "b": "from tlhelpers import c\n",
        "c": "from .d import thing\n",
        "d": "try:\n    from . import e\nexcept ImportError:\n    pass\n",
        "e": ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from tlhelpers import a\n"
              "def late():\n    from tlhelpers import a\n"
              "class K:\n    from tlhelpers.f import x\n"),
        "f": "import os\nfrom tlhelpers.nothere import y\n",
    }
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
    (tmp_path / "__init__.py").write_text("")
    assert import_graph(tmp_path) == {
        "a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"e"}, "e": {"f"},
        "f": set()}
    assert find_cycle(import_graph(tmp_path)) is None


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"x": {"y"}, "y": {"z"}, "z": {"y"}}, ["y", "z", "y"]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, None),
])
def test_find_cycle_reports_the_modules_in_the_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_a_cycle_in_source_files_is_found(tmp_path):
    (tmp_path / "low.py").write_text("from tlhelpers import high\n")
    (tmp_path / "high.py").write_text("from tlhelpers.low import thing\n")
    assert find_cycle(import_graph(tmp_path)) == ["high", "low", "high"]
