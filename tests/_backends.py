"""The servers a suite runs on: a real Redis, or fakeredis with Lua in process.

One suite, two backends: a test that takes the ``backend`` fixture (conftest)
connects through :meth:`Backend.connect` and runs unchanged on both, so the
in-process stand-in cannot drift from the real server unnoticed.

fakeredis (2.41, with lupa) differs from Redis in ways that matter here, each
met by :func:`fake_redis`:

- Redis gives scripts its ``struct`` library (dispatch.lua unpacks jobs with
  it); fakeredis loads Lua modules with ``require`` and ships none. A stand-in
  (``tests/lua/struct.lua``) is put on ``LUA_PATH``, read when fakeredis makes
  the server's Lua state.
- Redis runs ``redis.call`` inside a script with RESP2 replies whatever the
  client speaks; fakeredis uses the client's protocol, and under RESP3 an
  XREADGROUP reads back as a flat map (and an empty read as ``{}``, not nil).
  The fake client therefore speaks RESP2.
- ``WAIT``, ``INFO`` and ``#!lua flags=`` scripts are missing. (In 2.41 an
  async ``XREAD ... BLOCK`` does wait, and wakes on a new entry.)
- It is not faster here: every command costs about as much CPU in process as
  a round trip to a local Redis, and a script's ``redis.call`` almost as much.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fakeredis
import pytest
import redis as sync_redis
from fakeredis import aioredis

import agentq
import agentq.client
from agentq.eventlog import connection
from agentq.schemas.config import Config

LUA_MODULES = Path(__file__).parent / "lua"
BackendName = Literal["redis", "fakeredis"]
BACKENDS: tuple[BackendName, ...] = ("redis", "fakeredis")


@dataclass(frozen=True)
class Backend:
    """Where a test's client connects: ``url`` on real Redis; on fakeredis the
    client's connections are made in process (the url is not used)."""

    name: BackendName
    url: str

    def connect(self, config: Config) -> agentq.Client:
        return agentq.connect(self.url, config)


class _CompiledOnce:
    """A Lua runtime that compiles each script text once: fakeredis runs every
    EVAL and EVALSHA through ``execute``, which would compile the text again."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self._chunks: dict[bytes, Any] = {}

    def execute(self, code: bytes, *args: Any) -> Any:
        chunk = self._chunks.get(code)
        if chunk is None:
            chunk = self._chunks[code] = self._runtime.compile(code)
        return chunk(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


def _compile_scripts_once(server: fakeredis.FakeServer) -> None:
    """Make ``server``'s Lua runtime (fakeredis keeps one per server, made on the
    first script, with the modules of the client that ran it) compile once."""
    fakeredis.FakeRedis(server=server, lua_modules={"struct"}).eval("return 1", 0)
    runtime = getattr(server, "_lua_runtime", None)
    if runtime is not None and hasattr(runtime, "compile"):  # else: as fakeredis does it
        server._lua_runtime = _CompiledOnce(runtime)  # type: ignore[attr-defined]


def fake_redis(monkeypatch: pytest.MonkeyPatch) -> Backend:
    """A fakeredis backend: one in-process server for the test, every connection
    the client opens (commands and blocking reads alike) made to it."""
    monkeypatch.setenv("LUA_PATH", f"{LUA_MODULES}/?.lua;;")
    server = fakeredis.FakeServer()
    _compile_scripts_once(server)

    def open_fake(target: Any, *, socket_timeout: float | None = None) -> aioredis.FakeRedis:
        # The socket timeout as asked (none by default, as open_redis): fakeredis
        # would set redis-py's 5 s, whose asyncio.wait_for around each send can
        # swallow a cancel on Python 3.11 (a stopping worker's blocking read then
        # waits out its block), and costs a task per command.
        return aioredis.FakeRedis(
            server=server, decode_responses=True, lua_modules={"struct"}, protocol=2,
            socket_timeout=socket_timeout,
        )

    # Wherever agentq holds the name (the module that opens a client's
    # connections imported it from agentq.eventlog.connection).
    real = connection.open_redis
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("agentq") and \
                getattr(module, "open_redis", None) is real:
            monkeypatch.setattr(module, "open_redis", open_fake)
    return Backend("fakeredis", "redis://fakeredis")


def sync_client(url: str, **kwargs: Any) -> sync_redis.Redis | sync_redis.RedisCluster:
    """A blocking redis-py client for a test's own reads and writes behind agentq's
    back: ``RedisCluster`` for a ``redis+cluster://`` (or ``rediss+cluster://``) URL,
    which routes each key to its node, else a plain ``Redis``."""
    scheme, sep, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        return sync_redis.RedisCluster.from_url(f"{scheme.removesuffix('+cluster')}{sep}{rest}",
                                                **kwargs)
    return sync_redis.Redis.from_url(url, **kwargs)
