"""The scheduler: moves delayed jobs to ``queued`` when their run time comes.

It sleeps until the earliest run time of any partition, and blocks meanwhile
on every partition's ``timers`` stream, which the scripts touch whenever they
delay a job; so a new, earlier run time wakes it at once. Several schedulers
may run at once: the promote script checks each job again, so a job is moved
once. What is due is judged by Redis ``TIME`` inside the script, and the wait
until the next run time is measured against the server's clock too: a host
whose clock is off neither spins nor acts late.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis

from agentq.consumers.partitions import REFRESH_SECONDS, PartitionSet
from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.scripts import Scripts

_BATCH = 500


class Scheduler:
    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, actor: str = "system") -> None:
        self.redis = redis
        self.blocking = blocking
        self.scripts = Scripts(redis)
        self.partitions = PartitionSet(redis, keys)
        self.actor = actor

    async def promote_due(self, part: Partition) -> float:
        """Queue every due job of ``part``; returns the seconds (by the server's
        clock) until its next run time, at most ``REFRESH_SECONDS``."""
        while True:
            timed = await self.scripts.promote_due(part, self.actor, _BATCH)
            if len(timed.ids) < _BATCH:
                return timed.seconds_until_next(REFRESH_SECONDS)

    async def run_once(self) -> tuple[float, dict[str, str]]:
        """Promote what is due everywhere. Returns the seconds until the next run
        time, and where each timers stream ended before looking (to block from
        there, so that a job delayed meanwhile still wakes the scheduler)."""
        parts = await self.partitions.current()
        tails = await self._tails(parts) if parts else {}
        wait = REFRESH_SECONDS
        for part in parts:
            wait = min(wait, await self.promote_due(part))
        return wait, tails

    async def _tails(self, parts: list[Partition]) -> dict[str, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.xrevrange(part.timers, count=1)
            replies: list[Any] = await pipe.execute()
        return {
            part.timers: (reply[0][0] if reply else "0-0")
            for part, reply in zip(parts, replies, strict=True)
        }

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            wait, tails = await self.run_once()
            if wait <= 0:
                continue
            if tails:
                # Redis ends a BLOCK timeout only on its next timer tick (every
                # 100 ms at the default hz), so the due time is kept here: the
                # read blocks a little longer and is cancelled when the time comes.
                block_ms = int(wait * 1000) + 1000
                read = self.blocking.xread(tails, count=1, block=block_ms)  # type: ignore[arg-type]
                await until_stopped(read, stop, timeout=wait)
            else:
                await sleep_unless_stopped(wait, stop)
