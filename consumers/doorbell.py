"""The doorbell: which partitions changed, told by the scripts that changed them.

Every script that appends to a partition log publishes the agent's id once per
call on the channel ``<prefix>:ring`` (``_lib.lua``'s ``aq_ring``), with a word
``d<ms>`` when it delayed a job (the earliest run time it added), ``l<ms>``
when it started leases (their deadline) and ``q`` when all it appended was quiet
(:attr:`Ring.quiet`); ``owners.lua`` publishes ``!owners``
when leases on shards change hands. A process subscribes once and hands each
ring to its :class:`~agentq.consumers.ownership.Ownership`.

Pub/sub can drop a message (a reconnect, a lost cluster-bus message): after
every (re)subscription the process looks at every partition it serves
(``on_subscribed``), and a slow sweep looks at them all the time.

On a cluster a ``PUBLISH`` reaches a subscriber on another node over the
cluster bus, which on Redis 7.0 holds a message back now and then for ~40 ms
(measured on a local 3-master cluster: 200 publishes 5 ms apart, p50 0.6 ms /
p99 39 ms across nodes, p99 3.7 ms on the same node). So the doorbell listens
on every master, and takes a ring only from the node that holds the ringing
partition's slot, where the script published it: the copies the bus brings
to the other nodes are ignored. When the slot map is out of date the copy
taken is the bus's (late, not lost); the masters are looked up again every
few seconds, and a new one's subscription counts as a subscription.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster

from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.cluster import ClusterClient

log = structlog.get_logger("agentq.doorbell")

OWNERS_CHANGED: Final = "!owners"
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0
# How often a cluster's masters are looked at again (in the client's slot map,
# read again from the cluster only after a subscription lost its node).
_STOP_SECONDS = 1.0
_NODES_EVERY = 2.0


@dataclass(frozen=True, slots=True)
class Ring:
    """One ring: ``agent``'s log grew; ``run_ms`` the earliest run time of a job
    the call delayed, ``lease_ms`` the deadline of leases it started (server ms);
    ``quiet`` when every event appended was one only the projector acts on (a
    start, progress, an ending nobody waits on)."""

    agent: str
    run_ms: int | None = None
    lease_ms: int | None = None
    quiet: bool = False

    @classmethod
    def parse(cls, text: str) -> Ring | None:
        """The ring a message carries; None for anything else."""
        agent, *words = text.split(" ")
        if not agent or agent.startswith("!"):
            return None
        run_ms = lease_ms = None
        quiet = False
        for word in words:
            if word == "q":
                quiet = True
            elif word[1:].isdigit():
                if word[0] == "d":
                    run_ms = int(word[1:])
                elif word[0] == "l":
                    lease_ms = int(word[1:])
        return cls(agent, run_ms, lease_ms, quiet)


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
        # On a cluster: a subscription lost its node, so the masters may have changed.
        self._lost_node = False

    async def run(self, stop: asyncio.Event) -> None:
        if isinstance(self.redis, RedisCluster):
            await self._run_on_every_master(self.redis, stop)
        else:
            await self._run_on(self.redis, stop, None)

    async def _run_on_every_master(self, cluster: RedisCluster, stop: asyncio.Event) -> None:
        """One subscription per master, each taking the rings of its own slots."""
        listening: dict[str, tuple[asyncio.Task[None], asyncio.Event, Redis]] = {}
        try:
            while not stop.is_set():
                try:
                    if self._lost_node and isinstance(cluster, ClusterClient):
                        self._lost_node = False
                        await cluster.reread_map()
                    else:
                        await cluster.initialize()  # reads the map the first time only
                except Exception as exc:
                    self._lost_node = True
                    log.warning("doorbell: could not read the cluster's slot map", error=str(exc))
                masters = {node.name: node for node in cluster.get_primaries()}
                gone = set(listening) - set(masters)
                await _stop_listening([listening.pop(name) for name in gone])
                for name, node in masters.items():
                    if name not in listening:
                        client = _client_of(node)
                        node_stop = asyncio.Event()
                        task = asyncio.create_task(
                            self._run_on(client, node_stop, self._from_owner(cluster, name)))
                        listening[name] = (task, node_stop, client)
                await sleep_unless_stopped(_NODES_EVERY, stop)
        finally:
            await _stop_listening(list(listening.values()))

    def _from_owner(self, cluster: RedisCluster, node: str) -> Callable[[str], bool]:
        """Whether a message heard on ``node`` is to be taken: it is the node of
        the ringing partition's slot (of the global area's, for ``!owners``)."""
        prefix = self.channel.removesuffix(":ring")

        def accept(text: str) -> bool:
            tag = prefix if text == OWNERS_CHANGED else text.split(" ", 1)[0]
            try:
                owner = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(f"{{{tag}}}"))
            except Exception:
                return True  # no map for the slot: take it rather than lose it
            return owner is None or owner.name == node

        return accept

    async def _run_on(self, client: Redis, stop: asyncio.Event,
                      accept: Callable[[str], bool] | None) -> None:
        pause = _RETRY_FIRST
        while not stop.is_set():
            self.pubsub = pubsub = client.pubsub(ignore_subscribe_messages=True)
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
                await until_stopped(self._listen(pubsub, accept), stop)
            except Exception as exc:
                self._lost_node = accept is not None
                log.warning("doorbell: subscribing again shortly", error=str(exc), retry_in=pause)
            finally:
                self.subscribed.clear()
                if connection is not None:
                    connection.deregister_connect_callback(self._reconnected)
                await pubsub.aclose()
            if not stop.is_set():
                await sleep_unless_stopped(pause, stop)
                pause = min(pause * 2, _RETRY_MAX)

    def _reconnected(self, *_: object) -> None:
        self.subscriptions += 1
        self.subscribed.set()
        self.on_subscribed()

    async def _listen(self, pubsub: PubSub, accept: Callable[[str], bool] | None) -> None:
        while True:
            # The reply as read (``["message", channel, data]``), not get_message's
            # dict: a busy worker hears a ring for every batch it starts or ends.
            reply = await pubsub.parse_response(block=True)
            if not isinstance(reply, list) or len(reply) != 3 or reply[0] != "message":
                continue  # (un)subscribe confirmations, health-check pongs
            text = str(reply[2])
            if accept is not None and not accept(text):
                continue
            if text == OWNERS_CHANGED:
                self.on_owners()
            elif (ring := Ring.parse(text)) is not None:
                self.on_ring(ring)


def _client_of(node: ClusterNode) -> Redis:
    """A client of one cluster node alone, with the cluster client's connection
    settings (credentials, TLS, the breaker's connection class)."""
    settings = {**node.connection_kwargs, "host": node.host, "port": node.port}
    pool = ConnectionPool(connection_class=node.connection_class, **settings)
    return Redis.from_pool(pool)


async def _stop_listening(listeners: list[tuple[asyncio.Task[None], asyncio.Event, Redis]]) -> None:
    """Stops node listeners, each closing its subscription, and closes their
    clients; a listener that has not stopped within a second is cancelled."""
    for _, node_stop, _ in listeners:
        node_stop.set()
    tasks = [task for task, _, _ in listeners]
    try:
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=_STOP_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for _, _, client in listeners:
            await client.aclose()
