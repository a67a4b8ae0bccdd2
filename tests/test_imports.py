"""Import rules: no circles in bf16jax/ and the scripts, and subpackages import only downward.

Each subpackage's `__init__` docstring states what it may import ("May import: nn, precision."
or "Imports nothing from bf16jax"); the test reads the rules from there, so the docstrings and
the enforcement cannot drift apart. Root modules: `bf16jax.config` (the schema) sits above
models and data; `bf16jax.cli` and the commands (`python -m bf16jax.<tool>`) may import anything.

The import graph is read from the source with `ast` (nothing is imported): one node per module,
one edge per `import` / `from ... import` statement anywhere in the file, a deferred import
inside a function counting like a top-level one (hiding a circle in a function leaves it a
circle). Importing `a.b` also runs `a/__init__.py`, but a package importing its own submodules
is how packages work, so only the written imports make edges. Run this file as a script to print
the graph's circles: `python tests/test_imports.py`.
"""

from __future__ import annotations

import ast
import re
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


# Root modules that are not commands, with what they may import (subpackages' rules are read from
# their __init__ docstrings by `subpackage_rules`).
ROOT_RULES = {
    "bf16jax": {"precision"},  # the public API
    "config": {"models", "data", "nn", "precision", "parallel"},
}
# The commands and the CLI plumbing they share sit on top: they may import anything.
TOP = {
    "cli",
    "main",
    "serve",
    "generate",
    "evaluate",
    "gate",
    "export",
    "convert",
    "registry",
    "prepare",
}


def subsystem(module: str) -> str | None:
    """ "nn" for bf16jax.nn.layers, "config" for bf16jax.config, "bf16jax" for the package itself,
    None for a script."""
    if module == PACKAGE:
        return PACKAGE
    if not module.startswith(PACKAGE + "."):
        return None
    return module.split(".")[1]


def subpackage_rules() -> dict[str, set[str]]:
    """Subpackage -> the subsystems it may import, read from its __init__ docstring."""
    rules = {}
    for init in sorted((ROOT / PACKAGE).glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        name = init.parent.name
        if "Imports nothing from bf16jax" in doc:
            rules[name] = set()
            continue
        match = re.search(r"May import:\s*([a-z_,\s]+)\.", doc)
        assert match, (
            f"{init.relative_to(ROOT)}: its docstring must say 'May import: a, b.' or "
            "'Imports nothing from bf16jax'"
        )
        rules[name] = {w.strip() for w in match.group(1).split(",")}
    return rules


def direction_violations(
    graph: dict[str, dict[str, int]], rules: dict[str, set[str]], files: dict[str, Path]
) -> list[str]:
    """One line per import that goes up or sideways: 'FILE:LINE: a imports b (a may import ...)'."""
    found = []
    for module, edges in sorted(graph.items()):
        source = subsystem(module)
        if source is None or source in TOP:
            continue
        allowed = rules.get(source)
        assert allowed is not None, f"{module}: no import rule for subsystem {source!r}"
        for target, line in sorted(edges.items()):
            dest = subsystem(target)
            # the package root holds only the public names and __version__ (the circle test
            # keeps it from importing back up)
            if dest in (None, source, PACKAGE) or dest in allowed:
                continue
            found.append(
                f"{files[module].relative_to(ROOT)}:{line}: {module} imports {target} "
                f"({source} may import {', '.join(sorted(allowed)) or 'nothing from bf16jax'})"
            )
    return found


def test_graph_sees_the_package_and_the_scripts():
    graph = import_graph()
    # A checker that reads nothing finds no circles: prove it reads real, lazy and bare-name edges.
    assert "bf16jax.models.gpt" in graph["bf16jax.models.vit"]
    assert "bf16jax.precision" in graph["bf16jax.nn.layers"]
    assert "bf16jax.training.loop" in graph["bf16jax.main"]  # imported inside main()
    assert "bf16jax.config" in graph["benchmark"]
    assert {"study_plots", "precision_study"} <= set(graph)


def test_circles_are_found():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert circles(graph) == [["a", "b", "c"]]


def test_rules_are_read_from_the_docstrings():
    rules = subpackage_rules()
    assert rules["precision"] == set() and rules["parallel"] == set()
    assert rules["nn"] == {"precision", "parallel"}
    assert "training" in rules["serving"] and "serving" not in rules["training"]
    # every subpackage has a rule, and each rule names only subsystems that exist
    subsystems = {p.parent.name for p in (ROOT / PACKAGE).glob("*/__init__.py")}
    assert set(rules) == subsystems
    for name, allowed in rules.items():
        assert allowed <= subsystems | set(ROOT_RULES), (name, allowed - subsystems)


def test_directions_are_found():
    # The checker itself: an upward edge (nn -> training) and a sideways one (data -> models)
    # are reported with file and line; a downward one is not.
    graph = {
        "bf16jax.nn.layers": {"bf16jax.training.step": 7, "bf16jax.precision.matmul": 3},
        "bf16jax.data.datasets": {"bf16jax.models.gpt": 9},
        "bf16jax.training.step": {"bf16jax.nn.layers": 1},
    }
    rules = {"nn": {"precision"}, "data": set(), "training": {"nn"}, "precision": set()}
    files = {m: ROOT / PACKAGE / (m.split(".", 1)[1].replace(".", "/") + ".py") for m in graph}
    found = direction_violations(graph, rules, files)
    assert len(found) == 2
    assert "bf16jax.nn.layers imports bf16jax.training.step (nn may import precision)" in found[1]
    assert ":9: bf16jax.data.datasets imports bf16jax.models.gpt" in found[0]


def test_subpackages_import_only_downward():
    rules = {**subpackage_rules(), **ROOT_RULES}
    found = direction_violations(import_graph(), rules, module_files())
    assert not found, (
        "imports against the layering (see each subpackage's __init__):\n" + "\n".join(found)
    )


def test_no_import_circles():
    graph = import_graph()
    found = circles(graph)
    assert not found, "\n".join(describe(graph, c) for c in found)


if __name__ == "__main__":
    g = import_graph()
    for c in circles(g):
        print(describe(g, c))
    bad = direction_violations(g, {**subpackage_rules(), **ROOT_RULES}, module_files())
    print("\n".join(bad))
    sys.exit(1 if circles(g) or bad else 0)
