"""Shared fixtures: a real Redis server and a client with a key prefix of its own."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis as sync_redis
from _backends import BACKENDS, Backend, fake_redis

import agentq
from agentq import embedded
from agentq.eventlog.breaker import BREAKER
from agentq.schemas.config import Config


@pytest.fixture(autouse=True)
def _closed_breaker() -> Iterator[None]:
    """Each test starts with the process's circuit breaker closed."""
    BREAKER.reset()
    yield
    BREAKER.reset()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL when set (CI sets the machine's server), else an embedded server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    home = tmp_path_factory.mktemp("redis")
    server = embedded.ensure_server(home)
    yield server.url
    embedded.stop_server(home)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Backend:
    """The server a test runs on, once per backend: the real Redis of ``redis_url``,
    then fakeredis with Lua in process (tests/_backends.py: how it differs)."""
    if request.param == "redis":
        return Backend("redis", request.getfixturevalue("redis_url"))
    return fake_redis(monkeypatch)


def _delete_prefix(url: str, prefix: str) -> None:
    client = sync_redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def make_config() -> Iterator[Callable[..., Config]]:
    """Build a Config with a fresh key prefix; every prefix made is deleted afterwards."""
    prefixes: list[str] = []

    def build(**overrides: Any) -> Config:
        prefix = f"t{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        data: dict[str, Any] = {"keyPrefix": prefix}
        data.update(overrides)
        return Config.model_validate(data)

    yield build
    url = os.environ.get("REDIS_URL")
    if url:
        for prefix in prefixes:
            _delete_prefix(url, prefix)


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    """A client on its own prefix, rate limit off, agents a, b, c known."""
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b", "c"):
            await client.add_agent(agent)
        yield client
        await _adelete_prefix(client)


@pytest.fixture
async def worker_client(
    redis_url: str, make_config: Callable[..., Config]
) -> AsyncIterator[Callable[..., Awaitable[agentq.Client]]]:
    """Opens clients for worker tests, each on a fresh prefix with the given config
    overrides: rate limits off, a 1 s shutdown grace unless given, agent ``w`` known.
    Every client opened is closed afterwards."""
    opened: list[agentq.Client] = []

    async def open_client(**overrides: Any) -> agentq.Client:
        overrides.setdefault("workers", {"shutdownGraceSeconds": 1})
        overrides.setdefault("rateLimit", {"dispatchesPerMinute": 0, "maxQueueDepth": 0})
        q = await agentq.connect(redis_url, make_config(**overrides)).open()
        opened.append(q)
        await q.add_agent("w")
        return q

    yield open_client
    for q in opened:
        await q.aclose()


async def _adelete_prefix(client: agentq.Client) -> None:
    keys = [k async for k in client.redis.scan_iter(match=f"{client.keys.prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.redis.delete(*keys[i : i + 500])
