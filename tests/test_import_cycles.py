"""No import cycles between physkern's modules, counting imports inside functions.

A deferred import (inside a function) hides a cycle from Python but not from a reader: the two
modules still depend on each other. This test parses every module of physkern/ and kernels/
(installed as physkern.kernels), resolves relative imports, and fails on any strongly connected
component of more than one module, or a module importing itself.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Compiled modules of the package (setup.py builds them): leaves of the graph, not the package.
EXTENSIONS = {"physkern._C"}


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for physkern (kernels/ mapped to physkern.kernels)."""
    mods = {}
    for path in sorted((ROOT / "physkern").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        stem = path.stem
        mods["physkern.kernels" if stem == "__init__" else f"physkern.kernels.{stem}"] = path
    return mods


def imported_modules(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """physkern modules that module `name` imports anywhere in its body (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg.
            candidates = [f"{base}.{a.name}" if f"{base}.{a.name}" in set(mods) | EXTENSIONS
                          else base for a in node.names]
        else:
            continue
        for c in candidates:
            if c in EXTENSIONS:
                continue
            while c and c not in mods:
                c = c.rpartition(".")[0]
            if c and c != name:
                targets.add(c)
    return targets


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of size > 1 only."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    return {name: imported_modules(name, path, mods) for name, path in mods.items()}


def test_finder_sees_deferred_and_relative_imports():
    # The checker itself must work: these edges exist in the tree as deferred/relative imports.
    graph = import_graph()
    assert "physkern.kernels.packing" in graph["physkern.kernels.codebook_matmul"]
    assert "physkern.kernels.packing" in graph["physkern.quant.packing"]
    assert "physkern.layers" in graph["physkern.api"]


def test_strongly_connected_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = strongly_connected(graph)
    detail = ["{" + ", ".join(c) + "}: " + "; ".join(
        f"{m} -> {', '.join(sorted(graph[m] & set(c)))}" for m in c) for c in cycles]
    assert not cycles, "import cycles between physkern modules:\n" + "\n".join(detail)
