"""The MCP server both transports share: the tools called as the request's
caller, ``queue_wait``'s progress notifications, the instructions naming the
caller, and the Tasks extension (``tasks.py``) for the clients that opt in.

Over stdio the caller is fixed (``--agent``); over HTTP it is the agent of the
request's bearer token (``http.py``), so one server serves many callers and
works out who is calling on every request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
from mcp import types
from mcp.server import Server, ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.server.extension import compose_tool_call_handler
from mcp.server.stdio import stdio_server
from mcp.shared.jsonrpc_dispatcher import progress_token_from_params

from agentq.client import Client
from agentq.mcp.tasks import TasksExtension
from agentq.mcp.tools import VERSION, instructions, progress_of, tool_list, tool_result
from agentq.schemas.errors import AgentqError
from agentq.tools import TOOLS, queue_wait

# SPEC: while queue_wait waits, a client that gave a progress token hears from it
# at least this often, so that one whose requests time out after 60 s of silence
# keeps waiting. Tests shorten it (AGENTQ_MCP_PROGRESS_SECONDS, or monkeypatch).
PROGRESS_SECONDS = float(os.environ.get("AGENTQ_MCP_PROGRESS_SECONDS") or 10.0)

CallerOf = Callable[[ServerRequestContext[Any]], str]
"""Who a request acts for: the ``--agent`` of stdio, a token's agent over HTTP."""


async def instructions_for(client: Client, agent: str) -> str:
    """The server's instructions for ``agent``: who it is, whom it may dispatch to."""
    return instructions(agent, await client.dispatch_targets(agent),
                        client.config.is_system(agent))


async def wait_reporting(
    q: Client, caller: str, arguments: dict[str, Any], ctx: ServerRequestContext[Any]
) -> dict[str, Any]:
    """``queue_wait``, and every ``PROGRESS_SECONDS`` while it waits a progress
    notification with the job's state and progress (read from its record). When
    the client goes away, the task group is cancelled: the wait's blocking read
    ends with it and nothing stays behind."""
    out: dict[str, Any] = {}
    job_id = arguments.get("jobId")

    async with anyio.create_task_group() as group:

        async def wait() -> None:
            out.update(await queue_wait(q, caller, arguments))
            group.cancel_scope.cancel()

        group.start_soon(wait)
        while isinstance(job_id, str):
            await anyio.sleep(PROGRESS_SECONDS)
            try:
                view = await q.status(job_id, caller=caller)
            except AgentqError:
                continue  # the wait itself answers with the refusal
            percent, message = progress_of(view)
            await ctx.session.report_progress(percent, 100, message)
    return out


class _CallerInstructions:
    """Middleware: the instructions of ``initialize`` (handshake clients) and
    ``server/discover`` (2026-07-28 clients) name the request's own caller."""

    def __init__(self, client: Client, caller_of: CallerOf) -> None:
        self._client = client
        self._caller_of = caller_of

    async def __call__(self, ctx: ServerRequestContext[Any], call_next: CallNext) -> HandlerResult:
        result = await call_next(ctx)
        if ctx.method in ("initialize", "server/discover") and isinstance(result, dict):
            text = await instructions_for(self._client, self._caller_of(ctx))
            result = {**result, "instructions": text}
        return result


def build_server(
    client: Client, caller: str | CallerOf, instructions_text: str | None = None
) -> Server[Any]:
    """An MCP server whose tool calls act as ``caller`` through ``client``: one
    agent, or a function naming each request's agent (then the instructions are
    made per request, for that agent)."""
    caller_of: CallerOf = (lambda _ctx: caller) if isinstance(caller, str) else caller

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        agent = caller_of(ctx)
        arguments = dict(params.arguments or {})
        tool = TOOLS.get(params.name)
        if tool is None:
            out: dict[str, Any] = {"error": {"code": "invalid_input",
                                             "message": f"Unknown tool: {params.name}"}}
        elif params.name == "queue_wait" and progress_token_from_params(ctx.params) is not None:
            out = await wait_reporting(client, agent, arguments, ctx)
        else:
            out = await tool(client, agent, arguments)
        return tool_result(out)

    tasks = TasksExtension(client, caller_of)
    server: Server[Any] = Server(
        "agentq", version=VERSION, title="agentq", instructions=instructions_text,
        on_list_tools=list_tools,
    )
    # The Tasks extension on the SDK's hooks, as MCPServer applies one: its methods
    # added, its interceptor folded around tools/call, its identifier advertised.
    server.add_request_handler("tools/call", types.CallToolRequestParams,
                               compose_tool_call_handler([tasks], call_tool))
    for method in tasks.methods():
        server.add_request_handler(method.method, method.params_type, method.handler)
    server.extensions[tasks.identifier] = tasks.settings()
    if not isinstance(caller, str):
        server.middleware.append(_CallerInstructions(client, caller_of))
    return server


async def serve_stdio(client: Client, agent: str) -> None:
    """Serve MCP over this process's stdin and stdout, as ``agent``, until the
    client hangs up."""
    server = build_server(client, agent, await instructions_for(client, agent))
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())

