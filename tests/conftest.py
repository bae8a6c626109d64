"""Shared fixtures: a real Redis server and a client with a key prefix of its own."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from _backends import BACKENDS, Backend, fake_redis, sync_client
from _s3 import S3Server, s3_server
from redis.crc import key_slot

import agentq
from agentq import embedded
from agentq.eventlog.breaker import BREAKER
from agentq.schemas.config import Config
from benchmarks._cluster import LocalCluster, local_cluster


@pytest.fixture(autouse=True)
def _closed_breaker() -> Iterator[None]:
    """Each test starts with the process's circuit breaker closed."""
    BREAKER.reset()
    yield
    BREAKER.reset()


BOTH_BACKENDS = "both_backends"
"""The marker of whole-flow tests: they run on one server (``[server]`` in the test
id) and once more on a local Redis Cluster (``[cluster]``), through one ``redis_url``
parameter that every fixture built on it (``q``, ``worker_client``, the CLI's) follows.
Mark a module with ``pytestmark = pytest.mark.both_backends``."""

CLUSTER_AGENTS = {"a": 15495, "b": 3300, "c": 7365}  # the q fixture's agents and their slots


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{BOTH_BACKENDS}: a whole-flow test, run on one Redis server and again on a "
        "local Redis Cluster (3 masters, 3 replicas); AGENTQ_CLUSTER_TESTS=0 skips the latter",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marked = metafunc.definition.get_closest_marker(BOTH_BACKENDS) is not None
    if marked and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", ["server", "cluster"], indirect=True, scope="session")


def on_cluster(request: pytest.FixtureRequest) -> bool:
    """Whether the test runs in its ``[cluster]`` variant."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("redis_url") == "cluster"


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """One local Redis Cluster (3 masters, each with a replica) for the whole run,
    started when the first ``[cluster]`` test needs it, stopped by pid at the end.
    Agents a, b and c of the ``q`` fixture hash to slots served by three different
    masters (redis-cli gives the three masters 0-5460, 5461-10922 and 10923-16383)."""
    if os.environ.get("AGENTQ_CLUSTER_TESTS", "1") == "0":
        pytest.skip("AGENTQ_CLUSTER_TESTS=0: the cluster variants are skipped")
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not on PATH: the cluster variants need it")
    with local_cluster(masters=3, replicas=1) as started:
        owners = {agent: started.node_for_slot(s).port for agent, s in CLUSTER_AGENTS.items()}
        assert len(set(owners.values())) == 3, f"agents a, b, c share a node: {owners}"
        yield started


@pytest.fixture(scope="session")
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """REDIS_URL when set (CI sets the machine's server), else an embedded server;
    in a ``[cluster]`` variant, the session's local cluster (``redis+cluster://``)."""
    if getattr(request, "param", "server") == "cluster":
        started: LocalCluster = request.getfixturevalue("cluster")
        yield started.url
        return
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
    """Delete every key of ``prefix``. On a cluster (``redis+cluster://``) its keys
    live on every master: SCAN each one, and DEL per slot (DEL of keys in two slots
    is refused)."""
    client = sync_client(url)
    try:
        by_slot: dict[int, list[bytes]] = defaultdict(list)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            by_slot[key_slot(key)].append(key)
        for keys in by_slot.values():
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
    finally:
        client.close()


@pytest.fixture
def make_config(request: pytest.FixtureRequest) -> Iterator[Callable[..., Config]]:
    """Build a Config with a fresh key prefix; every prefix made is deleted afterwards
    (from REDIS_URL's server, or from the cluster in a ``[cluster]`` variant)."""
    prefixes: list[str] = []
    url = (
        request.getfixturevalue("redis_url") if on_cluster(request) else os.environ.get("REDIS_URL")
    )

    def build(**overrides: Any) -> Config:
        prefix = f"t{uuid.uuid4().hex[:10]}"
        prefixes.append(prefix)
        data: dict[str, Any] = {"keyPrefix": prefix}
        data.update(overrides)
        return Config.model_validate(data)

    yield build
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
        await asyncio.to_thread(_delete_prefix, redis_url, client.keys.prefix)


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


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A local S3-compatible server (moto), for the whole session."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on :func:`s3` as an archive URL; the AWS variables that
    point s3fs at the server are set for the test (and processes it starts)."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"aq-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    return f"s3://{bucket}/deployments"
