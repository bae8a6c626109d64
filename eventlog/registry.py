"""The agent registry: which agents are known, and who each may dispatch to.

An agent is known while its partition's ``meta`` hash exists; the dispatch
script checks that hash, so a dispatch to an unknown agent is refused inside
the same atomic step that would create the job. The global ``agents`` hash
lists them for ``agents list``; the ``partitions`` set remembers every agent
that ever had a partition, for replay and audit.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys


async def add_agent(redis: Redis, keys: Keys, agent: str, allow: Sequence[str] = ("*",)) -> None:
    """Register ``agent`` (again, replacing its allow list). Idempotent."""
    entry = orjson.dumps({"allowAgents": list(allow)})
    part = keys.partition(agent)
    # Meta last: the agent becomes dispatchable only once it is listed too.
    await redis.hset(keys.agents, agent, entry)
    await redis.sadd(keys.partitions, agent)
    await redis.hset(part.meta, "known", "1")


async def remove_agent(redis: Redis, keys: Keys, agent: str) -> bool:
    """Forget ``agent``: later dispatches to it are refused. Its log and jobs stay.
    Returns False when it was not known."""
    removed = await redis.delete(keys.partition(agent).meta)
    await redis.hdel(keys.agents, agent)
    return bool(removed)


async def list_agents(redis: Redis, keys: Keys) -> dict[str, list[str]]:
    """Known agents and their allow lists."""
    raw: dict[str, str] = await redis.hgetall(keys.agents)  # type: ignore[assignment]
    return {agent: list(orjson.loads(entry)["allowAgents"]) for agent, entry in sorted(raw.items())}


async def all_partitions(redis: Redis, keys: Keys) -> list[str]:
    """Every agent that ever had a partition, sorted."""
    members: set[str] = await redis.smembers(keys.partitions)  # type: ignore[assignment]
    return sorted(members)
