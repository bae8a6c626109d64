"""Bearer tokens: who a caller of MCP over HTTP (and of the dashboard) is.

A token names one agent. ``TokenStore.add(agent)`` makes a new one and returns
it: the only time anybody sees it. Redis keeps its SHA-256 alone, in one hash of
the global area (``Keys.tokens``: hex digest -> ``{agent, prefix, createdAt}`` as
JSON), so a dump of Redis gives nobody a token. A token reads
``aqt.<43 characters>``; its first 12 characters (``aqt.`` and 8 more) are its
*prefix*, shown by ``list`` and accepted by ``revoke`` to name it. The ``.``
cannot occur in an agent id, so ``revoke`` tells an agent from a prefix.

The API (every call one or two Redis round trips; none is cached, so a revoked
token is refused from the next request on):

- ``await store.add(agent) -> IssuedToken`` (``.token`` the secret, ``.entry``)
- ``await store.verify(token) -> str | None``: the token's agent, None when it
  is unknown (looked up by its digest: nothing is compared character by
  character, so the answer's timing tells nothing about the stored tokens)
- ``await store.entries() -> list[TokenEntry]`` (oldest first; never a token)
- ``await store.revoke(agent_or_prefix) -> list[TokenEntry]``: what was revoked
  (every token of an agent, or the one token with that prefix, or the token
  itself when given whole); empty when nothing matched

Who may call ``add``, ``list`` and ``revoke`` (system agents only) is decided by
the front (``agentq tokens``); this module only keeps the tokens.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys
from agentq.schemas.job import check_agent_id

__all__ = ["PREFIX_LENGTH", "TOKEN_MARK", "IssuedToken", "TokenEntry", "TokenStore", "digest"]

TOKEN_MARK = "aqt."
PREFIX_LENGTH = len(TOKEN_MARK) + 8
_SECRET_BYTES = 32  # 43 characters of base64url: 256 bits


def digest(token: str) -> str:
    """The SHA-256 of ``token``, hex: what Redis keeps instead of it."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """What is kept of one token: whose it is, how it starts, when it was made."""

    agent: str
    prefix: str
    created_at: str

    def wire(self) -> dict[str, str]:
        return {"agent": self.agent, "prefix": self.prefix, "createdAt": self.created_at}

    @classmethod
    def parse(cls, raw: str | bytes) -> TokenEntry:
        data = orjson.loads(raw)
        return cls(data["agent"], data["prefix"], data["createdAt"])


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just made: ``token`` is shown once and kept nowhere."""

    token: str
    entry: TokenEntry


class TokenStore:
    """The tokens of one deployment (one Redis, one key prefix)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.tokens

    async def add(self, agent: str) -> IssuedToken:
        """A new token for ``agent`` (InvalidInput for an id that is not an agent id)."""
        check_agent_id(agent, "agent")
        token = TOKEN_MARK + secrets.token_urlsafe(_SECRET_BYTES)
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        entry = TokenEntry(agent, token[:PREFIX_LENGTH], now)
        await self._redis.hset(self._key, digest(token), orjson.dumps(entry.wire()).decode())
        return IssuedToken(token, entry)

    async def verify(self, token: str) -> str | None:
        """The agent ``token`` names; None for a token nobody issued (or revoked)."""
        if not token.startswith(TOKEN_MARK):
            return None
        raw: str | None = await self._redis.hget(self._key, digest(token))  # type: ignore[assignment]
        return None if raw is None else TokenEntry.parse(raw).agent

    async def entries(self) -> list[TokenEntry]:
        """Every token's entry, oldest first."""
        raw: dict[str, str] = await self._redis.hgetall(self._key)  # type: ignore[assignment]
        entries = [TokenEntry.parse(value) for value in raw.values()]
        return sorted(entries, key=lambda e: (e.created_at, e.agent, e.prefix))

    async def revoke(self, agent_or_prefix: str) -> list[TokenEntry]:
        """Revoke every token of an agent, or the token with this prefix (or this
        whole token); returns the entries revoked, none when nothing matched."""
        raw: dict[str, str] = await self._redis.hgetall(self._key)  # type: ignore[assignment]
        if TOKEN_MARK in agent_or_prefix:
            whole = digest(agent_or_prefix)
            chosen = {d: v for d, v in raw.items()
                      if d == whole or TokenEntry.parse(v).prefix == agent_or_prefix}
        else:
            check_agent_id(agent_or_prefix, "agent")
            chosen = {d: v for d, v in raw.items()
                      if TokenEntry.parse(v).agent == agent_or_prefix}
        if chosen:
            await self._redis.hdel(self._key, *chosen)
        return sorted((TokenEntry.parse(v) for v in chosen.values()),
                      key=lambda e: (e.created_at, e.prefix))
