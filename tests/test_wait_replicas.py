"""``redis.waitReplicas`` (SPEC part two, "Redis Cluster and durability"): a write
acknowledged to a caller (dispatch, cancel, retry, drain, a worker's completion
or failure) is followed by ``WAIT <n> <timeoutMs>`` on the same connection (the
same node's pipeline on a cluster) before the caller is answered; when fewer
replicas confirm, the call fails with ``unavailable``: ``Write not confirmed by
<n>/<want> replicas; it may be lost on failover``.

On the local cluster (one replica per master) every such write is confirmed. On
one server with no replica every one of them is refused with that message, yet
made: a dispatch retried with its idempotency key finds its job, and a worker's
outcome is written and sent again until confirmed, never lost nor doubled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.asyncio.cluster import ClusterNode

import agentq
from agentq.consumers.handlers import Job
from agentq.schemas.config import Config
from benchmarks._cluster import LocalCluster

NOT_CONFIRMED = "Write not confirmed by 0/1 replicas; it may be lost on failover"


def config(prefix: str | None = None, **redis: Any) -> Config:
    return Config.model_validate({
        "keyPrefix": prefix or f"wr{uuid.uuid4().hex[:8]}",
        "redis": redis,
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "jobs": {"maxAttempts": 1},
        "workers": {"shutdownGraceSeconds": 1},
    })


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def worker(q: agentq.Client, agent: str, handler: Callable[[Job], Any]
                 ) -> AsyncIterator[Any]:
    run = q.worker(agent, handler, background=False)
    task = asyncio.create_task(run.run())
    try:
        yield run
    finally:
        run.stop()
        await asyncio.wait_for(task, timeout=15)


# -- on the cluster: confirmed ----------------------------------------------------


async def test_every_acknowledged_write_is_confirmed_on_the_cluster(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipelines: list[list[str]] = []
    original = ClusterNode.execute_pipeline

    async def recording(self: ClusterNode, commands: list[Any]) -> bool:
        pipelines.append([str(c.args[0]).upper() for c in commands])
        return await original(self, commands)

    monkeypatch.setattr(ClusterNode, "execute_pipeline", recording)
    async with agentq.connect(cluster.url, config(waitReplicas=1, waitTimeoutMs=5000)) as q:
        for agent in ("a", "b", "c"):
            await q.add_agent(agent)
        await q.dispatch("a", "the script is loaded on every master")
        pipelines.clear()
        views = await q.dispatch_many([{"target": t, "task": "x"} for t in ("a", "b", "c")])
        # The global job index's call first, alone (an index: not confirmed); then
        # one pipeline per node, each ending with its WAIT after the dispatch.
        scripts = [p for p in pipelines if "EVALSHA" in p]
        assert len(scripts) == 4 and scripts[0] == ["EVALSHA"], pipelines
        for sent in scripts[1:]:
            assert sent[-1] == "WAIT" and set(sent[:-1]) == {"EVALSHA"}, pipelines
        assert (await q.cancel(views[0].job_id)).state == "cancelled"
        drained = await q.drain("b")
        assert drained.job_ids == [views[1].job_id]

        async def fails(job: Job) -> None:
            raise RuntimeError("no")

        async with worker(q, "c", fails):
            failed, _ = await q.wait(views[2].job_id, timeout=15)
        assert failed.state == "failed"
        assert (await q.retry(views[2].job_id)).state == "queued"
        async with worker(q, "c", lambda job: "fine"):
            done, _ = await q.wait(views[2].job_id, timeout=15)
        assert done.state == "completed" and done.result == "fine"
        waits = [p for p in pipelines if p and p[-1] == "WAIT"]
        assert len(waits) >= 6  # dispatch x3, cancel, drain, fail, retry, complete


# -- on one server without replicas: refused, yet made -------------------------------


async def test_one_server_refuses_every_acknowledged_write(redis_url: str) -> None:
    prefix = f"wr{uuid.uuid4().hex[:8]}"
    async with agentq.connect(redis_url, config(prefix)) as plain, \
            agentq.connect(redis_url, config(prefix, waitReplicas=1, waitTimeoutMs=20)) as q:
        await plain.add_agent("w")
        # dispatch: refused with SPEC's message; retried with its key, it is the same job
        with pytest.raises(agentq.Unavailable) as caught:
            await q.dispatch("w", "once", idempotencyKey="k1")
        assert caught.value.message == NOT_CONFIRMED
        assert caught.value.exit_code == 6
        again = await plain.dispatch("w", "once", idempotencyKey="k1")
        assert again.state == "queued"
        # cancel, retry, drain: refused, and made
        with pytest.raises(agentq.Unavailable, match="0/1 replicas"):
            await q.cancel(again.job_id)
        assert (await plain.status(again.job_id)).state == "cancelled"
        failing = await plain.dispatch("w", "fails")
        async with worker(plain, "w", lambda job: 1 / 0):
            failed, _ = await plain.wait(failing.job_id, timeout=15)
        assert failed.state == "failed"
        with pytest.raises(agentq.Unavailable, match="0/1 replicas"):
            await q.retry(failing.job_id)
        assert (await plain.status(failing.job_id)).state == "queued"
        with pytest.raises(agentq.Unavailable, match="0/1 replicas"):
            await q.drain("w")
        assert (await plain.status(failing.job_id)).state == "cancelled"
        # Reads and the caller's own unconfirmed writes of no one else are not held up.
        assert (await q.status(failing.job_id)).state == "cancelled"


async def test_a_worker_outcome_not_confirmed_is_kept_not_lost(redis_url: str) -> None:
    prefix = f"wr{uuid.uuid4().hex[:8]}"
    ran: list[str] = []

    def handler(job: Job) -> str:
        ran.append(job.id)
        if job.task == "fail":
            raise RuntimeError("failed on purpose")
        return "made"

    async with agentq.connect(redis_url, config(prefix)) as plain, \
            agentq.connect(redis_url, config(prefix, waitReplicas=1, waitTimeoutMs=20)) as q:
        await plain.add_agent("w")
        done = await plain.dispatch("w", "complete")
        failed = await plain.dispatch("w", "fail")
        async with worker(q, "w", handler) as run:
            async def both_ended() -> bool:
                states = {(await plain.status(j.job_id)).state for j in (done, failed)}
                return states == {"completed", "failed"}

            await until(both_ended, what="both outcomes written")
            # Written, and still held: the worker sends them again until confirmed.
            await asyncio.sleep(0.3)
            assert run.worker is not None and run.worker.running == 2
        for job, last in ((done, "JobCompleted"), (failed, "JobFailed")):
            types = [e.type for e in await plain.history(job.job_id)]
            assert types.count(last) == 1, types
            assert "JobStalled" not in types
        assert (await plain.status(done.job_id)).result == "made"
        assert sorted(ran) == sorted([done.job_id, failed.job_id])  # each ran once


def test_cli_exits_6_with_the_message(redis_url: str) -> None:
    prefix = f"wr{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_REDIS__WAIT_REPLICAS="1",
               AGENTQ_REDIS__WAIT_TIMEOUT_MS="20")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentq.cli", "--redis", redis_url, *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    assert cli("agents", "add", "w").returncode == 0
    refused = cli("dispatch", "w", "hello")
    assert refused.returncode == 6, refused
    assert NOT_CONFIRMED in refused.stderr
