"""Stall recovery: re-queues active jobs whose lease expired, in every partition.

A lease expires when its worker died or hung without renewing it. The stall
script finds the expired leases by the server's clock (Redis ``TIME``) and
checks each job again, so several reclaimers may run at once and a host whose
clock is off neither spins nor acts late. Between passes the reclaimer sleeps
until the earliest lease deadline it saw, measured against the server's clock
(bounded, so new partitions and new leases are picked up).

It also keeps the partition's worker lists from piling up: heartbeats in
``{A}:workers`` whose deadline passed long ago are removed, and so are the
consumers of the ready streams' ``workers`` group whose worker is not live
(they never hold pending entries: the start script acknowledges as it takes).
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from agentq.consumers.partitions import REFRESH_SECONDS, PartitionSet
from agentq.consumers.waiting import sleep_unless_stopped
from agentq.eventlog.keys import WORKERS_GROUP, Keys, Partition
from agentq.eventlog.processes import Census, Processes
from agentq.eventlog.scripts import Backoff, Scripts

_BATCH = 500
# A heartbeat this long past its deadline is removed from the partition's workers.
_FORGET_WORKER_MS = 60_000
# A worker consumer its partition does not list is forgotten once idle this long.
_UNLISTED_IDLE_MS = 60_000
# How often each partition's worker lists are tidied.
_TIDY_SECONDS = 60.0


class Reclaimer:
    def __init__(self, redis: Redis, keys: Keys, backoff: Backoff, actor: str = "system") -> None:
        self.redis = redis
        self.scripts = Scripts(redis)
        self.partitions = PartitionSet(redis, keys)
        self.backoff = backoff
        self.actor = actor
        self.processes = Processes(redis, keys)
        self._tidied: dict[str, float] = {}  # partition -> loop time of its last tidy

    async def reclaim(self, part: Partition) -> tuple[list[str], float]:
        """Reclaim ``part``'s expired leases; (ids reclaimed, seconds by the server's
        clock until its next lease deadline, at most ``REFRESH_SECONDS``)."""
        reclaimed: list[str] = []
        while True:
            timed = await self.scripts.stall_due(part, self.actor, self.backoff, _BATCH)
            reclaimed += timed.ids
            if len(timed.ids) < _BATCH:
                break
        now = asyncio.get_running_loop().time()
        if now - self._tidied.get(part.agent, -_TIDY_SECONDS) >= _TIDY_SECONDS:
            self._tidied[part.agent] = now
            await self.forget_dead_workers(part, timed.now_ms)
        return reclaimed, timed.seconds_until_next(REFRESH_SECONDS)

    async def forget_dead_workers(self, part: Partition, now_ms: int) -> None:
        """Remove heartbeats long expired and the ready streams' consumers whose
        worker is not live (by the server's time ``now_ms``)."""
        listed: list[tuple[str, float]] = await self.redis.zrange(  # type: ignore[assignment]
            part.workers, 0, -1, withscores=True
        )
        census = Census(now_ms, {name: int(deadline) for name, deadline in listed})
        await self.redis.zremrangebyscore(part.workers, "-inf", f"({now_ms - _FORGET_WORKER_MS}")
        for stream in part.ready_streams:
            if not await self.redis.exists(stream):
                continue
            dead = await self.processes.dead_consumers(
                stream, WORKERS_GROUP, census, besides="", unlisted_after_ms=_UNLISTED_IDLE_MS
            )
            await self.processes.take_over(stream, WORKERS_GROUP, self.actor, dead)

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
