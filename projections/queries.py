"""Queries on the views: list (exact filters, cursor paging) and activity.

A query first brings the views of the partitions it reads up to the end of
their logs (SPEC: views are never stale when read), then reads them.
"""

from __future__ import annotations

import heapq
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import read_records, read_specs
from agentq.eventlog.records import to_view
from agentq.projections.projection import Projection
from agentq.schemas._base import micros_to_iso
from agentq.schemas.job import JobView

_PAGE = 100
# How long an intersected index may outlive a query that failed to delete it.
_SCRATCH_MS = 10_000


@dataclass(frozen=True)
class ListFilter:
    agent: str | None = None
    dispatched_by: str | None = None
    states: frozenset[str] | None = None

    def admits(self, view: JobView) -> bool:
        return (
            (self.agent is None or view.target == self.agent)
            and (self.dispatched_by is None or view.dispatched_by == self.dispatched_by)
            and (self.states is None or view.state in self.states)
        )


async def _members(redis: Redis, key: str, cursor: str | None) -> AsyncIterator[str]:
    """Members of an index, newest (greatest job id) first, after ``cursor``."""
    upper = f"({cursor}" if cursor else "+"
    while True:
        page: list[str] = await redis.zrevrangebylex(  # type: ignore[assignment]
            key, upper, "-", start=0, num=_PAGE
        )
        for member in page:
            yield member
        if len(page) < _PAGE:
            return
        upper = f"({page[-1]}"


@dataclass(frozen=True)
class Source:
    """An index to read; with ``states``, only its members in those states."""

    key: str
    states: tuple[str, ...] = ()


def _sources(part: Partition, flt: ListFilter, caller: str, system: bool) -> list[Source]:
    """The indexes of one partition whose union holds every job the query may show."""
    states = tuple(sorted(flt.states)) if flt.states else ()
    if not system and part.agent != caller:
        # Outside its own partition a caller sees only what it dispatched.
        if flt.dispatched_by not in (None, caller):
            return []
        return [Source(part.index_by(caller), states)]
    if flt.dispatched_by:
        return [Source(part.index_by(flt.dispatched_by), states)]
    if states:
        return [Source(part.index_state(s)) for s in states]
    return [Source(part.index_all)]


async def _narrow(redis: Redis, part: Partition, source: Source) -> list[str]:
    """The keys to read for ``source``: a dispatcher's index filtered by state is
    intersected with the state indexes in Redis (which walks the smaller set),
    into short-lived keys of the partition, so that a filter matching few jobs
    does not read every job of the dispatcher."""
    if not source.states:
        return [source.key]
    keys = [part.scratch(uuid.uuid4().hex) for _ in source.states]
    async with redis.pipeline(transaction=False) as pipe:
        for key, state in zip(keys, source.states, strict=True):
            pipe.zinterstore(key, [source.key, part.index_state(state)])
            pipe.pexpire(key, _SCRATCH_MS)
        await pipe.execute()
    return keys


async def list_jobs(
    redis: Redis,
    parts: Sequence[Partition],
    flt: ListFilter,
    *,
    caller: str,
    system: bool,
    limit: int,
    cursor: str | None,
    with_session_key: bool,
) -> tuple[list[JobView], str | None]:
    """Up to ``limit`` jobs passing the filter and visible to the caller, newest
    first, after ``cursor`` (a job id); and the cursor of the next page or None."""
    await Projection(redis).catch_up(parts)
    keys: list[str] = []
    scratch: list[str] = []
    for part in parts:
        for source in _sources(part, flt, caller, system):
            narrowed = await _narrow(redis, part, source)
            keys += narrowed
            if source.states:
                scratch += narrowed
    try:
        return await _merge(redis, parts, keys, flt, caller=caller, system=system, limit=limit,
                            cursor=cursor, with_session_key=with_session_key)
    finally:
        if scratch:
            await redis.delete(*scratch)


