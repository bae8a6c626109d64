"""What the CLI imports before it knows its command (issue 12, item 16).

``agentq --help`` (or a usage error) must not pay for Redis, the pydantic models or
the MCP SDK, and ``agentq mcp`` must not pay for the worker and the other commands.
Read from ``python -X importtime`` in a real process rather than from timings, which
a loaded machine makes meaningless."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Modules (and their submodules) the parser alone never needs.
HEAVY = ("asyncio", "redis", "pydantic", "pydantic_core", "mcp", "mcp_types", "yaml",
         "structlog", "agentq.client", "agentq.config", "agentq.schemas.job",
         "agentq.schemas.config", "agentq.eventlog", "agentq.consumers", "agentq.projections")
# What the MCP server does not serve: workers and their consumers, rebuilds, the demo.
NOT_FOR_MCP = ("agentq._runner", "agentq.consumers", "agentq.projections.rebuild", "agentq.demo")
_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|( *)(\S+)\s*$")


def imported(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> set[str]:
    """The modules ``agentq ARGS`` imports, from ``-X importtime`` (run from the repository)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "agentq.cli", *args],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )
    names = {m.group(2) for line in done.stderr.splitlines() if (m := _LINE.match(line))}
    assert "agentq.cli" in names, done.stderr[-2000:]
    return names


def _among(names: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("args", [
    ("--help",), ("mcp", "--help"), ("dispatch", "--help"), ("worker", "--help"), (),
    ("dispatch",),  # a usage error: TARGET and TASK missing
    ("--json", "nosuchcommand"),
], ids=lambda args: " ".join(args) or "nothing")
def test_help_and_usage_errors_import_no_redis_pydantic_or_mcp(args: tuple[str, ...]) -> None:
    names = imported(*args)
    assert _among(names, HEAVY) == []


def test_mcp_imports_what_it_serves_and_no_more(redis_url: str) -> None:
    """`agentq mcp` with standard input closed: it starts, finds no client, and exits."""
    names = imported("--redis", redis_url, "mcp", "--agent", "planner",
                     env={"AGENTQ_KEY_PREFIX": "aqstartup"})
    assert {"mcp", "agentq.mcp_server", "agentq.client"} <= names
    assert _among(names, NOT_FOR_MCP) == []


def test_a_command_loads_yaml_only_for_a_yaml_config(redis_url: str, tmp_path: Path) -> None:
    env = {"AGENTQ_KEY_PREFIX": "aqstartup"}
    names = imported("--redis", redis_url, "list", "--json", env=env)
    assert "agentq.client" in names
    assert _among(names, ("yaml", "mcp", "agentq._runner", "agentq.consumers")) == []
    config = tmp_path / "agentq.yaml"
    config.write_text("keyPrefix: aqstartup\n")
    assert "yaml" in imported("--redis", redis_url, "--config", str(config), "list", env=env)
