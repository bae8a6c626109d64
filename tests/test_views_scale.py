"""``list`` and ``activity`` at many agents: the global job indexes, and what a call costs.

- Exact: a history over eight agents, paged through by every kind of caller
  with every kind of filter and several limits, matches what the records say,
  with no job skipped or repeated; again with the state filter's first look
  and budget made tiny, so that both ways on (sifting more of the global
  index, the partitions' state indexes) are taken from where it stopped.
- Strays: members of the global index without a job (a refused dispatch, an
  idempotent repeat, a dispatch cut short, junk) change no page; a refused
  dispatch's and a repeat's ids leave the index at once.
- A dispatch whose index write was lost is listed once the projector applied it.
- A rebuild restores the global index (deleted, or littered) and drops strays
  old enough not to be in flight.
- Commands, counted with ``INFO commandstats`` on a private server: ``list``
  (no filter, limit 20) and ``activity`` of one agent make as many with 300
  agents as with 1; ``activity`` of every agent a bounded number per agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from _indexes import drop_ids, drop_index, index_members
from _redis_server import redis_server

import agentq
from agentq.consumers.gates import Gates
from agentq.eventlog import reader
from agentq.eventlog.ids import new_job_id
from agentq.eventlog.scripts import Backoff, Scripts, ensure_work_groups
from agentq.projections import global_index, queries
from agentq.projections.audit import verify
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config
from agentq.schemas.errors import QueueFull

pytestmark = pytest.mark.both_backends  # again on a local Redis Cluster (conftest)

AGENTS = ("a", "b", "c", "d", "e", "f", "g", "h")
DISPATCHERS = ("main", "a", "b", "x", "y")
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
WORKER = "w1"
LEASE_MS = 600_000
NO_BACKOFF = Backoff(0, 0)


@pytest.fixture
async def many(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    """A client whose eight agents are known; nothing dispatched yet."""
    async with agentq.connect(redis_url, make_config(rateLimit=NO_RATE_LIMIT)) as q:
        for agent in AGENTS:
            await q.add_agent(agent)
        yield q


async def history(q: agentq.Client) -> list[str]:
    """120 jobs over eight agents by five dispatchers, in every state but
    waiting; most completed, few failed, some active, cancelled, delayed.
    Returns the ids in dispatch order."""
    order: list[str] = []
    for i in range(120):
        target = AGENTS[(i * 3) % len(AGENTS)]
        delayed = {"delay_seconds": 3600} if i % 17 == 5 else {}
        view = await q.dispatch(target, f"job {i}", caller=DISPATCHERS[i % 5], max_attempts=1,
                                **delayed)
        order.append(view.job_id)
    for agent in AGENTS:
        part = q.partition(agent)
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 100)
        ids = [s.job_id for s in started]
        failing = ids[3:4]
        for job_id in failing:
            assert await q.scripts.fail(part, WORKER, job_id, 1, "boom", NO_BACKOFF) == "failed"
        done = [j for j in ids[:-2] if j not in failing]
        await q.scripts.complete(part, WORKER, [(j, 1, b"1") for j in done])
    for job_id in order[7::29]:
        view = await q.status(job_id)
        if view.state not in ("completed", "failed", "cancelled"):
            await q.cancel(job_id)
    return order


async def records(q: agentq.Client) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for agent in AGENTS:
        for job_id, record in (await reader.all_records(q.redis, q.partition(agent))).items():
            out[job_id] = {"view": (await q.status(job_id))}
            assert record
    return out


def expected(order: Sequence[str], known: dict[str, dict[str, Any]], caller: str,
             query: dict[str, Any]) -> list[str]:
    out = []
    for job_id in reversed(order):
        view = known[job_id]["view"]
        if caller != "main" and caller not in (view.dispatched_by, view.target):
            continue
        if query.get("agent") and view.target != query["agent"]:
            continue
        if query.get("dispatched_by") and view.dispatched_by != query["dispatched_by"]:
            continue
        if query.get("state") and view.state not in query["state"]:
            continue
        out.append(job_id)
    return out


async def pages(q: agentq.Client, limit: int, caller: str, **query: Any) -> list[list[str]]:
    got: list[list[str]] = []
    cursor = None
    while True:
        out = await q.list(caller=caller, limit=limit, cursor=cursor, **query)
        assert out.count == len(out.jobs)
        got.append([j.job_id for j in out.jobs])
        cursor = out.next_cursor
        if cursor is None:
            return got
        assert cursor == out.jobs[-1].job_id
        assert len(got) < 200, "paging does not end"


CALLERS = ("main", "a", "h", "x")
QUERIES: list[dict[str, Any]] = [
    {},
    {"state": ["failed"]},
    {"state": ["queued", "delayed"]},
    {"state": ["completed"]},
    {"state": ["active", "cancelled"]},
    {"dispatched_by": "a"},
    {"dispatched_by": "x", "state": ["completed"]},
    {"dispatched_by": "main", "state": ["failed", "active"]},
    {"agent": "c"},
    {"agent": "d", "state": ["completed"]},
    {"agent": "c", "dispatched_by": "main", "state": ["completed", "queued"]},
]


async def check_every_page(q: agentq.Client, order: Sequence[str],
                           limits: Sequence[int] = (1, 3, 7, 100)) -> None:
    known = await records(q)
    for caller in CALLERS:
        for query in QUERIES:
            wanted = expected(order, known, caller, query)
            for limit in limits:
                got = await pages(q, limit, caller, **query)
                where = f"caller={caller} query={query} limit={limit}"
                for page in got[:-1]:
                    assert len(page) == limit, where
                assert got[-1] or len(got) == 1, f"an empty last page: {where}"
                flat = [j for page in got for j in page]
                assert len(flat) == len(set(flat)), f"a job repeated: {where}"
                assert flat == wanted, where


async def test_list_is_exact_through_the_global_index(many: agentq.Client) -> None:
    order = await history(many)
    await check_every_page(many, order)


async def test_a_dispatcher_and_state_filter_is_exact_a_few_ids_a_look(
    many: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``index_both.lua`` looking at one or two ids a call goes on where it
    stopped, whichever index it walks."""
    order = await history(many)
    for looks in (1, 2):
        monkeypatch.setattr(queries, "_BOTH_LOOKS", looks)
        await check_every_page(many, order, limits=(1, 7))


