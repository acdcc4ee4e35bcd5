"""The house rules of the import graph: layers point downward, no cycles.

    flows -> pipeline -> crm_models;  evaluation -> pipeline's rasterizer, mesh I/O and hub access.

Every import in the four packages (module level and inside functions) is read with ``ast``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crm_models", "pipeline", "flows", "evaluation")
# What a package may import from the project (prefixes of module names).
ALLOWED = {
    "crm_models": ("crm_models",),
    "pipeline": ("pipeline", "crm_models"),
    "flows": ("flows", "pipeline", "crm_models"),
    "evaluation": (
        "evaluation",
        "pipeline.raster",
        "pipeline.mesh",
        "pipeline.outputs",
        "pipeline.weights.hub",
        "pipeline.weights.errors",
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in out if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {
        _module_name(p): p
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    graph = {}
    for name, path in modules.items():
        # keep only edges to real modules (a `from pkg import name` may name a function)
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


GRAPH = _graph()


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_downward(package):
    bad = sorted(
        f"{mod} imports {dep}"
        for mod, deps in GRAPH.items()
        if mod.split(".")[0] == package
        for dep in deps
        if not any(dep == p or dep.startswith(p + ".") for p in ALLOWED[package])
    )
    assert bad == []


def test_no_import_cycles():
    """No strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            # a package importing its own submodules (re-exports in __init__) is not a cycle
            if w.startswith(v + "."):
                continue
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
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_is_read():
    """The checks above see real edges (a parser that found nothing would pass them vacuously)."""
    assert "pipeline.finalize" in GRAPH["pipeline.image_to_mesh"]
    assert "crm_models.recon.model" in GRAPH["pipeline.weights.models"]
    assert "flows.io.storage" in GRAPH["flows.ray_job.workers"]
