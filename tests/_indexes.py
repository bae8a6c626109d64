"""Reading and damaging indexes in tests, whatever their form: paged
(``keys.index_directory``: the global job indexes, the partitions' dispatcher
and terminal-state indexes) or one sorted set (the other states')."""

from __future__ import annotations

from typing import Any

import agentq
from agentq.eventlog.keys import is_paged


async def index_members(q: agentq.Client, key: str) -> set[str]:
    """Every id ``key`` holds."""
    if not is_paged(key):
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
    if is_paged(key):
        doomed += [k async for k in q.redis.scan_iter(match=f"{key}#*")]
    await q.redis.delete(*doomed)


async def drop_ids(q: agentq.Client, key: str, ids: list[str]) -> None:
    """Take ``ids`` out of an index."""
    if is_paged(key):
        await q.scripts.index_edit(key, ids, add=False)
    else:
        await q.redis.zrem(key, *ids)


async def add_ids(q: agentq.Client, key: str, ids: list[str]) -> None:
    """Put ``ids`` into an index."""
    if is_paged(key):
        await q.scripts.index_edit(key, ids, add=True)
    else:
        await q.redis.zadd(key, dict.fromkeys(ids, 0))


async def index_size(q: agentq.Client, key: str) -> int:
    """How many ids an index holds."""
    if is_paged(key):
        return await q.scripts.index_size(key)
    return int(await q.redis.zcard(key))
