"""Which partitions a process serves, and what tells it that one needs a look.

A partition's background work (its scheduler, stall recovery and log
consumers) is served by one live process at a time. Partitions are grouped
into :data:`~agentq.consumers.shards.SHARDS` shards; a process holds leases on
shards in the owners hash (``owners.lua``), renewed by its presence beat. Each
beat claims the shards this process should own (rendezvous hashing over the
live processes that take leases) when they are free or held by a dead
process, and releases those it should no longer own, but only after it has
stopped serving them and acknowledged what it handled: stop, flush, release on
the next beat. A new owner claims only what was released or lapsed, so two
live processes never serve a shard at once. A process trusts its leases for
less than the heartbeat timeout after the beat that renewed them, so one that
stalls (or loses Redis) stops serving before anyone may claim its shards.

What changed comes from the doorbell (:mod:`agentq.consumers.doorbell`);
whenever a partition is gained, after every (re)subscription, and in a slow
sweep behind them (pub/sub can drop a message), a partition is *surveyed*: one
script call says where its log ends, where each consumer group stands and when
its next delayed job and lease fall due, which the served components turn into
work. The sweep visits partitions at :data:`SWEEP_PER_SECOND` in total over all
processes (each sweeps its share), so its cost is flat in the number of agents
and in the number of processes.

A standalone ownership (``exclusive=False``) serves every partition without
leases: what a consumer run by itself (a test, a tool) uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Final, Protocol

import structlog
from redis.asyncio import Redis

from agentq.consumers.doorbell import Doorbell, Ring
from agentq.consumers.partitions import REFRESH_SECONDS, Partitions
from agentq.consumers.shards import SHARDS, shard_of, share_of
from agentq.consumers.waiting import until_stopped
from agentq.eventlog.keys import Keys
from agentq.eventlog.processes import Census, Owners
from agentq.eventlog.scripts import Scripts, Survey

log = structlog.get_logger("agentq.ownership")

# The sweep: partitions surveyed per second, in total over all processes. A
# ring that pub/sub dropped (and no re-subscription noticed) is found within
# (partitions / this) seconds; at 1,000 agents about 17 minutes.
SWEEP_PER_SECOND: Final = 1.0
# Every this many sweep visits, the visit also tidies the partition (dead
# workers and consumers leave its lists): a constant rate too.
TIDY_EVERY: Final = 10
# A process trusts its leases for this share of the heartbeat timeout after
# sending the beat that renewed them (others may claim them at the timeout).
_TRUST: Final = 0.8
_SURVEY_BATCH: Final = 100


class Served(Protocol):
    """A component that serves partitions: told what to do by the ownership."""

    @property
    def groups(self) -> tuple[str, ...]:
        """The consumer groups of the partition logs it reads (none: ())."""
        ...

    def surveyed(self, agent: str, survey: Survey, *, gained: bool, tidy: bool) -> None:
        """``agent``'s partition was looked at; ``gained``: it has just started
        being served here; ``tidy``: also tidy its lists."""
        ...

    def rang(self, ring: Ring) -> None:
        """A served partition's doorbell rang."""
        ...

    async def dropped(self, agents: Collection[str]) -> None:
        """Stop serving ``agents``; return once nothing of theirs is in hand and
        what was handled is acknowledged."""
        ...


