"""The six agent tools (``agentq.tools``) on a real Redis: JSON in, JSON out.

- the authorization matrix of every tool (and of cancel, retry and drain):
  the dispatcher, the target, a third agent, a system agent; SPEC's exact
  messages; ``sessionKey`` only for system agents; ``queue_list`` showing a
  caller only its own jobs; ``queue_activity`` showing a non-system caller
  only itself and the agents it may dispatch to;
- ``task`` cut to 80 characters in lists, whole in a job view;
- ``queue_wait`` with ``timedOut``;
- the rate limit and the queue-depth cap at their exact boundaries, with
  concurrent callers through ``tools.queue_dispatch``;
- invalid input giving ``invalid_input`` with the field's path.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

import agentq
from agentq import tools
from agentq.eventlog.ids import new_job_id
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config
from agentq.schemas.errors import AgentqError, Unauthorized

MakeConfig = Callable[..., Config]
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
VIEW_DENIED = "Unauthorized: you can only view jobs you dispatched or that target you."
CANCEL_DENIED = "Unauthorized: you can only cancel jobs you dispatched or that target you."
WORKER = "w1"
LEASE_MS = 600_000
LONG_TASK = "Summarise the attached quarterly report, " * 6  # 246 characters
SECRET = "sk-session-4242"


def as_json(value: Any) -> Any:
    """Through JSON text and back: what an MCP client sends or receives."""
    return json.loads(json.dumps(value))


async def call(q: agentq.Client, tool: str, caller: str, params: dict[str, Any]) -> Any:
    """Call a tool with JSON params; its output must be JSON itself."""
    out = await tools.TOOLS[tool](q, caller, as_json(params))
    assert isinstance(out, dict)
    assert as_json(out) == out, f"{tool} returned something that is not JSON: {out!r}"
    return out


def refusal(out: dict[str, Any]) -> bool:
    """Whether a tool's output is the error object (a job view has an ``error`` field too)."""
    return set(out) == {"error"}


def error(out: dict[str, Any]) -> tuple[str, str]:
    assert set(out) == {"error"}, out
    assert set(out["error"]) == {"code", "message"}, out
    return out["error"]["code"], out["error"]["message"]


async def open_client(stack: AsyncExitStack, url: str, config: Config) -> agentq.Client:
    return await stack.enter_async_context(agentq.connect(url, config))


# -- the authorization matrix --------------------------------------------------------


@pytest.fixture
async def world(redis_url: str, make_config: MakeConfig) -> AsyncIterator[dict[str, Any]]:
    """Agents a (may dispatch only to b), b (to any), c (only to itself), d (to
    none); the system agent main. Jobs:

    - ``job``: a -> b, with a session key, a label and a long task;
    - ``back``: b -> a;  ``own``: c -> c;  ``ops``: main -> c;  ``side``: b -> c.
    """
    config = make_config(
        rateLimit=NO_RATE_LIMIT,
        agents={"a": {"allowAgents": ["b"]}, "b": {"allowAgents": ["*"]},
                "c": {"allowAgents": ["c"]}, "d": {"allowAgents": []}},
    )
    async with agentq.connect(redis_url, config) as q:
        made: dict[str, Any] = {"q": q}
        made["job"] = await call(q, "queue_dispatch", "a", {
            "target": "b", "task": LONG_TASK, "label": "report", "sessionKey": SECRET,
            "metadata": {"n": 1}, "origin": {"channel": "chat"}})
        made["back"] = await call(q, "queue_dispatch", "b", {"target": "a", "task": "reply"})
        made["own"] = await call(q, "queue_dispatch", "c", {"target": "c", "task": "self"})
        made["ops"] = await call(q, "queue_dispatch", "main",
                                 {"target": "c", "task": "ops", "sessionKey": "sk-ops"})
        made["side"] = await call(q, "queue_dispatch", "b", {"target": "c", "task": "side"})
        yield made


ALLOWED = ("a", "b", "main")  # for ``job``: dispatcher, target, system agent
DENIED = ("c", "d")  # a third agent; an agent that may dispatch to nobody


