"""Opening Redis connections for agentq."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, cast

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from agentq.eventlog.breaker import (
    GuardedClusterConnection,
    GuardedClusterSSLConnection,
    GuardedConnection,
    GuardedSSLConnection,
    GuardedUnixConnection,
)
from agentq.eventlog.cluster import ClusterClient

log = structlog.get_logger("agentq.connection")

# Connections per client. When all are in use a call waits for one to be free
# (never fails for want of one), so any number of concurrent jobs works: a
# worker's completions and lease renewals are batched, one call for many jobs.
POOL_CONNECTIONS = 64
_warned_unverified = False


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect: a URL plus what a URL cannot carry."""

    url: str
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls: bool = False
    # Verify the server's certificate (against tls_ca_file, else the system's CA
    # store); False only when the config says redis.tls.verify: false.
    tls_verify: bool = True
    # A Redis Cluster: ``url`` names any one node (a redis+cluster:// URL sets it).
    cluster: bool = False

    @property
    def is_cluster(self) -> bool:
        return self.cluster or self.url.startswith(CLUSTER_SCHEMES)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def node_url(url: str) -> str:
    """``url`` as redis-py reads it: a cluster URL's scheme without ``+cluster``."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.removesuffix('+cluster')}{sep}{rest}"


def open_redis(
    target: RedisTarget,
    *,
    socket_timeout: float | None = None,
    max_connections: int = POOL_CONNECTIONS,
) -> Redis:
    """A client for ``target``, with a pool of ``max_connections`` that waits for
    a free connection rather than failing.

    No socket timeout by default: redis-py then wraps every read and write in
    ``asyncio.wait_for``, which on Python 3.11 can swallow a task's
    cancellation (CPython gh-86296) and costs a task per command; a timeout
    would also break blocking stream reads. Dead peers are found by TCP
    keepalive and refused connections by the circuit breaker.
    """
    kwargs: dict[str, object] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 5.0,
        # The breaker decides about failures; redis-py's own retries would hide them.
        "retry": Retry(NoBackoff(), 0),
        # Redis 6.2 (the embedded server) has no CLIENT SETINFO; skip the round trip.
        "driver_info": None,
        # Nor CLIENT MAINT_NOTIFICATIONS (Redis 8): redis-py would send it on every
        # connection, and an ACL without CLIENT (README) logs each one as denied.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if target.username:
        kwargs["username"] = target.username
    if target.password:
        kwargs["password"] = target.password
    if not target.url.startswith("unix://"):
        kwargs["socket_keepalive"] = True
    url = node_url(target.url)
    if target.tls or url.startswith("rediss://"):
        url = url.replace("redis://", "rediss://", 1)
        if target.tls_verify:
            # No caFile: the system's CA store (ssl's default context) decides.
            kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        else:
            kwargs["ssl_cert_reqs"] = ssl.CERT_NONE
            _warn_unverified(url)
        if target.tls_ca_file:
            kwargs["ssl_ca_certs"] = target.tls_ca_file
        if target.tls_cert_file:
            kwargs["ssl_certfile"] = target.tls_cert_file
        if target.tls_key_file:
            kwargs["ssl_keyfile"] = target.tls_key_file
    if target.is_cluster:
        return cast(Redis, _open_cluster(url, max_connections, kwargs))
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=None, **kwargs
    )
    return _guarded(Redis.from_pool(pool))


def _open_cluster(url: str, max_connections: int, kwargs: dict[str, Any]) -> ClusterClient:
    """A cluster client from one node's URL, its connections behind the breaker.

    redis-py's own retries are off (``retry``: none): the client rides out a
    failover itself (see :mod:`agentq.eventlog.cluster`). A MOVED corrects the
    one slot (``reinitialize_steps=0``): a full refresh would drop the
    connections of commands in flight. The slots need not all be covered to
    start: a failover can leave some without a master for a moment.
    """
    if url.startswith("unix://"):
        raise ValueError("a Redis Cluster is reached over TCP, not a unix socket")
    options = {**kwargs, **parse_url(url)}
    tls = options.pop("connection_class", None) is SSLConnection
    if tls:
        options["ssl"] = True
    cluster = ClusterClient(
        **options,
        max_connections=max_connections,
        require_full_coverage=False,
        reinitialize_steps=0,
    )
    guarded = GuardedClusterSSLConnection if tls else GuardedClusterConnection
    # Set after it is built: redis-py picks the connection class itself, for the
    # nodes it will discover (connection_kwargs) and the one it starts from.
    cluster.connection_kwargs["connection_class"] = guarded
    for node in cluster.nodes_manager.startup_nodes.values():
        node.connection_class = guarded
    return cluster


def cluster_of(redis: Redis) -> ClusterClient | None:
    """The cluster client ``redis`` is, or None for one server."""
    return redis if isinstance(redis, ClusterClient) else None


def _warn_unverified(url: str) -> None:
    """Once per process: TLS without checking who answers."""
    global _warned_unverified
    if not _warned_unverified:
        _warned_unverified = True
        log.warning("redis.tls.verify is false: the server's certificate is not checked; "
                    "anyone on the path can pose as the server", url=url.split("@")[-1])


def _guarded(client: Redis) -> Redis:
    """``client`` with every connection going through the circuit breaker.

    Set on the pool after it is built: ``from_url`` lets the URL's scheme pick
    the connection class, over any given as an argument.
    """
    pool = client.connection_pool
    chosen = pool.connection_class
    if issubclass(chosen, UnixDomainSocketConnection):
        pool.connection_class = GuardedUnixConnection
    elif issubclass(chosen, SSLConnection):
        pool.connection_class = GuardedSSLConnection
    else:
        pool.connection_class = GuardedConnection
    return client
