"""``agentq mcp --agent AGENT``: the six tools over MCP (stdio), the caller fixed
to AGENT. Each tool has a title, a description and annotations; its input and
output schemas come from the pydantic models, whose field descriptions are
written for a language model. A refusal is a tool result with ``isError`` set and
the error object as its content.

Only the ``mcp`` command imports this module: the SDK takes most of a second to
import, which no other command should pay."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from mcp import types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import CoreSchema

from agentq.client import Client
from agentq.schemas import tools as models
from agentq.schemas.job import JobView
from agentq.tools import TOOLS

VERSION = "0.1.0"
_SEE = "Only for a job this caller dispatched or that targets it (else unauthorized)."


@dataclass(frozen=True)
class ToolSpec:
    """How one tool presents itself to an MCP client."""

    title: str
    description: str
    input: type[BaseModel]
    output: type[BaseModel]
    read_only: bool = True


SPECS: dict[str, ToolSpec] = {
    "queue_dispatch": ToolSpec(
        "Dispatch a job",
        "Give a task to another agent as a job. Returns at once with the job (its jobId, state, "
        "attempt budget); the target's worker runs it later. Follow it with queue_status or "
        "queue_wait, or set announce to be told when it ends. Refusals: unknown_agent (no such "
        "agent), forbidden (the target is not in this caller's allowAgents, or dispatches are "
        "nested too deep), rate_limited, queue_full, not_found (a dependsOn or parentJobId that "
        "does not exist), invalid_input.",
        models.DispatchInput, JobView, read_only=False,
    ),
    "queue_status": ToolSpec(
        "Job status",
        "Where one job stands now: its state (waiting_dependencies, delayed, queued, active, "
        "completed, failed, cancelled), attempt, progress, and its result or error once it "
        f"has ended. {_SEE}",
        models.StatusInput, JobView,
    ),
    "queue_list": ToolSpec(
        "List jobs",
        "Jobs newest first, filtered by target, dispatcher and state, a page at a time "
        "(nextCursor is null on the last page); each task cut to 80 characters. An agent other "
        "than a system agent sees only the jobs it dispatched or that target it.",
        models.ListInput, models.ListOutput,
    ),
    "queue_activity": ToolSpec(
        "Agent activity",
        "What each agent is doing now: offline (no live worker), idle or working; its live "
        "workers; its jobs per state; the jobs it is running. Covers the caller and the agents "
        "it may dispatch to (every agent, for a system agent); an agent nobody knows is refused "
        "with unknown_agent.",
        models.ActivityInput, models.ActivityOutput,
    ),
    "queue_wait": ToolSpec(
        "Wait for a job",
        "Block until a job ends (completed, failed or cancelled), for at most timeoutSeconds, "
        "and return it; a job still running then comes back as it stands with timedOut true. "
        f"{_SEE}",
        models.WaitInput, models.WaitOutput,
    ),
    "queue_history": ToolSpec(
        "Job history",
        "Every event of one job, oldest first (dispatched, queued, started, progress, attempt "
        "failed, completed, ...), each with its time and who caused it: the job's audit trail. "
        f"{_SEE}",
        models.HistoryInput, models.HistoryOutput,
    ),
}


class _UntitledFields(GenerateJsonSchema):
    """Output schemas without a title per field: pydantic would make them from the
    camelCase aliases ("Timedout"), which tells a reader nothing."""

    def field_title_should_be_set(self, schema: CoreSchema) -> bool:
        return False


def _annotations(spec: ToolSpec) -> types.ToolAnnotations:
    if spec.read_only:
        return types.ToolAnnotations(title=spec.title, read_only_hint=True, open_world_hint=False)
    # A dispatch adds a job and destroys nothing; repeating it adds another (unless it
    # carries an idempotencyKey); the job is then done by another agent, in the open world.
    return types.ToolAnnotations(title=spec.title, read_only_hint=False, destructive_hint=False,
                                 idempotent_hint=False, open_world_hint=True)


@cache
def tool_list() -> list[types.Tool]:
    """The six tools as MCP lists them (built once: the schemas do not change)."""
    return [
        types.Tool(
            name=name,
            title=spec.title,
            description=spec.description,
            input_schema=spec.input.model_json_schema(by_alias=True),
            output_schema=spec.output.model_json_schema(
                by_alias=True, mode="serialization", schema_generator=_UntitledFields
            ),
            annotations=_annotations(spec),
        )
        for name, spec in SPECS.items()
    ]


def instructions(agent: str, targets: list[str], system: bool) -> str:
    """The server's instructions: who the caller is and whom it may dispatch to."""
    reach = ", ".join(targets) if targets else "no agent (its allowAgents names no known agent)"
    sees = ("It is a system agent: it sees every job." if system else
            "It sees the jobs it dispatched and the jobs that target it.")
    return (
        f'agentq, a job queue for AI agents. Every tool call here acts as the agent "{agent}". '
        f"{sees} It may dispatch to: {reach} (the known agents it is allowed, as this "
        "session started).\n"
        "queue_dispatch gives a task to another agent and returns at once with the job's id. "
        "To hear back, call queue_wait with that id (it blocks up to timeoutSeconds, at most "
        "600) and call it again while timedOut is true, or dispatch with announce true: a job "
        f'telling the outcome is then dispatched back to "{agent}". dependsOn chains jobs '
        "without waiting in between.\n"
        'A refused call returns {"error": {"code": ..., "message": ...}} with isError set; '
        "the message says what was wrong."
    )


def build_server(client: Client, agent: str, instructions_text: str | None = None) -> Server[Any]:
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

    return Server("agentq", version=VERSION, title="agentq", instructions=instructions_text,
                  on_list_tools=list_tools, on_call_tool=call_tool)


async def serve(client: Client, agent: str) -> None:
    """Serve MCP over this process's stdin and stdout until the client hangs up."""
    text = instructions(agent, await client.dispatch_targets(agent),
                        client.config.is_system(agent))
    server = build_server(client, agent, text)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
