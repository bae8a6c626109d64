"""One deployment as a client holds it open: its config and keys, its Redis
connections, and its agents as last read. The client, its dispatcher and its
runners are each given this one object; none of them reaches into another."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentq import embedded
from agentq.config import redis_configured
from agentq.eventlog import merged, reader, registry
from agentq.eventlog.breaker import BREAKER, is_auth_error
from agentq.eventlog.cluster import describe
from agentq.eventlog.connection import RedisTarget, open_redis
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.scripts import Confirm, Scripts
from agentq.schemas.config import Config
from agentq.schemas.errors import Unavailable
from agentq.schemas.job import agent_of_job, check_agent_id

if TYPE_CHECKING:
    from agentq.eventlog.archive import Archive

# How long an agent's allow list, read from the registry, is trusted.
_REGISTRY_TTL = 1.0
_NOT_OPEN = "the client is not open; use `async with agentq.connect()`"
# What a cluster answers while it changes (a failover, a slot being moved), when
# it lasts longer than the client rides it out.
_CLUSTER_STATES = (ClusterDownError, TryAgainError, AskError, ClusterError, SlotNotCoveredError)


def resolve_target(url: str | None, config: Config) -> RedisTarget:
    """Where to connect: ``url``, else the configured server, else the embedded one."""
    tls = config.redis.tls
    extra: dict[str, Any] = {
        "username": config.redis.username,
        "password": config.redis.password,
        "tls": tls.enabled,
        "tls_ca_file": tls.ca_file,
        "tls_cert_file": tls.cert_file,
        "tls_key_file": tls.key_file,
        "tls_verify": tls.verify,
        "cluster": config.redis.cluster,
    }
    if url:
        return RedisTarget(url=url, **extra)
    if config.redis.url:
        return RedisTarget(url=config.redis.url, **extra)
    if redis_configured(config):
        scheme = "rediss" if tls.enabled else "redis"
        address = f"{scheme}://{config.redis.host}:{config.redis.port}/{config.redis.db}"
        return RedisTarget(url=address, **extra)
    server = embedded.ensure_server(embedded.home_dir())
    return RedisTarget(url=server.url)


class Deployment:
    """One Redis and one key prefix, as configured; usable between ``open`` and ``aclose``."""

    def __init__(self, url: str | None, config: Config) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.target: RedisTarget | None = None
        self._url = url
        self._redis: Redis | None = None
        self._scripts: Scripts | None = None
        self._blocking: list[Redis] = []
        self._allow_lists: dict[str, list[str]] = {}
        self._allow_read = 0.0
        self._archive: Archive | None = None

    async def open(self) -> None:
        """Connect, unless open already; agents named in the config and not yet
        known are registered."""
        if self._redis is not None:
            return
        breaker = self.config.circuit_breaker
        BREAKER.configure(breaker.failure_threshold, breaker.reset_timeout_seconds)
        self.target = await asyncio.to_thread(resolve_target, self._url, self.config)
        self._redis = open_redis(self.target)
        self._scripts = Scripts(self._redis, Confirm.of(self.config.redis))
        await self.call(self._register_configured_agents())

    async def aclose(self) -> None:
        for client in (self._redis, *self._blocking):
            if client is not None:
                await client.aclose()
        self._redis = self._scripts = None
        self._blocking = []

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError(_NOT_OPEN)
        return self._redis

    @property
    def scripts(self) -> Scripts:
        if self._scripts is None:
            raise RuntimeError(_NOT_OPEN)
        return self._scripts

    @property
    def archive(self) -> Archive | None:
        """Where events go before they leave Redis (``retention.archive``), opened
        on first use; None when none is configured (nothing leaves Redis)."""
        url = self.config.retention.archive
        if url is not None and self._archive is None:
            from agentq.eventlog.archive import open_archive  # fsspec: only when used

            self._archive = open_archive(url, self.keys.prefix)
        return self._archive

    def open_blocking(self) -> Redis:
        """A new connection for blocking reads (no socket timeout); closed by ``aclose``."""
        if self.target is None:
            raise RuntimeError(_NOT_OPEN)
        blocking = open_redis(self.target, socket_timeout=None)
        self._blocking.append(blocking)
        return blocking

    def partition(self, agent: str) -> Partition:
        return self.keys.partition(agent)

    async def call(self, awaitable: Any) -> Any:
        """Await a Redis call, turning connection failures (and a cluster's states
        that outlast the client's retries) into ``Unavailable``."""
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError, ResponseError,
                RedisClusterException) as exc:
            where = self.target.url if self.target else "Redis"
            if is_auth_error(exc) or "authentication" in BREAKER.last_error.lower():
                raise Unavailable(
                    f"Redis at {where} refused the credentials ({exc}); check redis.username "
                    "and redis.password (AGENTQ_REDIS__USERNAME, AGENTQ_REDIS__PASSWORD)"
                ) from exc
            if isinstance(exc, _CLUSTER_STATES):
                raise Unavailable(
                    f"Redis Cluster at {where} is unavailable: {describe(exc)}") from exc
            if isinstance(exc, RedisClusterException):
                raise Unavailable(
                    f"Redis Cluster at {where} refused the command: {exc}") from exc
            if isinstance(exc, ResponseError):
                raise
            if self.target is not None and self.target.is_cluster:
                if "Cluster mode is not enabled" in str(exc):
                    raise Unavailable(
                        f"Redis at {where} is not a Redis Cluster node; for one server use "
                        "a redis:// URL and leave redis.cluster false") from exc
                raise Unavailable(
                    f"Redis Cluster at {where} is unavailable ({describe(exc)}); check that "
                    "its nodes are running and that --redis / AGENTQ_REDIS_URL names one"
                ) from exc
            raise Unavailable(
                f"Redis at {where} is unavailable ({exc}); check that it is running and "
                "that --redis / AGENTQ_REDIS_URL points at it"
            ) from exc

    async def specs(self, job_ids: Sequence[str]) -> list[str | None]:
        """Jobs' specs (JSON) in one round trip; a job that has left Redis has its
        spec read from the archive; None for a job that does not exist (a
        malformed id included)."""
        specs: list[str | None] = await self.call(reader.read_specs(self.redis, [
            (self.partition(agent_of_job(job_id) or "-"), job_id) for job_id in job_ids]))
        if self.archive is not None:
            for index, (job_id, spec) in enumerate(zip(job_ids, specs, strict=True)):
                agent = agent_of_job(job_id)
                if spec is None and agent is not None:
                    record = await self.call(
                        merged.archived_record(self.archive, self.partition(agent), job_id))
                    specs[index] = record.get("spec")
        return specs

    # -- agents ------------------------------------------------------------

    async def _register_configured_agents(self) -> None:
        """Agents of the config that are not known, or known but not listed (a
        registration cut short), are registered (again)."""
        names = sorted(self.config.agents)
        if not names:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.exists(self.partition(name).meta)
                pipe.hexists(self.keys.agents, name)
            found = await pipe.execute()
        for name, known, listed in zip(names, found[0::2], found[1::2], strict=True):
            if not (known and listed):
                await registry.add_agent(
                    self.redis, self.keys, name, self.config.agents[name].allow_agents
                )

    async def add_agent(self, agent: str, allow: Sequence[str] = ("*",)) -> None:
        """Make ``agent`` known (InvalidInput for an id that is not an agent id)."""
        check_agent_id(agent, "agent")
        for i, other in enumerate(allow):
            if other != "*":
                check_agent_id(other, f"allow.{i}")
        await self.call(registry.add_agent(self.redis, self.keys, agent, allow))
        self._allow_read = 0.0

    async def remove_agent(self, agent: str) -> bool:
        check_agent_id(agent, "agent")
        removed = await self.call(registry.remove_agent(self.redis, self.keys, agent))
        self._allow_read = 0.0
        return bool(removed)

    async def repair_agents(self) -> tuple[list[str], list[str]]:
        """The registry's index made to agree with the partitions (a scan of every
        node): the agents listed again, and those no longer listed."""
        repaired: tuple[list[str], list[str]] = await self.call(
            registry.rebuild_index(self.redis, self.keys))
        self._allow_read = 0.0
        return repaired

    async def agents(self) -> dict[str, list[str]]:
        """Known agents and who each may dispatch to."""
        known: dict[str, list[str]] = await self.call(registry.list_agents(self.redis, self.keys))
        return known

    async def allow_list(self, caller: str) -> list[str]:
        """Whom ``caller`` may dispatch to: its configured ``allowAgents``, else the
        registry's, read at most once a second (``*`` for an agent it does not name)."""
        if caller in self.config.agents:
            return self.config.agents[caller].allow_agents
        if time.monotonic() - self._allow_read > _REGISTRY_TTL:
            self._allow_lists = await self.agents()
            self._allow_read = time.monotonic()
        return self._allow_lists.get(caller, ["*"])