@pytest.mark.both_backends
async def test_dispatch_returns_the_job_view_as_json(world: dict[str, Any]) -> None:
    job = world["job"]
    assert job["jobId"].startswith("j_") and job["jobId"].endswith(".b")
    assert (job["target"], job["dispatchedBy"], job["state"]) == ("b", "a", "queued")
    assert job["task"] == LONG_TASK  # the whole task in a job view
    assert (job["label"], job["metadata"], job["origin"]) == ("report", {"n": 1},
                                                              {"channel": "chat"})
    assert (job["priority"], job["attempt"], job["maxAttempts"]) == ("normal", 0, 3)
    assert job["createdAt"].endswith("Z")
    # The dispatcher is no system agent: its own session key is not shown back.
    assert job.get("sessionKey") is None
    ops = world["ops"]
    assert ops["sessionKey"] == "sk-ops"


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_status_authorization(world: dict[str, Any], caller: str) -> None:
    q, job_id = world["q"], world["job"]["jobId"]
    out = await call(q, "queue_status", caller, {"jobId": job_id})
    if caller in DENIED:
        assert error(out) == ("unauthorized", VIEW_DENIED)
        return
    assert out["jobId"] == job_id
    assert out["task"] == LONG_TASK
    assert out.get("sessionKey") == (SECRET if caller == "main" else None)


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_history_authorization(world: dict[str, Any], caller: str) -> None:
    q, job_id = world["q"], world["job"]["jobId"]
    out = await call(q, "queue_history", caller, {"jobId": job_id})
    if caller in DENIED:
        assert error(out) == ("unauthorized", VIEW_DENIED)
        return
    assert out["jobId"] == job_id
    assert [e["type"] for e in out["events"]] == ["JobDispatched"]
    event = out["events"][0]
    assert set(event) == {"eventId", "type", "jobId", "agent", "at", "actor", "v", "data"}
    assert (event["jobId"], event["agent"], event["actor"]) == (job_id, "b", "a")
    if caller != "main":
        # sessionKey is sensitive: it appears only for system agents, in the
        # events as in the view.
        assert SECRET not in json.dumps(out), f"{caller} sees the session key in the history"


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_wait_authorization(world: dict[str, Any], caller: str) -> None:
    q, job_id = world["q"], world["job"]["jobId"]
    await q.cancel(job_id, caller="main")  # terminal: a wait returns at once
    began = time.monotonic()
    out = await call(q, "queue_wait", caller, {"jobId": job_id, "timeoutSeconds": 5})
    assert time.monotonic() - began < 2
    if caller in DENIED:
        assert error(out) == ("unauthorized", VIEW_DENIED)
        return
    assert (out["jobId"], out["state"], out["timedOut"]) == (job_id, "cancelled", False)
    assert out.get("sessionKey") == (SECRET if caller == "main" else None)


async def test_unauthorized_wait_on_a_running_job_does_not_block(world: dict[str, Any]) -> None:
    q, job_id = world["q"], world["job"]["jobId"]
    began = time.monotonic()
    out = await call(q, "queue_wait", "c", {"jobId": job_id, "timeoutSeconds": 5})
    assert error(out) == ("unauthorized", VIEW_DENIED)
    assert time.monotonic() - began < 1


@pytest.mark.parametrize("tool", ["queue_status", "queue_history", "queue_wait"])
async def test_unknown_job_is_not_found(world: dict[str, Any], tool: str) -> None:
    q = world["q"]
    ghost = new_job_id("b")
    for caller in ("a", "main"):
        out = await call(q, tool, caller, {"jobId": ghost})
        assert error(out) == ("not_found", f"Job {ghost} not found")
    out = await call(q, tool, "main", {"jobId": "nope"})
    assert error(out) == ("not_found", "Job nope not found")


