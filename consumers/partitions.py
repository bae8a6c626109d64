"""The agent partitions a process knows of, by shard."""

from __future__ import annotations

from collections.abc import Collection

from redis.asyncio import Redis

from agentq.consumers.shards import shard_of
from agentq.eventlog.keys import Keys
from agentq.eventlog.registry import all_partitions

# How often the registry's list of partitions is read again. A partition whose
# doorbell rings is known at once; this only catches one whose rings were lost.
REFRESH_SECONDS = 60.0


class Partitions:
    """Every agent partition known to this process: the registry's list, read
    every ``REFRESH_SECONDS``, plus each agent whose doorbell rang first."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._by_shard: dict[int, set[str]] = {}
        self._known: set[str] = set()

    def __len__(self) -> int:
        return len(self._known)

    def __contains__(self, agent: object) -> bool:
        return agent in self._known

    def add(self, agent: str) -> bool:
        """Know ``agent``; True when it was not known."""
        if agent in self._known:
            return False
        self._known.add(agent)
        self._by_shard.setdefault(shard_of(agent), set()).add(agent)
        return True

    async def refresh(self) -> list[str]:
        """Read the registry's list; returns the agents it made known."""
        return [agent for agent in await all_partitions(self.redis, self.keys) if self.add(agent)]

    def of(self, shards: Collection[int]) -> list[str]:
        """The known agents of ``shards``, sorted."""
        return sorted(agent for shard in shards for agent in self._by_shard.get(shard, ()))
