"""The projector: events -> the list indexes and activity of each partition.

Per partition it keeps: every job (``idx:all``), jobs by dispatcher
(``idx:by:<agent>``), jobs by state (``idx:state:<state>``), all in job-id
order (newest last), plus the position it has applied up to and the time of
the last event. The position is written by the same script as the views, so
applying an event twice changes nothing; that lets a query that finds a view
behind its log apply the missing events itself before it answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent, read_partition
from agentq.eventlog.scripts import Scripts
from agentq.schemas.events import STATE_AFTER, STATES_BEFORE

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


class Projection:
    """Applies events to the views; the same code serves the projector and queries."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.scripts = Scripts(redis)

    async def apply(self, part: Partition, events: Sequence[RawEvent]) -> int:
        """Apply one partition's events (in log order); returns how many were new."""
        applied = 0
        for i in range(0, len(events), _BATCH):
            batch = [
                (
                    e.event_id,
                    e.job_id,
                    state_after(e),
                    states_before(e),
                    e.at,
                    e.data.get("dispatchedBy") if e.type == "JobDispatched" else None,
                )
                for e in events[i : i + _BATCH]
            ]
            applied += await self.scripts.project(part, batch)
        return applied

    async def positions(self, parts: Sequence[Partition]) -> list[tuple[str, str]]:
        """(applied position, log end) per partition; "0-0" where there is none."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.hget(part.projection, "pos")
                pipe.xrevrange(part.log, count=1)
            replies: list[Any] = await pipe.execute()
        out = []
        for i in range(0, len(replies), 2):
            end = replies[i + 1][0][0] if replies[i + 1] else "0-0"
            out.append((replies[i] or "0-0", end))
        return out

    async def follows_position(self, part: Partition, event_id: str) -> bool:
        """Whether ``event_id`` is the first event after the applied position (or
        at or before it, which applying skips): no event lies between them."""
        pos: str | None = await self.redis.hget(part.projection, "pos")  # type: ignore[assignment]
        start = f"({pos}" if pos else "-"
        between: list[Any] = await self.redis.xrange(  # type: ignore[assignment]
            part.log, start, f"({event_id}", count=1
        )
        return not between

    async def catch_up(self, parts: Sequence[Partition], until: str | None = None) -> int:
        """Bring the views of ``parts`` up to the end of their logs (or up to event
        ``until``, inclusive, and possibly a little past it); returns events applied."""
        applied = 0
        for part, (pos, end) in zip(parts, await self.positions(parts), strict=True):
            end = until or end
            while pos != end and _before(pos, end):
                events = await read_partition(self.redis, part, after=pos, count=_BATCH)
                if not events:
                    break
                applied += await self.apply(part, events)
                pos = events[-1].event_id
        return applied
