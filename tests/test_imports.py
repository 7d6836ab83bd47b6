"""The house's layers: no import circle among unify_dist's modules, module-level or inside a function.

Read from the source with `ast` (nothing is imported), so the test is fast and sees imports that run late
(inside a function) as well as those under `if TYPE_CHECKING:`: a late import only hides a circle, it does
not remove it. A package's __init__ is a module of its own: importing unify_dist.x runs unify_dist/__init__
first, but that is the package's face, not a layer, and is not counted as an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

__all__ = ["import_graph", "circles"]


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its source}, for the package in folder `package`."""
    name = package.name
    modules = {}
    for file in package.rglob("*.py"):
        parts = list(file.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file

    def known(dotted: str) -> str:  # the module itself, or the package a name is taken from
        while dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names if a.name.split(".")[0] == name}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, `level - 1` packages up
                    here = module.split(".") if file.name == "__init__.py" else module.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                if base.split(".")[0] == name:  # `from pkg import sub` imports the submodule sub
                    edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names}
        graph[module] = edges - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of two or more modules that import each other, directly or round about (Tarjan's strongly
    connected components, iteratively), each sorted, the list sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, todo = work[-1]
            step = next((n for n in todo if n not in index or n in stack), None)
            if step is not None and step not in index:
                index[step] = low[step] = len(index)
                stack.append(step)
                work.append((step, iter(sorted(graph.get(step, ())))))
            elif step is not None:
                low[node] = min(low[node], index[step])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    part = stack[stack.index(node) :]
                    del stack[stack.index(node) :]
                    if len(part) > 1:
                        found.append(sorted(part))
    return sorted(found)


def _edges_within(graph: dict[str, set[str]], circle: list[str]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(circle)))}" for m in circle)


def test_unify_dist_has_no_import_circle() -> None:
    graph = import_graph(Path(__file__).resolve().parents[1] / "unify_dist")  # read, not imported
    assert "unify_dist.app.loop" in graph and "unify_dist.trust.session" in graph  # it read the whole tree
    assert "unify_dist.data" in graph["unify_dist.app.loop"]
    found = circles(graph)
    assert not found, "import circles (each layer imports only the layers beneath it): " + " | ".join(
        _edges_within(graph, c) for c in found
    )


def test_the_checker_finds_circles_through_late_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")  # the package's face: not an edge of a's
    (pkg / "a.py").write_text("import os\nfrom pkg.b import thing\n")
    (pkg / "b.py").write_text("thing = 1\n\ndef late():\n    from pkg.sub import c\n")  # inside a function
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\nfrom . import d\n")  # relative: pkg.a and pkg.sub.d
    (pkg / "sub" / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.sub.c\n")
    (pkg / "e.py").write_text("from pkg import b\n")  # imports b, but nothing imports e: no circle
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub.d"} and graph["pkg.e"] == {"pkg.b"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d"]]  # a > b > c > a, and c <> d
    (pkg / "b.py").write_text("thing = 1\n")  # the late import gone: only c <-> d is left
    assert circles(import_graph(pkg)) == [["pkg.sub.c", "pkg.sub.d"]]
    (pkg / "sub" / "d.py").write_text("")
    assert circles(import_graph(pkg)) == []
