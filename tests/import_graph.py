"""The import graph of a package, read from its source with `ast` (no code is run).

Every ``import`` statement counts, also those inside functions: a lazy import hides a cycle
from Python's loader but not from the reader, and the architecture keeps its arrows one-way.
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``). Importing a package's ``__init__`` counts as an edge to it."""
    modules = {module_name(p, package_dir, package): p for p in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    up = base_parts[: len(base_parts) - (node.level - 1)]
                    src = ".".join(up + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in modules else src
                           for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]], ignore_parents: bool = True) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). With
    ``ignore_parents``, edges from a module to a package that contains it are dropped (a
    submodule importing its own package's ``__init__`` re-exports is not an architectural
    arrow)."""
    g = {m: {t for t in ts if not (ignore_parents and m.startswith(t + "."))}
         for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def collapse(graph: dict[str, set[str]], depth: int) -> dict[str, set[str]]:
    """The graph between packages: every module is replaced by its first ``depth`` name parts
    (``depth=2``: ``patchlens.recipes.caap`` -> ``patchlens.recipes``); edges inside one
    package disappear. ``cycles(collapse(g, 2))`` finds cycles between subpackages that no
    single pair of modules shows, e.g. ``recipes -> attribution -> recipes`` through different
    modules."""
    def top(m: str) -> str:
        return ".".join(m.split(".")[:depth])

    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        out.setdefault(top(m), set()).update(top(t) for t in targets if top(t) != top(m))
    return out