@pytest.mark.both_backends
async def test_list_shows_each_caller_only_its_jobs(world: dict[str, Any]) -> None:
    q = world["q"]
    ids = {name: world[name]["jobId"] for name in ("job", "back", "own", "ops", "side")}
    visible = {
        "a": ["back", "job"],
        "b": ["side", "back", "job"],
        "c": ["side", "ops", "own"],
        "d": [],
        "main": ["side", "ops", "own", "back", "job"],
    }
    for caller, names in visible.items():
        out = await call(q, "queue_list", caller, {})
        assert [j["jobId"] for j in out["jobs"]] == [ids[n] for n in names], caller
        assert (out["count"], out["nextCursor"]) == (len(names), None)
        for job in out["jobs"]:
            assert job.get("sessionKey") == (
                {ids["job"]: SECRET, ids["ops"]: "sk-ops"}.get(job["jobId"])
                if caller == "main" else None
            ), (caller, job["jobId"])
    # Filters narrow what the caller may see, never widen it.
    out = await call(q, "queue_list", "c", {"dispatchedBy": "a"})
    assert out["jobs"] == []
    out = await call(q, "queue_list", "c", {"agent": "b"})
    assert out["jobs"] == []
    out = await call(q, "queue_list", "b", {"agent": "c"})
    assert [j["jobId"] for j in out["jobs"]] == [ids["side"]]
    out = await call(q, "queue_list", "main", {"dispatchedBy": "b", "limit": 1})
    assert ([j["jobId"] for j in out["jobs"]], out["count"], out["nextCursor"]) == (
        [ids["side"]], 1, ids["side"])
    out = await call(q, "queue_list", "main",
                     {"dispatchedBy": "b", "limit": 1, "cursor": out["nextCursor"]})
    assert ([j["jobId"] for j in out["jobs"]], out["nextCursor"]) == ([ids["back"]], None)


async def test_list_cuts_the_task_to_80_characters(world: dict[str, Any]) -> None:
    q = world["q"]
    out = await call(q, "queue_list", "a", {"agent": "b"})
    (job,) = out["jobs"]
    assert job["task"] == LONG_TASK[:80]
    assert len(job["task"]) == 80
    status = await call(q, "queue_status", "a", {"jobId": job["jobId"]})
    assert status["task"] == LONG_TASK
    short = await call(q, "queue_list", "b", {"agent": "a"})
    assert short["jobs"][0]["task"] == "reply"


@pytest.mark.both_backends
async def test_activity_shows_non_system_callers_only_what_they_may_reach(
    world: dict[str, Any],
) -> None:
    q = world["q"]
    seen = {}
    for caller in ("a", "b", "c", "d", "main"):
        out = await call(q, "queue_activity", caller, {})
        seen[caller] = sorted(out["agents"])
        assert out["summary"]["agents"] == len(out["agents"])
    assert seen == {
        "a": ["a", "b"],  # itself and the one agent it may dispatch to
        "b": ["a", "b", "c", "d"],
        "c": ["c"],
        "d": ["d"],
        "main": ["a", "b", "c", "d"],
    }
    asked = await call(q, "queue_activity", "a", {"agents": ["c", "b"]})
    assert sorted(asked["agents"]) == ["b"]
    c = (await call(q, "queue_activity", "main", {"agents": ["c"]}))["agents"]["c"]
    assert (c["status"], c["queued"], c["workers"], c["currentJobs"]) == ("offline", 3, 0, [])


async def test_activity_current_jobs_cut_the_task(world: dict[str, Any]) -> None:
    q = world["q"]
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
    assert [s.job_id for s in started] == [world["job"]["jobId"]]
    b = (await call(q, "queue_activity", "a", {"agents": ["b"]}))["agents"]["b"]
    assert b["active"] == 1
    assert b["currentJobs"] == [{"jobId": world["job"]["jobId"], "label": "report",
                                 "task": LONG_TASK[:80]}]
    assert SECRET not in json.dumps(b)


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_cancel_authorization(world: dict[str, Any], caller: str) -> None:
    q, job_id = world["q"], world["job"]["jobId"]
    if caller in DENIED:
        with pytest.raises(Unauthorized) as info:
            await q.cancel(job_id, caller=caller)
        assert info.value.message == CANCEL_DENIED
        assert (await q.status(job_id)).state == "queued"  # nothing changed
        return
    view = await q.cancel(job_id, caller=caller)
    assert view.state == "cancelled"
    (*_, last) = await q.history(job_id)
    assert (last.type, last.actor) == ("JobCancelled", caller)


