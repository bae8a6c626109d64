"""Taking over what a dead process held (issue 11, items 11 and 21).

Every ``worker``/``run`` process beats in the process registry; once its
deadline (judged by Redis ``TIME``) has passed, a live process takes its
pending log entries over at once — not after they have been idle for the claim
time — and removes it from the consumer group. A live process's entries are
never taken, however slow it is.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Awaitable, Callable
from typing import Any

import test_gates_crash
from redis.asyncio import Redis
from test_gates_crash import (
    GateProcess,
    end_jobs,
    gates_pending,
    gates_settled,
    start_all,
    until,
)

import agentq
from agentq.consumers.gates import Gates
from agentq.consumers.presence import Presence
from agentq.consumers.reclaim import Reclaimer
from agentq.eventlog import reader, registry
from agentq.eventlog.keys import WORKERS_GROUP
from agentq.eventlog.processes import Processes
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import Backoff, ensure_work_groups

# The fixture that starts gate processes (tests/gate_proc.py).
spawn = test_gates_crash.spawn

HEARTBEAT = 2.0
# The production claim time (without the registry, the dead process's entries
# would wait this long), and the gates slow on endings only.
GATES = {"heartbeat": HEARTBEAT, "claim_idle_ms": "30000", "block_seconds": "5",
         "sleep_types": "JobCompleted"}


async def server_us(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1_000_000 + int(micros)


async def gates_consumers(q: agentq.Client) -> set[str]:
    names: set[str] = set()
    for agent in await registry.all_partitions(q.redis, q.keys):
        log = q.partition(agent).log
        if await q.redis.exists(log) and any(
            g["name"] == "gates" for g in await q.redis.xinfo_groups(log)
        ):
            names |= {c["name"] for c in await q.redis.xinfo_consumers(log, "gates")}
    return names


async def test_release_after_a_sigkill_within_the_heartbeat_timeout(
    q: agentq.Client, spawn: Callable[..., Awaitable[GateProcess]]
) -> None:
    """A gate process is SIGKILLed holding unacknowledged endings; a live one
    releases every dependent within heartbeatTimeoutSeconds + 1 s of the kill."""
    n = 30
    deps = [(await q.dispatch("b", f"dep {i}", caller="a")).job_id for i in range(n)]
    dependents = [(await q.dispatch("c", f"after {i}", caller="a", depends_on=[d])).job_id
                  for i, d in enumerate(deps)]
    slow = await spawn(q.config, sleep_ms=300, **GATES)  # slow on endings only
    dead_name = await slow.ready()
    await slow.wait_for(lambda: slow.count("HANDLED ") >= 2 * n, "the registrations")
    attempts = await start_all(q, "b")
    await end_jobs(q, "b", attempts, dict.fromkeys(deps, "completed"))
    await slow.wait_for(lambda: len(slow.handled_of(("JobCompleted",))) >= 3, "endings")
    live = await spawn(q.config, **GATES)
    await live.ready()
    await asyncio.sleep(0.3)  # the live process has read what there is: nothing
    await slow.kill()
    killed_at = await server_us(q.redis)
    pending = await gates_pending(q)
    assert pending.get(dead_name, 0) > 10, pending

    await until(lambda: gates_settled(q), timeout=HEARTBEAT + 10, what="the takeover")
    delays = []
    for job_id in dependents:
        events = await reader.job_history(q.redis, q.partition("c"), job_id)
        assert events is not None
        (queued,) = [e for e in events if e.type == "JobQueued"]
        if queued.at > killed_at:
            delays.append((queued.at - killed_at) / 1e6)
    assert len(delays) > 10, (delays, killed_at, slow.lines[-3:])
    p99 = statistics.quantiles(delays, n=100)[98] if len(delays) > 1 else delays[0]
    print(f"released after the kill: {len(delays)} dependents, "
          f"p50 {statistics.median(delays):.3f}s p99 {p99:.3f}s max {max(delays):.3f}s "
          f"(heartbeat timeout {HEARTBEAT}s)")
    assert max(delays) <= HEARTBEAT + 1, delays
    # The dead process is no consumer of the group any more.
    assert dead_name not in await gates_consumers(q)


class CountingGates(Gates):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    async def handle(self, events: list[RawEvent]) -> None:
        self.seen += [e.event_id for e in events]
        await super().handle(events)


async def test_recover_acknowledges_what_was_handled_instead_of_handling_it_again(
    q: agentq.Client,
) -> None:
    gates = CountingGates(q.redis, q.open_blocking(), q.keys, "solo")
    await gates.recover()
    for i in range(5):
        await q.dispatch("a", f"job {i}", caller="b")
    assert await gates.process_once(0) == 5  # handled; acknowledged with the next read
    assert await gates.recover() == 0
    assert len(gates.seen) == len(set(gates.seen)) == 5
    summary: Any = await q.redis.xpending(q.partition("a").log, "gates")
    assert summary["pending"] == 0


async def test_a_live_process_keeps_its_entries_and_a_dead_one_is_forgotten(
    q: agentq.Client,
) -> None:
    """Entries of a live (registered, beating) consumer are not taken however long
    they wait; once its deadline passes they are, and it leaves the group."""
    log = q.partition("a").log
    taker = CountingGates(q.redis, q.open_blocking(), q.keys, "taker", claim_idle_ms=0)
    await taker.recover()  # joins the group everywhere
    await q.dispatch("a", "held", caller="b")
    slow = Presence(q.redis, q.keys, "slow", timeout_seconds=1.0)
    await slow.beat()
    read: Any = await q.redis.xreadgroup("gates", "slow", {log: ">"})
    (held_id, _), = read[0][1]
    await asyncio.sleep(0.2)  # idle past the taker's claim time

    assert await taker.recover() == 0
    assert taker.seen == []
    assert "slow" in {c["name"] for c in await q.redis.xinfo_consumers(log, "gates")}

    await asyncio.sleep(1.0)  # "slow" misses its deadline
    census = await Processes(q.redis, q.keys).census()
    assert "slow" in census.dead()
    assert await taker.recover() == 1
    assert taker.seen == [held_id]
    assert "slow" not in {c["name"] for c in await q.redis.xinfo_consumers(log, "gates")}


async def test_presence_wakes_its_consumers_when_a_process_dies(q: agentq.Client) -> None:
    mine = Presence(q.redis, q.keys, "mine", timeout_seconds=30)
    woken = asyncio.Event()
    mine.watch(woken)
    doomed = Presence(q.redis, q.keys, "doomed", timeout_seconds=0.5)
    await doomed.beat()
    stop = asyncio.Event()
    run = asyncio.create_task(mine.run(stop))
    try:
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(woken.wait(), 3)
        # Woken at the dead process's deadline, not at the next own beat (10 s).
        assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        stop.set()
        await asyncio.wait_for(run, 5)
    census = await Processes(q.redis, q.keys).census()
    assert "mine" in census.dead()  # left cleanly: marked dead at once


async def test_dead_workers_leave_the_partition_and_its_work_groups(q: agentq.Client) -> None:
    part = q.partition("b")
    await q.dispatch("b", "something", caller="a")  # the ready stream exists
    await ensure_work_groups(q.redis, part)
    now = int(await server_us(q.redis) / 1000)
    await q.redis.zadd(part.workers, {"gone": now - 120_000, "late": now - 1_000,
                                      "live": now + 30_000})
    stream = part.ready("normal")
    for name in ("gone", "late", "live"):
        await q.redis.xgroup_createconsumer(stream, WORKERS_GROUP, name)
    await Reclaimer(q.redis, q.keys, Backoff(0, 0)).forget_dead_workers(part, now)
    assert set(await q.redis.zrange(part.workers, 0, -1)) == {"late", "live"}
    assert {c["name"] for c in await q.redis.xinfo_consumers(stream, WORKERS_GROUP)} == {"live"}
    assert await q.activity(["b"]) and (await q.activity(["b"]))["agents"]["b"]["workers"] == 1
