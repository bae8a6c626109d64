"""Reading and damaging indexes in tests, whatever their form: the global job
indexes are paged (``keys.index_directory``), the partitions' are sorted sets."""

from __future__ import annotations

from typing import Any

import agentq


def is_paged(q: agentq.Client, key: str) -> bool:
    return key.startswith(q.keys.jobs_index())


async def index_members(q: agentq.Client, key: str) -> set[str]:
    """Every id ``key`` holds."""
    if not is_paged(q, key):
        found: Any = await q.redis.zrange(key, 0, -1)
        return set(found)
    held: set[str] = set()
    after = None
    while ids := await q.scripts.index_range(key, after, 1000, forward=True):
        held.update(ids)
        after = ids[-1]
    return held


async def drop_index(q: agentq.Client, key: str) -> None:
    """Delete an index whole: a paged one's directory and pages too."""
    doomed = [key]
    if is_paged(q, key):
        doomed += [k async for k in q.redis.scan_iter(match=f"{key}#*")]
    await q.redis.delete(*doomed)


async def drop_ids(q: agentq.Client, key: str, ids: list[str]) -> None:
    """Take ``ids`` out of an index."""
    if is_paged(q, key):
        await q.scripts.index_edit(key, ids, add=False)
    else:
        await q.redis.zrem(key, *ids)