class Ownership:
    """The partitions this process (``name``) serves, and their wake-ups."""

    def __init__(self, redis: Redis, listen: Redis, keys: Keys, name: str = "", *,
                 exclusive: bool = True, timeout_seconds: float = 30.0,
                 sweep_per_second: float = SWEEP_PER_SECOND) -> None:
        """``listen``: the client whose connection carries the doorbell's
        subscription. ``exclusive``: serve only the shards this process leases
        (its :class:`~agentq.consumers.presence.Presence` beats them); else
        serve every partition."""
        self.keys = keys
        self.name = name
        self.exclusive = exclusive
        self.timeout = timeout_seconds
        self.sweep_per_second = sweep_per_second
        self.scripts = Scripts(redis)
        self.partitions = Partitions(redis, keys)
        self.doorbell = Doorbell(listen, keys.ring, on_ring=self._rang,
                                 on_owners=self._owners_changed, on_subscribed=self._subscribed)
        self.served: list[Served] = []
        self.census: Census | None = None
        """The registry as the last beat left it (exclusive only)."""
        self.beat_soon = asyncio.Event()
        """Set when a beat should not wait for its time: leases to claim or
        release, or another process changed its leases."""
        self.on_change: list[Callable[[frozenset[int]], None]] = []
        """Called with the shards served, whenever they change."""
        self.visits = 0
        """Partitions surveyed by the sweep (not counting other surveys)."""
        self._serving: set[int] = set() if exclusive else set(range(SHARDS))
        self._trusted_until = 0.0 if exclusive else math.inf
        self._desired: set[int] = set()
        self._dropping: set[int] = set()
        self._to_release: set[int] = set()
        self._joined = False
        # Partitions to survey soon: agent -> (gained, tidy), in order.
        self._to_survey: dict[str, tuple[bool, bool]] = {}
        self._survey_now = asyncio.Event()
        self._sweep_next = 0
        self._drops: set[asyncio.Task[None]] = set()
        self._started = False

    @classmethod
    def standalone(cls, redis: Redis, listen: Redis, keys: Keys) -> Ownership:
        """Serves every partition, with no leases."""
        return cls(redis, listen, keys, exclusive=False)

    def serve(self, component: Served) -> None:
        """Have ``component`` serve this process's partitions (once: again is nothing)."""
        if component in self.served:
            return
        self.served.append(component)
        if self._started:
            self._ask(self.owned(), gained=True, tidy=False)

    # -- what is served ---------------------------------------------------

    @property
    def shards(self) -> frozenset[int]:
        """The shards served now."""
        return frozenset(self._serving) if self._trusted() else frozenset()

    def _trusted(self) -> bool:
        return asyncio.get_running_loop().time() < self._trusted_until

    def serves(self, agent: str) -> bool:
        """Whether this process serves ``agent``'s partition now."""
        if not self.exclusive:
            return True
        return shard_of(agent) in self._serving and self._trusted()

    def owned(self) -> list[str]:
        """The known partitions served now."""
        return self.partitions.of(self.shards)

    # -- the presence's side ----------------------------------------------

    def plan(self) -> tuple[list[int], list[int], bool]:
        """For the next beat: the shards to claim or keep, those to release, and
        whether to tell the other processes (joining, or releasing)."""
        release = sorted(self._to_release)
        return sorted(self._desired), release, bool(release) or not self._joined

    def update(self, owners: Owners, sent_at: float, released: Collection[int]) -> None:
        """What the beat sent at loop time ``sent_at`` (releasing ``released``) left."""
        if not self.exclusive:
            return
        self._joined = True
        self.census = owners.census
        self._to_release -= set(released)
        previous = self._serving if self._trusted() else set()
        if not self._trusted() and self._serving:
            log.warning("leases lapsed before the beat renewed them; serving again what "
                        "is still ours", process=self.name)
        self._trusted_until = sent_at + self.timeout * _TRUST
        self._desired = share_of(self.name, owners.candidates())
        held = owners.held_by(self.name)
        serving = (held & self._desired) - self._dropping
        gained, lost = serving - previous, previous - serving
        self._serving = serving
        self._to_release |= held - self._desired - self._dropping - serving
        if lost:
            self._dropping |= lost
            task = asyncio.create_task(self._drop(lost))
            self._drops.add(task)
            task.add_done_callback(self._drops.discard)
        if gained:
            self._ask(self.partitions.of(gained), gained=True, tidy=True)
        live = owners.census.live()
        claimable = {s for s in self._desired - held
                     if owners.holders.get(s) not in live}
        if claimable or self._to_release:
            self.beat_soon.set()
        if gained or lost:
            for call in self.on_change:
                call(frozenset(serving))

    async def _drop(self, shards: set[int]) -> None:
        """Stop serving ``shards`` everywhere, then have them released."""
        agents = self.partitions.of(shards)
        try:
            results = await asyncio.gather(*(c.dropped(agents) for c in self.served),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("dropping partitions failed", error=str(result))
        finally:
            self._dropping -= shards
            self._to_release |= shards - self._desired
            self.beat_soon.set()

    def lapse(self) -> None:
        """Stop trusting the leases (a clean stop, before releasing them)."""
        self._trusted_until = 0.0

    # -- wake-ups -------------------------------------------------------------

    def _rang(self, ring: Ring) -> None:
        if self.partitions.add(ring.agent):
            if self.serves(ring.agent):
                self._ask([ring.agent], gained=True, tidy=True)
            return
        if self.serves(ring.agent):
            for component in self.served:
                component.rang(ring)

    def _owners_changed(self) -> None:
        if self.exclusive:
            self.beat_soon.set()

    def _subscribed(self) -> None:
        # Rings published while nobody listened are lost: look at everything.
        self._ask(self.owned(), gained=False, tidy=False)

    def _ask(self, agents: Sequence[str], *, gained: bool, tidy: bool) -> None:
        for agent in agents:
            was_gained, was_tidy = self._to_survey.get(agent, (False, False))
            self._to_survey[agent] = (gained or was_gained, tidy or was_tidy)
        if agents:
            self._survey_now.set()

    # -- running ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """The doorbell, the surveys and the sweep, and the registry's re-reads."""
        self._started = True
        async with asyncio.TaskGroup() as group:
            group.create_task(self.doorbell.run(stop))
            group.create_task(self._refresh(stop))
            group.create_task(self._surveys(stop))

    async def _refresh(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            new = await self.partitions.refresh()
            self._ask([agent for agent in new if self.serves(agent)], gained=True, tidy=True)
            await until_stopped(asyncio.sleep(REFRESH_SECONDS), stop)

    async def _surveys(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._to_survey:
                batch = list(self._to_survey.items())[:_SURVEY_BATCH]
                for agent, _ in batch:
                    del self._to_survey[agent]
                try:
                    await self.survey([(agent, *flags) for agent, flags in batch])
                except BaseException:
                    for agent, (gained, tidy) in batch:  # asked again after a restart
                        self._ask([agent], gained=gained, tidy=tidy)
                    raise
                continue
            self._survey_now.clear()
            owned = self.owned()
            wait = None
            if owned and self.sweep_per_second > 0:
                # This process's share of the sweep: its partitions out of all known.
                wait = len(self.partitions) / (self.sweep_per_second * len(owned))
            if await until_stopped(self._survey_now.wait(), stop, timeout=wait) \
                    or stop.is_set():
                continue
            owned = self.owned()
            if owned:
                agent = owned[self._sweep_next % len(owned)]
                self._sweep_next += 1
                self.visits += 1
                await self.survey([(agent, False, self.visits % TIDY_EVERY == 0)])

    async def survey(self, todo: Sequence[tuple[str, bool, bool]]) -> None:
        """Survey partitions ``(agent, gained, tidy)`` in one round trip (per node)
        and tell every served component."""
        groups = list(dict.fromkeys(g for c in self.served for g in c.groups))
        calls = [Scripts.survey_call(self.keys.partition(agent), groups) for agent, _, _ in todo]
        replies = await self.scripts.call_many(calls)
        for (agent, gained, tidy), reply in zip(todo, replies, strict=True):
            if not self.serves(agent):
                continue
            survey = Survey.of(reply, groups)
            for component in self.served:
                component.surveyed(agent, survey, gained=gained, tidy=tidy)


@contextlib.asynccontextmanager
async def serving(component: Served, own: Ownership | None, redis: Redis, listen: Redis,
                  keys: Keys, stop: asyncio.Event) -> AsyncIterator[Ownership]:
    """``own`` with ``component`` serving its partitions; without one (a component
    run by itself), a standalone :class:`Ownership` of its own, run until the
    block ends."""
    helper: asyncio.Task[None] | None = None
    if own is None:
        own = Ownership.standalone(redis, listen, keys)
        helper = asyncio.create_task(own.run(stop))
    own.serve(component)
    try:
        yield own
    finally:
        if helper is not None:
            if not stop.is_set():  # ended by an error: stopped at once, else by itself
                helper.cancel()
            await asyncio.gather(helper, return_exceptions=True)
