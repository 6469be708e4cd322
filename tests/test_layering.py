"""The package's module graph has no import cycles (lazy imports inside functions count too).

A lower module (config, kernels, export, ...) must never need a higher one (encoder, index, server, ...):
a cycle hidden in a function-level import still ties the two modules together. The one allowed pair is a
package facade re-exporting a submodule that builds on the facade (``embfast.kernels`` and
``embfast.kernels.quantized``: ``kernels.quantize`` is public API).
"""

from __future__ import annotations

import ast
from pathlib import Path

import embfast

ALLOWED = {frozenset({"embfast.kernels", "embfast.kernels.quantized"})}


def _module_graph() -> dict[str, set[str]]:
    root = Path(embfast.__file__).parent
    files = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in files and t not in (name, "embfast"))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, 1972)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_module_graph_has_no_import_cycles():
    graph = _module_graph()
    assert len(graph) > 40 and "embfast.encoder" in graph and "embfast.models" in graph["embfast.encoder"]
    cycles = [c for c in _cycles(graph) if frozenset(c) not in ALLOWED]
    assert not cycles, "import cycles (move the shared code into a lower module): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
