"""Rebuilding every view from the log.

A partition's views are built from its log into keys of their own (the
partition's keys under a rebuild prefix: same hash tag, same slot), then
swapped in over the live ones in one step. Until then the live views go on
answering and being updated; after it, they hold everything up to where the
rebuild read, with the position to match, and the next catch-up (a query or
the projector) applies what came after: no event is left out either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from agentq.eventlog.keys import Partition, rebuilding
from agentq.eventlog.scripts import Scripts
from agentq.projections.projection import Projection
from agentq.schemas.job import STATES


async def _view_keys(redis: Redis, views: Partition) -> list[str]:
    """Every key of ``views`` (indexes and position) that exists."""
    found = [key async for key in redis.scan_iter(match=f"{views.base}:idx:*", count=1000)]
    if await redis.exists(views.projection):
        found.append(views.projection)
    return found


async def rebuild_partition(redis: Redis, part: Partition) -> int:
    """Rebuild one partition's views from its log and swap them in; returns
    the events applied."""
    projection = Projection(redis)
    staging = rebuilding(part)
    leftovers = await _view_keys(redis, staging)  # of a rebuild that died midway
    if leftovers:
        await redis.delete(*leftovers)
    applied = await projection.catch_up([part], views=staging)
    built = await _view_keys(redis, staging)
    live_of = {key: part.base + key[len(staging.base):] for key in built}
    # The state indexes and the position are always replaced (emptied when the
    # rebuild made none); any other live index the rebuild did not make goes.
    for key in (*(staging.index_state(s) for s in STATES), staging.projection,
                staging.index_all):
        live_of.setdefault(key, part.base + key[len(staging.base):])
    stale = [key for key in await _view_keys(redis, part) if key not in live_of.values()]
    await Scripts(redis).swap(list(live_of.items()), stale)
    return applied


async def rebuild(
    redis: Redis, parts: Sequence[Partition], progress: Callable[[str, int], None] | None = None
) -> int:
    """Rebuild the views of ``parts`` from their logs; returns events applied.
    Queries go on answering from the live views while it runs."""
    total = 0
    for part in parts:
        applied = await rebuild_partition(redis, part)
        total += applied
        if progress:
            progress(part.agent, applied)
    return total
