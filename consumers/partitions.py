"""Tracking the set of partitions a background consumer must cover."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.registry import all_partitions

# How long a consumer trusts its list of partitions before reading it again;
# a new agent is picked up within this time.
REFRESH_SECONDS = 5.0


class PartitionSet:
    """Every agent partition, re-read from the registry at most every few seconds."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._parts: list[Partition] = []
        self._read_at = 0.0

    async def current(self) -> list[Partition]:
        if time.monotonic() - self._read_at > REFRESH_SECONDS:
            agents = await all_partitions(self.redis, self.keys)
            self._parts = [self.keys.partition(agent) for agent in agents]
            self._read_at = time.monotonic()
        return self._parts
