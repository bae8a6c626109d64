"""Cancelling a tree, end to end on a real server (and a local cluster): ``cancel
--cascade`` cancels every job dispatched from inside the job (``parentJobId``), at
any depth and across agents, each with its own ``JobCancelled`` (reason
parent_cancelled); an active descendant's handler is killed; a descendant that has
ended stays as it is while its own children are cancelled; dependents of a
cancelled job fail; redelivered events change nothing twice; and children
dispatched while their parent is being cancelled are never left live."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import agentq
from agentq.consumers.gates import Gates
from agentq.consumers.handlers import exec_handler
from agentq.eventlog.reader import read_partition
from agentq.schemas.config import Config
from agentq.schemas.job import TERMINAL_STATES
from tests.test_approvals import assert_audit_clean
from tests.test_dependencies import (
    assert_rebuild_equals_live,
    of_type,
    reaches,
    running_background,
    settle,
    start_and_complete,
    until,
)
from tests.test_worker_cancel import _gone

pytestmark = pytest.mark.both_backends


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0},
                         limits={"maxDepth": 3}, workers={"shutdownGraceSeconds": 1})
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b", "c", "stranger"):
            await client.add_agent(agent)
        yield client


async def child(q: agentq.Client, parent: str, target: str, task: str, **fields: Any
                ) -> agentq.JobView:
    """A job dispatched from inside ``parent`` by its target."""
    by = parent.rsplit(".", 1)[1]
    return await q.dispatch(target, task, caller=by, parent_job_id=parent, **fields)


async def cancellations(q: agentq.Client, job_id: str) -> list[dict[str, Any]]:
    return [e.data for e in of_type(await q.history(job_id), "JobCancelled")]


async def test_cascade_cancels_the_whole_tree_across_agents(
    q: agentq.Client, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    handler = exec_handler(f"echo $$ > {shlex.quote(str(pid_file))}; sleep 60")
    async with running_background(q):
        root = await q.dispatch("a", "root", caller="stranger")
        kids = [await child(q, root.job_id, "b", f"k{i}") for i in range(3)]
        pending = await child(q, root.job_id, "c", "needs approval", requires_approval=True)
        done = await child(q, root.job_id, "c", "finishes")
        grandkids = [await child(q, kids[0].job_id, "c", f"g{i}", delay_seconds=3600)
                     for i in range(2)]
        under_done = await child(q, done.job_id, "a", "outlives its parent")
        depends = await q.dispatch("a", "after k2", caller="a", depends_on=[kids[2].job_id])
        ignores = await q.dispatch("a", "after k2 anyway", caller="a",
                                   depends_on=[kids[2].job_id], on_dependency_failure="ignore")
        await start_and_complete(q, done.job_id, "ok")
        await settle(q)  # every child is in its parent's children
        # kids[1] runs in a worker of b, its handler a shell that sleeps.
        worker = q.worker("b", handler, concurrency=1, background=False)
        await q.cancel(kids[0].job_id)  # already cancelled: its own children still are
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: _has_pid(pid_file), what="the handler to start")
            pid = int(pid_file.read_text())
            assert (await q.status(kids[1].job_id)).state == "active"
            # The dispatcher (here: stranger) may cancel its tree.
            view = await q.cancel(root.job_id, caller="stranger", cascade=True)
            assert view.state == "cancelled"
            tree = [kids[1], kids[2], pending, *grandkids, under_done]
            for job in tree:
                await reaches(q, job.job_id, "cancelled")
            await until(lambda: asyncio.sleep(0, _gone(pid)), what="the handler to be killed")
        finally:
            worker.stop()
            await asyncio.wait_for(task, 15)
        (root_cancel,) = await cancellations(q, root.job_id)
        assert root_cancel == {"fromState": "queued", "reason": "cancel", "cascade": True}
        for job in tree:
            (data,) = await cancellations(q, job.job_id)
            assert data["reason"] == "parent_cancelled" and data["cascade"] is True
            assert data["parentJobId"] == job.parent_job_id
        assert (await cancellations(q, kids[1].job_id))[0]["fromState"] == "active"
        assert (await cancellations(q, pending.job_id))[0]["fromState"] == "pending_approval"
        # Ended before: left as they were.
        assert (await q.status(done.job_id)).state == "completed"
        assert [d["reason"] for d in await cancellations(q, kids[0].job_id)] == ["cancel"]
        # Dependents of a cancelled job fail, or run with "ignore".
        await reaches(q, depends.job_id, "failed")
        failed = of_type(await q.history(depends.job_id), "JobFailed")
        assert failed[0].data["reason"] == "dependency_failed"
        await reaches(q, ignores.job_id, "queued")
        await settle(q)
    await assert_rebuild_equals_live(q)
    await assert_audit_clean(q)


def _has_pid(path: Path) -> Any:
    return asyncio.sleep(0, path.exists() and path.read_text().strip() != "")


async def test_who_may_cascade_and_redelivery_changes_nothing(q: agentq.Client) -> None:
    root = await q.dispatch("a", "root", caller="b")
    kid = await child(q, root.job_id, "b", "kid")
    grandkid = await child(q, kid.job_id, "c", "grandkid")
    with pytest.raises(agentq.Unauthorized):
        await q.cancel(root.job_id, caller="stranger", cascade=True)
    gates = Gates(q.redis, q.redis, q.keys, "g1")
    logs = {agent: await read_partition(q.redis, q.partition(agent)) for agent in "abc"}
    for agent in "abc":  # the children's dispatches, twice
        await gates.handle(logs[agent])
        await gates.handle(logs[agent])
    assert await q.redis.smembers(q.partition("a").children(root.job_id)) == {kid.job_id}
    # The target may cancel too.
    await q.cancel(root.job_id, caller="a", cascade=True)
    for _ in range(2):  # each level's cancel, handled twice
        for agent in "abc":
            events = await read_partition(q.redis, q.partition(agent))
            await gates.handle(events)
            await gates.handle(events)
    for job in (kid, grandkid):
        assert (await q.status(job.job_id)).state == "cancelled"
        assert len(await cancellations(q, job.job_id)) == 1
    await assert_rebuild_equals_live(q)


async def test_children_dispatched_while_the_parent_is_cancelled_are_never_left_live(
    q: agentq.Client,
) -> None:
    async with running_background(q):
        for round_ in range(5):
            root = await q.dispatch("a", f"root {round_}")

            async def spawn(n: int, parent: str = root.job_id) -> list[str]:
                made = []
                for i in range(n):
                    try:
                        made.append((await child(q, parent, "bc"[i % 2], f"k{i}")).job_id)
                    except agentq.AgentqError:
                        break
                    await asyncio.sleep(0)
                return made

            dispatching = asyncio.create_task(spawn(30))
            await asyncio.sleep(0.002 * round_)
            await q.cancel(root.job_id, cascade=True)
            made = await dispatching
            made += await spawn(3)  # after the cancel, too
            for job_id in made:
                await reaches(q, job_id, "cancelled")
    await assert_rebuild_equals_live(q)


def test_cli_cancel_cascade(redis_url: str, make_config: Callable[..., Config],
                            tmp_path: Path) -> None:
    if redis_url.startswith("redis+cluster"):
        pytest.skip("the CLI's flow is the same on a cluster; covered by the client tests")
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    path = tmp_path / "agentq.json"
    path.write_text(config.model_dump_json(by_alias=True, exclude_none=True))
    env = {**os.environ, "AGENTQ_HOME": str(tmp_path)}

    def cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentq.cli", "--config", str(path), "--redis", redis_url,
             "--json", *args], capture_output=True, text=True, env={**env, **extra_env},
            timeout=60)

    assert cli("agents", "add", "a").returncode == 0
    root = orjson.loads(cli("dispatch", "a", "root").stdout)
    kid = cli("--as", "a", "dispatch", "a", "kid", AGENTQ_JOB_ID=root["jobId"])
    assert orjson.loads(kid.stdout)["parentJobId"] == root["jobId"]
    out = cli("cancel", root["jobId"], "--cascade")
    assert out.returncode == 0 and orjson.loads(out.stdout)["state"] == "cancelled"
    assert cli("cancel", root["jobId"], "--cascade").returncode == 5


async def test_a_cancelled_job_cannot_be_cancelled_again(q: agentq.Client) -> None:
    assert "pending_approval" not in TERMINAL_STATES
    root = await q.dispatch("a", "r")
    await q.cancel(root.job_id, cascade=True)
    with pytest.raises(agentq.InvalidState):
        await q.cancel(root.job_id, cascade=True)
