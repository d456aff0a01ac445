"""The package's import graph: no cycle at import time, and the low-level modules in no cycle at all.

Imports inside functions count too (they are how a cycle hides): only the orchestration modules,
whose features call each other by design (``load`` rebuilds through ``convert``, ``convert`` hands
untraceable models to ``partial``, ``ConversionResult.save`` writes through ``io``), may form one.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lnconvert"
# the only strongly connected group allowed, when function-level imports count
ORCHESTRATION = {"lnconvert.compact", "lnconvert.convert", "lnconvert.export", "lnconvert.io", "lnconvert.partial"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(function_level: bool) -> dict[str, set[str]]:
    """module -> the lnconvert modules it imports (the package ``__init__``, which only re-exports, left out)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree) if function_level else tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import passes` imports the submodule
                deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name] = {d for d in deps if d in modules and d not in (name, "lnconvert")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_at_import_time():
    assert cycles(import_graph(function_level=False)) == []


def test_only_the_orchestration_modules_call_each_other():
    groups = cycles(import_graph(function_level=True))
    assert all(group <= ORCHESTRATION for group in groups), groups


def test_models_and_files_import_no_saved_model_code():
    graph = import_graph(function_level=True)
    assert "lnconvert.io" not in graph["lnconvert.models"] and graph["lnconvert.files"] <= {"lnconvert.errors"}


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
