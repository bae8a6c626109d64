"""``agentq mcp --agent AGENT``: the six tools over MCP (stdio), the caller fixed
to AGENT. Input schemas come from the pydantic models; a refusal is a tool
result with ``isError`` set and the error object as its content."""

from __future__ import annotations

from typing import Any

import orjson
from mcp import types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from pydantic import BaseModel

from agentq.client import Client
from agentq.schemas import tools as models
from agentq.tools import TOOLS

_INPUTS: dict[str, type[BaseModel]] = {
    "queue_dispatch": models.DispatchInput,
    "queue_status": models.StatusInput,
    "queue_list": models.ListInput,
    "queue_activity": models.ActivityInput,
    "queue_wait": models.WaitInput,
    "queue_history": models.HistoryInput,
}

_DESCRIPTIONS = {
    "queue_dispatch": "Dispatch a task to another agent as a job; returns the job.",
    "queue_status": "The state, result, error and progress of one job.",
    "queue_list": "Jobs newest first, filtered by target, dispatcher and state, paged by cursor.",
    "queue_activity": "What each agent is doing: live workers, jobs per state, current jobs.",
    "queue_wait": "Wait until a job ends (or a timeout) and return it.",
    "queue_history": "Every event of a job, oldest first: the audit trail.",
}


def tool_list() -> list[types.Tool]:
    return [
        types.Tool(
            name=name,
            description=_DESCRIPTIONS[name],
            input_schema=model.model_json_schema(by_alias=True),
        )
        for name, model in _INPUTS.items()
    ]


def build_server(client: Client, agent: str) -> Server[Any]:
    """An MCP server whose tool calls act as ``agent`` through ``client``."""

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        tool = TOOLS.get(params.name)
        if tool is None:
            out: dict[str, Any] = {"error": {"code": "invalid_input",
                                             "message": f"Unknown tool: {params.name}"}}
        else:
            out = await tool(client, agent, dict(params.arguments or {}))
        text = orjson.dumps(out).decode()
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)],
            structured_content=out,
            # A refusal is exactly {"error": {...}}; a job view has an "error" field too.
            is_error=set(out) == {"error"} and isinstance(out["error"], dict),
        )

    return Server("agentq", version="0.1.0", on_list_tools=list_tools, on_call_tool=call_tool)


async def serve(client: Client, agent: str) -> None:
    """Serve MCP over this process's stdin and stdout until the client hangs up."""
    server = build_server(client, agent)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
