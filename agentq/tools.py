"""The six agent tools: JSON object in, JSON object out, the same from Python,
the CLI and MCP. Refusals come back as ``{"error": {"code", "message"}}``
rather than being raised."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from agentq._admission import parse_model
from agentq.client import Client
from agentq.schemas.errors import AgentqError
from agentq.schemas.tools import (
    ActivityInput,
    ApproveInput,
    HistoryInput,
    ListInput,
    RejectInput,
    StatusInput,
    WaitInput,
)

JsonObject = dict[str, Any]
Tool = Callable[[Client, str, JsonObject], Awaitable[JsonObject]]


async def _guarded(work: Awaitable[JsonObject]) -> JsonObject:
    try:
        return await work
    except AgentqError as exc:
        return exc.to_json()


async def queue_dispatch(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """Dispatch a job to another agent; returns the job view."""

    async def run() -> JsonObject:
        (view,) = await q.dispatch_many([params], caller=caller)
        return view.wire()

    return await _guarded(run())


async def queue_status(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """One job's view."""

    async def run() -> JsonObject:
        inp = parse_model(StatusInput, params)
        return (await q.status(inp.job_id, caller=caller)).wire()

    return await _guarded(run())


async def queue_list(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """Jobs, newest first, filtered, paged by cursor."""

    async def run() -> JsonObject:
        inp = parse_model(ListInput, params)
        out = await q.list(caller=caller, agent=inp.agent, dispatched_by=inp.dispatched_by,
                           state=inp.state, limit=inp.limit, cursor=inp.cursor)
        return out.wire()

    return await _guarded(run())


async def queue_activity(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """What each agent is doing: workers, counts per state, current jobs."""

    async def run() -> JsonObject:
        inp = parse_model(ActivityInput, params)
        return await q.activity(inp.agents, caller=caller)

    return await _guarded(run())


async def queue_wait(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """Block until the job ends (or the timeout); its view, with ``timedOut``."""

    async def run() -> JsonObject:
        inp = parse_model(WaitInput, params)
        view, timed_out = await q.wait(inp.job_id, timeout=inp.timeout_seconds, caller=caller)
        return {**view.wire(), "timedOut": timed_out}

    return await _guarded(run())


async def queue_history(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """A job's events, oldest first."""

    async def run() -> JsonObject:
        inp = parse_model(HistoryInput, params)
        events = await q.history(inp.job_id, caller=caller)
        return {"jobId": inp.job_id, "events": [e.wire() for e in events]}

    return await _guarded(run())


async def queue_approve(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """Approve a job pending approval (approvers only); returns its view."""

    async def run() -> JsonObject:
        inp = parse_model(ApproveInput, params)
        return (await q.approve(inp.job_id, caller=caller, note=inp.note)).wire()

    return await _guarded(run())


async def queue_reject(q: Client, caller: str, params: JsonObject) -> JsonObject:
    """Reject a job pending approval (approvers only): it is cancelled; returns its view."""

    async def run() -> JsonObject:
        inp = parse_model(RejectInput, params)
        return (await q.reject(inp.job_id, caller=caller, reason=inp.reason)).wire()

    return await _guarded(run())


TOOLS: dict[str, Tool] = {
    "queue_dispatch": queue_dispatch,
    "queue_status": queue_status,
    "queue_list": queue_list,
    "queue_activity": queue_activity,
    "queue_wait": queue_wait,
    "queue_history": queue_history,
    "queue_approve": queue_approve,
    "queue_reject": queue_reject,
}
