"""The base of every consumer that follows the partition logs through a
consumer group: gates, alerts, projections.

Each partition log gets the group at its start (never ``$``: nothing before
the group's creation is skipped). A consumer first re-reads its own pending
entries (what it took but did not acknowledge before a crash), takes over
entries left pending too long by consumers that died, then blocks for new
ones. It acknowledges a batch only after handling it, so handlers must be
idempotent: an event may be handled again, never lost.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from redis.asyncio import Redis

from agentq.consumers.partitions import REFRESH_SECONDS, PartitionSet
from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import ensure_group

_BATCH = 200
# Entries pending this long belong to a consumer presumed dead.
CLAIM_IDLE_MS = 30_000


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class LogConsumer:
    """Subclasses set ``group`` and implement :meth:`handle`."""

    group = ""
    # After a read that found events, wait this long before the next one, so that
    # events arriving one by one are handled in batches. The projector can lag
    # (queries catch up); consumers whose promptness matters (gates) wait only
    # when busy, after a read of at least ``busy_events``.
    coalesce_seconds = 0.0
    busy_coalesce_seconds = 0.005
    busy_events = 32

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, consumer: str | None = None):
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.consumer = consumer or consumer_name()
        self.partitions = PartitionSet(redis, keys)
        self._grouped: set[str] = set()
        # Entries handled but not yet acknowledged, by log: acknowledged with
        # the next read, in its round trip. A crash in between leaves them
        # pending, to be handled again (handlers are idempotent).
        self._acks: dict[str, list[str]] = {}

    async def handle(self, events: list[RawEvent]) -> None:
        """Handle a batch of one partition's events, in log order. Idempotent."""
        raise NotImplementedError

    async def _parts(self) -> list[Partition]:
        parts = await self.partitions.current()
        for part in parts:
            if part.log not in self._grouped:
                await ensure_group(self.redis, part.log, self.group)
                self._grouped.add(part.log)
        return parts

    async def _consume(
        self, part: Partition, entries: list[Any], *, ack_later: bool = False
    ) -> int:
        events = [RawEvent.parse(part.agent, eid, fields) for eid, fields in entries if fields]
        if events:
            await self.handle(events)
        ids = [eid for eid, _ in entries]
        if ids and ack_later:
            self._acks.setdefault(part.log, []).extend(ids)
        elif ids:
            await self.redis.xack(part.log, self.group, *ids)
        return len(events)

    async def flush_acks(self) -> None:
        """Acknowledge what was handled and not yet acknowledged."""
        acks, self._acks = self._acks, {}
        for log, ids in acks.items():
            await self.redis.xack(log, self.group, *ids)

    async def recover(self) -> int:
        """Take over entries left pending too long by consumers presumed dead, then
        handle every entry pending to this consumer (its own, from before a crash,
        and those just claimed). Returns the events handled."""
        handled = 0
        for part in await self._parts():
            cursor = "0-0"
            while True:
                # Only the cursor is used: the claimed entries are read back below
                # from this consumer's pending list, which also returns entries
                # deleted from the log (as nil: Redis 6.2 has no third reply element).
                claimed: Any = await self.redis.xautoclaim(
                    part.log, self.group, self.consumer, CLAIM_IDLE_MS, cursor, count=_BATCH
                )
                cursor = str(claimed[0])
                if cursor == "0-0":
                    break
            after = "0"
            while True:
                reply: Any = await self.redis.xreadgroup(
                    self.group, self.consumer, {part.log: after}, count=_BATCH
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                handled += await self._consume(part, entries)
                after = entries[-1][0]
        return handled

    async def process_once(self, block_ms: int | None = None) -> int:
        """Handle what is available now (waiting up to ``block_ms``); returns the count."""
        parts = await self._parts()
        if not parts:
            return 0
        streams = {part.log: ">" for part in parts}
        acks, self._acks = self._acks, {}
        # The previous batch's acknowledgements go in the same round trip as the read.
        async with self.blocking.pipeline(transaction=False) as pipe:
            for log, ids in acks.items():
                pipe.xack(log, self.group, *ids)
            pipe.xreadgroup(self.group, self.consumer, streams,  # type: ignore[arg-type]
                            count=_BATCH, block=block_ms)
            replies: list[Any] = await pipe.execute()
        by_log = {part.log: part for part in parts}
        handled = 0
        for stream, entries in replies[-1] or []:
            handled += await self._consume(by_log[stream], entries, ack_later=True)
        return handled

    async def run(self, stop: asyncio.Event) -> None:
        claim_every = CLAIM_IDLE_MS / 1000
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        while not stop.is_set():
            if loop.time() >= next_claim:
                await self.recover()
                next_claim = loop.time() + claim_every
            handled = 0

            async def step() -> None:
                nonlocal handled
                handled = await self.process_once(int(REFRESH_SECONDS * 1000))

            await until_stopped(step(), stop)
            pause = self.coalesce_seconds if handled else 0.0
            if handled >= self.busy_events:
                pause = max(pause, self.busy_coalesce_seconds)
            if pause:
                await sleep_unless_stopped(pause, stop)
        await self.flush_acks()
