"""``audit verify``: re-derive every job from the log and compare it with the
state records, the per-state counts and the views. Each difference is named."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog.fold import records_from as fold
from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import iter_partition, read_record
from agentq.eventlog.records import normalize
from agentq.projections.projection import Projection
from agentq.schemas.job import STATES


async def verify_partition(redis: Redis, part: Partition) -> list[str]:
    """Differences between what ``part``'s log implies and what Redis holds."""
    derived = fold([event async for event in iter_partition(redis, part)])
    problems: list[str] = []
    live_ids = {
        key[len(part.job_prefix):]
        async for key in redis.scan_iter(match=f"{part.job_prefix}*", count=1000)
    }
    for job_id in sorted(live_ids - set(derived)):
        problems.append(f"{job_id}: has a state record but no events in {part.log}")
    for job_id in sorted(derived):
        record = await read_record(redis, part, job_id)
        if not record:
            problems.append(f"{job_id}: has events but no state record")
            continue
        live = normalize(record)
        expected = derived[job_id]
        for field in sorted(set(live) | set(expected)):
            if live.get(field) != expected.get(field):
                problems.append(
                    f"{job_id}: {field} is {live.get(field)!r} in the state record, "
                    f"{expected.get(field)!r} by the log"
                )
    states = Counter(str(r["state"]) for r in derived.values())
    counts: dict[str, str] = await redis.hgetall(part.counts)  # type: ignore[assignment]
    for state in STATES:
        if int(counts.get(state, 0)) != states.get(state, 0):
            problems.append(
                f"agent {part.agent}: {counts.get(state, 0)} jobs counted {state}, "
                f"{states.get(state, 0)} by the log"
            )
    await Projection(redis).catch_up([part])
    problems += await _verify_views(redis, part, derived)
    return problems


async def _verify_views(redis: Redis, part: Partition, derived: dict[str, Any]) -> list[str]:
    problems = []
    listed: set[str] = set(await redis.zrange(part.index_all, 0, -1))  # type: ignore[arg-type]
    for job_id in sorted(set(derived) ^ listed):
        where = "listed but not in the log" if job_id in listed else "in the log but not listed"
        problems.append(f"{job_id}: {where} (agent {part.agent})")
    by_keys = [key async for key in redis.scan_iter(match=part.index_by("*"), count=1000)]
    expected_by: dict[str, set[str]] = {}
    for job_id, record in derived.items():
        expected_by.setdefault(record["spec"]["dispatchedBy"], set()).add(job_id)
    seen_dispatchers = {key[len(part.index_by("")):] for key in by_keys}
    for dispatcher in sorted(seen_dispatchers | set(expected_by)):
        listed_by: set[str] = set(
            await redis.zrange(part.index_by(dispatcher), 0, -1)  # type: ignore[arg-type]
        )
        wanted = expected_by.get(dispatcher, set())
        for job_id in sorted(listed_by - wanted):
            problems.append(f"{job_id}: listed as dispatched by {dispatcher}, but the log says "
                            f"{derived.get(job_id, {}).get('spec', {}).get('dispatchedBy')}")
        for job_id in sorted(wanted - listed_by):
            problems.append(f"{job_id}: dispatched by {dispatcher} by the log, but not listed "
                            f"as dispatched by {dispatcher}")
    for state in STATES:
        members: set[str] = set(
            await redis.zrange(part.index_state(state), 0, -1)  # type: ignore[arg-type]
        )
        expected = {j for j, r in derived.items() if r["state"] == state}
        for job_id in sorted(members - expected):
            problems.append(f"{job_id}: listed as {state}, but the log says "
                            f"{derived.get(job_id, {}).get('state', 'nothing')}")
        for job_id in sorted(expected - members):
            problems.append(f"{job_id}: {state} by the log, but not listed as {state}")
    return problems


async def verify(redis: Redis, parts: Sequence[Partition]) -> list[str]:
    """Every difference found in ``parts``; empty when all agree with the log."""
    problems: list[str] = []
    for part in parts:
        problems += await verify_partition(redis, part)
    return problems
