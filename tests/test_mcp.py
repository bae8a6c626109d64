"""``agentq mcp --agent AGENT``: the six tools over MCP (stdio), driven by the
official SDK's own client (``mcp.Client`` with ``StdioServerParameters``, 2.x).
Every call acts as the agent given on the command line; a refusal is a tool result
with ``isError`` set and the error object as its content. What a model reads before
calling (titles, descriptions, annotations, output schemas, instructions) is checked
at the end."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, TextContent, Tool

import agentq
from agentq import Job, tools
from agentq.schemas.config import Config
from agentq.schemas.tools import ActivityOutput

REPO = Path(__file__).resolve().parent.parent
TOOLS = {"queue_dispatch", "queue_status", "queue_list", "queue_activity", "queue_wait",
         "queue_history", "queue_approve", "queue_reject"}
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
        # One state alone, as a model often writes it, is a list of one.
        assert (await call("queue_list", {"state": "queued"}))["count"] == 1

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
        nobody = await mcp.call_tool("queue_activity", {"agents": ["nobody"]})
    for result in (unknown, forbidden, unauthorized, missing, invalid, nobody):
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
    assert _content(nobody) == {"error": {"code": "unknown_agent",
                                          "message": "Unknown target agent: nobody"}}
    assert "maxAttempts" in _content(invalid)["error"]["message"]
    # Nothing was dispatched by the refused calls.
    assert (await q.list(dispatched_by="planner")).count == 0


# -- what a language model reads before it calls a tool (issue 12, item 14) ----

READ_ONLY = {"queue_status", "queue_list", "queue_activity", "queue_wait", "queue_history"}
# A title pydantic makes from a camelCase alias: "Timeoutseconds", "Dependson".
CAMEL_WORDS = re.compile(r"[A-Z]?[a-z0-9]+")


async def _listed(q: agentq.Client, redis_url: str, agent: str) -> tuple[dict[str, Tool], str]:
    async with mcp_as(q, redis_url, agent) as mcp:
        listed = await mcp.list_tools()
        assert mcp.instructions is not None
        return {tool.name: tool for tool in listed.tools}, mcp.instructions


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    return [prop, *prop.get("anyOf", [])]


async def test_every_parameter_has_a_description_with_its_default_and_limits(
    q: agentq.Client, redis_url: str
) -> None:
    listed, _ = await _listed(q, redis_url, "planner")
    assert len(listed) == 8
    described = 0
    for name, tool in listed.items():
        for param, prop in tool.input_schema["properties"].items():
            where = f"{name}.{param}"
            text = prop.get("description", "")
            assert len(text) >= 30, f"{where} has no real description: {text!r}"
            described += 1
            # A title, when there is one, is the words of the name, not "Timeoutseconds".
            words = [w.lower() for w in CAMEL_WORDS.findall(param)]
            if "title" in prop:
                assert prop["title"].lower().split() == words, (where, prop["title"])
            default = prop.get("default")
            if default not in (None, [], {}):
                shown = json.dumps(default).strip('"')
                assert re.search(rf"\b{re.escape(shown)}\b", text), (where, default, text)
            for branch in _branches(prop):
                for limit in ("maximum", "maxLength", "maxItems"):
                    if limit in branch:
                        value = branch[limit]
                        assert f"{value:,}" in text or str(value) in text, (where, limit, text)
    assert described == 33


async def test_tools_have_titles_annotations_and_output_schemas(
    q: agentq.Client, redis_url: str
) -> None:
    listed, _ = await _listed(q, redis_url, "planner")
    titles = {tool.title for tool in listed.values()}
    assert len(titles) == 8 and None not in titles
    for name, tool in listed.items():
        assert tool.annotations is not None, name
        assert tool.annotations.read_only_hint is (name in READ_ONLY), name
        assert tool.annotations.title == tool.title
        assert tool.description and len(tool.description) > 80, name
        out = tool.output_schema
        assert out is not None and out["type"] == "object", name
        jsonschema.Draft202012Validator.check_schema(out)
        assert "title" not in json.dumps(out["properties"]).replace('"title": "', ""), name
    dispatch = listed["queue_dispatch"].annotations
    assert dispatch is not None
    assert (dispatch.destructive_hint, dispatch.idempotent_hint) == (False, False)
    assert {"jobId", "state", "target"} <= set(listed["queue_status"].output_schema["properties"])
    assert "timedOut" in listed["queue_wait"].output_schema["required"]
    assert set(listed["queue_list"].output_schema["required"]) == {"jobs", "count"}
    # A single state is offered as well as a list of them.
    state = listed["queue_list"].input_schema["properties"]["state"]
    assert {branch.get("type") for branch in state["anyOf"]} == {"string", "array", "null"}


async def test_instructions_name_the_caller_and_its_targets(
    q: agentq.Client, redis_url: str
) -> None:
    _, planner = await _listed(q, redis_url, "planner")
    assert '"planner"' in planner
    reach = re.search(r"may dispatch to: ([^(]*)\(", planner)
    assert reach is not None, planner
    assert reach.group(1).strip() == "researcher"
    assert "It is a system agent" not in planner
    _, main = await _listed(q, redis_url, "main")
    assert '"main"' in main and "It is a system agent" in main
    reach = re.search(r"may dispatch to: ([^(]*)\(", main)
    assert reach is not None
    assert reach.group(1).strip() == "planner, researcher, writer"


async def test_output_schemas_hold_for_real_answers(q: agentq.Client) -> None:
    """The answers the tools give match the declared schemas, a running job included
    (the SDK client checks every successful call as well)."""
    from agentq.mcp_server import SPECS

    started = asyncio.Event()
    release = asyncio.Event()

    async def handler(job: Job) -> str:
        started.set()
        await release.wait()
        return "done"

    running = await q.dispatch("researcher", "run while we look", caller="planner",
                               label="busy")
    waiting = await q.dispatch("researcher", "after it", caller="planner",
                               depends_on=[running.job_id])
    worker = asyncio.create_task(q.worker("researcher", handler, concurrency=1).run())
    try:
        await asyncio.wait_for(started.wait(), 20)
        answers = {
            "queue_activity": await tools.queue_activity(q, "planner", {}),
            "queue_status": await tools.queue_status(q, "planner", {"jobId": waiting.job_id}),
            "queue_list": await tools.queue_list(q, "planner", {"state": "active"}),
            "queue_history": await tools.queue_history(q, "planner",
                                                       {"jobId": running.job_id}),
            "queue_wait": await tools.queue_wait(q, "planner", {"jobId": running.job_id,
                                                                "timeoutSeconds": 1}),
        }
        release.set()
        answers["queue_dispatch"] = await tools.queue_dispatch(
            q, "planner", {"target": "researcher", "task": "one more", "announce": True})
    finally:
        release.set()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    current = answers["queue_activity"]["agents"]["researcher"]["currentJobs"]
    assert [job["jobId"] for job in current] == [running.job_id]
    ActivityOutput.model_validate(answers["queue_activity"])
    for name, answer in answers.items():
        assert "error" not in answer or set(answer) != {"error"}, (name, answer)
        schema = SPECS[name].output.model_json_schema(by_alias=True, mode="serialization")
        jsonschema.validate(answer, schema)
