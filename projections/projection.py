"""The projector: events -> the list indexes and activity of each partition.

Per partition it keeps: jobs by dispatcher (``idx:by:<agent>``) and jobs by
state (``idx:state:<state>``; every job is in exactly one, so their union is
every job), all in job-id order (newest last), plus the position it has
applied up to and the time of the last event. The position is written by the
same script as the views, so applying an event twice changes nothing; that
lets a query that finds a view behind its log apply the missing events itself
before it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent, read_partition, readable
from agentq.eventlog.scripts import Scripts
from agentq.schemas.events import STATE_AFTER, STATES_BEFORE

# Called with each run of events a catch-up reads, before it applies them.
Observer = Callable[[Sequence[RawEvent]], Awaitable[None]]

_BATCH = 500


def _before(a: str, b: str) -> bool:
    """Stream id ``a`` comes before ``b``."""
    a_ms, a_seq = a.split("-")
    b_ms, b_seq = b.split("-")
    return (int(a_ms), int(a_seq)) < (int(b_ms), int(b_seq))


def states_before(event: RawEvent) -> str:
    """The states a job can be in just before ``event`` (comma-separated; "" for
    none), so that applying it removes the job from those indexes only."""
    if event.type == "JobCancelled":
        return str(event.data.get("fromState", "*"))
    return STATES_BEFORE.get(event.type, "*")


def state_after(event: RawEvent) -> str:
    """The state the event leaves its job in, or "" when it does not change it."""
    rule = STATE_AFTER[event.type]
    if rule == "data":
        return str(event.data.get("state", ""))
    return rule or ""


def dispatched(events: Sequence[RawEvent]) -> list[tuple[str, str]]:
    """``(job id, dispatcher)`` of each dispatch among ``events`` this version reads."""
    return [(e.job_id, str(by)) for e in events
            if e.type == "JobDispatched" and readable(e) and (by := e.data.get("dispatchedBy"))]


def _line(event: RawEvent) -> tuple[str, str, str, str, int, str | None]:
    """What ``project.lua`` needs of an event. One this version cannot read (a
    newer agentq's, during a rolling upgrade) changes no view; the position
    still moves past it."""
    if not readable(event):
        return (event.event_id, event.job_id, "", "", event.at, None)
    return (
        event.event_id,
        event.job_id,
        state_after(event),
        states_before(event),
        event.at,
        event.data.get("dispatchedBy") if event.type == "JobDispatched" else None,
    )


class Projection:
    """Applies events to the views; the same code serves the projector and queries."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.scripts = Scripts(redis)

    async def apply(self, part: Partition, events: Sequence[RawEvent]) -> int:
        """Apply a run of one partition's events (in log order, none left out
        between them); returns how many were new. Never past a gap: when the
        run does not follow the views' position (a consumer group may hand
        batches out of log order; a rebuild may swap in views with an earlier
        position), the script refuses it and the log is read from the position."""
        applied = 0
        for i in range(0, len(events), _BATCH):
            batch = events[i : i + _BATCH]
            new = await self._project(part, batch)
            if new < 0:
                return applied + await self.catch_up([part], until=events[-1].event_id)
            applied += new
        return applied

    async def _project(
        self, part: Partition, events: Sequence[RawEvent], *, follows: str = "",
        views: Partition | None = None,
    ) -> int:
        """``project.lua`` for ``events`` (see ``Scripts.project``)."""
        # Each event's type is counted with it (agentq_jobs_total, consumers/metrics.py).
        return await self.scripts.project(part, [_line(e) for e in events], follows=follows,
                                          views=views, types=[e.type for e in events])

    async def positions(
        self, parts: Sequence[Partition], views: Partition | None = None
    ) -> list[tuple[str, str]]:
        """(applied position, log end) per partition; "0-0" where there is none.
        ``views``: read the position of these views (a rebuild's) instead."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.hget((views or part).projection, "pos")
                pipe.xrevrange(part.log, count=1)
            replies: list[Any] = await pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            end = replies[i + 1][0][0] if replies[i + 1] else "0-0"
            out.append((replies[i] or "0-0", end))
        return out

    async def catch_up(
        self, parts: Sequence[Partition], until: str | None = None,
        views: Partition | None = None, observe: Observer | None = None,
    ) -> int:
        """Bring the views of ``parts`` up to the end of their logs (or up to event
        ``until``, inclusive, and possibly a little past it); returns events applied.
        ``views``: the one partition's views to bring up (a rebuild's); ``observe``
        sees each run of events read, before it is applied."""
        applied = 0
        for part, (pos, end) in zip(parts, await self.positions(parts, views), strict=True):
            end = until or end
            # After a full page, the next is read while this one is applied.
            following: asyncio.Future[list[RawEvent]] | None = None
            try:
                while pos != end and _before(pos, end):
                    if following is not None:
                        events, following = await following, None
                    else:
                        events = await read_partition(self.redis, part, after=pos,
                                                      count=_BATCH)
                    if not events:
                        break
                    if len(events) == _BATCH and _before(events[-1].event_id, end):
                        following = asyncio.ensure_future(read_partition(
                            self.redis, part, after=events[-1].event_id, count=_BATCH))
                    if observe is not None:
                        await observe(events)
                    new = await self._project(part, events, follows=pos, views=views)
                    if new < 0:
                        # The position moved back meanwhile (a rebuild swapped its views
                        # in): read on from there.
                        if following is not None:
                            following.cancel()
                            following = None
                        ((pos, _),) = await self.positions([part], views)
                        continue
                    applied += new
                    pos = events[-1].event_id
            finally:
                if following is not None:
                    following.cancel()
        return applied
