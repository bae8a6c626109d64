"""``agentq mcp --http``: one real server process on a loopback port for the module,
reached with the official SDK's client (Streamable HTTP, bearer tokens). A request
without a valid token gets 401 and runs nothing; every call acts as its token's
agent; ``queue_wait`` keeps a client with a short read timeout alive with
progress notifications (over stdio as well); a client that goes away mid-call
leaves nothing running; many clients at once each see their own jobs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

import httpx2
import pytest
from _mcp_http import REPO, HttpServer, eventually, http_server, mcp_client
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError

import agentq
from agentq import Job


@pytest.fixture(scope="module")
def server(redis_url: str) -> Iterator[HttpServer]:
    with http_server(redis_url) as started:
        yield started


@pytest.fixture
async def q(server: HttpServer) -> AsyncIterator[agentq.Client]:
    async with server.client() as client:
        yield client


def _body(result: Any) -> Any:
    return json.loads(result.content[0].text)


# -- the door ------------------------------------------------------------------

DISPATCH = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "queue_dispatch",
                       "arguments": {"target": "writer", "task": "must not run"}}}


async def test_requests_without_a_valid_token_get_401_and_run_nothing(
    server: HttpServer, q: agentq.Client
) -> None:
    revoked = await server.token("planner")
    await q.tokens.revoke(revoked[:12])
    headers = {"Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2025-11-25"}
    async with httpx2.AsyncClient() as http:
        for authorization in (None, "Bearer", "Bearer wrong", f"Bearer {revoked}",
                              f"Bearer {revoked[:-1]}", f"Basic {revoked}"):
            sent = {**headers, "Authorization": authorization} if authorization else headers
            answer = await http.post(server.url, json=DISPATCH, headers=sent)
            assert answer.status_code == 401, (authorization, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer ")
        # A good token through a proxy that passes on its own Host name: refused on a
        # loopback address (DNS-rebinding protection; the README's proxy sets Host).
        good = await server.token("planner")
        proxied = await http.post(server.url, json=DISPATCH, headers={
            **headers, "Authorization": f"Bearer {good}", "Host": "agentq.example.com"})
        assert proxied.status_code == 421, proxied.text
    with pytest.raises(Exception):  # noqa: B017 -- the SDK's client cannot even connect
        async with mcp_client(server.url, revoked):
            pass
    assert (await q.list(agent="writer")).count == 0


async def _rpc(http: httpx2.AsyncClient, url: str, method: str, params: dict[str, Any]) -> Any:
    """One JSON-RPC request of the handshake protocol (2025-11-25) on the stateless
    transport, as any MCP client sends it; its result, read off the SSE answer."""
    answer = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": method,
                                        "params": params},
                             headers={"Accept": "application/json, text/event-stream",
                                      "MCP-Protocol-Version": "2025-11-25"})
    assert answer.status_code == 200, answer.text
    data = [line[5:] for line in answer.text.splitlines() if line.startswith("data:")]
    message = json.loads(data[-1] if data else answer.text)
    assert "result" in message, message
    return message["result"]


async def test_many_clients_at_once_each_act_as_their_tokens_agent(
    server: HttpServer, q: agentq.Client
) -> None:
    """100 clients, each with a connection and a token of its own, at once (by hand-built
    requests: 100 of the SDK's clients cost the test process seconds of CPU each run)."""
    agents = [f"agent{i:03d}" for i in range(100)]
    tokens = [await q.tokens.add(agent) for agent in agents]
    hello = {"protocolVersion": "2025-11-25", "capabilities": {},
             "clientInfo": {"name": "test", "version": "1"}}

    async def session(agent: str, token: str) -> tuple[str, str, list[str]]:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            opened = await _rpc(http, server.url, "initialize", hello)
            view = (await _rpc(http, server.url, "tools/call", {
                "name": "queue_dispatch",
                "arguments": {"target": "worker", "task": f"from {agent}"}}))["structuredContent"]
            listed = (await _rpc(http, server.url, "tools/call", {
                "name": "queue_list", "arguments": {"limit": 100}}))["structuredContent"]
            return view["dispatchedBy"], opened["instructions"], [
                job["jobId"] for job in listed["jobs"]]

    answers = await asyncio.gather(*(session(a, t.token) for a, t in
                                     zip(agents, tokens, strict=True)))
    seen: set[str] = set()
    for agent, (dispatched_by, text, jobs) in zip(agents, answers, strict=True):
        assert dispatched_by == agent
        assert f'acts as the agent "{agent}"' in text
        assert "may dispatch to: idle, runner, worker, writer" in text
        assert len(jobs) == 1, (agent, jobs)  # only its own job
        seen.update(jobs)
    assert len(seen) == 100
    # Each job was dispatched by its token's agent, and one caller cannot read another's;
    # the SDK's client (2026-07-28) is told the same.
    first, second = answers[0][2][0], answers[1][2][0]
    assert (await q.status(first)).dispatched_by == agents[0]
    async with mcp_client(server.url, tokens[1].token) as client:
        assert client.protocol_version == "2026-07-28"
        assert client.instructions is not None and '"agent001"' in client.instructions
        refused = await client.call_tool("queue_status", {"jobId": first})
        assert refused.is_error and _body(refused)["error"]["code"] == "unauthorized"
        assert _body(await client.call_tool("queue_status", {"jobId": second}))["jobId"] == second


# -- progress while queue_wait waits -------------------------------------------


async def _slow(job: Job) -> str:
    """A job of a few seconds that reports its progress."""
    for step in range(1, 4):
        await asyncio.sleep(float(job.view.metadata["seconds"]) / 3)
        await job.progress(step * 30, f"step {step}")
    return "done"


@pytest.fixture
async def runner(q: agentq.Client) -> AsyncIterator[None]:
    worker = q.worker("runner", _slow, concurrency=2, background=False)
    running = asyncio.create_task(worker.run())
    yield
    worker.stop()
    await asyncio.wait_for(running, 15)


async def test_progress_keeps_a_client_with_a_short_read_timeout_waiting(
    server: HttpServer, q: agentq.Client, runner: None
) -> None:
    token = await server.token("planner")
    heard: list[tuple[float, float | None, str | None]] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        heard.append((done, total, message))

    # The HTTP client gives up after 1 s of silence; the job takes 3 s.
    async with mcp_client(server.url, token, read_seconds=1.0) as client:
        job = _body(await client.call_tool("queue_dispatch", {
            "target": "runner", "task": "slow", "metadata": {"seconds": 3}}))
        waited = await client.call_tool("queue_wait", {"jobId": job["jobId"],
                                                       "timeoutSeconds": 30},
                                        progress_callback=progress)
    assert not waited.is_error
    assert (_body(waited)["state"], _body(waited)["timedOut"]) == ("completed", False)
    assert len(heard) >= 8, heard  # every 0.2 s (AGENTQ_MCP_PROGRESS_SECONDS) for 3 s
    assert {total for _, total, _ in heard} == {100}
    # The job's own progress: its percent and message, as it went.
    assert any(done >= 30 and message and "step 1" in message for done, _, message in heard)
    assert all(message and message.startswith(("queued", "active")) for *_, message in heard)

    # The same wait without a progress token stays silent: the client gives up.
    silent = await q.dispatch("runner", "slow", caller="planner", metadata={"seconds": 2})
    gave_up = False
    try:
        async with mcp_client(server.url, token, read_seconds=1.0) as client:
            await client.call_tool("queue_wait", {"jobId": silent.job_id, "timeoutSeconds": 30})
    except* (httpx2.ReadTimeout, MCPError):
        gave_up = True
    assert gave_up


async def test_progress_over_stdio(server: HttpServer, q: agentq.Client, runner: None) -> None:
    heard: list[str | None] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        heard.append(message)

    stdio = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentq.cli", "--redis", server.redis_url, "mcp", "--agent", "planner"],
        env={"AGENTQ_KEY_PREFIX": server.config.key_prefix,
             "AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE": "0",
             "AGENTQ_RATE_LIMIT__MAX_QUEUE_DEPTH": "0", "AGENTQ_MCP_PROGRESS_SECONDS": "0.2"},
        cwd=str(REPO),
    )
    async with Client(stdio, read_timeout_seconds=30) as client:
        job = _body(await client.call_tool("queue_dispatch", {
            "target": "runner", "task": "slow", "metadata": {"seconds": 1.5}}))
        waited = _body(await client.call_tool(
            "queue_wait", {"jobId": job["jobId"], "timeoutSeconds": 30},
            progress_callback=progress))
    assert waited["state"] == "completed"
    assert len(heard) >= 4, heard
    assert any(m and "step" in m for m in heard), heard


