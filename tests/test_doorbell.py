"""The doorbell (issue 13, item 3): every script that appends to a partition log
publishes the agent once per call on ``<prefix>:ring``; a process with background
work reads only the partitions that rang, so an idle one costs about the same
however many agents there are. Pub/sub can drop a ring: a re-subscription looks
at every partition served, and a slow sweep behind it finds what no ring told.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _procs import LineProcess
from _redis_server import RedisServer

import agentq
from agentq.consumers import doorbell
from agentq.consumers.background import Background
from agentq.consumers.doorbell import Ring
from agentq.eventlog import registry
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config

ROOT = Path(__file__).resolve().parent.parent
BACKGROUND_PROC = Path(__file__).resolve().parent / "background_proc.py"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}


def test_a_ring_reads_its_words() -> None:
    assert Ring.parse("a") == Ring("a")
    assert Ring.parse("x_1-y d1700000000123") == Ring("x_1-y", run_ms=1700000000123)
    assert Ring.parse("b l5 d7") == Ring("b", run_ms=7, lease_ms=5)
    assert Ring.parse("c l5 q") == Ring("c", lease_ms=5, quiet=True)
    assert Ring.parse("!owners") is None
    assert Ring.parse("") is None


class Bell:
    """A subscription to a prefix's doorbell, for counting rings."""

    def __init__(self, q: agentq.Client) -> None:
        self.pubsub = q.redis.pubsub(ignore_subscribe_messages=True)
        self.channel = q.keys.ring

    async def __aenter__(self) -> Bell:
        await self.pubsub.subscribe(self.channel)
        while (await self.pubsub.get_message(timeout=1)) is not None:
            pass  # the subscription's reply
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]

    async def rings(self, quiet: float = 0.2) -> list[str]:
        """The rings published until none came for ``quiet`` seconds."""
        got: list[str] = []
        while (message := await self.pubsub.get_message(timeout=quiet)) is not None:
            got.append(str(message["data"]))
        return got


async def server_ms(q: agentq.Client) -> int:
    seconds, micros = await q.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_each_script_call_rings_once_with_what_falls_due(q: agentq.Client) -> None:
    part = q.partition("a")
    async with Bell(q) as bell:
        # One call, four events, two of them delayed: one ring, the earliest run time.
        before = await server_ms(q)
        await q.dispatch_many([
            {"target": "a", "task": "now"},
            {"target": "a", "task": "later", "delaySeconds": 30},
            {"target": "a", "task": "sooner", "delaySeconds": 20},
            {"target": "a", "task": "high", "priority": "high"},
        ], caller="b")
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.agent == "a" and parsed.lease_ms is None
        assert parsed.run_ms is not None
        assert before + 20_000 <= parsed.run_ms <= await server_ms(q) + 20_000

        # A start of two jobs: one ring, with the deadline of the leases it gave.
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, "w1", 60_000, 2)
        assert len(started) == 2
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.run_ms is None and parsed.lease_ms is not None
        assert parsed.lease_ms >= before + 60_000

        # A failed attempt with a backoff: its retry's run time.
        first = started[0]
        assert await q.scripts.fail(part, "w1", first.job_id, 1, "x", Backoff(5_000, 5_000)) \
            == "delayed"
        (ring,) = await bell.rings()
        parsed = Ring.parse(ring)
        assert parsed is not None and parsed.run_ms is not None

        # Calls that append nothing ring nothing: a renewal, a refused completion,
        # a dispatch that only repeats an idempotency key.
        second = started[1]
        assert await q.scripts.renew(part, 60_000, [(second.job_id, 1)]) == [True]
        refused = await q.scripts.complete(part, "w1", [(first.job_id, 1, b"1")])
        assert refused[0] is not None
        await q.dispatch("a", "once", caller="b", idempotency_key="k")
        assert len(await bell.rings()) == 1
        await q.dispatch("a", "once", caller="b", idempotency_key="k")
        assert await bell.rings() == []