async def _failed_job(q: agentq.Client) -> str:
    view = await q.dispatch("b", "fails", caller="a", max_attempts=1)
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 10)
    assert view.job_id in [s.job_id for s in started]
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "boom", Backoff(0, 0)) == "failed"
    return view.job_id


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_retry_requires_a_system_agent(world: dict[str, Any], caller: str) -> None:
    q = world["q"]
    job_id = await _failed_job(q)
    if caller != "main":
        with pytest.raises(Unauthorized) as info:
            await q.retry(job_id, caller=caller)
        assert info.value.message == "Unauthorized: retry requires a system agent."
        assert (await q.status(job_id)).state == "failed"
        return
    assert (await q.retry(job_id, caller=caller)).state == "queued"


@pytest.mark.parametrize("caller", ALLOWED + DENIED)
async def test_drain_requires_a_system_agent(world: dict[str, Any], caller: str) -> None:
    q = world["q"]
    if caller != "main":
        with pytest.raises(Unauthorized) as info:
            await q.drain("c", caller=caller)
        assert info.value.message == "Unauthorized: drain requires a system agent."
        assert (await q.activity(["c"]))["agents"]["c"]["queued"] == 3
        return
    out = await q.drain("c", caller=caller)
    assert out.drained == 3


@pytest.mark.both_backends
async def test_dispatch_authorization(world: dict[str, Any]) -> None:
    q = world["q"]
    out = await call(q, "queue_dispatch", "a", {"target": "c", "task": "t"})
    assert error(out) == ("forbidden", 'Target agent "c" is not in allowAgents')
    out = await call(q, "queue_dispatch", "d", {"target": "d", "task": "t"})
    assert error(out) == ("forbidden", 'Target agent "d" is not in allowAgents')
    out = await call(q, "queue_dispatch", "a", {"target": "zz", "task": "t"})
    assert error(out) == ("unknown_agent", "Unknown target agent: zz")
    ok = await call(q, "queue_dispatch", "c", {"target": "c", "task": "t"})
    assert ok["state"] == "queued"
    assert (await call(q, "queue_dispatch", "main", {"target": "a", "task": "t"}))["state"] \
        == "queued"


# -- queue_wait ------------------------------------------------------------------------


async def test_wait_times_out_with_the_view_as_it_stands(q: agentq.Client) -> None:
    job = await call(q, "queue_dispatch", "a", {"target": "b", "task": "never run"})
    began = time.monotonic()
    out = await call(q, "queue_wait", "a", {"jobId": job["jobId"], "timeoutSeconds": 1})
    took = time.monotonic() - began
    assert 0.95 <= took < 3, took
    assert (out["jobId"], out["state"], out["timedOut"]) == (job["jobId"], "queued", True)


@pytest.mark.both_backends
async def test_wait_returns_when_the_job_ends(q: agentq.Client) -> None:
    job = await call(q, "queue_dispatch", "a", {"target": "b", "task": "soon done"})
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)

    async def finish() -> None:
        await asyncio.sleep(0.3)
        await q.scripts.start(part, WORKER, LEASE_MS, 1)
        await q.scripts.complete(part, WORKER, [(job["jobId"], 1, b'{"ok":true}')])

    began = time.monotonic()
    out, _ = await asyncio.gather(
        call(q, "queue_wait", "b", {"jobId": job["jobId"], "timeoutSeconds": 10}), finish())
    assert time.monotonic() - began < 2
    assert (out["state"], out["result"], out["timedOut"]) == ("completed", {"ok": True}, False)


# -- rate limit and queue-depth cap, exact, with concurrent callers -------------------


