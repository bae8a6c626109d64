"""A process's presence: its heartbeat in the process registry, and the news
that another process died.

The process beats every third of its heartbeat timeout. Between beats it
wakes when the earliest deadline of another process falls due (measured by
the server's clock), so a process that died is known dead within moments of
its deadline; the log consumers that watch this presence are then woken to
take over its pending entries at once instead of waiting for them to go idle.

With an :class:`~agentq.consumers.ownership.Ownership`, each beat also renews,
claims and releases the process's leases on shards (``owners.lua``, one
script call), and the presence beats at once when the ownership asks (leases
to claim or release, another process's leases changed): a dead process's
shards are claimed by the beat that finds it dead.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog
from redis.asyncio import Redis

from agentq.consumers.waiting import until_stopped
from agentq.eventlog.keys import Keys
from agentq.eventlog.processes import Census, Processes

if TYPE_CHECKING:
    from agentq.consumers.ownership import Ownership

log = structlog.get_logger("agentq.presence")

# A dead process stays listed this many heartbeat timeouts (at least 5 minutes),
# so that every group has had time to take over what it held.
_FORGET_TIMEOUTS = 10
_FORGET_MIN_MS = 300_000
# Looking a little after a deadline rather than on it: Redis's clock moves in ms.
_AFTER_DEADLINE = 0.02


class Presence:
    """``name`` (the process's consumer name) alive in the registry while ``run`` runs."""

    def __init__(self, redis: Redis, keys: Keys, name: str, timeout_seconds: float = 30.0,
                 *, ownership: Ownership | None = None):
        """``ownership``: the shards this process leases, beaten with it."""
        self.processes = Processes(redis, keys)
        self.ownership = ownership
        self.name = name
        self.timeout_ms = int(timeout_seconds * 1000)
        self.forget_ms = max(_FORGET_MIN_MS, _FORGET_TIMEOUTS * self.timeout_ms)
        self._watchers: list[asyncio.Event] = []
        self._dead: set[str] = set()

    def watch(self, event: asyncio.Event) -> None:
        """Set ``event`` whenever another process is found dead."""
        self._watchers.append(event)

    async def beat(self) -> Census:
        """Renew this process's deadline (and leases); tell the watchers of
        processes newly dead."""
        own = self.ownership
        if own is not None and own.exclusive:
            want, release, notify = own.plan()
            sent_at = asyncio.get_running_loop().time()
            owners = await self.processes.beat_owning(
                self.name, self.timeout_ms, self.forget_ms, want=want, release=release,
                notify=notify)
            own.update(owners, sent_at, release)
            census = owners.census
        else:
            census = await self.processes.beat(self.name, self.timeout_ms, self.forget_ms)
        dead = census.dead() - {self.name}
        if dead - self._dead:
            log.info("processes found dead; taking over their pending entries",
                     processes=sorted(dead - self._dead))
            for event in self._watchers:
                event.set()
        self._dead = dead
        return census

    async def run(self, stop: asyncio.Event) -> None:
        every = self.timeout_ms / 3000
        soon = self.ownership.beat_soon if self.ownership is not None else asyncio.Event()
        try:
            while not stop.is_set():
                soon.clear()
                census = await self.beat()
                wait = every
                ahead = census.seconds_to_next_deadline(besides=self.name)
                if ahead is not None:
                    wait = min(wait, ahead + _AFTER_DEADLINE)
                await until_stopped(soon.wait(), stop, timeout=wait)
        finally:
            if stop.is_set():
                await self.leave()

    async def leave(self) -> None:
        """Mark this process dead now (a clean stop), releasing every lease: others
        forget its consumers and claim its shards at once instead of after its
        timeout. Whoever stops the process stops its consumers first."""
        own = self.ownership
        if own is not None and own.exclusive:
            own.lapse()
            await self.processes.beat_owning(self.name, self.timeout_ms, self.forget_ms,
                                             leaving=True, notify=True)
            return
        await self.processes.beat(self.name, self.timeout_ms, self.forget_ms, leaving=True)
