"""Approvals, end to end on a real server: ``requiresApproval`` (and the target's
default), the ``pending_approval`` state outside the depth cap, approve and reject
through the client, the tools and the CLI, who may decide, dependencies and delays
honoured on approval, and the approvals sink told once per waiting job. Every
test that changes states ends by checking rule 1 (the fold of the log equals the
live records)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

import agentq
from agentq.consumers.alerts import Alerter
from agentq.consumers.approvals import ApprovalNotices
from agentq.eventlog.reader import RawEvent, read_partition
from agentq.eventlog.registry import all_partitions
from agentq.projections import audit
from agentq.schemas.config import Config, StreamSink
from agentq.tools import queue_approve, queue_dispatch, queue_reject
from tests.test_dependencies import (
    assert_rebuild_equals_live,
    of_type,
    reaches,
    running_background,
    start_and_complete,
    until,
)

pytestmark = pytest.mark.both_backends


@pytest.fixture
async def aq(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    """Agents a, b, gated, boss and stranger known; ``gated`` requires approval by
    default; the approvers are main and boss; the queue-depth cap is 2."""
    config = make_config(
        rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 2},
        auth={"systemAgents": ["main"], "approvers": ["main", "boss"]},
        agents={"gated": {"requiresApproval": True}},
        approvals={"sinks": [{"type": "stream", "key": f"approvals-{uuid.uuid4().hex}"}]},
    )
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b", "gated", "boss", "stranger"):
            await client.add_agent(agent)
        yield client
        await client.redis.delete(_sink_key(client))


def _sink_key(q: agentq.Client) -> str:
    sink = q.config.approvals.sinks[0]
    assert isinstance(sink, StreamSink)
    return sink.key


async def test_pending_job_waits_outside_the_cap_and_is_approved_to_queued(
    aq: agentq.Client,
) -> None:
    pending = [await aq.dispatch("a", f"t{i}", caller="b", requires_approval=True)
               for i in range(3)]
    assert {v.state for v in pending} == {"pending_approval"}
    # Three pending jobs and the cap of 2 still takes two queued ones.
    await aq.dispatch("a", "q1", caller="b")
    await aq.dispatch("a", "q2", caller="b")
    with pytest.raises(agentq.QueueFull):
        await aq.dispatch("a", "q3", caller="b")
    counts = await aq.redis.hgetall(aq.partition("a").counts)
    assert counts["pending_approval"] == "3" and counts["queued"] == "2"
    # The target's default, and a dispatch that says no.
    assert (await aq.dispatch("gated", "x", caller="b")).state == "pending_approval"
    assert (await aq.dispatch("gated", "x", caller="b",
                              requires_approval=False)).state == "queued"

    approved = await aq.approve(pending[0].job_id, caller="boss", note="fine")
    assert approved.state == "queued"
    history = await aq.history(pending[0].job_id)
    (event,) = of_type(history, "JobApproved")
    assert event.actor == "boss" and event.data == {"state": "queued", "note": "fine"}
    rejected = await aq.reject(pending[1].job_id, reason="no")
    assert rejected.state == "cancelled"
    (event,) = of_type(await aq.history(pending[1].job_id), "JobRejected")
    assert event.actor == "main" and event.data == {"reason": "no"}
    # A decided job is decided: approving or rejecting again is invalid_state.
    with pytest.raises(agentq.InvalidState, match="queued, not pending_approval"):
        await aq.approve(pending[0].job_id)
    with pytest.raises(agentq.InvalidState):
        await aq.reject(pending[1].job_id)
    # Cancel works on a pending job too.
    assert (await aq.cancel(pending[2].job_id, caller="b")).state == "cancelled"
    await assert_rebuild_equals_live(aq)
    await assert_audit_clean(aq)


async def test_who_may_approve_and_reject(aq: agentq.Client) -> None:
    job = await aq.dispatch("a", "t", caller="b", requires_approval=True)
    # Dispatcher, target and stranger are no approvers; main (system) and boss are.
    for who in ("b", "a", "stranger"):
        for decide in (aq.approve, aq.reject):
            with pytest.raises(agentq.Unauthorized, match="requires an approver"):
                await decide(job.job_id, caller=who)
    # Through the tools: the JSON error object.
    out = await queue_approve(aq, "stranger", {"jobId": job.job_id})
    assert out["error"]["code"] == "unauthorized"
    out = await queue_reject(aq, "b", {"jobId": job.job_id, "reason": "x"})
    assert out["error"]["code"] == "unauthorized"
    out = await queue_approve(aq, "boss", {"jobId": "j_01J00000000000000000000000.a"})
    assert out["error"]["code"] == "not_found"
    assert (await aq.status(job.job_id)).state == "pending_approval"
    out = await queue_approve(aq, "boss", {"jobId": job.job_id, "note": "ok"})
    assert out["state"] == "queued"
    other = await queue_dispatch(aq, "b", {"target": "a", "task": "t", "requiresApproval": True})
    assert other["state"] == "pending_approval"
    out = await queue_reject(aq, "main", {"jobId": other["jobId"]})
    assert out["state"] == "cancelled"
    await assert_rebuild_equals_live(aq)


async def test_approval_honours_dependencies_and_delay(aq: agentq.Client) -> None:
    async with running_background(aq):
        dep = await aq.dispatch("b", "dep", caller="a")
        waits = await aq.dispatch("a", "w", caller="b", depends_on=[dep.job_id],
                                  requires_approval=True)
        released = await aq.dispatch("a", "r", caller="b", depends_on=[dep.job_id],
                                     requires_approval=True)
        delayed = await aq.dispatch("a", "d", caller="b", delay_seconds=3600,
                                    requires_approval=True)
        # Approved while its dependency is open: it waits for it.
        assert (await aq.approve(waits.job_id)).state == "waiting_dependencies"
        assert (await aq.approve(delayed.job_id)).state == "delayed"
        await start_and_complete(aq, dep.job_id, "done")
        await reaches(aq, waits.job_id, "queued")
        # Released while pending: the resolution is recorded, and approval queues it.
        async def resolved() -> bool:
            return bool(of_type(await aq.history(released.job_id), "DependencyResolved"))

        await until(resolved, what="the pending job's dependency resolution")
        assert (await aq.status(released.job_id)).state == "pending_approval"
        view = await aq.approve(released.job_id)
        assert view.state == "queued"
        assert view.dependencies[dep.job_id].result == "done"

        # A dependency that fails while its dependent is pending: approved, it fails.
        doomed = await aq.dispatch("b", "doomed", caller="a")
        child = await aq.dispatch("a", "c", caller="b", depends_on=[doomed.job_id],
                                  requires_approval=True)
        await aq.cancel(doomed.job_id)

        async def recorded() -> bool:
            return bool(of_type(await aq.history(child.job_id), "DependencyResolved"))

        await until(recorded, what="the failed dependency's resolution")
        view = await aq.approve(child.job_id)
        assert view.state == "failed" and view.error == f"dependency {doomed.job_id} cancelled"
        failed = of_type(await aq.history(child.job_id), "JobFailed")
        assert failed[0].data["reason"] == "dependency_failed"
    await assert_rebuild_equals_live(aq)
    await assert_audit_clean(aq)


async def assert_audit_clean(q: agentq.Client) -> None:
    """``audit verify``: records, counts and views agree with the log."""
    agents = await all_partitions(q.redis, q.keys)
    assert await audit.verify(q.redis, [q.partition(a) for a in agents]) == []


async def test_rejected_job_fails_its_dependents(aq: agentq.Client) -> None:
    async with running_background(aq):
        pending = await aq.dispatch("a", "p", caller="b", requires_approval=True)
        dependent = await aq.dispatch("b", "d", caller="a", depends_on=[pending.job_id])
        await aq.reject(pending.job_id)
        await reaches(aq, dependent.job_id, "failed")
    await assert_rebuild_equals_live(aq)


async def test_sink_is_told_once_per_waiting_job(aq: agentq.Client) -> None:
    secret = "A" * 60
    job = await aq.dispatch("a", f"deploy with token {secret} " + "and then more " * 30, caller="b",
                            label="deploy", requires_approval=True)
    await aq.dispatch("a", "no approval needed", caller="b")
    notifier = _notifier(aq, "n1")
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(stop))
    try:
        async def told() -> bool:
            return notifier.alerts_sent >= 1

        await until(told, what="the approvals sink")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    # A second notifier (a redelivery, another process) tells nobody again.
    again = _notifier(aq, "n2")
    await again.handle([e for e in await _log(aq, "a") if e.job_id == job.job_id])
    entries = await aq.redis.xrange(_sink_key(aq))
    assert len(entries) == 1
    fields = entries[0][1]
    assert fields["jobId"] == job.job_id and fields["dispatchedBy"] == "b"
    assert fields["agent"] == "a" and fields["label"] == "deploy"
    assert secret not in fields["task"] and "[redacted-base64]" in fields["task"]
    assert len(fields["task"]) <= 200 and fields["task"].endswith("...")
    assert "waits for approval" in fields["text"]


def _notifier(q: agentq.Client, name: str) -> Alerter:
    """The alerter as the background runs it: dead letters and approval requests."""
    return Alerter(q.redis, q.redis, q.keys, q.config, name,
                   notices=[ApprovalNotices(q.redis, q.config)])


async def _log(q: agentq.Client, agent: str) -> list[RawEvent]:
    return await read_partition(q.redis, q.partition(agent))


def test_cli_approve_reject_and_requires_approval(redis_url: str, make_config: Any,
                                                  tmp_path: Any) -> None:
    if redis_url.startswith("redis+cluster"):
        pytest.skip("the CLI's flow is the same on a cluster; covered by the client tests")
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    path = tmp_path / "agentq.json"
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    env = {**os.environ, "AGENTQ_HOME": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentq.cli", "--config", str(path), "--redis", redis_url,
             "--json", *args], capture_output=True, text=True, env=env, timeout=60)

    assert cli("agents", "add", "a").returncode == 0
    out = cli("--as", "a", "dispatch", "a", "t", "--requires-approval")
    assert out.returncode == 0, out.stderr
    job = orjson.loads(out.stdout)
    assert job["state"] == "pending_approval"
    refused = cli("--as", "a", "approve", job["jobId"])
    assert refused.returncode == 4 and orjson.loads(refused.stdout)["error"]["code"] == \
        "unauthorized"
    approved = cli("approve", job["jobId"], "--note", "ok")
    assert approved.returncode == 0 and orjson.loads(approved.stdout)["state"] == "queued"
    again = cli("reject", job["jobId"])
    assert again.returncode == 5 and orjson.loads(again.stdout)["error"]["code"] == \
        "invalid_state"