async def _merge(
    redis: Redis, parts: Sequence[Partition], keys: Sequence[str], flt: ListFilter, *,
    caller: str, system: bool, limit: int, cursor: str | None, with_session_key: bool,
) -> tuple[list[JobView], str | None]:
    """Up to ``limit`` jobs of the union of ``keys``, newest first, after ``cursor``."""
    streams = [_members(redis, key, cursor) for key in keys]
    heap: list[tuple[str, int]] = []  # (inverted job id, stream index): greatest id first

    async def push(index: int) -> None:
        member = await anext(streams[index], None)
        if member is not None:
            heapq.heappush(heap, (_invert(member), index))

    for index in range(len(streams)):
        await push(index)
    views: list[JobView] = []
    seen: set[str] = set()
    more = False
    while heap:
        batch: list[str] = []
        while heap and len(batch) < limit + 1 - len(views):
            inverted, index = heapq.heappop(heap)
            job_id = _invert(inverted)
            await push(index)
            if job_id not in seen:
                seen.add(job_id)
                batch.append(job_id)
        for view in await _views(redis, parts, batch, with_session_key):
            if flt.admits(view) and (system or caller in (view.target, view.dispatched_by)):
                if len(views) == limit:
                    more = True
                    break
                views.append(view)
        if more or (len(views) == limit and not heap):
            break
    return views, (views[-1].job_id if more and views else None)


def _invert(job_id: str) -> str:
    """A string that sorts in the opposite order (for a max-heap on job ids)."""
    return "".join(chr(0x10FFFF - ord(c)) for c in job_id)


async def _views(
    redis: Redis, parts: Sequence[Partition], job_ids: Sequence[str], with_session_key: bool
) -> list[JobView]:
    by_agent = {part.agent: part for part in parts}
    records = await read_records(
        redis, [(by_agent[job_id.rsplit(".", 1)[-1]], job_id) for job_id in job_ids])
    return [
        to_view(job_id, record, with_session_key=with_session_key)
        for job_id, record in zip(job_ids, records, strict=True)
        if record
    ]


# -- activity ----------------------------------------------------------------

TASK_PREVIEW = 80


async def activity(redis: Redis, keys: Keys, agents: Sequence[str]) -> dict[str, Any]:
    """SPEC's queue_activity output for ``agents``."""
    parts = [keys.partition(agent) for agent in agents]
    await Projection(redis).catch_up(parts)
    async with redis.pipeline(transaction=False) as pipe:
        # A heartbeat is a deadline in the server's milliseconds: it is judged by
        # Redis TIME, read in the same round trip, never by this host's clock.
        pipe.time()
        for part in parts:
            pipe.hgetall(part.counts)
            pipe.zrange(part.workers, 0, -1, withscores=True)
            pipe.hkeys(part.active)
            pipe.hget(part.projection, "lastActivityAt")
        (seconds, micros), *replies = await pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    out: dict[str, Any] = {}
    counted = ("queued", "active", "delayed", "waitingDependencies", "completed", "failed")
    summary: dict[str, int] = dict.fromkeys(
        ("agents", "offline", "idle", "working", *counted), 0
    )
    for i, part in enumerate(parts):
        counts, heartbeats, active_ids, last = replies[4 * i : 4 * i + 4]
        workers = sum(1 for _, deadline in heartbeats if deadline > now_ms)
        current = await _current_jobs(redis, part, sorted(active_ids))
        active = int(counts.get("active", 0))
        status = "offline" if workers == 0 else ("working" if active > 0 else "idle")
        entry: dict[str, Any] = {
            "status": status,
            "queued": int(counts.get("queued", 0)),
            "delayed": int(counts.get("delayed", 0)),
            "waitingDependencies": int(counts.get("waiting_dependencies", 0)),
            "active": active,
            "completed": int(counts.get("completed", 0)),
            "failed": int(counts.get("failed", 0)),
            "currentJobs": current,
            "lastActivityAt": _iso(last),
            "workers": int(workers),
        }
        out[part.agent] = entry
        summary["agents"] += 1
        summary[status] += 1
        for name in counted:
            summary[name] += entry[name]
    return {"agents": out, "summary": summary}


def _iso(micros: str | None) -> str | None:
    return micros_to_iso(int(micros)) if micros else None


async def _current_jobs(redis: Redis, part: Partition, job_ids: Sequence[str]) -> list[Any]:
    if not job_ids:
        return []
    specs = await read_specs(redis, [(part, job_id) for job_id in job_ids])
    jobs = []
    for job_id, spec_json in zip(job_ids, specs, strict=True):
        if spec_json:
            spec = orjson.loads(spec_json)
            jobs.append({"jobId": job_id, "label": spec.get("label"),
                         "task": spec["task"][:TASK_PREVIEW]})
    return jobs
