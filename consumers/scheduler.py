"""The scheduler: moves delayed jobs to ``queued`` when their run time comes.

It keeps, per partition it serves, the next run time in a
:class:`~agentq.consumers.timetable.Timetable`: from the promote script's
replies, from surveys, and from the doorbell, whose ring carries the earliest
run time a script just added. It wakes for the partitions whose time came and
calls the promote script on each, which judges what is due by Redis ``TIME``
(a host whose clock is off neither spins nor acts late) and says when the next
run time is. Several schedulers may run at once: the script checks each job
again, so a job is moved once; with an ownership, one process serves each
partition anyway.

The same wake-ups tick the partition's schedules (:mod:`agentq.consumers.schedules`):
a partition's next time is the earlier of its next delayed job and its next
schedule tick (the survey and the doorbell report both), and each look both
promotes the due jobs and dispatches the due ticks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from redis.asyncio import Redis

from agentq.consumers.doorbell import Ring
from agentq.consumers.ownership import Ownership, serving
from agentq.consumers.schedules import Ticks
from agentq.consumers.timetable import Timetable
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.scripts import Scripts, Survey, Timed

_BATCH = 500


class Scheduler:
    groups: tuple[str, ...] = ()

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, actor: str = "system", *,
                 ownership: Ownership | None = None, ticks: Ticks | None = None) -> None:
        """``ownership``: the partitions to serve; without one, a run serves every
        partition, with ``blocking`` carrying its doorbell. ``ticks``: how schedules
        are ticked (default: no queue-depth cap on their jobs)."""
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.scripts = Scripts(redis)
        self.actor = actor
        self.ownership = ownership
        self.timetable = Timetable()
        self.ticks = ticks or Ticks(redis, keys)

    # -- told by the ownership -------------------------------------------------

    def surveyed(self, agent: str, survey: Survey, *, gained: bool, tidy: bool) -> None:
        self.timetable.set(agent, survey.next_run_ms, survey.now_ms)

    def rang(self, ring: Ring) -> None:
        if ring.run_ms is not None:
            self.timetable.earlier(ring.agent, ring.run_ms)

    async def dropped(self, agents: Collection[str]) -> None:
        for agent in agents:
            self.timetable.forget(agent)

    # -- work -------------------------------------------------------------------

    async def promote_due(self, part: Partition) -> Timed:
        """Queue every due job of ``part``; returns the last reply (the next run
        time and the server's time)."""
        while True:
            timed = await self.scripts.promote_due(part, self.actor, _BATCH)
            if len(timed.ids) < _BATCH:
                return timed

    async def run(self, stop: asyncio.Event) -> None:
        async with serving(self, self.ownership, self.redis, self.blocking, self.keys,
                           stop) as own:
            while not stop.is_set():
                await self.timetable.act_on_due(own.serves, self._promote)
                await self.timetable.wait(stop)

    async def _promote(self, agent: str) -> tuple[int | None, int]:
        part = self.keys.partition(agent)
        timed, due = await asyncio.gather(self.promote_due(part), self.ticks.due(part))
        tick_ms, now_ms = await self.ticks.fire(part, due)
        known = [ms for ms in (timed.next_ms, tick_ms) if ms is not None]
        return (min(known) if known else None), max(timed.now_ms, now_ms)
