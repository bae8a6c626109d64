"""Rebuilding every view from the log.

A partition's views are built from its log into keys of their own (the
partition's keys under a rebuild prefix: same hash tag, same slot), then
swapped in over the live ones in one step. Until then the live views go on
answering and being updated; after it, they hold everything up to where the
rebuild read, with the position to match, and the next catch-up (a query or
the projector) applies what came after: no event is left out either way.

The global job indexes are staged likewise (in the global area's slot): each
dispatch the partitions' rebuilds read is added to the staged copy, which is
then merged into the live indexes, dropping members that have no job
(``global_index.merge_staging``); a job dispatched meanwhile stays listed.

The log is read in pages (``Projection.catch_up``), so memory does not grow
with the log. Which view keys exist (a stale index to delete, what a rebuild
that died midway left) is found by one SCAN for every partition: a SCAN
visits the whole key space whatever its pattern.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition, rebuilding
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import Scripts
from agentq.projections import global_index
from agentq.projections.projection import Projection, dispatched
from agentq.projections.scan import view_keys
from agentq.projections.ticker import Ticker
from agentq.schemas.job import STATES


async def rebuild_partition(
    redis: Redis, part: Partition, existing: Collection[str] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> int:
    """Rebuild one partition's views from its log and swap them in; returns
    the events applied. ``existing``: its index keys (``view_keys``), else
    scanned for. Its dispatches are staged for the global indexes. ``progress``
    is told the events read so far now and then (``ticker``)."""
    if existing is None:
        existing = (await view_keys(redis, Keys(part.prefix))).get(part.agent, set())
    staging = rebuilding(part)
    leftovers = [key for key in existing if key.startswith(staging.base + ":")]
    await redis.delete(staging.projection, *leftovers)  # of a rebuild that died midway
    keys = Keys(part.prefix)
    dispatchers: set[str] = set()
    ticker, read = Ticker(), 0

    async def stage(events: Sequence[RawEvent]) -> None:
        nonlocal read
        read += len(events)
        if progress is not None and ticker.due():
            progress(part.agent, read)
        jobs = dispatched(events)
        dispatchers.update(dispatcher for _, dispatcher in jobs)
        await global_index.add(redis, keys, jobs, stage=global_index.STAGE)

    applied = await Projection(redis).catch_up([part], views=staging, observe=stage)
    # The state indexes and the position are always replaced (emptied when the
    # rebuild made none); any other live index the rebuild did not make goes
    # (the index of every job a version before kept, idx:all, among them).
    built = [*(staging.index_state(s) for s in STATES), staging.projection,
             *(staging.index_by(d) for d in sorted(dispatchers))]
    live_of = {key: part.base + key[len(staging.base):] for key in built}
    live = set(live_of.values())
    stale = sorted(key for key in existing
                   if key.startswith(part.base + ":idx:") and key not in live)
    await Scripts(redis).swap(list(live_of.items()), stale)
    return applied


async def rebuild(
    redis: Redis, parts: Sequence[Partition], progress: Callable[[str, int], None] | None = None
) -> int:
    """Rebuild the views of ``parts`` from their logs, and the global job indexes
    for their jobs; returns events applied. Queries go on answering from the
    live views while it runs. ``progress`` is told each partition's events
    applied when it is done, and how far it is now and then before."""
    if not parts:
        return 0
    keys = Keys(parts[0].prefix)
    existing = await view_keys(redis, keys)
    await global_index.clear_staging(redis, keys)
    total = 0
    for part in parts:
        applied = await rebuild_partition(redis, part, existing.get(part.agent, set()),
                                          progress)
        total += applied
        if progress:
            progress(part.agent, applied)
    await global_index.merge_staging(redis, keys, [part.agent for part in parts])
    await redis.set(keys.jobs_built, "1")
    return total


async def build_global_index(redis: Redis, keys: Keys, parts: Sequence[Partition]) -> None:
    """Fill the global job indexes from the partitions' views (brought up to the
    end of their logs first) and mark them built: what a deployment made by a
    version without them needs once. Adding twice changes nothing."""
    existing = await view_keys(redis, keys)
    # A catch-up adds what it applies to the global indexes, as the projector does.
    await Projection(redis).catch_up(parts)
    for part in parts:
        by_prefix = part.index_by("")
        sources = [(key, key[len(by_prefix):]) for key in sorted(existing.get(part.agent, ()))
                   if key.startswith(by_prefix)]
        for key, dispatcher in sources:
            low = "-"
            while True:
                page: list[str] = await redis.zrangebylex(key, low, "+", 0, 1000)  # type: ignore[assignment]
                if page:
                    # Every job has one dispatcher: the union of these is every job.
                    async with redis.pipeline(transaction=False) as pipe:
                        pipe.zadd(keys.jobs_by(dispatcher), dict.fromkeys(page, 0))
                        pipe.zadd(keys.jobs_index(), dict.fromkeys(page, 0))
                        await pipe.execute()
                if len(page) < 1000:
                    break
                low = f"({page[-1]}"
    await redis.set(keys.jobs_built, "1")
