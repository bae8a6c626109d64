"""Rebuilding every view from the log."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from agentq.eventlog.keys import Partition
from agentq.projections.projector import Projection


async def rebuild(
    redis: Redis, parts: Sequence[Partition], progress: Callable[[str, int], None] | None = None
) -> int:
    """Drop the views of ``parts`` and apply their logs again; returns events applied.

    While it runs, a query on a partition being rebuilt may see part of its view.
    """
    projection = Projection(redis)
    total = 0
    for part in parts:
        stale = [key async for key in redis.scan_iter(match=f"{part.base}:idx:*", count=1000)]
        stale.append(part.projection)
        await redis.delete(*stale)
        applied = await projection.catch_up([part])
        total += applied
        if progress:
            progress(part.agent, applied)
    return total
