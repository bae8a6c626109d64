"""Stall recovery: re-queues active jobs whose lease expired.

A lease expires when its worker died or hung without renewing it. The stall
script finds the expired leases by the server's clock (Redis ``TIME``) and
checks each job again, so several reclaimers may run at once and a host whose
clock is off neither spins nor acts late. Per partition it serves, the
reclaimer keeps the next lease deadline in a
:class:`~agentq.consumers.timetable.Timetable` (from the stall script's
replies, surveys, and the doorbell of the start script, which carries the
deadline of the leases it gave) and wakes for the partitions whose deadline
came; a renewal only moves a deadline later, so waking early costs one call.

It also keeps the partition's worker lists from piling up, when it starts
serving a partition and when the sweep asks: heartbeats in ``{A}:workers``
whose deadline passed long ago are removed, and so are the consumers of the
ready streams' ``workers`` group whose worker is not live (they never hold
pending entries: the start script acknowledges as it takes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from redis.asyncio import Redis

from agentq.consumers.doorbell import Ring
from agentq.consumers.ownership import Ownership, serving
from agentq.consumers.timetable import Timetable
from agentq.eventlog.keys import WORKERS_GROUP, Keys, Partition
from agentq.eventlog.processes import Census, Processes
from agentq.eventlog.scripts import Backoff, Scripts, Survey

_BATCH = 500
# A heartbeat this long past its deadline is removed from the partition's workers.
_FORGET_WORKER_MS = 60_000
# A worker consumer its partition does not list is forgotten once idle this long.
_UNLISTED_IDLE_MS = 60_000


class Reclaimer:
    groups: tuple[str, ...] = ()

    def __init__(self, redis: Redis, keys: Keys, backoff: Backoff, actor: str = "system", *,
                 ownership: Ownership | None = None) -> None:
        """``ownership``: the partitions to serve; without one, a run serves every
        partition."""
        self.redis = redis
        self.keys = keys
        self.scripts = Scripts(redis)
        self.backoff = backoff
        self.actor = actor
        self.processes = Processes(redis, keys)
        self.ownership = ownership
        self.timetable = Timetable()
        self._tidy: dict[str, int] = {}  # partitions to tidy -> the server's time (ms)

    # -- told by the ownership -------------------------------------------------

    def surveyed(self, agent: str, survey: Survey, *, gained: bool, tidy: bool) -> None:
        self.timetable.set(agent, survey.next_lease_ms, survey.now_ms)
        if tidy:
            self._tidy[agent] = survey.now_ms
            self.timetable.poke()

    def rang(self, ring: Ring) -> None:
        if ring.lease_ms is not None:
            self.timetable.earlier(ring.agent, ring.lease_ms)

    async def dropped(self, agents: Collection[str]) -> None:
        for agent in agents:
            self.timetable.forget(agent)
            self._tidy.pop(agent, None)

    # -- work -------------------------------------------------------------------

    async def reclaim(self, part: Partition) -> tuple[list[str], int | None, int]:
        """Reclaim ``part``'s expired leases: (ids reclaimed, its next lease
        deadline (server ms, None: no lease), the server's time (ms))."""
        reclaimed: list[str] = []
        while True:
            timed = await self.scripts.stall_due(part, self.actor, self.backoff, _BATCH)
            reclaimed += timed.ids
            if len(timed.ids) < _BATCH:
                return reclaimed, timed.next_ms, timed.now_ms

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

    async def run(self, stop: asyncio.Event) -> None:
        async with serving(self, self.ownership, self.redis, self.redis, self.keys,
                           stop) as own:
            while not stop.is_set():
                await self.timetable.act_on_due(own.serves, self._reclaim)
                while self._tidy:
                    agent, now_ms = next(iter(self._tidy.items()))
                    if own.serves(agent):
                        await self.forget_dead_workers(self.keys.partition(agent), now_ms)
                    self._tidy.pop(agent, None)
                    if self.timetable.due_now():
                        break  # leases first
                if not self._tidy:
                    await self.timetable.wait(stop)

    async def _reclaim(self, agent: str) -> tuple[int | None, int]:
        _, next_ms, now_ms = await self.reclaim(self.keys.partition(agent))
        return next_ms, now_ms