@pytest.mark.both_backends
async def test_rate_limit_exact_with_concurrent_callers(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 5, "maxQueueDepth": 0})
    async with AsyncExitStack() as stack:
        clients = [await open_client(stack, redis_url, config) for _ in range(4)]
        for agent in ("a", "b"):
            await clients[0].add_agent(agent)
        # Refusals for other reasons first: they do not count.
        assert error(await call(clients[0], "queue_dispatch", "a",
                                {"target": "zz", "task": "t"}))[0] == "unknown_agent"
        assert error(await call(clients[0], "queue_dispatch", "a",
                                {"target": "b"}))[0] == "invalid_input"
        keyed = await call(clients[0], "queue_dispatch", "a",
                           {"target": "b", "task": "keyed", "idempotencyKey": "k"})
        # 12 dispatches at once by one caller over 4 connections: exactly 4 more fit.
        outs = await asyncio.gather(*(
            call(clients[i % 4], "queue_dispatch", "a", {"target": "b", "task": f"t{i}"})
            for i in range(12)
        ))
        ok = [o for o in outs if not refusal(o)]
        refused = [error(o) for o in outs if refusal(o)]
        assert len(ok) == 4, outs
        assert refused == [("rate_limited", "Rate limit exceeded: 5/5 dispatches this minute")] * 8
        # An idempotent repeat is not refused and does not count.
        again = await call(clients[1], "queue_dispatch", "a",
                           {"target": "b", "task": "keyed", "idempotencyKey": "k"})
        assert again["jobId"] == keyed["jobId"]
        # Other callers have windows of their own, as exact.
        outs = await asyncio.gather(*(
            call(clients[i % 4], "queue_dispatch", caller, {"target": "a", "task": "t"})
            for i, caller in enumerate(["b"] * 7 + ["main"] * 6)
        ))
        by_caller: dict[str, list[str]] = {"b": [], "main": []}
        for caller, out in zip(["b"] * 7 + ["main"] * 6, outs, strict=True):
            by_caller[caller].append("ok" if not refusal(out) else error(out)[1])
        limited = "Rate limit exceeded: 5/5 dispatches this minute"
        assert sorted(by_caller["b"]) == sorted(["ok"] * 5 + [limited] * 2)
        assert sorted(by_caller["main"]) == sorted(["ok"] * 5 + [limited])
        log = clients[0].partition("b").log
        assert await clients[0].redis.xlen(log) == 5  # a's five jobs, nothing else
        assert await clients[0].redis.xlen(clients[0].partition("a").log) == 10


@pytest.mark.both_backends
async def test_queue_depth_cap_exact_with_concurrent_callers(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 4})
    async with AsyncExitStack() as stack:
        clients = [await open_client(stack, redis_url, config) for _ in range(4)]
        q = clients[0]
        for agent in ("a", "b", "c"):
            await q.add_agent(agent)
        full = "Queue depth exceeded: 4/4 pending jobs for agent b"
        callers = ["a", "c", "main", "x"]
        outs = await asyncio.gather(*(
            call(clients[i % 4], "queue_dispatch", callers[i % 4],
                 {"target": "b", "task": f"t{i}"})
            for i in range(10)
        ))
        ok = [o for o in outs if not refusal(o)]
        assert len(ok) == 4
        assert [error(o) for o in outs if refusal(o)] == [("queue_full", full)] * 6
        # Another agent's queue is not this one's.
        assert (await call(q, "queue_dispatch", "a", {"target": "c", "task": "t"}))["state"] \
            == "queued"
        # Active jobs count: starting one frees nothing.
        part = q.partition("b")
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
        assert error(await call(q, "queue_dispatch", "a", {"target": "b", "task": "t"})) == (
            "queue_full", full)
        # Completing it frees one place: of 3 concurrent dispatches exactly one fits.
        await q.scripts.complete(part, WORKER, [(started[0].job_id, 1, b"1")])
        outs = await asyncio.gather(*(
            call(clients[i], "queue_dispatch", callers[i], {"target": "b", "task": "t"})
            for i in range(3)
        ))
        assert sorted(refusal(o) for o in outs) == [False, True, True]
        # Delayed jobs count too; a cancelled one frees its place.
        still_queued = next(o["jobId"] for o in ok if o["jobId"] != started[0].job_id)
        await q.cancel(still_queued, caller="main")
        delayed = await call(q, "queue_dispatch", "a",
                             {"target": "b", "task": "later", "delaySeconds": 3600})
        assert delayed["state"] == "delayed"
        assert error(await call(q, "queue_dispatch", "a", {"target": "b", "task": "t"})) == (
            "queue_full", full)
        counts = await q.redis.hgetall(part.counts)
        pending = sum(int(counts.get(s, 0)) for s in ("queued", "delayed", "active"))
        assert pending == 4


