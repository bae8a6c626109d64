"""Ownership of partitions (issue 13, item 3): each partition's background work
(scheduler, stall recovery, log consumers) is served by one live process at a
time. Processes lease shards of partitions in the owners hash, renewed with
their heartbeat; rendezvous hashing over the live processes says who should
own what, so that processes coming and going move few shards; a SIGKILLed
owner's shards are claimed once its heartbeat deadline has passed.
"""

from __future__ import annotations

import asyncio
import statistics
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from test_doorbell import BackgroundProcess, add_agents, spawn_background, until

import agentq
from agentq.consumers.shards import SHARDS, owner_of, shard_of, share_of
from agentq.eventlog import reader
from agentq.eventlog.processes import Processes
from agentq.eventlog.scripts import ensure_work_groups
from agentq.schemas.config import Config

__all__ = ["spawn_background"]  # the fixture, shared with test_doorbell

# A process trusts its leases for 0.8 of this after each beat: at 2 s, a CI run on
# two loaded cores once left [4-1000]'s delayed jobs unqueued for 30 s (one failure
# in about five runs; not reproduced alone), so 3 s gives a late beat more room.
HEARTBEAT = 3.0
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}


# -- shards ------------------------------------------------------------------------------


def test_an_agents_shard_is_a_stable_hash_of_its_id() -> None:
    assert SHARDS == 64
    for agent in ("a", "researcher", "x_1-y"):
        assert shard_of(agent) == zlib.crc32(agent.encode()) % 64
    assert shard_of("a") == 3  # the same in every process and version


def test_every_shard_has_one_owner_and_few_move_when_processes_come_and_go() -> None:
    processes = [f"host:{pid}" for pid in (101, 202, 303, 404)]
    shares = {p: share_of(p, processes) for p in processes}
    assert set().union(*shares.values()) == set(range(SHARDS))
    assert sum(len(s) for s in shares.values()) == SHARDS  # no shard twice
    assert all(shares.values())
    # A fifth process takes only shards it wins; nobody else's share changes otherwise.
    joined = [*processes, "host:505"]
    for p in processes:
        assert share_of(p, joined) <= shares[p]
    moved = SHARDS - sum(len(share_of(p, joined) & shares[p]) for p in processes)
    assert moved == len(share_of("host:505", joined))
    # One leaves: only its shards move, to the others.
    left = processes[1:]
    for p in left:
        assert share_of(p, left) >= shares[p]
    assert all(owner_of(s, left) != processes[0] for s in range(SHARDS))


# -- leases --------------------------------------------------------------------------------


async def test_a_lease_is_claimed_only_when_free_or_its_holder_is_dead(q: agentq.Client) -> None:
    processes = Processes(q.redis, q.keys)
    first = await processes.beat_owning("first", 1_000, 60_000, want=[1, 2])
    assert first.held_by("first") == {1, 2}
    second = await processes.beat_owning("second", 30_000, 60_000, want=[2, 3])
    assert second.held_by("second") == {3}  # 2 is held by a live process
    assert second.holders[2] == "first"
    assert second.members == {"first", "second"}
    assert second.candidates() == {"first", "second"}

    await asyncio.sleep(1.1)  # the first process misses its deadline
    second = await processes.beat_owning("second", 30_000, 60_000, want=[2, 3])
    assert second.held_by("second") == {2, 3}
    assert second.candidates() == {"second"}
    assert second.holders[1] == "first"  # lapsed, until someone claims it

    # Only one's own leases are released.
    second = await processes.beat_owning("second", 30_000, 60_000, want=[3], release=[1, 2])
    assert second.holders == {1: "first", 3: "second"}
    # Leaving releases every lease and leaves the members.
    second = await processes.beat_owning("second", 30_000, 60_000, leaving=True)
    assert second.held_by("second") == set()
    assert "second" not in second.members
    assert "second" in second.census.dead()


# -- processes -------------------------------------------------------------------------------


async def holders(q: agentq.Client) -> dict[int, str]:
    owners: dict[str, str] = await q.redis.hgetall(q.keys.owners)  # type: ignore[assignment]
    return {int(field): name for field, name in owners.items() if field.isdigit()}


async def settled(q: agentq.Client, procs: dict[str, BackgroundProcess]) -> bool:
    """Is every shard leased to the one of ``procs`` that rendezvous hashing
    picks, and does each process say it serves exactly those shards?"""
    held = await holders(q)
    return all(proc.shards() == {s for s, h in held.items() if h == name}
               == share_of(name, procs) for name, proc in procs.items())


