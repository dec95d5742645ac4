"""No import circles among the modules of talkformer_core and nodes, and every module imports alone.

The rule: the graph whose nodes are the package's modules and whose edges are EVERY ``import`` /
``from ... import`` statement a module contains (at module level, under ``if TYPE_CHECKING``, or
inside a function or method) has no cycle. An import moved into a function only postpones a
circle to call time, so it counts the same as one at the top of the file: when two modules need
each other, the shared piece moves to the module it belongs in.

Edges go to the module an import names (``from .x import y`` -> ``x``, or ``x.y`` when ``y`` is
a submodule; relative imports resolved against the importing module's package). The parent
packages Python runs on the way (``a/__init__`` when importing ``a.b``) are not edges: a package
``__init__`` re-exporting its submodules is not a circle.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("talkformer_core", "nodes")

# Edges left out of the check, each with why; the list only shrinks.
ALLOWED_EDGES: set[tuple[str, str]] = set()  # none: every edge counts


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__)."""
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _owner(name: str, mods: dict) -> str | None:
    """The package module that ``name`` (a dotted import target) lives in, or None if external."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: line of the first such import}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for mod, (path, is_pkg) in mods.items():
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                for a in node.names:  # ``from pkg import submodule`` names the submodule
                    sub = f"{base_name}.{a.name}"
                    targets.append(sub if sub in mods else base_name)
            for t in targets:
                owner = _owner(t, mods)
                if owner is not None and owner != mod:
                    edges.setdefault(owner, node.lineno)
        graph[mod] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph is small: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in components:  # a shortest path back to the start inside the component
        start = min(comp)
        prev = {start: None}
        queue = [start]
        end = None
        while queue and end is None:
            v = queue.pop(0)
            for w in sorted(graph[v]):
                if w == start:
                    end = v
                    break
                if w in comp and w not in prev:
                    prev[w] = v
                    queue.append(w)
        path = [end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(path[::-1] + [start])
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_finder_reports_a_circle():
    g = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_graph_sees_imports_inside_functions():
    g = import_graph()
    assert "talkformer_core.errors" in g["talkformer_core.pipeline"]  # module level
    assert "talkformer_core.face.track" in g["talkformer_core.pipeline"]  # inside a function
    assert "talkformer_core.face.topology" in g["talkformer_core.models.unet"]  # relative, two dots


def test_no_import_cycles():
    graph = import_graph()
    for a, b in ALLOWED_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: remove the entry from ALLOWED_EDGES"
        del graph[a][b]
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_every_module_imports_on_its_own():
    """``import talkformer_core.X`` works for every module as the first import of the package (each
    in a fresh import of our packages; torch and the other dependencies stay loaded, for speed)."""
    names = [m for m in _modules() if not m.endswith("__main__")]  # those run a CLI when imported
    script = "\n".join([
        "import importlib, sys, traceback",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "bad = []",
        f"for name in {names!r}:",
        f"    for m in [m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}]:",
        "        del sys.modules[m]",
        "    try:",
        "        importlib.import_module(name)",
        "    except Exception:",
        "        bad.append(name + ': ' + traceback.format_exc(limit=3))",
        "print(chr(10).join(bad))",
        "sys.exit(1 if bad else 0)",
    ])
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
