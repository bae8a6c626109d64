"""Stall recovery: re-queues active jobs whose lease expired, in every partition.

A lease expires when its worker died or hung without renewing it. The stall
script checks each job again against the server's clock, so several
reclaimers may run at once. Between passes the reclaimer sleeps until the
earliest lease deadline it saw (bounded, so new partitions are picked up).
"""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from agentq.consumers.partitions import REFRESH_SECONDS, PartitionSet
from agentq.consumers.waiting import sleep_unless_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.scripts import Backoff, Scripts

_BATCH = 500


class Reclaimer:
    def __init__(self, redis: Redis, keys: Keys, backoff: Backoff, actor: str = "system") -> None:
        self.redis = redis
        self.scripts = Scripts(redis)
        self.partitions = PartitionSet(redis, keys)
        self.backoff = backoff
        self.actor = actor

    async def reclaim(self, part: Partition) -> tuple[list[str], int | None]:
        """Reclaim ``part``'s expired leases; (ids reclaimed, next lease deadline in ms)."""
        reclaimed: list[str] = []
        while True:
            now_ms = int(time.time() * 1000)
            expired: list[str] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                part.leases, "-inf", now_ms, start=0, num=_BATCH
            )
            if expired:
                reclaimed += await self.scripts.stall(part, self.actor, expired, self.backoff)
            if len(expired) < _BATCH:
                break
        head: list[tuple[str, float]] = await self.redis.zrange(  # type: ignore[assignment]
            part.leases, 0, 0, withscores=True
        )
        return reclaimed, (int(head[0][1]) if head else None)

    async def run_once(self) -> float:
        """One pass over every partition; returns seconds until the next deadline."""
        wait = REFRESH_SECONDS
        for part in await self.partitions.current():
            _, deadline = await self.reclaim(part)
            if deadline is not None:
                wait = min(wait, max(0.0, deadline / 1000 - time.time()) + 0.005)
        return wait

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep_unless_stopped(await self.run_once(), stop)
