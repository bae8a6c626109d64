"""The scheduler: moves delayed jobs to ``queued`` when their run time comes.

It sleeps until the earliest run time of any partition, and blocks meanwhile
on every partition's ``timers`` stream, which the scripts touch whenever they
delay a job; so a new, earlier run time wakes it at once. Several schedulers
may run at once: the promote script checks each job again, so a job is moved
once.
"""

from __future__ import annotations

import asyncio
import time
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

    async def promote_due(self, part: Partition) -> int | None:
        """Queue every due job of ``part``; returns the next run time (ms) or None."""
        while True:
            now_ms = int(time.time() * 1000)
            due: list[str] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                part.delayed, "-inf", now_ms, start=0, num=_BATCH
            )
            if not due:
                head: list[tuple[str, float]] = await self.redis.zrange(  # type: ignore[assignment]
                    part.delayed, 0, 0, withscores=True
                )
                return int(head[0][1]) if head else None
            _, next_due = await self.scripts.promote(part, self.actor, due)
            if len(due) < _BATCH and (next_due is None or next_due > now_ms):
                return next_due

    async def run_once(self) -> tuple[float, dict[str, str]]:
        """Promote what is due everywhere. Returns the seconds until the next run
        time, and where each timers stream ended before looking (to block from
        there, so that a job delayed meanwhile still wakes the scheduler)."""
        parts = await self.partitions.current()
        tails = await self._tails(parts) if parts else {}
        wait = REFRESH_SECONDS
        for part in parts:
            next_due = await self.promote_due(part)
            if next_due is not None:
                wait = min(wait, max(0.0, next_due / 1000 - time.time()))
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
