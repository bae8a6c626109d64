"""Who is looking: a login by token, kept as a session of this process.

Logging in posts a token (``agentq tokens add AGENT``); the answer sets a cookie
naming a new session (random, ``HttpOnly``, ``SameSite=Strict``, ``Secure`` when
served over HTTPS). The session keeps the token and a CSRF token of its own,
which every form of the session carries. The token is verified again on every
request, so a revoked token is refused from the next request on, as over MCP;
the session only saves typing it again. Sessions live in this process's memory:
a restarted dashboard asks for the token again.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

COOKIE = "agentq_session"
# An unused session is forgotten after this long; the most sessions kept at once
# (the oldest are forgotten first).
IDLE_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000


class Verifier(Protocol):
    """What checks a token: ``eventlog.tokens.TokenStore`` is one."""

    async def verify(self, token: str) -> str | None:
        """The agent ``token`` names; None for a token nobody issued (or revoked)."""
        ...


@dataclass
class Session:
    token: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    seen: float = field(default_factory=time.monotonic)

    def csrf_matches(self, sent: str | None) -> bool:
        return sent is not None and secrets.compare_digest(sent, self.csrf)


class Sessions:
    """The sessions of this process, by cookie value."""

    def __init__(self) -> None:
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def open(self, token: str) -> tuple[str, Session]:
        """A new session for ``token``: (the cookie's value, the session)."""
        while len(self._by_id) >= MAX_SESSIONS:
            self._by_id.popitem(last=False)
        session_id = secrets.token_urlsafe(32)
        session = self._by_id[session_id] = Session(token)
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        """The live session of this cookie value, or None."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > IDLE_SECONDS:
            del self._by_id[session_id]
            return None
        session.seen = now
        self._by_id.move_to_end(session_id)
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)
