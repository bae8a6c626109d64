"""Opening Redis connections for agentq."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.backoff import NoBackoff
from redis.retry import Retry

from agentq.eventlog.breaker import GuardedConnection, GuardedSSLConnection, GuardedUnixConnection


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


def open_redis(target: RedisTarget, *, socket_timeout: float | None = None) -> Redis:
    """A client for ``target``.

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
    }
    if target.username:
        kwargs["username"] = target.username
    if target.password:
        kwargs["password"] = target.password
    if not target.url.startswith("unix://"):
        kwargs["socket_keepalive"] = True
    if target.tls or target.url.startswith("rediss://"):
        url = target.url.replace("redis://", "rediss://", 1)
        kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED if target.tls_ca_file else ssl.CERT_NONE
        if target.tls_ca_file:
            kwargs["ssl_ca_certs"] = target.tls_ca_file
        if target.tls_cert_file:
            kwargs["ssl_certfile"] = target.tls_cert_file
        if target.tls_key_file:
            kwargs["ssl_keyfile"] = target.tls_key_file
        return _guarded(Redis.from_url(url, **kwargs))  # type: ignore[arg-type]
    return _guarded(Redis.from_url(target.url, **kwargs))  # type: ignore[arg-type]


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
