"""The base of every consumer that follows the partition logs through a
consumer group: gates, alerts, projections.

Each partition log gets the group at its start (never ``$``: nothing before
the group's creation is skipped). A consumer first takes over the pending
entries of consumers that are gone, and re-reads its own (what it took but did
not acknowledge before a crash), then blocks for new ones. It acknowledges a
batch only after handling it, so handlers must be idempotent: an event may be
handled again, never lost.

A consumer is gone when its process's deadline in the process registry has
passed (:mod:`agentq.eventlog.processes`, judged by Redis ``TIME``): then its
entries are taken over at once, and it is removed from the group. A live
process's entries are never taken, however slow it is. A consumer the
registry does not list counts as gone once idle for ``claim_idle_ms``.
A consumer that follows its process's :class:`~agentq.consumers.presence.Presence`
is woken as soon as a process is found dead.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentq.consumers.partitions import REFRESH_SECONDS, PartitionSet
from agentq.consumers.presence import Presence
from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.processes import Census, Processes
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import ensure_group

_BATCH = 200
# A consumer the process registry does not list is presumed dead once idle this
# long; this is also how often every consumer looks at pending entries again.
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
    # Entries read at once.
    batch = _BATCH
    # How long one read blocks (None: REFRESH_SECONDS, so new partitions are
    # picked up); a wake-up ends it sooner.
    block_ms: int | None = None

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, consumer: str | None = None,
                 *, claim_idle_ms: int | None = None):
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.consumer = consumer or consumer_name()
        self.partitions = PartitionSet(redis, keys)
        self.processes = Processes(redis, keys)
        self.claim_idle_ms = CLAIM_IDLE_MS if claim_idle_ms is None else claim_idle_ms
        self._grouped: set[str] = set()
        # Logs joined but whose pending entries were not looked at yet.
        self._unrecovered: set[str] = set()
        # Set when a process is found dead (or the run is to stop): ends a wait.
        self._wake = asyncio.Event()
        # Entries handled but not yet acknowledged, by log: acknowledged with
        # the next read, in its round trip. A crash in between leaves them
        # pending, to be handled again (handlers are idempotent).
        self._acks: dict[str, list[str]] = {}

    def follow(self, presence: Presence) -> None:
        """Be woken whenever ``presence`` finds a process dead (this consumer's name
        must be the presence's: its process's name in the registry)."""
        if presence.name != self.consumer:
            raise ValueError(f"consumer {self.consumer!r} is not process {presence.name!r}")
        presence.watch(self._wake)

    async def handle(self, events: list[RawEvent]) -> None:
        """Handle a batch of one partition's events, in log order. Idempotent."""
        raise NotImplementedError

    async def _parts(self) -> list[Partition]:
        parts = await self.partitions.current()
        for part in parts:
            if part.log not in self._grouped:
                await ensure_group(self.redis, part.log, self.group)
                self._grouped.add(part.log)
                self._unrecovered.add(part.log)
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

    async def recover(self, logs: set[str] | None = None) -> int:
        """Take over the pending entries of consumers that are gone, then handle
        every entry pending to this consumer (its own, from before a crash, and
        those just taken over). Entries this consumer handled and has not yet
        acknowledged are acknowledged first, not handled again. ``logs`` limits
        it to those partition logs. Returns the events handled."""
        await self.flush_acks()
        parts = [p for p in await self._parts() if logs is None or p.log in logs]
        census = await self.processes.census()
        handled = 0
        for part in parts:
            await self._take_over(part, census)
            self._unrecovered.discard(part.log)
            after = "0"
            while True:
                reply: Any = await self.redis.xreadgroup(
                    self.group, self.consumer, {part.log: after}, count=self.batch
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                # Entries deleted from the log read back without fields (nil):
                # handled as nothing, acknowledged.
                handled += await self._consume(part, entries)
                after = entries[-1][0]
        return handled

    async def _take_over(self, part: Partition, census: Census) -> None:
        """Move the gone consumers' pending entries to this one, forgetting them."""
        while True:
            dead = await self.processes.dead_consumers(
                part.log, self.group, census, besides=self.consumer,
                unlisted_after_ms=self.claim_idle_ms,
            )
            if not await self.processes.take_over(part.log, self.group, self.consumer, dead):
                return

    async def process_once(self, block_ms: int | None = None, *,
                           interruptible: bool = False) -> int:
        """Handle what is available now (waiting up to ``block_ms``; None or 0 does
        not wait); returns the count.
        A partition seen for the first time has its pending entries handled first.
        ``interruptible``: a wake-up (a process found dead, a stop) ends the wait."""
        parts = await self._parts()
        if not parts:
            return 0
        if self._unrecovered:
            recovered = await self.recover(set(self._unrecovered))
            if recovered:
                return recovered
        streams = {part.log: ">" for part in parts}
        acks, self._acks = self._acks, {}

        async def read() -> list[Any]:
            # The previous batch's acknowledgements go in the same round trip as the read.
            async with self.blocking.pipeline(transaction=False) as pipe:
                for log, ids in acks.items():
                    pipe.xack(log, self.group, *ids)
                pipe.xreadgroup(self.group, self.consumer, streams,  # type: ignore[arg-type]
                                count=self.batch, block=block_ms or None)
                replies: list[Any] = await pipe.execute()
            return replies

        reading = asyncio.ensure_future(read())
        if interruptible and not await until_stopped(reading, self._wake):
            # Whatever the cut-off read delivered stays pending to this consumer
            # and is handled by the recovery that follows; the acknowledgements
            # may not have gone: they go with the next read (twice does no harm).
            for log, ids in acks.items():
                self._acks.setdefault(log, []).extend(ids)
            return 0
        replies = await reading
        by_log = {part.log: part for part in parts}
        handled = 0
        for stream, entries in replies[-1] or []:
            handled += await self._consume(by_log[stream], entries, ack_later=True)
        return handled

    async def run(self, stop: asyncio.Event) -> None:
        claim_every = self.claim_idle_ms / 1000
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        relay = asyncio.ensure_future(self._wake_on(stop))
        try:
            while not stop.is_set():
                if loop.time() >= next_claim or self._wake.is_set():
                    self._wake.clear()
                    await self.recover()
                    next_claim = loop.time() + claim_every
                # A process found dead ends the wait: its entries are taken over now.
                block_ms = self.block_ms or int(REFRESH_SECONDS * 1000)
                try:
                    handled = await self.process_once(block_ms, interruptible=True)
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        # A log or its group was deleted under us: join again.
                        self._grouped.clear()
                    raise
                pause = self.coalesce_seconds if handled else 0.0
                if handled >= self.busy_events:
                    pause = max(pause, self.busy_coalesce_seconds)
                if pause:
                    await sleep_unless_stopped(pause, stop)
        finally:
            relay.cancel()
        await self.flush_acks()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()
