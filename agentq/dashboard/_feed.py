"""The live feed: one reader of the logs per dashboard process, fanned out to every
open page.

It hears which partitions changed from the doorbell (one subscription, as every
worker has), reads each changed partition's log from where it last stopped
(``XRANGE``, one round trip for all the partitions a ring named), and hands each
new event to every subscriber's queue. So a hundred open browsers cost one
subscription and one read per change, not a hundred. What a subscriber may see
is its own business (:class:`~agentq._access.EventFilter`, in ``app.py``).

Positions start at the feed's start (Redis ``TIME``): a partition first heard of
later is read from then on, never from its beginning. Pub/sub can drop a ring;
after every (re)subscription every partition is read again, and a page that
missed an update gets it with the next one (each page reloads its content, it
does not apply events one by one).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import Redis

from agentq.consumers.doorbell import Doorbell, Ring
from agentq.eventlog import registry
from agentq.eventlog.keys import Keys
from agentq.eventlog.reader import RawEvent

log = structlog.get_logger("agentq.dashboard")

# Entries read per partition per round: a burst larger than this is read in
# several rounds (the feed keeps its place), never skipped.
_READ_COUNT = 500
# A subscriber that falls this far behind (a stalled tab) is told to reload
# instead of being handed every event it missed.
_QUEUE_SIZE = 2_000


@dataclass(frozen=True, slots=True)
class Overflow:
    """Put in a subscriber's queue instead of events it had no room for."""


OVERFLOW = Overflow()
Item = RawEvent | Overflow


class Feed:
    """Follows every partition log of one deployment while :meth:`run` runs."""

    def __init__(self, redis: Redis, listen: Redis, keys: Keys) -> None:
        """``redis`` reads the logs; ``listen`` carries the doorbell's subscription
        (a connection without a socket timeout)."""
        self._redis = redis
        self._keys = keys
        self._positions: dict[str, str] = {}
        self._start = "0-0"
        self._dirty: set[str] = set()
        self._everything = False
        self._wake = asyncio.Event()
        self._subscribers: set[asyncio.Queue[Item]] = set()
        self.doorbell = Doorbell(listen, keys.ring, on_ring=self._rang,
                                 on_owners=lambda: None, on_subscribed=self._subscribed)
        self.ready = asyncio.Event()
        """Set once the feed listens (a ring from then on is not missed)."""

    # -- subscribers ---------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue(_QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Item]) -> None:
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def _publish(self, events: list[RawEvent]) -> None:
        for queue in self._subscribers:
            for event in events:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    with contextlib.suppress(asyncio.QueueEmpty):
                        while True:  # what it missed is dropped: it reloads instead
                            queue.get_nowait()
                    queue.put_nowait(OVERFLOW)
                    break

    # -- the doorbell --------------------------------------------------------

    def _rang(self, ring: Ring) -> None:
        self._dirty.add(ring.agent)
        self._wake.set()

    def _subscribed(self) -> None:
        self._everything = True
        self._wake.set()

    # -- running -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the logs until ``stop`` is set."""
        seconds, micros = await self._redis.time()
        self._start = f"{int(seconds) * 1000 + int(micros) // 1000}-0"
        bell = asyncio.create_task(self.doorbell.run(stop))
        try:
            while not stop.is_set():
                waker = asyncio.ensure_future(self._wake.wait())
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({waker, stopper}, return_when=asyncio.FIRST_COMPLETED)
                for task in (waker, stopper):
                    task.cancel()
                if stop.is_set():
                    break
                self._wake.clear()
                try:
                    await self._read_changed()
                except Exception as exc:  # Redis away: read again at the next ring
                    log.warning("dashboard feed: reading the logs failed", error=str(exc))
                    self._everything = True
                    await asyncio.sleep(0.5)
                    self._wake.set()
        finally:
            bell.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await bell

    async def _read_changed(self) -> None:
        if self._everything:
            self._everything = False
            self._dirty.update(await registry.all_partitions(self._redis, self._keys))
            self.ready.set()
        while self._dirty:
            agents, self._dirty = sorted(self._dirty), set()
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent in agents:
                    after = self._positions.get(agent, self._start)
                    pipe.xrange(self._keys.partition(agent).log, f"({after}", "+",
                                count=_READ_COUNT)
                replies: list[Any] = await pipe.execute()
            events: list[RawEvent] = []
            for agent, entries in zip(agents, replies, strict=True):
                for entry_id, fields in entries:
                    events.append(RawEvent.parse(agent, entry_id, fields))
                if entries:
                    self._positions[agent] = entries[-1][0]
                if len(entries) == _READ_COUNT:
                    self._dirty.add(agent)  # more to read
            if events:
                events.sort(key=lambda e: e.at)
                self._publish(events)