# -- a client that goes away ---------------------------------------------------


async def test_a_client_that_leaves_mid_call_leaves_nothing_behind(
    server: HttpServer, q: agentq.Client
) -> None:
    token = await server.token("planner")
    job = await q.dispatch("idle", "nobody runs this", caller="planner")

    async def waits() -> int:
        """The server's Redis connections blocked in a read (its waits)."""
        clients: list[dict[str, Any]] = await q.redis.client_list()
        return sum(1 for c in clients if c.get("name") == server.client_name
                   and c.get("cmd") == "xread")

    async def call() -> None:
        async with mcp_client(server.url, token) as client:
            await client.call_tool("queue_wait", {"jobId": job.job_id, "timeoutSeconds": 120})

    assert await waits() == 0
    calling = asyncio.create_task(call())
    await eventually(lambda: _positive(waits()), "the wait to block in Redis")
    calling.cancel()
    with suppress(asyncio.CancelledError):
        await calling
    await eventually(lambda: _zero(waits()), "the wait to end with its client")
    # The server is still there for the next caller.
    async with mcp_client(server.url, token) as client:
        assert _body(await client.call_tool("queue_status", {"jobId": job.job_id}))[
            "state"] == "queued"


async def _positive(count: Any) -> bool:
    return bool(await count > 0)


async def _zero(count: Any) -> bool:
    return bool(await count == 0)


# -- the example ---------------------------------------------------------------


async def test_the_python_client_example_runs(server: HttpServer) -> None:
    token = await server.token("planner")
    env = {**os.environ, "AGENTQ_MCP_URL": server.url, "AGENTQ_TOKEN": token}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "examples/mcp_http_client.py", "idle", "summarise the report",
         "--wait", "1"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert 'acts as the agent "planner"' in done.stdout
    assert "dispatched j_" in done.stdout and "still queued after 1 s" in done.stdout
