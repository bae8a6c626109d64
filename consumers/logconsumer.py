"""The base of every consumer that follows the partition logs through a
consumer group: gates, alerts, projections.

A consumer reads only the partitions its process serves
(:mod:`agentq.consumers.ownership`) and, of those, only the ones that changed:
a partition is marked when its doorbell rings or a survey finds entries its
group has not delivered, and then read alone (``XREADGROUP`` of one stream,
``COUNT`` n, not blocking), so no read names streams of two slots. Each
partition log gets the group at its start (never ``$``: nothing before the
group's creation is skipped). A consumer acknowledges a batch only after
handling it (with its next read, or alone when none follows soon), so handlers
must be idempotent: an event may be handled again, never lost.

When it starts serving a partition (and whenever a survey finds entries
pending that are not its own in hand) a consumer *recovers* it: it takes over
the pending entries of consumers that are gone and handles those pending to
itself. A process that serves a partition is its only server, so it takes
over every other consumer's entries there, live or not; a consumer run by
itself (no ownership: it serves every partition, beside others like it) takes
over only those of processes the registry says are dead
(:mod:`agentq.eventlog.processes`, judged by Redis ``TIME``), plus those of
consumers it does not list once idle for ``claim_idle_ms``, and looks again at
every partition that often and whenever its process's
:class:`~agentq.consumers.presence.Presence` finds a process dead.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Collection
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentq.consumers.doorbell import Ring
from agentq.consumers.ownership import Ownership, serving
from agentq.consumers.presence import Presence
from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.processes import Census, Processes
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.registry import all_partitions
from agentq.eventlog.scripts import Survey, ensure_group

_BATCH = 200
# A consumer the process registry does not list is presumed dead once idle this
# long; a consumer run by itself also looks at every partition this often.
CLAIM_IDLE_MS = 30_000


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Nudge(asyncio.Event):
    """An event that, when set, also sets ``also``."""

    def __init__(self, also: asyncio.Event) -> None:
        super().__init__()
        self._also = also

    def set(self) -> None:
        super().set()
        self._also.set()


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
    # Entries read at once. A read per pause of ``batch`` caps a consumer at
    # ``batch`` ÷ the pause (the alerter at 2,000 events/s): a burst above that
    # is left for later (the worker in the same process gets the CPU), but
    # under a load that lasts, the consumer would never catch up. So once a
    # partition's reads have come back full for ``catch_up_after`` seconds,
    # each of its reads asks for twice as many as the last, up to
    # ``batch_most``, and for ``batch`` again once one is not full.
    batch = _BATCH
    batch_most = 2000
    catch_up_after = 5.0
    # Whether a quiet ring (starts, progress, endings nobody waits on) is a reason
    # to read: only for consumers that act on those events. The others read them
    # with the next loud ring's entries, or when a survey finds them undelivered.
    hears_quiet = True
    # Handled entries are acknowledged with the next read; alone when no read
    # follows within this time.
    ack_delay = 0.05

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, consumer: str | None = None,
                 *, claim_idle_ms: int | None = None, ownership: Ownership | None = None):
        """``ownership``: the partitions to serve (the process's); without one, a
        run serves every partition, with ``blocking`` carrying its doorbell."""
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.consumer = consumer or consumer_name()
        self.processes = Processes(redis, keys)
        self.claim_idle_ms = CLAIM_IDLE_MS if claim_idle_ms is None else claim_idle_ms
        self.ownership = ownership
        self._grouped: set[str] = set()
        # Partitions to read (in order), and partitions whose pending entries to
        # look at; `_marked` is set when either gets one.
        self._dirty: dict[str, None] = {}
        self._counts: dict[str, int] = {}  # agent -> entries its next read asks for
        self._behind: dict[str, float] = {}  # agent -> since when its reads came back full
        self._recover: dict[str, None] = {}
        self._marked = asyncio.Event()
        # Set when a process is found dead (or the run is to stop): ends a wait.
        self._wake = _Nudge(self._marked)
        # Entries handled but not yet acknowledged, by log: acknowledged with
        # the next read, in its round trip. A crash in between leaves them
        # pending, to be handled again (handlers are idempotent).
        self._acks: dict[str, list[str]] = {}
        # Held while a partition is served, so that dropping it waits for that.
        self._serving = asyncio.Lock()

    def follow(self, presence: Presence) -> None:
        """Be woken whenever ``presence`` finds a process dead (this consumer's name
        must be the presence's: its process's name in the registry)."""
        if presence.name != self.consumer:
            raise ValueError(f"consumer {self.consumer!r} is not process {presence.name!r}")
        presence.watch(self._wake)

    async def handle(self, events: list[RawEvent]) -> None:
        """Handle a batch of one partition's events, in log order. Idempotent."""
        raise NotImplementedError

    # -- told by the ownership ----------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        return (self.group,)

    def surveyed(self, agent: str, survey: Survey, *, gained: bool, tidy: bool) -> None:
        state = survey.groups.get(self.group)
        log = self.keys.partition(agent).log
        if state is None:
            self._grouped.discard(log)
        else:
            self._grouped.add(log)
        # Entries pending while this consumer has none of the log's in hand
        # belong to someone else (or to this consumer before a restart).
        if gained or tidy or (state is not None and state.pending and log not in self._acks):
            self._recover[agent] = None
        if survey.undelivered(self.group):
            self._dirty[agent] = None
        self._marked.set()

    def rang(self, ring: Ring) -> None:
        if ring.quiet and not self.hears_quiet:
            return
        self._dirty[ring.agent] = None
        self._marked.set()

    async def dropped(self, agents: Collection[str]) -> None:
        async with self._serving:
            for agent in agents:
                self._dirty.pop(agent, None)
                self._recover.pop(agent, None)
            logs = {self.keys.partition(agent).log for agent in agents}
            await self._ack({log: ids for log, ids in self._acks.items() if log in logs})

    # -- reading --------------------------------------------------------------

    async def _ensure(self, part: Partition) -> None:
        if part.log not in self._grouped:
            await ensure_group(self.redis, part.log, self.group)
            self._grouped.add(part.log)

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

    async def _ack(self, acks: dict[str, list[str]]) -> None:
        """Acknowledge ``acks`` (log -> ids) in one round trip, and forget them."""
        if not acks:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for log, ids in acks.items():
                pipe.xack(log, self.group, *ids)
            await pipe.execute(raise_on_error=False)  # a group gone: nothing to acknowledge
        for log in acks:
            self._acks.pop(log, None)

    async def flush_acks(self) -> None:
        """Acknowledge what was handled and not yet acknowledged."""
        await self._ack(dict(self._acks))

    async def _read(self, part: Partition) -> int:
        """Read ``part``'s new entries (one batch, not waiting) and handle them; the
        acknowledgements of what was handled before go in the same round trip."""
        await self._ensure(part)
        acks, self._acks = self._acks, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for log, ids in acks.items():
                    pipe.xack(log, self.group, *ids)
                count = self._counts.get(part.agent, self.batch)
                pipe.xreadgroup(self.group, self.consumer, {part.log: ">"}, count=count)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except BaseException:
            for log, ids in acks.items():  # perhaps not sent: with the next read
                self._acks.setdefault(log, []).extend(ids)
            raise
        read = replies[-1]
        if isinstance(read, ResponseError):
            if "NOGROUP" in str(read):
                # The log or its group was deleted under us: join again.
                self._grouped.discard(part.log)
                self._dirty[part.agent] = None
                return 0
            raise read
        entries = read[0][1] if read else []
        if len(entries) >= count:  # behind: read again, more at once after a while
            self._dirty[part.agent] = None
            now = asyncio.get_running_loop().time()
            if now - self._behind.setdefault(part.agent, now) >= self.catch_up_after:
                self._counts[part.agent] = min(count * 2, max(self.batch_most, self.batch))
        else:
            self._counts.pop(part.agent, None)
            self._behind.pop(part.agent, None)
        return await self._consume(part, entries, ack_later=True)

    async def _read_own(self, part: Partition) -> int:
        """Handle every entry pending to this consumer in ``part`` (its own, from
        before a crash, and those just taken over)."""
        handled = 0
        after = "0"
        while True:
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {part.log: after}, count=self.batch
            )
            entries = reply[0][1] if reply else []
            if not entries:
                return handled
            # Entries deleted from the log read back without fields (nil):
            # handled as nothing, acknowledged.
            handled += await self._consume(part, entries)
            after = entries[-1][0]

    async def _take_over(self, part: Partition, census: Census, *, sole: bool = False) -> None:
        """Move the gone consumers' pending entries to this one, forgetting them
        (``sole``: every other consumer's, as the partition's only server)."""
        while True:
            gone = await self.processes.dead_consumers(
                part.log, self.group, census, besides=self.consumer,
                unlisted_after_ms=self.claim_idle_ms, holding=sole,
            )
            if not await self.processes.take_over(part.log, self.group, self.consumer, gone):
                return

    async def _recover_part(self, part: Partition, census: Census | None = None, *,
                            sole: bool = False) -> int:
        """Recover one partition: acknowledge what is in hand, take over what the
        gone (``sole``: all the others) hold, handle what is pending to this one."""
        await self._ack({part.log: self._acks[part.log]} if part.log in self._acks else {})
        await self._ensure(part)
        await self._take_over(part, census or await self.processes.census(), sole=sole)
        return await self._read_own(part)

    async def recover(self, logs: set[str] | None = None) -> int:
        """Take over the pending entries of consumers that are gone, then handle
        every entry pending to this consumer (its own, from before a crash, and
        those just taken over), in every partition (``logs``: those partition
        logs). Entries this consumer handled and has not yet acknowledged are
        acknowledged first, not handled again. Returns the events handled."""
        await self.flush_acks()
        parts = [p for p in await self._every_partition() if logs is None or p.log in logs]
        census = await self.processes.census()
        handled = 0
        for part in parts:
            await self._ensure(part)
            await self._take_over(part, census)
            handled += await self._read_own(part)
        return handled

    async def _every_partition(self) -> list[Partition]:
        return [self.keys.partition(agent) for agent in await all_partitions(self.redis,
                                                                            self.keys)]

    async def process_once(self, block_ms: int | None = None) -> int:
        """Handle what every partition has now, one partition per read (waiting
        ``block_ms`` and looking once more when there was nothing); returns the
        count. A partition seen for the first time is recovered first."""
        handled = 0
        for part in await self._every_partition():
            if part.log not in self._grouped:
                handled += await self._recover_part(part)
        if handled:
            return handled
        for attempt in range(2):
            for part in await self._every_partition():
                handled += await self._read(part)
            if handled or not block_ms or attempt:
                return handled
            await asyncio.sleep(block_ms / 1000)
        return handled

    # -- serving ----------------------------------------------------------------

    async def _serve(self, own: Ownership) -> int:
        """One pass over the marked partitions: recover those to recover, read
        each (again later when a read was full); returns the events handled."""
        recover, self._recover = self._recover, {}
        dirty, self._dirty = {**recover, **self._dirty}, {}
        # Every partition to recover first (each gets its group), then the reads.
        steps = [(agent, True) for agent in recover] + [(agent, False) for agent in dirty]
        handled = 0
        for done, (agent, recovering) in enumerate(steps):
            async with self._serving:
                if not own.serves(agent):
                    continue
                part = self.keys.partition(agent)
                try:
                    if recovering:
                        census = own.census if own.exclusive else None
                        handled += await self._recover_part(part, census, sole=own.exclusive)
                        continue
                    read = await self._read(part)
                except BaseException:
                    # What is left is done by the next pass (after a restart); what
                    # this one had in hand is pending to this consumer: recover it.
                    self._recover[agent] = None
                    for left, recovering_left in steps[done + 1:]:
                        if recovering_left:
                            self._recover[left] = None
                        else:
                            self._dirty[left] = None
                    raise
                handled += read
        return handled

    async def run(self, stop: asyncio.Event) -> None:
        async with serving(self, self.ownership, self.redis, self.blocking, self.keys,
                           stop) as own:
            waker = asyncio.create_task(self._wake_on(stop))
            try:
                await self._run(own, stop)
            finally:
                waker.cancel()
                await asyncio.gather(waker, return_exceptions=True)
        await self.flush_acks()

    async def _run(self, own: Ownership, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_claim = 0.0
        while not stop.is_set():
            if not own.exclusive and (self._wake.is_set() or loop.time() >= next_claim):
                # By itself: look at every partition's pending entries now and then,
                # and at once when a process is found dead.
                self._recover.update(dict.fromkeys(own.owned()))
                next_claim = loop.time() + self.claim_idle_ms / 1000
            self._wake.clear()
            self._marked.clear()
            handled = await self._serve(own)
            pause = self.coalesce_seconds if handled else 0.0
            if handled >= self.busy_events:
                pause = max(pause, self.busy_coalesce_seconds)
            if pause:
                await sleep_unless_stopped(pause, stop)
            if self._dirty or self._recover or stop.is_set():
                continue
            timeout: float | None = None
            if self._acks:
                timeout = self.ack_delay
            elif not own.exclusive:
                timeout = max(0.0, next_claim - loop.time())
            if not await until_stopped(self._marked.wait(), stop, timeout=timeout):
                await self.flush_acks()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()