async def test_a_call_that_appends_only_what_the_projector_acts_on_rings_quiet(
    q: agentq.Client,
) -> None:
    """Starts, progress and endings nobody waits on ring ``q``: the gates and the
    alerts do not read for them (they read those entries with the next loud ring)."""
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    async with Bell(q) as bell:
        plain = await q.dispatch("a", "plain", caller="b")
        awaited = await q.dispatch("a", "awaited", caller="b")
        await q.dispatch("b", "after", caller="a", depends_on=[awaited.job_id])
        rings = [Ring.parse(r) for r in await bell.rings()]
        assert [r.quiet for r in rings if r and r.agent == "a"] == [False, False]

        started, _ = await q.scripts.start(part, "w1", 60_000, 2)
        ((ring,),) = [[Ring.parse(r) for r in await bell.rings()]]
        assert ring is not None and ring.quiet and ring.lease_ms is not None
        by_id = {job.job_id: job for job in started}
        assert await q.scripts.progress(part, "w1", plain.job_id, 1, b'{"pct":50}') is None
        ((ring,),) = [[Ring.parse(r) for r in await bell.rings()]]
        assert ring is not None and ring.quiet

        # Nobody waits on `plain`: quiet. `awaited` has a dependent once the gates
        # registered it: loud (the gates release it).
        assert await q.scripts.complete(part, "w1", [(plain.job_id, 1, b"1")]) == [None]
        ((ring,),) = [[Ring.parse(r) for r in await bell.rings()]]
        assert ring is not None and ring.quiet
        assert by_id.keys() == {plain.job_id, awaited.job_id}
        await q.redis.sadd(part.dependents(awaited.job_id), "j_someone")
        assert await q.scripts.complete(part, "w1", [(awaited.job_id, 1, b"2")]) == [None]
        ((ring,),) = [[Ring.parse(r) for r in await bell.rings()]]
        assert ring is not None and not ring.quiet


def test_only_the_consumers_that_act_on_quiet_events_read_for_a_quiet_ring() -> None:
    from agentq.consumers.alerts import Alerter
    from agentq.consumers.gates import Gates
    from agentq.consumers.projector import Projector

    assert Projector.hears_quiet and not Gates.hears_quiet and not Alerter.hears_quiet
    gates = Gates.__new__(Gates)
    gates._dirty, gates._marked = {}, asyncio.Event()
    gates.rang(Ring("a", quiet=True))
    assert gates._dirty == {} and not gates._marked.is_set()
    gates.rang(Ring("a"))
    assert list(gates._dirty) == ["a"] and gates._marked.is_set()


# -- a process with background work, started by itself -----------------------------


class BackgroundProcess(LineProcess):
    name = "background process"

    def shards(self) -> set[int]:
        """The shards this process said it serves, last."""
        lines = [line for line in self.lines if line.startswith("SHARDS ")]
        if not lines:
            return set()
        words = lines[-1].split()
        return {int(s) for s in words[2].split(",")} if len(words) > 2 else set()

    def calls(self) -> list[tuple[str, str, int]]:
        """(script, agent, server ms) of each scheduler and stall recovery call."""
        return [(w[1], w[2], int(w[3])) for line in self.lines
                if line.startswith("CALL ") and len(w := line.split()) == 4]


