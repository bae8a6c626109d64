"""Ownership of partitions (issue 13, item 3): processes lease shards of
partitions in the owners hash, renewed with their heartbeat; rendezvous hashing
over the live processes says who should own what, so that processes coming and
going move few shards; a dead holder's leases lapse with its heartbeat.
"""

from __future__ import annotations

import asyncio
import zlib

import agentq
from agentq.consumers.shards import SHARDS, owner_of, shard_of, share_of
from agentq.eventlog.processes import Processes


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
