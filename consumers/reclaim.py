"""Stall recovery: re-queues active jobs whose lease expired, in every partition.

A lease expires when its worker died or hung without renewing it. The stall
script finds the expired leases by the server's clock (Redis ``TIME``) and
checks each job again, so several reclaimers may run at once and a host whose
clock is off neither spins nor acts late. Between passes the reclaimer sleeps
until the earliest lease deadline it saw, measured against the server's clock
(bounded, so new partitions and new leases are picked up).
"""

from __future__ import annotations

import asyncio

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

    async def reclaim(self, part: Partition) -> tuple[list[str], float]:
        """Reclaim ``part``'s expired leases; (ids reclaimed, seconds by the server's
        clock until its next lease deadline, at most ``REFRESH_SECONDS``)."""
        reclaimed: list[str] = []
        while True:
            timed = await self.scripts.stall_due(part, self.actor, self.backoff, _BATCH)
            reclaimed += timed.ids
            if len(timed.ids) < _BATCH:
                return reclaimed, timed.seconds_until_next(REFRESH_SECONDS)

    async def run_once(self) -> float:
        """One pass over every partition; returns seconds until the next deadline."""
        wait = REFRESH_SECONDS
        for part in await self.partitions.current():
            _, until_next = await self.reclaim(part)
            wait = min(wait, until_next + 0.005 if until_next < REFRESH_SECONDS else until_next)
        return wait

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await sleep_unless_stopped(await self.run_once(), stop)
