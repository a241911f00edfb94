"""The package's import graph: no module imports itself back, at any depth.

Every ``import`` statement in ``memlab/`` and ``kernels/`` (installed as
``memlab_kernels``) counts, including those inside functions: a cycle that only
closes inside a function still couples two modules both ways.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ((ROOT / "memlab", "memlab"), (ROOT / "kernels", "memlab_kernels"))


def _modules() -> dict:
    mods = {}
    for base, pkg in PACKAGES:
        for path in base.rglob("*.py"):
            parts = [pkg, *path.relative_to(base).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods: dict):
    """The module an import of ``name`` loads (a name imported from a module: the module)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict:
    """``{module: {modules it imports}}`` over memlab and memlab_kernels."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from pkg import sub`` loads pkg.sub; ``from mod import name`` loads mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                r = _resolve(t, mods)
                if r is not None and r != mod:
                    graph[mod].add(r)
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules (first == last), or None."""
    state: dict = {}
    stack: list = []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_and_kv_policies_do_not_import_each_other():
    graph = import_graph()
    for a, b in (("memlab.models", "memlab.kv"), ("memlab.kv", "memlab.models")):
        bad = sorted((m, n) for m, deps in graph.items() if m.startswith(a) for n in deps
                     if n == b or n.startswith(b + "."))
        assert not bad, f"{a} must not import {b}: {bad}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "memlab.cache" in graph["memlab.models.llama"]       # the walker sees real imports
    assert "memlab_kernels.flash_attention" in graph["memlab.nn.attention"]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