@pytest.fixture
async def spawn_background(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    """Start background processes (tests/background_proc.py); each is stopped and
    reaped afterwards."""
    started: list[BackgroundProcess] = []

    async def start(url: str, config: Config, **env: str) -> BackgroundProcess:
        stderr_path = tmp_path / f"background{len(started)}.stderr"
        config_json = config.model_dump_json(by_alias=True, exclude_none=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(BACKGROUND_PROC), url, config_json, cwd=ROOT,
                env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=err,
            )
        process = BackgroundProcess(proc, stderr_path)
        started.append(process)
        return process

    yield start
    for process in started:
        await process.close()


@pytest.fixture
def private_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, whose command counts are the test's."""
    with RedisServer() as server:
        yield server


async def add_agents(q: agentq.Client, n: int) -> list[str]:
    agents = [f"agent{i:04d}" for i in range(n)]
    await asyncio.gather(*(registry.add_agent(q.redis, q.keys, agent) for agent in agents))
    return agents


async def commands_per_second(q: agentq.Client, seconds: float) -> float:
    """Commands the server processed per second over ``seconds`` (less this
    test's own two INFO calls)."""
    before = int((await q.redis.info("stats"))["total_commands_processed"])
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = int((await q.redis.info("stats"))["total_commands_processed"])
    return (after - before - 1) / (time.monotonic() - started)


async def idle_rate(spawn_background: Callable[..., Any], server: RedisServer,
                    make_config: Callable[..., Config], agents: int) -> float:
    config = make_config(rateLimit=NO_RATE_LIMIT, workers={"heartbeatTimeoutSeconds": 3})
    async with agentq.connect(server.url, config) as q:
        await add_agents(q, agents)
        process = await spawn_background(server.url, config, BG_QUIET="1")
        await process.ready()
        await process.wait_for(lambda: len(process.shards()) == 64, "all 64 shards")
        # Starting to serve a partition costs a survey, joining its groups and a
        # tidy: wait until that is done (a second of fewer than 100 commands).
        deadline = time.monotonic() + 60
        while await commands_per_second(q, 1) > 100:
            assert time.monotonic() < deadline, "the process never settled"
        rate = await commands_per_second(q, 6)
        await process.close()
        return rate


async def test_an_idle_process_costs_the_same_with_1_or_1000_agents(
    private_server: RedisServer, spawn_background: Callable[..., Any],
    make_config: Callable[..., Config],
) -> None:
    one = await idle_rate(spawn_background, private_server, make_config, 1)
    thousand = await idle_rate(spawn_background, private_server, make_config, 1000)
    print(f"idle Redis commands/s of one process: {one:.1f} with 1 agent, "
          f"{thousand:.1f} with 1,000 ({(thousand - one) / 999:.4f} per extra agent)")
    assert thousand <= 2 * max(one, 1.0), (one, thousand)


# -- rings lost --------------------------------------------------------------------------


@pytest.fixture
async def private_q(private_server: RedisServer,
                    make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit=NO_RATE_LIMIT)
    async with agentq.connect(private_server.url, config) as client:
        for agent in ("a", "b", "c"):
            await client.add_agent(agent)
        yield client


async def until(check: Callable[[], Any], timeout: float = 15, what: str = "") -> None:
    """Until ``check()`` (a bool, or an awaitable of one) is true."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def state_of(q: agentq.Client, job_id: str) -> str:
    return str(await q.redis.hget(q.partition(job_id.rsplit(".", 1)[1]).job(job_id), "state"))


async def test_rings_lost_with_the_connection_are_made_up_for_on_resubscribing(
    private_q: agentq.Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = private_q
    monkeypatch.setattr(doorbell, "_RETRY_FIRST", 1.0)  # a window with nobody listening
    background = Background(q.redis, q.open_blocking, q.keys, q.config)
    background.ownership.sweep_per_second = 0  # no sweep: only the re-subscription
    bell = background.ownership.doorbell
    dep = await q.dispatch("b", "first", caller="a")
    waiting = await q.dispatch("c", "after", caller="a", depends_on=[dep.job_id])
    stop = asyncio.Event()
    run = asyncio.create_task(background.run(stop))
    try:
        await until(lambda: len(background.ownership.shards) == 64,
                    what="the process to serve every shard")
        await until(bell.subscribed.is_set, what="the doorbell")
        assert bell.subscriptions == 1
        await q.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: not bell.subscribed.is_set(), what="the drop")
        # Completed while nobody listens: its ring is lost.
        part = q.partition("b")
        await ensure_work_groups(q.redis, part)
        (started,), _ = await q.scripts.start(part, "w1", 60_000, 1)
        assert started.job_id == dep.job_id
        assert await q.scripts.complete(part, "w1", [(dep.job_id, 1, b"1")]) == [None]
        await until(bell.subscribed.is_set, what="resubscribing")
        await until(lambda: _is(q, waiting.job_id, "queued"), timeout=10,
                    what="the dependent's release")
        # Subscribed again (redis-py 8.2 may reconnect inside a read as well as the
        # doorbell subscribing anew: each counts); the sweep is off, so that did it.
        assert bell.subscriptions >= 2
    finally:
        stop.set()
        await asyncio.wait_for(run, 15)


async def _is(q: agentq.Client, job_id: str, state: str) -> bool:
    return await state_of(q, job_id) == state


RAW_EVENT = {"type": "Unheard", "jobId": "j_none.a", "v": "1", "at": "0", "actor": "t",
             "data": "{}", "p": ""}


async def test_the_sweep_finds_what_no_ring_told(q: agentq.Client) -> None:
    """An event appended with a raw XADD (no ring) is read by every log consumer."""
    background = Background(q.redis, q.open_blocking, q.keys, q.config)
    background.ownership.sweep_per_second = 5.0
    stop = asyncio.Event()
    run = asyncio.create_task(background.run(stop))
    log = q.partition("a").log
    try:
        await until(lambda: len(background.ownership.shards) == 64,
                    what="the process to serve every shard")
        await asyncio.sleep(0.3)  # every partition surveyed once
        visits = background.ownership.visits
        entry = await q.redis.xadd(log, RAW_EVENT)  # type: ignore[arg-type]

        async def read_by_all() -> bool:
            groups = {g["name"]: g for g in await q.redis.xinfo_groups(log)}
            return all(name in groups and groups[name]["last-delivered-id"] == entry
                       and groups[name]["pending"] == 0
                       for name in ("gates", "projector", "alerts"))

        await until(read_by_all, timeout=10, what="the sweep to find the entry")
        assert background.ownership.visits > visits
    finally:
        stop.set()
        await asyncio.wait_for(run, 15)


async def test_a_stop_releases_every_shard_at_once(q: agentq.Client) -> None:
    background = Background(q.redis, q.open_blocking, q.keys, q.config)
    stop = asyncio.Event()
    run = asyncio.create_task(background.run(stop))
    try:
        await until(lambda: len(background.ownership.shards) == 64,
                    what="the process to serve every shard")
        owners = await q.redis.hgetall(q.keys.owners)
        assert {v for k, v in owners.items() if k.isdigit()} == {background.presence.name}
    finally:
        stop.set()
        await asyncio.wait_for(run, 15)
    owners = await q.redis.hgetall(q.keys.owners)
    assert owners == {}, owners


async def test_a_refused_ring_leaves_the_write_standing(
    make_config: Callable[..., Config],
) -> None:
    """An ACL user without the doorbell's channel: the scripts' writes stand (the
    ring is lost; the sweep finds what it would have told)."""
    with RedisServer(["--user", "bob", "on", ">secret", "~*", "resetchannels", "+@all",
                      "--user", "default", "off"]) as server:
        config = make_config(rateLimit=NO_RATE_LIMIT,
                             redis={"username": "bob", "password": "secret"})
        async with agentq.connect(server.url, config) as q:
            await q.add_agent("a")
            job = await q.dispatch("a", "written all the same", caller="a", delay_seconds=60)
            assert (await q.status(job.job_id)).state == "delayed"


async def test_a_consumer_behind_reads_more_at_once(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The projector (200 entries a read) and the alerter (100) pause 50 ms after a
    read, to batch what comes one by one. Behind for longer than ``catch_up_after``
    (0 here, 5 s by default), each read asks for twice as many as the last: a read
    of a fixed size per pause would cap them at a batch per 50 ms (the alerter at
    2,000 events/s), below the rate a busy log grows at, and under a load that
    lasts they would never catch up."""
    from agentq.consumers import logconsumer

    monkeypatch.setattr(logconsumer.LogConsumer, "catch_up_after", 0.0)

    pauses: list[float] = []
    sleep = logconsumer.sleep_unless_stopped

    async def noted(seconds: float, stop: asyncio.Event) -> Any:
        pauses.append(seconds)
        return await sleep(seconds, stop)

    monkeypatch.setattr(logconsumer, "sleep_unless_stopped", noted)
    log = q.partition("a").log
    for _ in range(3):
        await q.dispatch_many([{"target": "a", "task": "backlog"}] * 500)
    end = (await q.redis.xrevrange(log, count=1))[0][0]
    background = Background(q.redis, q.open_blocking, q.keys, q.config)
    stop = asyncio.Event()
    run = asyncio.create_task(background.run(stop))
    try:
        async def read_by_both() -> bool:
            groups = {g["name"]: g for g in await q.redis.xinfo_groups(log)}
            return all(name in groups and groups[name]["last-delivered-id"] == end
                       for name in ("projector", "alerts"))

        await until(read_by_both, timeout=20, what="the backlog to be read")
    finally:
        stop.set()
        await asyncio.wait_for(run, 15)
    # The alerter reads 100, 200, 400, 800 (and the rest), the projector 200, 400,
    # 800 (and the rest), a pause after each: 23 pauses with reads of fixed size.
    assert len([p for p in pauses if p >= 0.05]) <= 12, pauses