async def test_queue_full_refusals_give_their_rate_places_back(
    redis_url: str, make_config: MakeConfig
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 5, "maxQueueDepth": 2})
    async with AsyncExitStack() as stack:
        clients = [await open_client(stack, redis_url, config) for _ in range(3)]
        q = clients[0]
        await q.add_agent("b")
        made: list[str] = []

        async def burst(n: int) -> list[dict[str, Any]]:
            outs = await asyncio.gather(*(
                call(clients[i % 3], "queue_dispatch", "a", {"target": "b", "task": "t"})
                for i in range(n)
            ))
            made.extend(o["jobId"] for o in outs if not refusal(o))
            return list(outs)

        outs = await burst(5)
        assert sorted(error(o)[0] if refusal(o) else "ok" for o in outs) == (
            ["ok"] * 2 + ["queue_full"] * 3)
        for job_id in made:
            await q.cancel(job_id, caller="main")
        outs = await burst(3)  # 2 in the window: two fit the queue
        assert sorted(error(o)[0] if refusal(o) else "ok" for o in outs) == (
            ["ok"] * 2 + ["queue_full"])
        for job_id in made[2:]:
            await q.cancel(job_id, caller="main")
        outs = await burst(2)  # 4 in the window: one more fits
        assert sorted(error(o)[0] if refusal(o) else "ok" for o in outs) == [
            "ok", "rate_limited"]
        assert error(next(o for o in outs if refusal(o)))[1] == (
            "Rate limit exceeded: 5/5 dispatches this minute")
        assert len(made) == 5


async def test_concurrent_queue_full_refusals_do_not_rate_limit_the_others(
    redis_url: str, make_config: MakeConfig
) -> None:
    """8 dispatches at once, rate limit 5, queue cap 2: two are made; the other
    six are refused by the queue cap (check 5). None is rate limited: only two
    dispatches are in the window, and refused ones do not count (SPEC)."""
    config = make_config(rateLimit={"dispatchesPerMinute": 5, "maxQueueDepth": 2})
    async with AsyncExitStack() as stack:
        clients = [await open_client(stack, redis_url, config) for _ in range(4)]
        await clients[0].add_agent("b")
        outs = await asyncio.gather(*(
            call(clients[i % 4], "queue_dispatch", "a", {"target": "b", "task": f"t{i}"})
            for i in range(8)
        ))
        got = sorted(error(o)[1] if refusal(o) else "ok" for o in outs)
        full = "Queue depth exceeded: 2/2 pending jobs for agent b"
        assert got == sorted(["ok"] * 2 + [full] * 6), got


# -- invalid input -----------------------------------------------------------------------

BIG_METADATA = {"blob": "x" * (16 * 1024)}
DISPATCH_INVALID: list[tuple[dict[str, Any], str]] = [
    ({"task": "t"}, "target"),
    ({"target": "b"}, "task"),
    ({"target": "B!", "task": "t"}, "target"),
    ({"target": "b", "task": ""}, "task"),
    ({"target": "b", "task": "t" * 50_001}, "task"),
    ({"target": "b", "task": "t", "label": "l" * 501}, "label"),
    ({"target": "b", "task": "t", "maxAttempts": 0}, "maxAttempts"),
    ({"target": "b", "task": "t", "maxAttempts": 21}, "maxAttempts"),
    ({"target": "b", "task": "t", "timeoutSeconds": -1}, "timeoutSeconds"),
    ({"target": "b", "task": "t", "priority": "urgent"}, "priority"),
    ({"target": "b", "task": "t", "delaySeconds": -5}, "delaySeconds"),
    ({"target": "b", "task": "t", "dependsOn": [new_job_id("b") for _ in range(21)]},
     "dependsOn"),
    ({"target": "b", "task": "t", "dependsOn": "j_x"}, "dependsOn"),
    ({"target": "b", "task": "t", "onDependencyFailure": "maybe"}, "onDependencyFailure"),
    ({"target": "b", "task": "t", "metadata": BIG_METADATA}, "metadata"),
    ({"target": "b", "task": "t", "metadata": "text"}, "metadata"),
    ({"target": "b", "task": "t", "origin": [1]}, "origin"),
    ({"target": "b", "task": "t", "announce": [1]}, "announce"),
    ({"target": "b", "task": "t", "bogus": 1}, "bogus"),
]