async def server_ms(q: agentq.Client) -> int:
    seconds, micros = await q.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def dispatch_delayed(q: agentq.Client, agents: list[str], delay: float) -> list[str]:
    ids: list[str] = []
    for i in range(0, len(agents), 100):
        views = await q.dispatch_many([{"target": agent, "task": "later", "delaySeconds": delay}
                                       for agent in agents[i:i + 100]], caller=agents[0])
        ids += [view.job_id for view in views]
    return ids


async def all_in(q: agentq.Client, job_ids: list[str], state: str) -> bool:
    async with q.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(q.partition(job_id.rsplit(".", 1)[1]).job(job_id), "state")
        states = await pipe.execute()
    return all(s == state for s in states)


@pytest.mark.parametrize(("n_procs", "n_agents"), [(2, 100), (4, 1000)])
async def test_each_partition_is_served_by_one_process_and_a_killed_ones_are_taken_over(
    redis_url: str, make_config: Callable[..., Config],
    spawn_background: Callable[..., Any], n_procs: int, n_agents: int,
) -> None:
    config = make_config(rateLimit=NO_RATE_LIMIT,
                         workers={"heartbeatTimeoutSeconds": HEARTBEAT})
    async with agentq.connect(redis_url, config) as q:
        agents = await add_agents(q, n_agents)
        procs: dict[str, BackgroundProcess] = {}
        for _ in range(n_procs):
            proc = await spawn_background(redis_url, config)
            procs[await proc.ready()] = proc
        await until(lambda: settled(q, procs), timeout=90, what="every shard to have one owner")
        held = await holders(q)
        views = {name: proc.shards() for name, proc in procs.items()}
        assert all(views.values()), views  # everyone serves a share
        assert sum(len(v) for v in views.values()) == SHARDS  # and no shard twice

        # Delayed jobs in a third of the partitions, expired leases in a tenth: each
        # partition's promote and stall calls come from its owner alone.
        delayed = agents[::3]
        leased = agents[1::10]
        jobs = await dispatch_delayed(q, delayed, 0.5)
        started = []
        for agent in leased:
            await q.dispatch(agent, "abandoned", caller=agents[0], max_attempts=5)
            part = q.partition(agent)
            await ensure_work_groups(q.redis, part)
            (job,), _ = await q.scripts.start(part, "gone-worker", 300, 1)
            started.append(job.job_id)
        await until(lambda: all_in(q, jobs + started, "queued"), timeout=30,
                    what="every delayed job queued and every lease reclaimed")
        callers: dict[tuple[str, str], set[str]] = defaultdict(set)
        for name, proc in procs.items():
            for script, agent, _ in proc.calls():
                callers[(script, agent)].add(name)
        for script, agents_of in (("promote", delayed), ("stall", leased)):
            for agent in agents_of:
                assert callers[(script, agent)] == {held[shard_of(agent)]}, (script, agent)
        calls = sum(len(proc.calls()) for proc in procs.values())
        print(f"{n_procs} processes, {n_agents} agents: {len(delayed)} partitions promoted "
              f"and {len(leased)} reclaimed, each by its owner alone ({calls} calls)")

        # SIGKILL one: its partitions are served again once its deadline has passed.
        victim_name, victim = next(iter(procs.items()))
        mine = [a for a in agents if shard_of(a) in views[victim_name]][:100]
        due = await dispatch_delayed(q, mine, 0.2)
        await victim.kill()
        killed_at = await server_ms(q)
        del procs[victim_name]
        await until(lambda: all_in(q, due, "queued"), timeout=HEARTBEAT + 20,
                    what="the killed process's partitions to be served again")
        delays = []
        for job_id in due:
            events = await reader.job_history(q.redis, q.partition(job_id.rsplit(".", 1)[1]),
                                              job_id)
            assert events is not None
            (queued,) = [e for e in events if e.type == "JobQueued"]
            delays.append(max(0, queued.at // 1000 - killed_at) / 1000)
        print(f"served again after the SIGKILL: p50 {statistics.median(delays):.3f}s "
              f"max {max(delays):.3f}s for {len(delays)} partitions "
              f"(heartbeat timeout {HEARTBEAT}s)")
        assert max(delays) <= HEARTBEAT + 2, delays
        await until(lambda: settled(q, procs), timeout=30, what="the survivors to share all")
        assert victim_name not in (await holders(q)).values()
