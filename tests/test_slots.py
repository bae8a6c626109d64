"""Cluster safety (DESIGN rule 2): every script call's keys hash to one slot, and
every key of one partition shares its agent's slot."""

from __future__ import annotations

import asyncio
import inspect
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import pytest
from redis.crc import key_slot

import agentq
from agentq.eventlog import reader
from agentq.eventlog.keys import Keys, Partition, rebuilding
from agentq.eventlog.scripts import SCRIPT_NAMES, Backoff, ScriptCall, Scripts, ensure_work_groups

Calls = dict[str, list[list[str]]]


def slot(key: str) -> int:
    return key_slot(key.encode())


def record_keys(q: agentq.Client) -> Calls:
    """Record the KEYS of every script call, whether made alone or in a batch."""
    calls: Calls = defaultdict(list)
    scripts = q.scripts
    call_one, call_many = scripts._call, scripts.call_many

    def one(name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls[name].append([str(k) for k in keys])
        return call_one(name, keys, args)

    async def many(batch: Sequence[ScriptCall]) -> list[Any]:
        for call in batch:
            calls[call.name].append([str(k) for k in call.keys])
        return await call_many(batch)

    scripts._call = one  # type: ignore[method-assign]
    scripts.call_many = many  # type: ignore[method-assign]
    return calls


async def exercise_every_script(q: agentq.Client) -> None:
    """One representative call of each script, through the client or the wrapper."""
    part = q.partition("a")
    dep = await q.dispatch("b", "dependency", caller="c")
    # One dispatch call: a queued, a delayed, a waiting job, idempotency keys.
    await q.dispatch_many(
        [
            {"target": "a", "task": "one", "idempotencyKey": "k{1}"},
            {"target": "a", "task": "two", "delaySeconds": 0.01, "idempotencyKey": "k2"},
            {"target": "a", "task": "three", "dependsOn": [dep.job_id]},
            {"target": "a", "task": "four", "priority": "high"},
        ],
        caller="c",
    )
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, "w1", 60_000, 2)
    assert len(started) == 2
    (j1, r1), (j2, r2) = [(s.job_id, int(s.record["attempt"])) for s in started]
    assert await q.scripts.progress(part, "w1", j1, r1, b'{"percent":10}') is None
    assert await q.scripts.renew(part, 60_000, [(j1, r1), (j2, r2)]) == [True, True]
    assert await q.scripts.complete(part, "w1", [(j1, r1, b"1")]) == [None]
    assert await q.scripts.fail(part, "w1", j2, r2, "x", Backoff(0, 0)) in ("queued", "failed")
    short, _ = await q.scripts.start(part, "w1", 1, 1)
    await asyncio.sleep(0.01)
    assert await q.scripts.stall(part, "reaper", [short[0].job_id], Backoff(0, 0)) == [
        short[0].job_id
    ]
    delayed = await q.redis.zrange(part.delayed, 0, -1)
    await asyncio.sleep(0.02)
    await q.scripts.promote(part, "scheduler", delayed)
    # The same two scripts finding what is due themselves, by the server's clock.
    await q.scripts.promote_due(part, "scheduler", 10)
    await q.scripts.stall_due(part, "reaper", Backoff(0, 0), 10)
    # A worker's presence, and a stopping worker handing back what it holds.
    assert await q.scripts.heartbeat(part, "w1", 30_000) > 0
    held, _ = await q.scripts.start(part, "w1", 60_000, 1)
    # The process registry (one global key) and a takeover in one stream.
    await q.scripts.presence(q.keys.processes, "p1", 30_000, 60_000, False)
    # A beat with shard leases (the registry and the owners hash share the global
    # slot), and one look at a partition for its background work.
    await q.scripts.owners(q.keys.processes, q.keys.owners, "p1", 30_000, 60_000,
                           leaving=False, channel="", want=[1, 2], release=[])
    assert (await q.scripts.survey(part, ["gates", "projector"])).last_id
    assert await q.scripts.takeover(part.ready("normal"), "workers", "w1", 10, ["gone"]) == 0
    attempt = int(held[0].record["attempt"])
    assert await q.scripts.release(part, "w1", [(held[0].job_id, attempt)]) == [held[0].job_id]
    failing = await q.dispatch("a", "fails", caller="c", max_attempts=1)
    await q.scripts.start(part, "w1", 60_000, 10)
    assert await q.scripts.fail(part, "w1", failing.job_id, 1, "x", Backoff(0, 0)) == "failed"
    await q.retry(failing.job_id)
    waiting = await q.dispatch("a", "waits", caller="c", depends_on=[dep.job_id])
    await q.cancel(waiting.job_id)
    await q.dispatch("a", "drained", caller="c", delay_seconds=3600)
    await q.drain("a")
    await q.scripts.take_rate(q.partition("c"), 10, 1, "token")
    # Retention: removing ended jobs (none archived here, so none goes).
    assert (await q.scripts.expire(part, 1000, 10, "", 60_000)).jobs == []
    # An archiving pass's record of what it made durable, and the global indexes'
    # removal of jobs that left.
    await q.scripts.record(part, {failing.job_id: 1}, ("", "", 0))
    await q.scripts.call_many([q.scripts.unindex_call(q.keys, [(failing.job_id, "c")])])
    # The paged global indexes read (list across agents, audit verify) and edited
    # (a rebuild's merge).
    index = q.keys.jobs_by("c")
    assert await q.scripts.index_range(index, None, 10, forward=False)
    assert await q.scripts.index_has(index, [dep.job_id]) == [True]
    assert await q.scripts.index_size(index) > 0
    assert await q.scripts.index_edit(index, [dep.job_id], add=True) == 0
    # A list by dispatcher and state reads what two of a partition's indexes hold.
    ((both, _, _),) = await q.scripts.call_many([Scripts.index_both_call(
        q.partition("a").index_by("c"), q.partition("a").index_state("queued"), None, 10, 100)])
    assert isinstance(both, list)  # none may be projected yet: the slot is the point
    # Records read a batch at a time (audit verify).
    assert (await q.scripts.records(part, [dep.job_id, "j_gone.a"]))[1] == {}
    # Which were dispatched by a time (a rebuild of a trimmed partition).
    mine = (await q.dispatch("a", "made", caller="main")).job_id
    assert await q.scripts.created_by(part, 2**52, [mine, "j_gone.a"]) == [mine]
    assert await q.scripts.created_by(part, 0, [mine]) == []
    # Dependency gates: register in the dependency's partition, resolve and rearm in
    # the dependent's.
    gated = await q.dispatch("a", "gated", caller="c", depends_on=[dep.job_id])
    assert await q.scripts.register(q.partition("b"), dep.job_id, gated.job_id) is None
    assert (
        await q.scripts.resolve(
            part, "gates", gated.job_id, dep.job_id, "completed", "1", "", ignore_failure=False
        )
        == "queued"
    )
    assert await q.scripts.rearm(part, "gates", gated.job_id, dep.job_id) is False
    assert await q.scripts.endings(part, [gated.job_id]) == {}
    # Projections: a dispatch (with its dispatcher's index) and a later event.
    first, *rest = await reader.read_partition(q.redis, part)
    await q.scripts.project(
        part,
        [
            (
                first.event_id,
                first.job_id,
                first.data["state"],
                "",
                first.at,
                first.data["dispatchedBy"],
            ),
            (rest[0].event_id, rest[0].job_id, "", "", rest[0].at, None),
        ],
    )
    # A job's history; a rebuild's views swapped in (here: one staged key over another).
    assert (await q.scripts.history(part, first.event_id, 10))[0]
    staged = rebuilding(part)
    await q.scripts.swap([(staged.index_state("failed"), staged.index_state("queued"))], [])
    # What activity reads of a partition.
    (read,) = await q.scripts.call_many([q.scripts.activity_call(part)])
    assert q.scripts.activity_outcome(read).counts
    # What /metrics reads of a partition.
    (read,) = await q.scripts.call_many([q.scripts.metrics_call(part)])
    assert read[0]
    # Schedules: the name's global index, then a change, a look and a tick in the
    # target's partition.
    assert await q.scripts.schedule_name(q.keys, "claim", "s1", "a") == ["claimed"]
    assert await q.scripts.schedule(part, "add", "s1", "main", b"{}", ring=q.keys.ring,
                                    next_ms=1, definition=b"{}") != 0
    assert (await q.scripts.schedule_due(part, 10)).due[0][:2] == ("s1", 1)
    assert await q.scripts.schedule_tick(part, "s1", 1, 2, "!queue_full")
    # Approvals: one job approved, one rejected; a child adopted by its parent.
    held = [await q.dispatch("a", f"held {n}", requires_approval=True) for n in (1, 2)]
    assert await q.scripts.approve(part, "main", held[0].job_id, "ok", allowed=True) == "queued"
    assert await q.scripts.reject(part, "main", held[1].job_id, "no", allowed=True) is None
    assert await q.scripts.adopt(part, held[0].job_id, "j_child") == "added"


