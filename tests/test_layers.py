"""The house's import rules (docs/extending.md, DESIGN.md's layers), read from the source with `ast`:
no package imports another in a cycle, and the evaluation suites never import training code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("benchmarks", "callbacks", "core", "datamodules", "evaluation", "experiments", "lightning_modules")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at module level or inside a function
    (a deferred import still ties the two together)."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        if (module := todo.pop()) not in seen:
            seen.add(module)
            todo += graph[module]
    return seen


def test_no_module_imports_itself_through_others():
    """Issue 21.18: datamodules/masking.py and datamodules/policies/standard.py imported each other."""
    graph = imports()
    assert not sorted(m for m in graph if m in reachable(graph, m))


def test_the_evaluation_suites_never_import_training_code():
    """Suites run on an exported model, from the CLI and from the evaluation callback: the callback may
    import them, never the other way (issue 21.18: evaluation/entropy.py took forking_stats from a callback)."""
    graph = imports()
    wrong = {m: sorted(i for i in graph[m] if i.startswith("callbacks")) for m in graph if m.startswith("evaluation")}
    assert not {m: i for m, i in wrong.items() if i}
