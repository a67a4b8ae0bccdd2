"""No import circles in bf16jax/ and the scripts, lazy (function-level) imports included.

The import graph is read from the source with `ast` (nothing is imported): one node per module,
one edge per `import` / `from ... import` statement anywhere in the file, a deferred import
inside a function counting like a top-level one (hiding a circle in a function leaves it a
circle). Importing `a.b` also runs `a/__init__.py`, but a package importing its own submodules
is how packages work, so only the written imports make edges. Run this file as a script to print
the graph's circles: `python tests/test_imports.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "bf16jax"
# Folders of scripts that import each other by bare name (their folder is sys.path[0] when run).
SCRIPT_DIRS = ("experiments", "colab", "configs", "tests")


def module_files() -> dict[str, Path]:
    """Module name -> file: every bf16jax module, and experiments' scripts by bare name."""
    files = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            clash = files.get(path.stem)
            assert clash is None, f"two scripts named {path.stem}: {clash} and {path}"
            files[path.stem] = path
    return files


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The known modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [n for n in (_longest_known(n, known) for n in names) if n]
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:  # relative import
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"  # `from pkg import submodule`
        target = sub if sub in known else _longest_known(base, known)
        if target:
            out.append(target)
    return out


def _longest_known(name: str, known: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line of the first such import}."""
    files = module_files()
    known = set(files)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, module, path.name == "__init__.py", known):
                    if target != module:
                        edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    files = module_files()
    members = set(component)
    lines = [f"import circle: {' <-> '.join(component)}"]
    for a in component:
        for b, line in sorted(graph[a].items()):
            if b in members:
                lines.append(f"  {files[a].relative_to(ROOT)}:{line} imports {b}")
    return "\n".join(lines)


def test_graph_sees_the_package_and_the_scripts():
    graph = import_graph()
    # A checker that reads nothing finds no circles: prove it reads real, lazy and bare-name edges.
    assert "bf16jax.models.gpt" in graph["bf16jax.models.vit"]
    assert "bf16jax.precision" in graph["bf16jax.layers"]
    assert "bf16jax.loop" in graph["bf16jax.main"]  # imported inside main()
    assert "bf16jax.config" in graph["benchmark"]
    assert {"study_plots", "precision_study"} <= set(graph)


def test_circles_are_found():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    assert not found, "\n".join(describe(graph, c) for c in found)


if __name__ == "__main__":
    g = import_graph()
    for c in circles(g):
        print(describe(g, c))
    sys.exit(1 if circles(g) else 0)
