"""The agent registry: which agents are known, and who each may dispatch to.

The truth is each partition's own ``meta`` hash: an agent is known while it
exists, and it holds the registration (``allowAgents``, as JSON). The dispatch
script checks it, so a dispatch to an unknown agent is refused inside the same
atomic step that would create the job.

The global ``agents`` hash (agent -> registration, for ``agents list`` and
allow lists) and ``partitions`` set (every agent that ever had a partition, for
``list``, replay and audit) are indexes of the global slot. They are written
after the truth, both in one transaction (one slot), so that on a Redis Cluster,
where the partition and the global area live on different nodes, no write
spans two slots: a failure between the two steps leaves an agent that is known
but not yet listed, never a listed agent that dispatches refuse. Such an agent
is listed again by :func:`rebuild_index` (``agentq agents list --repair``;
adding the agent again does it too, and a client registers the agents of its
config again when their index entry is missing).
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys

_META_SUFFIX = "}:meta"


def _registration(allow: Sequence[str]) -> str:
    """The index's entry for an agent: its registration as JSON."""
    return orjson.dumps({"allowAgents": list(allow)}).decode()


async def add_agent(redis: Redis, keys: Keys, agent: str, allow: Sequence[str] = ("*",)) -> None:
    """Register ``agent`` (again, replacing its allow list). Idempotent: made again
    after a failure, it completes what the failure left out."""
    entry = _registration(allow)
    # The truth first (the partition's slot), then the indexes (the global slot).
    await redis.hset(keys.partition(agent).meta,
                     mapping={"known": "1", "allowAgents": orjson.dumps(list(allow)).decode()})
    await _index(redis, keys, {agent: entry})


async def _index(redis: Redis, keys: Keys, entries: dict[str, str]) -> None:
    """List ``entries`` (agent -> registration) in both indexes, in one step."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.agents, mapping=dict(entries))  # type: ignore[arg-type]
        pipe.sadd(keys.partitions, *entries)
        await pipe.execute()


async def remove_agent(redis: Redis, keys: Keys, agent: str) -> bool:
    """Forget ``agent``: later dispatches to it are refused. Its log and jobs stay
    (and its partition stays among ``partitions``). Returns False when it was not known."""
    removed = await redis.delete(keys.partition(agent).meta)
    await redis.hdel(keys.agents, agent)
    return bool(removed)


async def list_agents(redis: Redis, keys: Keys) -> dict[str, list[str]]:
    """Known agents and their allow lists, as the index has them."""
    raw: dict[str, str] = await redis.hgetall(keys.agents)  # type: ignore[assignment]
    return {agent: list(orjson.loads(entry)["allowAgents"]) for agent, entry in sorted(raw.items())}


async def all_partitions(redis: Redis, keys: Keys) -> list[str]:
    """Every agent that ever had a partition, sorted."""
    members: set[str] = await redis.smembers(keys.partitions)  # type: ignore[assignment]
    return sorted(members)


async def rebuild_index(redis: Redis, keys: Keys) -> tuple[list[str], list[str]]:
    """Make the global indexes agree with the partitions: every agent whose ``meta``
    exists is listed (with the allow list its meta holds) and in ``partitions``;
    an agent listed without one is no longer listed. Scans the keys of every
    node (on a cluster, every master), so it costs in proportion to the whole
    keyspace: a repair, not a read. Returns the agents listed again and those
    taken out."""
    pattern = f"{keys.prefix}:{{*{_META_SUFFIX}"
    metas = [key async for key in redis.scan_iter(match=pattern, count=1000)]
    agents = [key[len(keys.prefix) + 2 : -len(_META_SUFFIX)] for key in metas]
    async with redis.pipeline(transaction=False) as pipe:
        for key in metas:
            pipe.hget(key, "allowAgents")
        pipe.hgetall(keys.agents)
        *allows, listed = await pipe.execute()
    truth: dict[str, str] = {}
    for agent, allow in zip(agents, allows, strict=True):
        # A meta written before it held the allow list: the index's entry stands.
        truth[agent] = _registration(orjson.loads(allow)) if allow else \
            listed.get(agent) or _registration(["*"])
    missing = sorted(a for a in truth if listed.get(a) != truth[a])
    stale = sorted(set(listed) - set(truth))
    if missing:
        await _index(redis, keys, {a: truth[a] for a in missing})
    if stale:
        await redis.hdel(keys.agents, *stale)
    return missing, stale
