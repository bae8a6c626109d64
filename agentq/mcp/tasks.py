"""The MCP Tasks extension (``io.modelcontextprotocol/tasks``, protocol
2026-07-28, SEP-2663), built on the SDK's extension hooks
(``mcp.server.extension.Extension``): agentq's jobs are such tasks.

For a request whose client declared the extension (in the request's
``clientCapabilities``), ``queue_dispatch`` answers with a task
(``resultType: "task"``) whose ``taskId`` is the job id. ``tasks/get`` maps the
job's state: queued, delayed, waiting_dependencies and active are ``working``;
pending_approval is ``input_required`` (with no input requests: an approver
answers it, with ``agentq approve``); completed, failed and cancelled are
themselves. A terminal task carries the job view inlined as ``result`` (a tool
result, as ``queue_status`` would give it); a failed one also carries ``error``
(code -32603, the job's error, the view as ``data``). ``tasks/cancel`` cancels
the job (an ended job is acknowledged as is: the cancellation came too late);
``tasks/update`` is acknowledged and changes nothing. Every method authorizes
like ``queue_status``. A client that does not opt in sees the plain tools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mcp import types
from mcp.server import ServerRequestContext
from mcp.server.context import CallNext, HandlerResult
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver.server import require_client_extension
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from agentq.client import Client
from agentq.mcp.tools import progress_of, tool_result
from agentq.schemas.errors import AgentqError, InvalidState
from agentq.schemas.job import TERMINAL_STATES, JobView

IDENTIFIER = "io.modelcontextprotocol/tasks"
# How often a client should poll tasks/get: a job's state changes in milliseconds,
# but a model waiting on a job has nothing better to do with faster answers.
POLL_INTERVAL_MS = 2000

# agentq state -> task status (SPEC part two); an agentq state not named here
# (one added later) reads as working until it is mapped.
STATUS: dict[str, str] = {
    "queued": "working", "delayed": "working", "waiting_dependencies": "working",
    "active": "working", "pending_approval": "input_required",
    "completed": "completed", "failed": "failed", "cancelled": "cancelled",
}


class TaskParams(types.RequestParams):
    """``tasks/get`` and ``tasks/cancel``: the task (job) id."""

    task_id: str = Field(alias="taskId")


class UpdateTaskParams(TaskParams):
    """``tasks/update``: responses to input requests (agentq never asks for any)."""

    input_responses: dict[str, Any] = Field(alias="inputResponses", default_factory=dict)


def _status_message(view: JobView) -> str:
    if view.state == "pending_approval":
        return f"waiting for approval (an approver runs: agentq approve {view.job_id})"
    if view.state == "waiting_dependencies":
        return "waiting for its dependencies: " + ", ".join(view.depends_on)
    if view.state == "delayed" and view.run_at:
        return f"delayed until {view.run_at}"
    if view.state == "failed":
        return f"failed: {view.error}"
    if view.state == "cancelled":
        return f"cancelled: {view.error}" if view.error else "cancelled"
    return progress_of(view)[1]


def task_of(view: JobView, *, detailed: bool = True) -> dict[str, Any]:
    """The job as a task: ``Task`` (a dispatch's answer), or the ``DetailedTask``
    of ``tasks/get`` (input requests, result and error inlined)."""
    status = STATUS.get(view.state, "working")
    task: dict[str, Any] = {
        "taskId": view.job_id,
        "status": status,
        "statusMessage": _status_message(view),
        "createdAt": view.created_at,
        "lastUpdatedAt": view.finished_at or view.started_at or view.queued_at
        or view.created_at,
        "ttlMs": None,  # a job is never forgotten: it stays readable from the archive
        "pollIntervalMs": POLL_INTERVAL_MS,
    }
    if not detailed:
        return task
    if status == "input_required":
        task["inputRequests"] = {}
    if view.state in TERMINAL_STATES:
        inlined = tool_result(view.wire())
        task["result"] = inlined.model_dump(by_alias=True, mode="json", exclude_none=True)
        if view.state == "failed":
            task["error"] = {"code": INTERNAL_ERROR,
                             "message": f"Job {view.job_id} failed: {view.error}",
                             "data": view.wire()}
    return task


def _refused(exc: AgentqError) -> MCPError:
    """A refusal of a tasks/* request: invalid params (SEP-2663's code for a task that
    is not there), agentq's own error object as its data."""
    return MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: {exc.message}",
                    data=exc.to_json()["error"])


class TasksExtension(Extension):
    """``io.modelcontextprotocol/tasks`` over agentq's jobs; ``caller_of`` names the
    agent each request acts for."""

    identifier = IDENTIFIER

    def __init__(self, client: Client,
                 caller_of: Callable[[ServerRequestContext[Any]], str]) -> None:
        self._client = client
        self._caller_of = caller_of

    @staticmethod
    def opted_in(ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether this request's client declared the extension (2026-07-28 only: a
        task cannot be told on an older wire)."""
        capabilities = ctx.session.client_capabilities
        declared = capabilities.extensions if capabilities is not None else None
        return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and bool(declared) \
            and IDENTIFIER in (declared or {})

    def methods(self) -> Sequence[MethodBinding]:
        versions = frozenset(MODERN_PROTOCOL_VERSIONS)
        return (
            MethodBinding("tasks/get", TaskParams, self._get, versions),
            MethodBinding("tasks/cancel", TaskParams, self._cancel, versions),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, versions),
        )

    async def intercept_tool_call(
        self, params: types.CallToolRequestParams, ctx: ServerRequestContext[Any, Any],
        call_next: CallNext,
    ) -> HandlerResult:
        result = await call_next(ctx)
        if params.name != "queue_dispatch" or not self.opted_in(ctx):
            return result
        if not isinstance(result, types.CallToolResult) or result.is_error \
                or result.structured_content is None:
            return result  # a refused dispatch made no job: the plain refusal
        view = JobView.model_validate(result.structured_content)
        # The dispatch has returned: the job exists, so tasks/get resolves at once.
        return {"resultType": "task", **task_of(view, detailed=False)}

    def _admit(self, ctx: ServerRequestContext[Any, Any]) -> str:
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            raise MCPError(code=METHOD_NOT_FOUND, message="Method not found", data=ctx.method)
        require_client_extension(ctx, IDENTIFIER)
        return self._caller_of(ctx)

    async def _view(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> JobView:
        try:
            return await self._client.status(task_id, caller=self._admit(ctx))
        except AgentqError as exc:
            raise _refused(exc) from exc

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        return task_of(await self._view(ctx, params.task_id))

    async def _cancel(self, ctx: ServerRequestContext[Any, Any],
                      params: TaskParams) -> HandlerResult:
        caller = self._admit(ctx)
        try:
            await self._client.cancel(params.task_id, caller=caller)
        except InvalidState:
            pass  # it ended first: SEP-2663 acknowledges a cancellation that came too late
        except AgentqError as exc:
            raise _refused(exc) from exc
        return {}

    async def _update(self, ctx: ServerRequestContext[Any, Any],
                      params: UpdateTaskParams) -> HandlerResult:
        await self._view(ctx, params.task_id)  # a task that is not there is refused
        return {}
