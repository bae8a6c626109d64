"""The doorbell: which partitions changed, told by the scripts that changed them.

Every script that appends to a partition log publishes the agent's id once per
call on the channel ``<prefix>:ring`` (``_lib.lua``'s ``aq_ring``), with a word
``d<ms>`` when it delayed a job (the earliest run time it added) and ``l<ms>``
when it started leases (their deadline); ``owners.lua`` publishes ``!owners``
when leases on shards change hands. A process subscribes once and hands each
ring to its :class:`~agentq.consumers.ownership.Ownership`.

Pub/sub can drop a message (a reconnect, a lost cluster-bus message): after
every (re)subscription the process looks at every partition it serves
(``on_subscribed``), and a slow sweep looks at them all the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from agentq.consumers.waiting import sleep_unless_stopped, until_stopped

log = structlog.get_logger("agentq.doorbell")

OWNERS_CHANGED: Final = "!owners"
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0


@dataclass(frozen=True, slots=True)
class Ring:
    """One ring: ``agent``'s log grew; ``run_ms`` the earliest run time of a job
    the call delayed, ``lease_ms`` the deadline of leases it started (server ms)."""

    agent: str
    run_ms: int | None = None
    lease_ms: int | None = None

    @classmethod
    def parse(cls, text: str) -> Ring | None:
        """The ring a message carries; None for anything else."""
        agent, *words = text.split(" ")
        if not agent or agent.startswith("!"):
            return None
        run_ms = lease_ms = None
        for word in words:
            if word[1:].isdigit():
                if word[0] == "d":
                    run_ms = int(word[1:])
                elif word[0] == "l":
                    lease_ms = int(word[1:])
        return cls(agent, run_ms, lease_ms)


class Doorbell:
    """Listens on ``channel`` until stopped, subscribing again (after a pause)
    whenever the connection drops, and calls ``on_subscribed`` after each
    subscription: what was published while nobody listened never arrives."""

    def __init__(self, redis: Redis, channel: str, *, on_ring: Callable[[Ring], None],
                 on_owners: Callable[[], None], on_subscribed: Callable[[], None]) -> None:
        self.redis = redis
        self.channel = channel
        self.on_ring = on_ring
        self.on_owners = on_owners
        self.on_subscribed = on_subscribed
        self.subscribed = asyncio.Event()
        self.subscriptions = 0
        """How many times the doorbell subscribed (more than once: it lost its
        connection and came back)."""
        self.pubsub: PubSub | None = None

    async def run(self, stop: asyncio.Event) -> None:
        pause = _RETRY_FIRST
        while not stop.is_set():
            self.pubsub = pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            connection = None
            try:
                await pubsub.subscribe(self.channel)
                # A client that retries reconnects and subscribes again by itself,
                # inside a read: told of it, as of any subscription.
                connection = getattr(pubsub, "connection", None)
                if connection is not None:
                    connection.register_connect_callback(self._reconnected)
                self._reconnected()
                pause = _RETRY_FIRST
                await until_stopped(self._listen(pubsub), stop)
            except Exception as exc:
                log.warning("doorbell: subscribing again shortly", error=str(exc), retry_in=pause)
            finally:
                self.subscribed.clear()
                if connection is not None:
                    connection.deregister_connect_callback(self._reconnected)
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not stop.is_set():
                await sleep_unless_stopped(pause, stop)
                pause = min(pause * 2, _RETRY_MAX)

    def _reconnected(self, *_: object) -> None:
        self.subscriptions += 1
        self.subscribed.set()
        self.on_subscribed()

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None or message.get("type") != "message":
                continue
            text = str(message["data"])
            if text == OWNERS_CHANGED:
                self.on_owners()
            elif (ring := Ring.parse(text)) is not None:
                self.on_ring(ring)
