"""The cluster client (issue 13, items 1 and 2; SPEC part two "Redis Cluster and
durability"): agentq against a local Redis Cluster of three masters, each with a
replica (the session's ``cluster`` fixture), with agents a, b and c on three
different masters.

Whole flows through ``agentq.connect``: dispatch (one job, and a batch over three
nodes sent as one pipeline per node), a real worker starting and completing,
cancel, retry, drain, status, history, wait; ``agents add/list/remove`` and the
registry's repair; a URL naming a node that does not own the global slot; a
client whose slot map is wrong (MOVED followed); a cluster that cannot be
reached (``unavailable``, said in words); the CLI with ``--redis
redis+cluster://``. The worker's handling of cluster errors is checked without
a cluster.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from _redis_server import free_port
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    ClusterDownError,
    MovedError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)

import agentq
from agentq.consumers import worker as worker_module
from agentq.consumers.handlers import Job
from agentq.eventlog import registry
from agentq.eventlog.cluster import ClusterClient, NodePipeline, routing_key
from agentq.eventlog.connection import RedisTarget, cluster_of, open_redis
from agentq.eventlog.scripts import Scripts
from agentq.schemas.config import Config
from benchmarks._cluster import LocalCluster, slot_of

AGENTS = ("a", "b", "c")  # slots 15495, 3300, 7365: one per master (conftest checks)


def config(**overrides: Any) -> Config:
    data: dict[str, Any] = {
        "keyPrefix": f"cc{uuid.uuid4().hex[:8]}",
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "workers": {"shutdownGraceSeconds": 1},
    }
    data.update(overrides)
    return Config.model_validate(data)


@asynccontextmanager
async def connected(url: str, cfg: Config | None = None) -> AsyncIterator[agentq.Client]:
    async with agentq.connect(url, cfg or config()) as q:
        for agent in AGENTS:
            await q.add_agent(agent)
        yield q


@asynccontextmanager
async def working(q: agentq.Client, handler: Callable[[Job], Any]) -> AsyncIterator[None]:
    from agentq._runner import WorkerSpec

    runner = q.runner([WorkerSpec(agent, handler, 2) for agent in AGENTS], background=False)
    task = asyncio.create_task(runner.run())
    try:
        yield
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=15)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def node_of(cluster: LocalCluster, q: agentq.Client, agent: str) -> int:
    return cluster.node_for_key(q.partition(agent).log).port


def url_of(port: int) -> str:
    return f"redis+cluster://127.0.0.1:{port}"


# -- the config --------------------------------------------------------------------


def test_config_keys_environment_and_urls() -> None:
    from agentq.cli._base import redis_url_problem
    from agentq.config import load_config
    from agentq.schemas.errors import InvalidInput

    loaded = load_config(environ={"AGENTQ_REDIS__CLUSTER": "true",
                                  "AGENTQ_REDIS__WAIT_REPLICAS": "2",
                                  "AGENTQ_REDIS__WAIT_TIMEOUT_MS": "250"})
    assert (loaded.redis.cluster, loaded.redis.wait_replicas, loaded.redis.wait_timeout_ms) \
        == (True, 2, 250)
    assert load_config(environ={}).redis.is_cluster is False
    by_url = load_config(environ={"AGENTQ_REDIS_URL": "rediss+cluster://10.0.0.5:7000"})
    assert by_url.redis.is_cluster and not by_url.redis.cluster
    for environ, says in [
        ({"AGENTQ_REDIS__WAIT_REPLICAS": "-1"}, "redis.waitReplicas: Input should be greater"),
        ({"AGENTQ_REDIS__WAIT_TIMEOUT_MS": "0"}, "redis.waitTimeoutMs: Input should be greater"),
        ({"AGENTQ_REDIS__CLUSTER": "maybe"}, "redis.cluster: Input should be a valid boolean"),
        ({"AGENTQ_REDIS__CLUSTER": "true", "AGENTQ_REDIS__DB": "2"},
         "redis: a Redis Cluster has only database 0"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            load_config(environ=environ)
        assert says in caught.value.message, caught.value.message
    assert redis_url_problem("redis+cluster://127.0.0.1:7000") is None
    assert "only database 0" in (redis_url_problem("redis+cluster://127.0.0.1:7000/1") or "")
    assert "name a node" in (redis_url_problem("redis+cluster:///") or "")


# -- the client itself ----------------------------------------------------------


async def test_a_cluster_url_opens_the_cluster_client(cluster: LocalCluster) -> None:
    async with connected(cluster.url) as q:
        client = cluster_of(q.redis)
        assert isinstance(client, ClusterClient)
        assert isinstance(q.redis.pipeline(transaction=False), NodePipeline)
        assert q.target is not None and q.target.is_cluster
        # The agents live on three different masters.
        assert len({node_of(cluster, q, agent) for agent in AGENTS}) == 3
        # Every connection passes the breaker, which leaves a cluster's failed
        # calls to the client to count.
        for node in client.get_nodes():
            assert node.connection_class.__name__ == "GuardedClusterConnection"


async def test_redis_cluster_setting_with_a_plain_url(cluster: LocalCluster) -> None:
    plain = cluster.url.replace("redis+cluster://", "redis://")
    async with connected(plain, config(redis={"cluster": True})) as q:
        assert cluster_of(q.redis) is not None
        view = await q.dispatch("b", "hello")
        assert (await q.status(view.job_id)).state == "queued"


async def test_url_at_a_node_that_does_not_own_the_global_slot(cluster: LocalCluster) -> None:
    cfg = config()
    global_port = cluster.node_for_key(f"{cfg.key_prefix}:{{{cfg.key_prefix}}}:agents").port
    other = next(n for n in cluster.masters_now() if n.port != global_port)
    async with connected(url_of(other.port), cfg) as q:
        assert sorted(await q.agents()) == list(AGENTS)
        views = await q.dispatch_many([{"target": a, "task": f"t {a}"} for a in AGENTS])
        for view in views:
            assert (await q.status(view.job_id)).state == "queued"


async def test_dispatch_many_is_one_pipeline_per_node(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: Counter[str] = Counter()
    original = ClusterNode.execute_pipeline

    async def counting(self: ClusterNode, commands: list[Any]) -> bool:
        if any(str(c.args[0]).upper() == "EVALSHA" for c in commands):
            sent[self.name] += 1
        return await original(self, commands)

    async with connected(cluster.url) as q:
        monkeypatch.setattr(ClusterNode, "execute_pipeline", counting)
        items = [{"target": agent, "task": f"job {i}"} for i in range(3) for agent in AGENTS]
        views = await q.dispatch_many(items)
        monkeypatch.undo()
        assert [v.target for v in views] == [i["target"] for i in items]
        assert [v.state for v in views] == ["queued"] * 9
        # One pipeline per node for the dispatches; the global slot's node also
        # got the index call, sent (and answered) before them.
        client = cluster_of(q.redis)
        assert client is not None
        index_node = client.nodes_manager.get_node_from_slot(slot_of(q.keys.jobs_index())).name
        assert len(sent) == 3 and sent.pop(index_node) == 2, sent
        assert set(sent.values()) == {1}, sent
        for view in views:
            assert (await q.status(view.job_id)).target == view.target


async def test_a_wrong_slot_map_is_corrected_by_the_moved_reply(cluster: LocalCluster) -> None:
    async with connected(cluster.url) as q:
        client = cluster_of(q.redis)
        assert client is not None
        slot = slot_of(q.partition("a").log)
        owner = client.nodes_manager.slots_cache[slot]
        wrong = next(n for n in client.get_primaries() if n.name != owner[0].name)
        # A batch (per node) and a single call, each sent to the wrong master first.
        client.nodes_manager.slots_cache[slot] = [wrong]
        views = await q.dispatch_many([{"target": "a", "task": "x"}, {"target": "b", "task": "y"}])
        assert client.nodes_manager.slots_cache[slot][0].name == owner[0].name
        client.nodes_manager.slots_cache[slot] = [wrong]
        cancelled = await q.cancel(views[0].job_id)
        assert cancelled.state == "cancelled"
        assert client.nodes_manager.slots_cache[slot][0].name == owner[0].name
        client.nodes_manager.slots_cache[slot] = [wrong]
        assert (await q.status(views[0].job_id)).state == "cancelled"


async def test_plain_pipelines_group_by_node_and_split_multi_key_commands(
    cluster: LocalCluster,
) -> None:
    async with connected(cluster.url) as q:
        keys = [f"{q.partition(agent).base}:test:x" for agent in AGENTS]
        async with q.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, "1")
            pipe.time()
            pipe.delete(*keys)  # three slots: split per slot, one reply each
            replies = await pipe.execute()
        assert replies[:3] == [True, True, True]
        assert isinstance(replies[3], tuple) and replies[3][0] > 0
        assert replies[4:] == [1, 1, 1]


def test_routing_key_of_scripts_and_stream_reads() -> None:
    assert routing_key(("EVALSHA", "abc", 2, "k1", "k2", "arg")) == "k1"
    assert routing_key(("EVALSHA", "abc", 0, "arg")) is None
    assert routing_key(("XREAD", "COUNT", 1, "BLOCK", 10, "STREAMS", "s1", "s2", "0", "0")) == "s1"
    assert routing_key(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">")) == "s"
    assert routing_key(("HGETALL", "k")) is None


def test_what_is_sent_again_and_what_is_not() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from agentq.eventlog.breaker import CircuitOpen, _mark_unsent
    from agentq.eventlog.cluster import _retryable

    refused = RedisConnectionError("Error 111 connecting")
    _mark_unsent(refused)  # what the guarded connection does when it cannot connect
    lost = RedisConnectionError("Connection closed by server.")
    for error in (ClusterDownError("CLUSTERDOWN"), TryAgainError("TRYAGAIN"),
                  MovedError("3300 127.0.0.1:7102"), ResponseError("UNBLOCKED force unblock"),
                  RedisClusterException("Redis Cluster cannot be connected. …"), refused):
        assert _retryable(error, read=False), error
    # A script whose reply was lost may have run: only a read is sent again.
    assert not _retryable(lost, read=False) and _retryable(lost, read=True)
    # An open breaker refuses at once; a command that cannot be routed is a bug.
    assert not _retryable(CircuitOpen("open"), read=True)
    assert not _retryable(RedisClusterException("all keys must map to the same key slot"),
                          read=True)
    assert not _retryable(ResponseError("ERR wrong number of arguments"), read=True)


async def test_an_unreachable_cluster_is_unavailable_in_words() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(agentq.Unavailable) as caught:
        async with agentq.connect(url_of(port), config()) as q:
            await q.agents()
    message = caught.value.message
    assert "Redis Cluster at" in message and "cannot be reached" in message, message
    assert "Traceback" not in message
    # Never reached: no failover to ride out, so it says so at once (a bound far
    # from the ride-out time, not a timing assertion).
    assert time.monotonic() - started < 8


async def test_one_server_url_is_not_a_cluster(redis_url: str) -> None:
    redis = open_redis(RedisTarget(redis_url))
    try:
        assert cluster_of(redis) is None
    finally:
        await redis.aclose()


# -- whole flows ------------------------------------------------------------------


async def test_dispatch_work_wait_history_on_three_nodes(cluster: LocalCluster) -> None:
    ran: list[str] = []

    async def handler(job: Job) -> dict[str, str]:
        ran.append(job.id)
        await job.progress(50, "half")
        return {"done": job.id}

    async with connected(cluster.url) as q, working(q, handler):
        single = await q.dispatch("a", "one")
        batch = await q.dispatch_many([{"target": agent, "task": f"for {agent}"}
                                       for agent in AGENTS])
        for view in [single, *batch]:
            ended, timed_out = await q.wait(view.job_id, timeout=15)
            assert not timed_out and ended.state == "completed", ended
            assert ended.result == {"done": view.job_id}
            assert (await q.status(view.job_id)).state == "completed"
            types = [event.type for event in await q.history(view.job_id)]
            assert types[0] == "JobDispatched" and types[-1] == "JobCompleted", types
            assert "JobStarted" in types and "JobProgress" in types
        assert sorted(ran) == sorted(v.job_id for v in [single, *batch])


async def test_cancel_retry_and_drain(cluster: LocalCluster) -> None:
    cfg = config(jobs={"maxAttempts": 1})
    async with connected(cluster.url, cfg) as q:
        # cancel: a delayed job on agent b
        delayed = await q.dispatch("b", "later", delaySeconds=60)
        assert (await q.cancel(delayed.job_id)).state == "cancelled"
        # drain: agent c's queued and delayed jobs, on its own node
        drained_ids = [v.job_id for v in await q.dispatch_many(
            [{"target": "c", "task": f"d{i}"} for i in range(5)]
            + [{"target": "c", "task": "d-later", "delaySeconds": 60}])]
        drained = await q.drain("c")
        assert sorted(drained.job_ids) == sorted(drained_ids)
        for job_id in drained_ids:
            assert (await q.status(job_id)).state == "cancelled"
        # retry: a job of agent a that failed its only attempt, then completes
        attempts: Counter[str] = Counter()

        async def flaky(job: Job) -> str:
            attempts[job.id] += 1
            if attempts[job.id] == 1:
                raise RuntimeError("first time fails")
            return "second time works"

        async with working(q, flaky):
            job = await q.dispatch("a", "flaky")
            failed, _ = await q.wait(job.job_id, timeout=15)
            assert failed.state == "failed" and failed.error == "first time fails"
            assert (await q.retry(job.job_id)).state in ("queued", "active", "completed")
            done, _ = await q.wait(job.job_id, timeout=15)
            assert done.state == "completed" and done.result == "second time works"


# -- the registry -----------------------------------------------------------------


async def test_agents_add_list_remove_and_repair(cluster: LocalCluster) -> None:
    async with connected(cluster.url) as q:
        keys = q.keys
        assert cluster.node_for_key(keys.partition("b").meta).port != \
            cluster.node_for_key(keys.agents).port or True
        await q.add_agent("planner", ["a", "b"])
        # The partition holds the registration; the index lists it.
        meta = await q.redis.hgetall(keys.partition("planner").meta)
        assert json.loads(meta["allowAgents"]) == ["a", "b"]
        assert (await q.agents())["planner"] == ["a", "b"]
        # A registration cut short after the truth was written: known, not listed.
        await q.redis.hdel(keys.agents, "planner")
        await q.redis.srem(keys.partitions, "planner")
        assert "planner" not in await q.agents()
        view = await q.dispatch("planner", "dispatchable all the same")
        assert view.state == "queued"
        relisted, dropped = await q.repair_agents()
        assert relisted == ["planner"] and dropped == []
        assert (await q.agents())["planner"] == ["a", "b"]
        assert "planner" in await registry.all_partitions(q.redis, keys)
        # An index entry whose agent is gone is dropped by the repair.
        await q.redis.hset(keys.agents, "ghost", json.dumps({"allowAgents": ["*"]}))
        assert (await q.repair_agents()) == ([], ["ghost"])
        # remove: the truth first; dispatches are refused at once.
        assert await q.remove_agent("planner") is True
        assert "planner" not in await q.agents()
        with pytest.raises(agentq.UnknownAgent):
            await q.dispatch("planner", "too late")
        assert await q.remove_agent("planner") is False


async def test_configured_agents_missing_from_the_index_are_listed_again(
    cluster: LocalCluster,
) -> None:
    cfg = config(agents={"scout": {"allowAgents": ["a"]}})
    async with agentq.connect(cluster.url, cfg) as q:
        assert (await q.agents())["scout"] == ["a"]
        await q.redis.hdel(q.keys.agents, "scout")
    async with agentq.connect(cluster.url, cfg) as q:
        assert (await q.agents())["scout"] == ["a"]


async def test_the_demo_runs_on_the_cluster(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from agentq.demo import run_demo

    assert await run_demo(config(), cluster.url) == 0
    printed = capsys.readouterr().out
    assert "writer     completed Summary:" in printed
    assert "embedded Redis server keeps running" not in printed


# -- the CLI ---------------------------------------------------------------------


def test_cli_with_a_cluster_url(cluster: LocalCluster) -> None:
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0")
    # A node that does not own the global slot, to show nothing depends on it.
    global_port = cluster.node_for_key(f"{prefix}:{{{prefix}}}:agents").port
    other = next(n for n in cluster.masters_now() if n.port != global_port)

    def agentq_cli(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "agentq.cli", "--redis", url_of(other.port), "--json", *args],
            capture_output=True, text=True, env=env, timeout=60, check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.stdout.strip() else None

    for agent in AGENTS:
        agentq_cli("agents", "add", agent)
    assert sorted(agentq_cli("agents", "list", "--repair")["agents"]) == list(AGENTS)
    job = agentq_cli("dispatch", "c", "from the command line")
    assert agentq_cli("status", job["jobId"])["state"] == "queued"
    assert agentq_cli("cancel", job["jobId"])["state"] == "cancelled"
    # A cluster URL naming a database is refused before anything is sent.
    refused = subprocess.run(
        [sys.executable, "-m", "agentq.cli", "--redis", f"{url_of(other.port)}/2", "agents",
         "list"], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert refused.returncode == 2 and "only database 0" in refused.stderr


# -- the worker and cluster errors (no cluster needed) -------------------------------


@pytest.mark.parametrize("error", [
    RedisClusterException("Redis Cluster cannot be connected"),
    ClusterDownError("CLUSTERDOWN The cluster is down"),
    TryAgainError("TRYAGAIN"),
    MovedError("3300 127.0.0.1:7102"),
])
def test_the_worker_takes_cluster_errors_for_a_lost_connection(error: Exception) -> None:
    assert isinstance(error, worker_module.UNREACHABLE)
    # Tried again without end, like a lost connection (an error reply is tried 10 times).
    assert worker_module._try_again(error, tries=1000)
    assert not worker_module._try_again(ResponseError("OOM"), tries=1000)


async def test_scripts_know_a_cluster_client(cluster: LocalCluster) -> None:
    async with connected(cluster.url) as q:
        assert Scripts(q.redis)._cluster is cluster_of(q.redis)
