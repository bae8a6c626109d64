"""``agentq mcp --agent AGENT``: the six tools over MCP (stdio), driven by the
official SDK's own client (``mcp.Client`` with ``StdioServerParameters``, 2.x).
Every call acts as the agent given on the command line; a refusal is a tool result
with ``isError`` set and the error object as its content."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent

import agentq
from agentq.schemas.config import Config

REPO = Path(__file__).resolve().parent.parent
TOOLS = {"queue_dispatch", "queue_status", "queue_list", "queue_activity", "queue_wait",
         "queue_history"}
CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")
MISSING_JOB = "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.researcher"


def _content(result: CallToolResult) -> Any:
    """The JSON object a tool returned, from its text content."""
    assert len(result.content) == 1, result.content
    block = result.content[0]
    assert isinstance(block, TextContent), block
    return json.loads(block.text)


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    """The Python API on a fresh prefix: planner (may dispatch to researcher only),
    researcher and writer known."""
    config = make_config(rateLimit={"dispatchesPerMinute": 0})
    async with agentq.connect(redis_url, config) as client:
        await client.add_agent("planner", ["researcher"])
        await client.add_agent("researcher")
        await client.add_agent("writer")
        yield client


@asynccontextmanager
async def mcp_as(q: agentq.Client, redis_url: str, agent: str) -> AsyncIterator[Client]:
    """``agentq mcp --agent AGENT`` on q's prefix, through the SDK's stdio client."""
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentq.cli", "--redis", redis_url, "mcp", "--agent", agent],
        env={"AGENTQ_KEY_PREFIX": q.config.key_prefix,
             "AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE": "0"},
        cwd=str(REPO),
    )
    async with Client(server, read_timeout_seconds=30) as client:
        yield client


async def test_mcp_lists_six_tools_with_camel_case_input_schemas(
    q: agentq.Client, redis_url: str
) -> None:
    async with mcp_as(q, redis_url, "planner") as mcp:
        listed = await mcp.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description
        schema = tool.input_schema
        assert schema["type"] == "object"
        assert schema["properties"], tool.name
        for name in schema["properties"]:
            assert CAMEL.match(name), (tool.name, name)
    dispatch = tools["queue_dispatch"].input_schema
    assert {"target", "task", "dependsOn", "timeoutSeconds", "maxAttempts", "delaySeconds",
            "idempotencyKey", "onDependencyFailure", "parentJobId", "sessionKey",
            "announce", "metadata", "origin", "priority"} <= set(dispatch["properties"])
    assert set(dispatch["required"]) == {"target", "task"}
    assert set(tools["queue_status"].input_schema["properties"]) == {"jobId"}
    assert set(tools["queue_history"].input_schema["properties"]) == {"jobId"}
    assert set(tools["queue_wait"].input_schema["properties"]) == {"jobId", "timeoutSeconds"}
    assert set(tools["queue_list"].input_schema["properties"]) == {
        "agent", "dispatchedBy", "state", "limit", "cursor"}
    assert set(tools["queue_activity"].input_schema["properties"]) == {"agents"}


async def test_mcp_calls_each_tool_as_its_agent(q: agentq.Client, redis_url: str) -> None:
    foreign = await q.dispatch("writer", "not the planner's business")
    flagged: list[str] = []  # successful calls that came back with isError set

    async with mcp_as(q, redis_url, "planner") as mcp:

        async def call(name: str, arguments: dict[str, Any]) -> Any:
            result = await mcp.call_tool(name, arguments)
            body = _content(result)
            assert "error" not in body or set(body) != {"error"}, (name, body)
            assert result.structured_content in (None, body)
            if result.is_error:
                flagged.append(name)
            return body

        view = await call("queue_dispatch", {
            "target": "researcher", "task": "find sources", "label": "sources",
            "maxAttempts": 2, "metadata": {"ticket": "T-1"},
        })
        job_id = view["jobId"]
        assert job_id.startswith("j_")
        # The caller is the agent of the command line.
        assert (view["target"], view["dispatchedBy"], view["state"]) == (
            "researcher", "planner", "queued")
        assert (view["label"], view["maxAttempts"], view["metadata"]) == (
            "sources", 2, {"ticket": "T-1"})

        status = await call("queue_status", {"jobId": job_id})
        assert (status["jobId"], status["state"]) == (job_id, "queued")

        page = await call("queue_list", {"limit": 10})
        assert set(page) == {"jobs", "count", "nextCursor"}
        # The planner sees its own job, not the writer's.
        assert [j["jobId"] for j in page["jobs"]] == [job_id]
        assert (page["count"], page["nextCursor"]) == (1, None)
        assert (await call("queue_list", {"state": ["completed"]}))["count"] == 0

        history = await call("queue_history", {"jobId": job_id})
        assert history["jobId"] == job_id
        assert [e["type"] for e in history["events"]] == ["JobDispatched"]
        assert history["events"][0]["actor"] == "planner"

        waited = await call("queue_wait", {"jobId": job_id, "timeoutSeconds": 1})
        assert (waited["state"], waited["timedOut"]) == ("queued", True)
        await q.cancel(job_id)
        ended = await call("queue_wait", {"jobId": job_id, "timeoutSeconds": 5})
        assert (ended["state"], ended["timedOut"]) == ("cancelled", False)

        activity = await call("queue_activity", {})
        assert set(activity) == {"agents", "summary"}
        # The planner sees itself and the agents it may dispatch to.
        assert set(activity["agents"]) == {"planner", "researcher"}
        assert activity["agents"]["researcher"]["status"] == "offline"
        only = await call("queue_activity", {"agents": ["researcher"]})
        assert set(only["agents"]) == {"researcher"}

    # What the MCP server did is in the log, as the planner's doing.
    assert (await q.status(job_id)).dispatched_by == "planner"
    assert [j.job_id for j in (await q.list(agent="researcher")).jobs] == [job_id]
    assert (await q.status(foreign.job_id)).state == "queued"
    # SPEC: only a refusal is a result with isError set.
    assert flagged == [], f"successful calls flagged isError: {flagged}"


async def test_mcp_refusals_are_error_results(q: agentq.Client, redis_url: str) -> None:
    foreign = await q.dispatch("writer", "not the planner's business")
    async with mcp_as(q, redis_url, "planner") as mcp:
        unknown = await mcp.call_tool("queue_dispatch", {"target": "nobody", "task": "x"})
        forbidden = await mcp.call_tool("queue_dispatch", {"target": "writer", "task": "x"})
        unauthorized = await mcp.call_tool("queue_status", {"jobId": foreign.job_id})
        missing = await mcp.call_tool("queue_history", {"jobId": MISSING_JOB})
        invalid = await mcp.call_tool("queue_dispatch", {"target": "researcher", "task": "x",
                                                         "maxAttempts": 99})
    for result in (unknown, forbidden, unauthorized, missing, invalid):
        assert result.is_error
        body = _content(result)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert _content(unknown) == {"error": {"code": "unknown_agent",
                                           "message": "Unknown target agent: nobody"}}
    assert _content(forbidden) == {"error": {
        "code": "forbidden", "message": 'Target agent "writer" is not in allowAgents'}}
    assert _content(unauthorized) == {"error": {
        "code": "unauthorized",
        "message": "Unauthorized: you can only view jobs you dispatched or that target you."}}
    assert _content(missing) == {"error": {"code": "not_found",
                                           "message": f"Job {MISSING_JOB} not found"}}
    assert _content(invalid)["error"]["code"] == "invalid_input"
    assert "maxAttempts" in _content(invalid)["error"]["message"]
    # Nothing was dispatched by the refused calls.
    assert (await q.list(dispatched_by="planner")).count == 0
