"""The arrows of DESIGN.md, checked on the source: agentq's front → consumers →
projections / eventlog → schemas, and nothing imports the layers by the bare
top-level names that an installed agentq does not have."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("schemas", "eventlog", "projections", "consumers")

# What each layer may import of agentq's own code (itself always).
ALLOWED = {
    "schemas": set(),
    "eventlog": {"schemas"},
    "projections": {"schemas", "eventlog"},
    "consumers": {"schemas", "eventlog", "projections"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)]
            if node.module == "agentq":
                found += [(node.lineno, f"agentq.{alias.name}") for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    """The layer an ``agentq.…`` module belongs to; "front" for the rest of agentq."""
    parts = module.split(".")
    if parts[0] != "agentq":
        return None
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "front"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for line, module in _imports(path):
                target = _layer(module)
                if target is None or target == layer:
                    continue
                if target not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == [], "imports against DESIGN.md's arrows:\n" + "\n".join(wrong)


def test_nothing_imports_the_bare_layer_names() -> None:
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for line, module in _imports(path):
            if module.split(".")[0] in LAYERS:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == [], "use agentq.<layer>, the only name installed:\n" + "\n".join(wrong)


def test_the_layers_are_reached_through_agentq() -> None:
    for layer in LAYERS:
        link = ROOT / "agentq" / layer
        assert link.is_symlink() and link.resolve() == ROOT / layer, link


def _front_modules() -> dict[str, Path]:
    """agentq's own modules outside the layers, by dotted name (a package by its own)."""
    front: dict[str, Path] = {}
    for path in sorted((ROOT / "agentq").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1] in LAYERS or any(p.startswith((".", "__pycache__")) for p in parts):
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        front[name] = path
    return front


def _front_graph() -> dict[str, set[str]]:
    """Who imports whom among the front modules: every import, also those under
    TYPE_CHECKING and inside functions (a deferred import is still an arrow)."""
    front = _front_modules()
    graph: dict[str, set[str]] = {name: set() for name in front}
    for name, path in front.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in front}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    # `from agentq import tools` names a module, `from agentq import Client` not.
                    whole = f"{node.module}.{alias.name}"
                    target = whole if whole in front else node.module
                    if target in front and target != name:
                        graph[name].add(target)
    return graph


def _a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path that closes it, or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        path.append(name)
        for target in sorted(graph[name]):
            if (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        done.add(name)
        return None

    for name in sorted(graph):
        if (cycle := visit(name)) is not None:
            return cycle
    return None


def test_the_front_modules_import_one_way() -> None:
    graph = _front_graph()
    # The client drives the dispatcher and the runner; they are given what they need.
    assert {"agentq._dispatching", "agentq._runner"} <= graph["agentq.client"]
    for module in ("agentq._dispatching", "agentq._runner"):
        assert "agentq.client" not in graph[module], f"{module} imports agentq.client"
    assert _a_cycle(graph) is None, "import cycle: " + " -> ".join(_a_cycle(graph) or [])


def test_a_cycle_is_found() -> None:
    assert _a_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _a_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