@pytest.mark.parametrize(("params", "path"), DISPATCH_INVALID,
                         ids=[f"{p}-{i}" for i, (_, p) in enumerate(DISPATCH_INVALID)])
async def test_dispatch_invalid_input_names_the_field(
    q: agentq.Client, params: dict[str, Any], path: str
) -> None:
    before = [await q.redis.xlen(q.partition(a).log) for a in ("a", "b")]
    code, message = error(await call(q, "queue_dispatch", "a", params))
    assert code == "invalid_input"
    assert message.startswith(f"Invalid input: {path}"), message
    assert [await q.redis.xlen(q.partition(a).log) for a in ("a", "b")] == before


READ_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("queue_status", {}, "jobId"),
    ("queue_status", {"jobId": 5}, "jobId"),
    ("queue_status", {"jobId": "j", "extra": 1}, "extra"),
    ("queue_history", {}, "jobId"),
    ("queue_wait", {}, "jobId"),
    ("queue_wait", {"jobId": "j", "timeoutSeconds": 0}, "timeoutSeconds"),
    ("queue_wait", {"jobId": "j", "timeoutSeconds": 601}, "timeoutSeconds"),
    ("queue_list", {"limit": 0}, "limit"),
    ("queue_list", {"limit": 101}, "limit"),
    ("queue_list", {"state": ["nope"]}, "state.0"),
    ("queue_list", {"state": ["failed", "nope"]}, "state.1"),
    ("queue_list", {"agent": "A!"}, "agent"),
    ("queue_list", {"dispatchedBy": "-x"}, "dispatchedBy"),
    ("queue_list", {"cursor": "not-a-job"}, "cursor"),
    ("queue_activity", {"agents": "a"}, "agents"),
]


@pytest.mark.parametrize(("tool", "params", "path"), READ_INVALID,
                         ids=[f"{t}-{p}-{i}" for i, (t, _, p) in enumerate(READ_INVALID)])
async def test_read_tools_invalid_input_names_the_field(
    q: agentq.Client, tool: str, params: dict[str, Any], path: str
) -> None:
    code, message = error(await call(q, tool, "main", params))
    assert code == "invalid_input"
    assert path in message, message


async def test_inputs_at_their_limits_are_accepted(q: agentq.Client) -> None:
    out = await call(q, "queue_dispatch", "a", {
        "target": "b", "task": "t" * 50_000, "label": "l" * 500, "maxAttempts": 20,
        "timeoutSeconds": 0, "priority": "low", "delaySeconds": 0,
        "metadata": {"blob": "x" * (16 * 1024 - 20)}, "announce": False})
    assert out["state"] == "queued", out
    listed = await call(q, "queue_list", "a", {"limit": 100, "state": ["queued", "failed"]})
    assert listed["jobs"][0]["task"] == "t" * 80
    assert (await call(q, "queue_list", "a", {"limit": 1}))["count"] == 1
    waited = await call(q, "queue_wait", "a", {"jobId": out["jobId"], "timeoutSeconds": 1})
    assert waited["timedOut"] is True


async def test_errors_raised_by_the_client_carry_the_same_codes(q: agentq.Client) -> None:
    """The tools return what the client raises, as JSON."""
    with pytest.raises(AgentqError) as info:
        await q.dispatch("zz", "t", caller="a")
    out = await call(q, "queue_dispatch", "a", {"target": "zz", "task": "t"})
    assert out == info.value.to_json()