@pytest.mark.parametrize("way", ["sift", "partitions"])
async def test_a_sparse_state_filter_goes_on_from_where_it_stopped(
    many: agentq.Client, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """The first look at the global index stops at once; the counts then send the
    query on through the global index (``sift``) or the partitions' indexes."""
    order = await history(many)
    monkeypatch.setattr(queries, "_FIRST_LOOK", 0)
    if way == "sift":
        monkeypatch.setattr(queries, "_GLOBAL_BUDGET", 10**9)
        monkeypatch.setattr(queries, "_SIFT_PER_PARTITION", 10**9)
    else:
        monkeypatch.setattr(queries, "_GLOBAL_BUDGET", 0)
    went: list[str] = []
    partitions = queries._list_partitions

    async def tracked_partitions(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("pruned"):  # on from the global index (else: a list of one agent)
            went.append("partitions")
        return await partitions(*args, **kwargs)

    monkeypatch.setattr(queries, "_list_partitions", tracked_partitions)
    await check_every_page(many, order, limits=(1, 2, 5))
    assert ("partitions" in went) == (way == "partitions"), went


async def test_strays_change_no_page_and_refusals_leave_none(
    redis_url: str, make_config: Callable[..., Config]
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 5})
    async with agentq.connect(redis_url, config) as q:
        for agent in AGENTS:
            await q.add_agent(agent)
        keys = q.keys
        order = [(await q.dispatch(AGENTS[i % 8], f"job {i}", caller=DISPATCHERS[i % 5],
                                   idempotency_key=f"k{i}")).job_id for i in range(20)]
        members = await index_members(q, keys.jobs_index())
        assert members == set(order)

        # A refused dispatch (queue full) and an idempotent repeat leave no id behind.
        for _ in range(2):  # a has 3 of the 20
            await q.dispatch("a", "fill", caller="b")
        with pytest.raises(QueueFull):
            await q.dispatch("a", "one too many", caller="b")
        repeat = await q.dispatch(AGENTS[1], "job 1", caller=DISPATCHERS[1], idempotency_key="k1")
        assert repeat.job_id == order[1]
        listed = await index_members(q, keys.jobs_index())
        by_b = await index_members(q, keys.jobs_by("b"))
        jobs = {j.job_id for j in (await q.list(caller="main", limit=100)).jobs}
        assert listed == jobs and len(jobs) == 22
        assert by_b == {j.job_id for j in (await q.list(caller="main", limit=100,
                                                          dispatched_by="b")).jobs}

        # Ids without a job, among and around the real ones, change nothing.
        strays = [new_job_id("a"), new_job_id("zz"), "j_junk", "not-a-job", order[5] + "x"]
        await global_index.add(q.scripts, keys, [(s, "b") for s in strays])
        await global_index.add(q.scripts, keys, [(s, "main") for s in strays])
        for caller in ("main", "b", "a"):
            for query in ({}, {"dispatched_by": "b"}, {"state": ["queued"]}):
                flat = [j for page in await pages(q, 2, caller, **query) for j in page]
                assert not set(flat) & set(strays), (caller, query)
                assert flat == [j.job_id for j in (await q.list(
                    caller=caller, limit=100, **query)).jobs]


async def test_the_index_is_written_before_the_dispatch_runs(
    many: agentq.Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The index call goes ahead of the dispatch scripts (on one connection, in
    the same round trip; on a cluster, acknowledged before they are sent), so a
    crash between the two can leave only an index member without a job."""
    q = many
    sent: list[list[str]] = []
    call_many = Scripts.call_many

    async def spy(self: Scripts, calls: Sequence[Any]) -> list[Any]:
        sent.append([call.name for call in calls])
        return await call_many(self, calls)

    monkeypatch.setattr(Scripts, "call_many", spy)
    await q.dispatch_many([{"target": "b", "task": "x"}, {"target": "c", "task": "y"}])
    names = [name for batch in sent for name in batch]
    assert names[0] == "index" and sorted(names[1:]) == ["dispatch", "dispatch"]
    if q.scripts.on_cluster:
        assert sent[0] == ["index"]  # its reply came back before the dispatches went


async def test_a_dispatch_whose_index_write_was_lost_is_listed_after_a_rebuild(
    many: agentq.Client,
) -> None:
    """The dispatch script ran, the global index write did not (only a failover
    that lost the index's write can do that): audit names it, a rebuild restores it."""
    q = many
    assert (await q.list(caller="main")).jobs == []  # the global indexes are built
    job = await q.dispatch("c", "lost", caller="y")
    await global_index.remove(Scripts(q.redis), q.keys, [(job.job_id, "y")])
    assert (await q.list(caller="main")).jobs == []
    parts = [q.partition(agent) for agent in AGENTS]
    assert any(job.job_id in problem for problem in await verify(q.redis, parts))
    await rebuild(q.redis, parts)
    assert [j.job_id for j in (await q.list(caller="main")).jobs] == [job.job_id]
    assert [j.job_id for j in (await q.list(caller="y")).jobs] == [job.job_id]


async def test_an_announce_job_is_listed_as_soon_as_the_gates_made_it(
    many: agentq.Client,
) -> None:
    """The gates' dispatch of an announce job writes the global index too (no
    projector runs here)."""
    q = many
    await q.list(caller="main")  # the global indexes are built (from nothing)
    done = await q.dispatch("b", "work", caller="a", announce=True)
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)
    await q.scripts.start(part, WORKER, LEASE_MS, 1)
    await q.scripts.complete(part, WORKER, [(done.job_id, 1, b'"ok"')])
    # The gates handle b's log (as its consumer group would deliver it).
    gates = Gates(q.redis, q.open_blocking(), q.keys, consumer="g1")
    await gates.handle(await reader.read_partition(q.redis, part))
    # Across agents first: a list of one agent's jobs would catch its views up,
    # which adds what it applies to the global index as well.
    announce, first = (await q.list(caller="main")).jobs
    assert first.job_id == done.job_id
    assert (announce.target, announce.dispatched_by, announce.metadata) == (
        "a", "b", {"announceFor": done.job_id, "outcome": "completed"})
    assert [j.job_id for j in (await q.list(caller="b", dispatched_by="b")).jobs] == [
        announce.job_id]


async def test_rebuild_restores_the_global_index(many: agentq.Client) -> None:
    q = many
    order = await history(q)
    keys = q.keys
    before = {key: await index_members(q, key) for key in
              [keys.jobs_index(), *(keys.jobs_by(d) for d in DISPATCHERS)]}
    assert before[keys.jobs_index()] == set(order)
    # Lost, partly lost, and littered with strays old and young.
    await drop_index(q, keys.jobs_index())
    await drop_index(q, keys.jobs_by("x"))
    await drop_ids(q, keys.jobs_by("a"), order[1::10])
    old_stray = "j_00000000000000000000000000.a"
    young_stray = new_job_id("b")
    await global_index.add(q.scripts, keys, [(old_stray, "a"), (young_stray, "y"),
                                           ("j_nonsense", "ghost")])
    applied = await rebuild(q.redis, [q.partition(a) for a in AGENTS])
    assert applied > 120
    after = {key: await index_members(q, key) for key in before}
    assert after[keys.jobs_by("y")] == before[keys.jobs_by("y")] | {young_stray}
    assert {k: v - {young_stray} for k, v in after.items()} == before
    assert [k async for k in q.redis.scan_iter(match=f"{keys.jobs_by('ghost')}*")] == []
    assert [k async for k in q.redis.scan_iter(match=f"{keys.jobs_index('rebuild')}*")] == []
    await check_every_page(q, order, limits=(7,))


async def test_the_first_list_after_an_upgrade_builds_the_global_index(
    many: agentq.Client,
) -> None:
    """A deployment made by a version without the global indexes: the first list
    across agents (of any process) builds them from the partitions, once."""
    q = many
    order = await history(q)
    keys = q.keys
    await q.list(caller="main")
    # Some jobs were projected, some not, none is in a global index.
    await Projection(q.redis).catch_up([q.partition(a) for a in AGENTS[:4]])
    global_keys = [k async for k in q.redis.scan_iter(match=f"{keys.jobs_index()}*")]
    assert keys.jobs_built in global_keys
    await q.redis.delete(*global_keys)
    queries._built.clear()  # as in a process that never listed
    assert [j.job_id for j in (await q.list(caller="main", limit=100)).jobs] == order[::-1][:100]
    assert await q.redis.exists(keys.jobs_built)
    assert await index_members(q, keys.jobs_index()) == set(order)
    await check_every_page(q, order, limits=(7,))


async def test_replay_merges_every_partition_read_a_page_at_a_time(many: agentq.Client) -> None:
    q = many
    await history(q)
    parts = [q.partition(a) for a in AGENTS]
    logs = {part.agent: await reader.read_partition(q.redis, part, count=10_000)
            for part in parts}
    merged = [e for _, _, _, e in sorted(
        (e.at, e.agent, i, e) for events in logs.values() for i, e in enumerate(events))]
    for batch in (1, 3, 1000):
        got = [e async for e in reader.replay(q.redis, parts, batch=batch)]
        assert [(e.agent, e.event_id) for e in got] == [(e.agent, e.event_id) for e in merged]
    since = merged[len(merged) // 2].at
    got = [e async for e in reader.replay(q.redis, parts, batch=2, since_us=since)]
    assert got == [e for e in merged if e.at >= since]


async def test_replay_as_an_agent_looks_specs_up_together(
    many: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From --since on, most jobs' JobDispatched is not in the replay: their specs
    are read a run of events at a time, not one round trip per job."""
    q = many
    await history(q)
    parts = [q.partition(a) for a in AGENTS]
    merged = [e async for e in reader.replay(q.redis, parts)]
    since = merged[len(merged) // 2].at
    lookups: list[int] = []
    specs = q._deployment.specs

    async def counted(job_ids: Sequence[str]) -> list[str | None]:
        lookups.append(len(job_ids))
        return await specs(job_ids)

    monkeypatch.setattr(q._deployment, "specs", counted)
    got = [e async for e in q.replay(since_us=since, caller="a")]
    views = {e.job_id: await q.status(e.job_id) for e in merged}
    wanted = [e for e in merged if e.at >= since
              and "a" in (views[e.job_id].target, views[e.job_id].dispatched_by)]
    assert [(e.agent, e.event_id) for e in got] == [(e.agent, e.event_id) for e in wanted]
    assert 0 < len(lookups) <= len(merged) // 500 + 1 < sum(lookups)


# -- what a call costs --------------------------------------------------------------


async def _commands(redis: Any) -> int:
    stats: dict[str, dict[str, int]] = await redis.info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values())


async def _cost(q: agentq.Client, call: Callable[[], Any]) -> int:
    """Redis commands one call makes (those of scripts included), its second time."""
    await call()
    before = await _commands(q.redis)
    await call()
    return await _commands(q.redis) - before - 1  # the INFO itself


async def _costs_at(agents: int, config: Config) -> dict[str, int]:
    with redis_server() as server:
        async with agentq.connect(server.url, config) as q:
            names = [f"ag{i:03d}" for i in range(agents)]
            for name in names:
                await q.add_agent(name)
            # The first agent has 30 jobs, any other 3: each list reads a full page.
            items = [{"target": name, "task": f"task {i}"} for name in names
                     for i in range(30 if name == names[0] else 3)]
            for start in range(0, len(items), 300):
                await q.dispatch_many(items[start : start + 300], caller="main")
            part = q.partition(names[0])
            await ensure_work_groups(q.redis, part)
            await q.scripts.start(part, WORKER, LEASE_MS, 1)
            await q.scripts.heartbeat(part, WORKER, 30_000)
            return {
                "list": await _cost(q, lambda: q.list(caller="main", limit=20)),
                "list_mine": await _cost(q, lambda: q.list(caller=names[0], limit=20)),
                "activity_one": await _cost(q, lambda: q.activity([names[0]], caller="main")),
                "activity_all": await _cost(q, lambda: q.activity(caller="main")),
            }


async def test_list_and_activity_cost_the_same_at_1_and_300_agents(
    make_config: Callable[..., Config],
) -> None:
    config = make_config(rateLimit=NO_RATE_LIMIT)
    one, many = await asyncio.gather(_costs_at(1, config), _costs_at(300, config))
    print(f"\nRedis commands per call, 1 agent: {one}; 300 agents: {many}")
    # A page of 20 jobs of 927 costs what a page of 20 of 30 costs.
    assert many["list"] == one["list"]
    assert many["list_mine"] == one["list_mine"]
    assert many["activity_one"] == one["activity_one"]
    # Every agent: the registry's read, then one script call per partition and
    # what it runs, nothing more.
    assert many["activity_all"] <= 1 + 300 * (one["activity_all"] - 1)
