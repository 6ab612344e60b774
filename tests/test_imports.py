"""The package's import graph has no cycle, counting imports inside functions too.

A function-level import keeps a cycle from failing at import time, not from being a cycle: the modules still
cannot be read, tested or moved one without the other. This parses every module under inf_quant/ with `ast`
(module level and function bodies, relative imports resolved) and fails on any cycle, printing it, and on any
import by a folder of a later folder in the pipeline's order (STAGES) or of a top-level command.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "inf_quant"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the inf_quant modules it imports anywhere in its body}.

    `from . import x` counts as an import of the submodule x where one exists, else of the package. Importing
    a submodule also runs its parent packages' __init__, but those hold no imports of their own children at
    module level, so the implicit parent edges are left out (they would make every module import inf_quant).
    """
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in paths:
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in paths]
                edges.update(subs)
                if len(subs) < len(node.names):
                    edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Iterative depth-first search, modules in sorted order."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "inf_quant.pipeline" in graph["inf_quant.cli"]  # imported inside a function, `from .pipeline import`
    assert "inf_quant.core.config" in graph["inf_quant.quant.gptq"]  # `from ..core.config import`
    assert "inf_quant.preflight" in graph["inf_quant.pipeline"]  # `from . import preflight`
    assert "inf_quant.save.output" in graph["inf_quant.pipeline"]  # `from .save import output`


# The folders of inf_quant/ in pipeline order (README's table): each imports only those before it, and none imports
# a top-level module (the commands: pipeline, verify, release, ...) other than the package itself (__version__).
STAGES = ("models", "core", "read", "data", "quant", "engine", "save", "evaluate")


def stage(module: str) -> str | None:
    """The folder a module sits in (inf_quant.read.load -> "read"), or None for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_each_folder_imports_only_the_folders_before_it():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders == set(STAGES), f"folders missing from or extra in STAGES: {sorted(folders ^ set(STAGES))}"
    wrong = []
    for name, edges in sorted(import_graph().items()):
        if (s := stage(name)) is None:
            continue
        for e in sorted(edges):
            t = stage(e)
            if (t is None and e != "inf_quant") or (t is not None and STAGES.index(t) > STAGES.index(s)):
                wrong.append(f"{name} -> {e}")
    assert not wrong, "imports against the pipeline order:\n" + "\n".join(wrong)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
