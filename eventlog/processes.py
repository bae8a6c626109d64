"""The process registry, and taking over what dead processes held in consumer groups.

Every ``worker`` and ``run`` process beats in ``Keys.processes`` under its
consumer name: a deadline in the server's milliseconds (Redis ``TIME``), so no
host's clock is ever asked whether a process is alive. Once a deadline has
passed, any live process takes the dead one's pending entries over at once
(``takeover.lua``) and removes it from the group; a consumer that was never
listed (or whose entry was forgotten) counts as dead once it has been idle in
the group for the caller's claim time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentq.eventlog.keys import Keys
from agentq.eventlog.scripts import Scripts

# How many of one dead consumer's entries one takeover call moves; the rest
# move on the next call (the consumer is deleted only once it holds nothing).
TAKEOVER_BATCH = 1_000


@dataclass(frozen=True, slots=True)
class Census:
    """The registry as read at the server's time ``now_ms``: name -> deadline (ms)."""

    now_ms: int
    deadlines: Mapping[str, int]

    @classmethod
    def of(cls, reply: Sequence[Any]) -> Census:
        now, listed = reply
        return cls(int(now), {listed[i]: int(float(listed[i + 1]))
                              for i in range(0, len(listed), 2)})

    def dead(self) -> set[str]:
        """The listed processes whose deadline has passed."""
        return {name for name, deadline in self.deadlines.items() if deadline < self.now_ms}

    def live(self) -> set[str]:
        """The listed processes whose deadline has not passed."""
        return {name for name, deadline in self.deadlines.items() if deadline >= self.now_ms}

    def is_dead(self, name: str, idle_ms: int, unlisted_after_ms: int) -> bool:
        """Whether consumer ``name``, idle ``idle_ms`` in its group, is gone: its
        deadline passed, or it is not listed and idle at least ``unlisted_after_ms``."""
        deadline = self.deadlines.get(name)
        if deadline is None:
            return idle_ms >= unlisted_after_ms
        return deadline < self.now_ms

    def seconds_to_next_deadline(self, besides: str) -> float | None:
        """Seconds until the earliest deadline of a live process other than ``besides``."""
        ahead = [d for n, d in self.deadlines.items() if n != besides and d >= self.now_ms]
        return (min(ahead) - self.now_ms) / 1000 if ahead else None


@dataclass(frozen=True, slots=True)
class Owners:
    """What an owning beat left (``owners.lua``): the registry, which process
    holds the lease of each shard that has one, and the processes that take
    leases (the ``@<name>`` fields)."""

    census: Census
    holders: Mapping[int, str]
    members: frozenset[str]

    @classmethod
    def of(cls, reply: Sequence[Any]) -> Owners:
        now, listed, flat = reply
        holders: dict[int, str] = {}
        members: set[str] = set()
        for i in range(0, len(flat), 2):
            field, value = flat[i], flat[i + 1]
            if field.startswith("@"):
                members.add(field[1:])
            elif field.isdigit():
                holders[int(field)] = value
        return cls(Census.of([now, listed]), holders, frozenset(members))

    def candidates(self) -> set[str]:
        """The live processes that take leases: those that share the shards."""
        return self.census.live() & self.members

    def held_by(self, name: str) -> set[int]:
        """The shards whose lease ``name`` holds (valid only while it lives)."""
        return {shard for shard, holder in self.holders.items() if holder == name}


class Processes:
    """The registry's and the takeover's scripts, registered on one client."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._scripts = Scripts(redis)

    async def beat(self, name: str, timeout_ms: int, forget_ms: int, *,
                   leaving: bool = False) -> Census:
        """Renew ``name``'s deadline (or, ``leaving``, mark it dead now); returns the
        registry as it was before the beat."""
        return Census.of(await self._scripts.presence(
            self.keys.processes, name, timeout_ms, forget_ms, leaving))

    async def beat_owning(self, name: str, timeout_ms: int, forget_ms: int, *,
                          want: Sequence[int] = (), release: Sequence[int] = (),
                          leaving: bool = False, notify: bool = False) -> Owners:
        """Renew ``name``'s deadline and its shard leases in one step: release
        ``release``, claim those of ``want`` that are free or held by a dead
        process (``leaving``: mark it dead and release every lease); ``notify``
        publishes ``!owners`` on the doorbell so the others look at once.
        Returns the registry and leases after the beat."""
        return Owners.of(await self._scripts.owners(
            self.keys.processes, self.keys.owners, name, timeout_ms, forget_ms,
            leaving=leaving, channel=self.keys.ring if notify else "", want=want,
            release=release))

    async def census(self) -> Census:
        """The registry, read with the server's time in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(self.keys.processes, 0, -1, withscores=True)
            (seconds, micros), listed = await pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return Census(now_ms, {name: int(deadline) for name, deadline in listed})

    async def take_over(self, stream: str, group: str, taker: str, dead: Sequence[str]) -> int:
        """Move the pending entries of the ``dead`` consumers of ``group`` to ``taker``
        and delete those left with nothing pending; returns the entries moved."""
        if not dead:
            return 0
        return await self._scripts.takeover(stream, group, taker, TAKEOVER_BATCH, dead)

    async def dead_consumers(self, stream: str, group: str, census: Census, *,
                             besides: str, unlisted_after_ms: int,
                             holding: bool = False) -> list[str]:
        """The consumers of ``group`` on ``stream`` (other than ``besides``) that are
        gone; none when the group does not exist. ``holding``: also every other
        consumer holding pending entries, gone or not (what the sole owner of a
        partition takes over: nobody else may be serving it)."""
        try:
            consumers: list[dict[str, Any]] = await self.redis.xinfo_consumers(stream, group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return []
            raise
        return [c["name"] for c in consumers
                if c["name"] != besides
                and ((holding and int(c["pending"]) > 0)
                     or census.is_dead(c["name"], int(c["idle"]), unlisted_after_ms))]
