"""The house: one-way layers (import-linter, pyproject.toml), no import cycle counting imports inside
functions, no import placed inside a function to dodge one, registries that find their modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tunelab"
# Imports inside functions allowed only where they keep `import tunelab` / the CLI's start light.
LAZY_OK = {"__init__.py", "cli.py"}


def test_the_layer_contract_holds():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 kept, 0 broken" in done.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            comp = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                comp.append(n)
                if n == m:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_counting_imports_inside_functions():
    sys.setrecursionlimit(10_000)
    graph = grimp.build_graph("tunelab")  # grimp reads every import statement, function bodies included
    assert len(graph.modules) > 50
    assert _cycles(graph) == []


def test_no_tunelab_import_inside_a_function_outside_the_lazy_faces():
    inner = []
    for f in sorted(SRC.rglob("*.py")):
        if f.relative_to(SRC).as_posix() in LAZY_OK:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            is_tunelab = (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunelab")) or (
                isinstance(node, ast.Import) and any(a.name.startswith("tunelab") for a in node.names))
            if is_tunelab and node.col_offset > 0:
                inner.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert inner == [], "move these imports to the top of their module (a cycle means a layer is wrong)"


def test_every_objective_module_registers_itself():
    from tunelab.objectives import OBJECTIVES

    modules = {s.loss.__module__ for s in OBJECTIVES.values()}
    files = {f"tunelab.objectives.{p.stem}" for p in (SRC / "objectives").glob("*.py")
             if p.stem not in {"__init__", "registry", "alignment_losses", "preference_losses", "frozen", "rewards"}}
    assert files <= modules, f"{sorted(files - modules)} register no objective"
