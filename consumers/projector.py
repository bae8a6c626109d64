"""The projector consumer: group ``projector`` on every partition log keeps the
views of :mod:`projections.projector` current in the background."""

from __future__ import annotations

from redis.asyncio import Redis

from consumers.logconsumer import LogConsumer
from eventlog.keys import Keys
from eventlog.reader import RawEvent
from projections.projector import Projection


class Projector(LogConsumer):
    group = "projector"

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, consumer: str | None = None):
        super().__init__(redis, blocking, keys, consumer)
        self.projection = Projection(redis)

    async def handle(self, events: list[RawEvent]) -> None:
        await self.projection.apply(self.keys.partition(events[0].agent), events)
