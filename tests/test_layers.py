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
