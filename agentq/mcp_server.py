"""``agentq mcp --agent AGENT`` (stdio) and ``agentq mcp --http`` live in the
:mod:`agentq.mcp` package; this module keeps the names it always offered."""

from __future__ import annotations

from agentq.mcp import SPECS, ToolSpec, build_server, instructions, serve_stdio, tool_list

serve = serve_stdio

__all__ = ["SPECS", "ToolSpec", "build_server", "instructions", "serve", "tool_list"
           ]
