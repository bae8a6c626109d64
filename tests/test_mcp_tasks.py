"""The MCP Tasks extension (``io.modelcontextprotocol/tasks``, 2026-07-28) on
``agentq mcp --http``, spoken by the SDK's client with the extension declared and
hand-built ``tasks/*`` requests: a dispatch is a task whose id is the job id,
``tasks/get`` follows the job through its states (its view inlined at the end),
``tasks/cancel`` cancels it; a client that does not opt in sees plain tools."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

import pytest
from _mcp_http import HttpServer, eventually, http_server, mcp_client
from mcp import Client, types
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.shared.exceptions import MCPError
from pydantic import Field, TypeAdapter

import agentq
from agentq import Job
from agentq.mcp.tasks import IDENTIFIER, STATUS, TaskParams, task_of
from agentq.schemas.job import JobView

# -- a client that speaks the extension ------------------------------------------


class CreatedTask(types.Result):
    """``CreateTaskResult``: what a tools/call answers with when it made a task."""

    result_type: Literal["task"] = Field(alias="resultType")
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None


class GetTask(types.Request[TaskParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    name_param = "taskId"


class CancelTask(types.Request[TaskParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param = "taskId"


ANY = TypeAdapter(dict[str, Any])


class Tasks(ClientExtension):
    """Declares the extension and claims ``resultType: "task"``."""

    identifier = IDENTIFIER

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=self._resolve)]

    async def _resolve(self, task: CreatedTask, ctx: ClaimContext) -> types.CallToolResult:
        raise AssertionError("the tests follow their tasks by hand")


async def dispatch_task(client: Client, arguments: dict[str, Any]) -> CreatedTask:
    created = await client.session.call_tool("queue_dispatch", arguments, allow_claimed=True)
    assert isinstance(created, CreatedTask), created
    return created


async def get_task(client: Client, task_id: str) -> dict[str, Any]:
    got: dict[str, Any] = await client.session.send_request(
        GetTask(params=TaskParams(task_id=task_id)), ANY)
    return got


async def cancel_task(client: Client, task_id: str) -> dict[str, Any]:
    done: dict[str, Any] = await client.session.send_request(
        CancelTask(params=TaskParams(task_id=task_id)), ANY)
    return done


def _acknowledged(answer: dict[str, Any]) -> bool:
    """An empty result (SEP-2663's acknowledgement), with the 2026 envelope's own keys."""
    return answer.get("resultType") == "complete" and set(answer) <= {"resultType", "_meta"}


# -- the server and a worker -------------------------------------------------------


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[HttpServer]:
    with http_server(redis_url) as started:
        yield started


@pytest.fixture
async def q(server: HttpServer) -> AsyncIterator[agentq.Client]:
    async with server.client() as client:
        yield client


# -- the mapping ------------------------------------------------------------------


def test_every_state_maps_to_a_task_status() -> None:
    base = {"job_id": "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.worker", "target": "worker",
            "dispatched_by": "planner", "task": "t", "max_attempts": 3,
            "created_at": "2026-01-01T00:00:00Z", "depends_on": [], "dependencies": {}}
    expected = {"queued": "working", "delayed": "working", "waiting_dependencies": "working",
                "active": "working", "pending_approval": "input_required",
                "completed": "completed", "failed": "failed", "cancelled": "cancelled"}
    assert expected == STATUS
    for state, status in expected.items():
        # model_construct: pending_approval may be newer than this tree's JobView.
        view = JobView.model_construct(**base, state=state, result={"n": 1}, error="boom")
        task = task_of(view)
        assert (task["taskId"], task["status"]) == (view.job_id, status)
        assert task["ttlMs"] is None and task["pollIntervalMs"] > 0
        assert ("inputRequests" in task) is (status == "input_required")
        assert ("result" in task) is (state in ("completed", "failed", "cancelled"))
        assert ("error" in task) is (state == "failed")
        if "result" in task:
            assert task["result"]["structuredContent"]["state"] == state
            assert task["result"]["isError"] is False
        if state == "failed":
            assert task["error"]["code"] == -32603 and task["error"]["data"]["error"] == "boom"
        assert "result" not in task_of(view, detailed=False)


# -- the flow ---------------------------------------------------------------------


async def test_a_dispatch_is_a_task_followed_through_its_states(
    server: HttpServer, q: agentq.Client
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def handler(job: Job) -> dict[str, int]:
        if job.task == "fail":
            raise RuntimeError("it broke")
        started.set()
        await release.wait()
        return {"answer": 42}

    token = await server.token("planner")
    async with mcp_client(server.url, token, extensions=[Tasks()]) as client:
        assert client.protocol_version == "2026-07-28"
        assert IDENTIFIER in (client.server_capabilities.extensions or {})
        created = await dispatch_task(client, {"target": "runner", "task": "work"})
        assert created.status == "working" and created.task_id.startswith("j_")
        job = await q.status(created.task_id)  # the task id is the job id
        assert (job.dispatched_by, job.state) == ("planner", "queued")

        got = await get_task(client, created.task_id)
        assert (got["status"], got["statusMessage"]) == ("working", "queued, 0%")
        assert "result" not in got

        worker = q.worker("runner", handler, concurrency=2, background=False)
        running = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(started.wait(), 20)
            got = await get_task(client, created.task_id)
            assert got["status"] == "working" and got["statusMessage"].startswith("active")
            release.set()

            async def completed() -> bool:
                return (await get_task(client, created.task_id))["status"] == "completed"

            await eventually(completed, "the task to complete")
            done = await get_task(client, created.task_id)
            view = done["result"]["structuredContent"]
            assert (view["jobId"], view["state"], view["result"]) == (
                created.task_id, "completed", {"answer": 42})
            assert done["result"]["isError"] is False

            broken = await dispatch_task(client, {"target": "runner", "task": "fail",
                                                  "maxAttempts": 1})

            async def failed() -> bool:
                return (await get_task(client, broken.task_id))["status"] == "failed"

            await eventually(failed, "the task to fail")
            failure = await get_task(client, broken.task_id)
            assert failure["error"]["code"] == -32603
            assert "it broke" in failure["error"]["message"]
            assert failure["result"]["structuredContent"]["state"] == "failed"
        finally:
            release.set()
            worker.stop()
            await asyncio.wait_for(running, 15)


async def test_tasks_cancel_cancels_the_job(server: HttpServer, q: agentq.Client) -> None:
    token = await server.token("planner")
    async with mcp_client(server.url, token, extensions=[Tasks()]) as client:
        created = await dispatch_task(client, {"target": "idle", "task": "never runs"})
        assert _acknowledged(await cancel_task(client, created.task_id))
        assert (await q.status(created.task_id)).state == "cancelled"
        got = await get_task(client, created.task_id)
        assert got["status"] == "cancelled"
        assert got["result"]["structuredContent"]["state"] == "cancelled"
        # Cancelling it again is acknowledged: it has ended.
        assert _acknowledged(await cancel_task(client, created.task_id))

        missing = "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.idle"
        for call in (get_task, cancel_task):
            with pytest.raises(MCPError) as refused:
                await call(client, missing)
            assert refused.value.error.code == -32602

    # Another agent's task is not this caller's to read or cancel.
    other = await server.token("stranger")
    async with mcp_client(server.url, other, extensions=[Tasks()]) as client:
        for call in (get_task, cancel_task):
            with pytest.raises(MCPError) as refused:
                await call(client, created.task_id)
            assert refused.value.error.code == -32602
            assert refused.value.error.data["code"] == "unauthorized"


async def test_a_client_that_does_not_opt_in_sees_plain_tools(
    server: HttpServer, q: agentq.Client
) -> None:
    token = await server.token("planner")
    async with mcp_client(server.url, token) as client:
        plain = await client.call_tool("queue_dispatch", {"target": "idle", "task": "plain"})
        assert not plain.is_error
        assert plain.structured_content is not None
        assert plain.structured_content["state"] == "queued"
        with pytest.raises(MCPError) as refused:
            await get_task(client, plain.structured_content["jobId"])
        assert refused.value.error.code == -32021  # missing required client capability


async def test_pending_approval_is_input_required(server: HttpServer, q: agentq.Client) -> None:
    token = await server.token("planner")
    async with mcp_client(server.url, token, extensions=[Tasks()]) as client:
        asked = await client.session.call_tool(
            "queue_dispatch", {"target": "idle", "task": "approve me", "requiresApproval": True},
            allow_claimed=True)
        if isinstance(asked, types.CallToolResult):
            pytest.skip(f"approvals are not in this tree yet: {asked.content}")
        assert isinstance(asked, CreatedTask)
        got = await get_task(client, asked.task_id)
        assert (got["status"], got["inputRequests"]) == ("input_required", {})
        assert "approve" in got["statusMessage"]
