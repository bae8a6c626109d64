"""How the tools present themselves over MCP: a title, a description and
annotations each; input and output schemas from the pydantic models, whose field
descriptions are written for a language model; and the server's instructions,
which name the caller and the agents it may dispatch to."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson
from mcp import types
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import CoreSchema

from agentq.schemas import tools as models
from agentq.schemas.job import JobView

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
        "Give a progress token to be sent progress (the job's state and percent) at least "
        f"every 10 seconds while it waits. {_SEE}",
        models.WaitInput, models.WaitOutput,
    ),
    "queue_history": ToolSpec(
        "Job history",
        "Every event of one job, oldest first (dispatched, queued, started, progress, attempt "
        "failed, completed, ...), each with its time and who caused it: the job's audit trail. "
        f"{_SEE}",
        models.HistoryInput, models.HistoryOutput,
    ),
    "queue_approve": ToolSpec(
        "Approve a job",
        "Let a job that waits in pending_approval go on: it is queued (or waits for its "
        "dependencies or its delay). Only for approvers (auth.approvers; else unauthorized); a "
        "job in another state is refused with invalid_state.",
        models.ApproveInput, JobView, read_only=False,
    ),
    "queue_reject": ToolSpec(
        "Reject a job",
        "Refuse a job that waits in pending_approval: it is cancelled and never runs. Only for "
        "approvers (auth.approvers; else unauthorized); a job in another state is refused with "
        "invalid_state.",
        models.RejectInput, JobView, read_only=False,
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


def tool_result(out: dict[str, Any]) -> types.CallToolResult:
    """A tool's JSON answer as MCP returns it: the object as text and as structured
    content; ``isError`` exactly when it is a refusal (a job view has an "error"
    field too)."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=orjson.dumps(out).decode())],
        structured_content=out,
        is_error=set(out) == {"error"} and isinstance(out["error"], dict),
    )


def progress_of(view: JobView) -> tuple[float, str]:
    """A job's progress as a notification carries it: percent (0 before any report)
    and a line saying where the job stands."""
    percent = view.progress.percent if view.progress is not None else 0.0
    said = view.progress.message if view.progress is not None else None
    where = view.state if view.state != "active" else \
        f"active (attempt {view.attempt}/{view.max_attempts})"
    return percent, f"{where}, {percent:g}%: {said}" if said else f"{where}, {percent:g}%"