async def test_every_script_call_uses_one_slot(q: agentq.Client) -> None:
    calls = record_keys(q)
    await exercise_every_script(q)
    missing = set(SCRIPT_NAMES) - set(calls)
    assert not missing, f"scripts not exercised by this test (add a call): {sorted(missing)}"
    for name, keys_of_calls in calls.items():
        for keys in keys_of_calls:
            assert keys, name
            assert len({slot(k) for k in keys}) == 1, (name, keys)
            assert all(k.startswith(f"{q.keys.prefix}:{{") for k in keys), (name, keys)


async def test_job_scripts_stay_in_their_agents_slot(q: agentq.Client) -> None:
    calls = record_keys(q)
    await exercise_every_script(q)
    slot_a, slot_b = slot(q.partition("a").log), slot(q.partition("b").log)
    for name in SCRIPT_NAMES:
        if name in ("rate", "presence", "owners", "index", "unindex", "schedule_name",
                    "index_range", "index_has", "index_size", "index_edit"):
            continue
        for keys in calls[name]:
            # The dependency's own dispatch and its register run in b's partition.
            in_b = name == "register" or keys[0] == q.partition("b").meta
            assert {slot(k) for k in keys} == {slot_b if in_b else slot_a}, name
    # The rate window lives in the caller's slot.
    assert calls["rate"] == [[q.partition("c").rate, q.partition("c").rate_pending]]
    # The process registry is the one global key of its own slot.
    assert calls["presence"] == [[q.keys.processes]]
    # Dispatches add their jobs to the global job indexes, in the global slot.
    assert calls["index"] and calls["unindex"]
    paged = [keys for name in ("index_range", "index_has", "index_size", "index_edit")
             for keys in calls[name]]
    for keys in calls["index"] + calls["unindex"] + paged:
        assert {slot(k) for k in keys} == {slot(q.keys.jobs_index())}
    assert calls["owners"] == [[q.keys.processes, q.keys.owners]]
    assert calls["schedule_name"] == [[q.keys.schedules]]
    assert slot(q.keys.schedules) == slot(q.keys.jobs_index())


