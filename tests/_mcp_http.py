"""``agentq mcp --http 127.0.0.1:0`` as a subprocess on a key prefix of its own,
shared by the tests of a module, and the SDK's client to reach it with a token."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.extension import ClientExtension
from mcp.client.streamable_http import streamable_http_client

import agentq
from agentq.schemas.config import Config

REPO = Path(__file__).resolve().parent.parent
READY = "MCP over HTTP at "
AGENTS = ("worker", "writer", "runner", "idle")  # known agents, the targets of the tests


@dataclass
class HttpServer:
    """A running ``agentq mcp --http``: where it listens, and its deployment."""

    url: str
    redis_url: str
    config: Config
    client_name: str  # the name its Redis connections carry (CLIENT LIST)
    proc: subprocess.Popen[bytes]

    @asynccontextmanager
    async def client(self) -> AsyncIterator[agentq.Client]:
        async with agentq.connect(self.redis_url, self.config) as q:
            yield q

    async def token(self, agent: str) -> str:
        async with self.client() as q:
            return (await q.tokens.add(agent)).token


def _env(prefix: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=prefix, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
               AGENTQ_RATE_LIMIT__MAX_QUEUE_DEPTH="0", AGENTQ_MCP_PROGRESS_SECONDS="0.2")
    env.update(extra)
    return env


@contextmanager
def http_server(redis_url: str, **extra_env: str) -> Iterator[HttpServer]:
    """Start the server (port chosen by the system, read from its standard error),
    with agents worker and writer known; stop it by its pid and delete its prefix."""
    from conftest import _delete_prefix

    prefix = f"t{uuid.uuid4().hex[:10]}"
    config = Config.model_validate({"keyPrefix": prefix,
                                    "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}})

    async def register() -> None:
        async with agentq.connect(redis_url, config) as q:
            for agent in AGENTS:
                await q.add_agent(agent)

    asyncio.run(register())
    name = f"aqmcp{uuid.uuid4().hex[:8]}"
    named = f"{redis_url}{'&' if '?' in redis_url else '?'}client_name={name}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "stderr"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentq.cli", "--redis", named, "mcp", "--http",
                 "127.0.0.1:0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=_env(prefix, extra_env), cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while READY not in (text := log.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start: rc={proc.poll()} {text}")
                time.sleep(0.05)
            url = text.split(READY, 1)[1].split()[0]
            yield HttpServer(url, redis_url, config, name, proc)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if os.environ.get("REDIS_URL"):
                _delete_prefix(redis_url, prefix)


@asynccontextmanager
async def mcp_client(
    url: str, token: str | None, *, read_seconds: float = 30.0,
    extensions: Sequence[ClientExtension] | None = None, **options: Any,
) -> AsyncIterator[Client]:
    """The SDK's client over Streamable HTTP with ``Authorization: Bearer token``;
    ``read_seconds`` is how long the HTTP client waits in silence before it gives up."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=read_seconds))
    async with http:
        client = Client(streamable_http_client(url, http_client=http),
                        extensions=extensions, **options)
        async with client:
            yield client


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds (polling, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not in time: {what}"
        await asyncio.sleep(0.02)