async def test_a_batch_across_agents_makes_one_call_per_partition(q: agentq.Client) -> None:
    # The scripts loaded first: a server that lacks one answers NOSCRIPT, and the
    # batch is sent again once it is loaded (two calls of each, counted here).
    await q.dispatch_many([{"target": "a", "task": "w"}, {"target": "b", "task": "w"}],
                          caller="c")
    calls = record_keys(q)
    await q.dispatch_many(
        [{"target": "a", "task": "x"}, {"target": "b", "task": "y"}, {"target": "a", "task": "z"}],
        caller="c",
    )
    dispatches = calls["dispatch"]
    assert len(dispatches) == 2
    slots = [{slot(k) for k in keys} for keys in dispatches]
    assert all(len(s) == 1 for s in slots)
    assert slots[0] != slots[1]


async def test_start_builds_record_keys_in_its_partitions_slot(q: agentq.Client) -> None:
    """start reads job ids from the ready streams and makes their record keys from
    ``job_prefix`` inside Lua; that prefix must carry the partition's hash tag."""
    part = q.partition("a")
    assert part.job("j_X.a").startswith(part.job_prefix)
    assert slot(part.job_prefix + "j_anything.a") == slot(part.log)


def partition_keys(part: Partition) -> list[str]:
    """Every key a Partition builds, found by introspection so that new ones are covered."""
    samples = {
        "priority": ["high", "normal", "low"],
        "job_id": ["j_X.a", "j_{odd}.a"],
        "key": ["k", "{tag}", "}{"],
        "state": ["queued", "failed"],
    }
    generic = ["c", "x{y}"]  # any other parameter: a plain value and one with braces
    out: list[str] = []
    for name, member in inspect.getmembers(type(part)):
        if name.startswith("_") or name in ("prefix", "agent"):
            continue
        if isinstance(member, property):
            value = getattr(part, name)
            out += [value] if isinstance(value, str) else list(value)
        elif inspect.isfunction(member):
            params = list(inspect.signature(member).parameters)[1:]
            combos: list[list[str]] = [[]]
            for param in params:
                combos = [[*c, v] for c in combos for v in samples.get(param, generic)]
            out += [getattr(part, name)(*combo) for combo in combos]
    return out


@pytest.mark.parametrize("agent", ["a", "researcher", "x_1-y"])
def test_every_partition_key_shares_the_agents_slot(agent: str) -> None:
    part = Keys("pfx").partition(agent)
    keys = partition_keys(part)
    assert len(keys) >= 15
    assert {slot(k) for k in keys} == {key_slot(agent.encode())}


def test_different_agents_can_live_in_different_slots() -> None:
    keys = Keys("pfx")
    assert slot(keys.partition("a").log) != slot(keys.partition("b").log)
    assert slot(keys.partition("a").log) != slot(keys.partition("a-b").log)


def test_the_global_area_shares_one_slot() -> None:
    keys = Keys("pfx")
    assert slot(keys.agents) == slot(keys.partitions)
    # The leases on shards live beside the registry whose deadlines make them valid.
    assert slot(keys.owners) == slot(keys.processes) == slot(keys.agents)
