"""``agentq mcp --http [HOST:]PORT``: the tools over MCP's Streamable HTTP
transport at ``/mcp``, each request's caller the agent of its bearer token.

Built from the SDK's own pieces: its bearer-token backend and middleware (a
request without a token agentq issued is answered 401 before anything runs),
its session manager in stateless mode (every request stands alone, so a client
that goes away leaves no session behind; a 2026-07-28 request that loses its
client is cancelled, its wait with it), and uvicorn to serve it. The SDK's
DNS-rebinding protection is on for a loopback address, as the SDK itself does.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import uvicorn
from mcp.server import ServerRequestContext
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    BearerAuthBackend,
    RequireAuthMiddleware,
)
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST
from starlette.applications import Starlette
from starlette.authentication import AuthenticationError
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentq.client import Client
from agentq.eventlog.tokens import TokenStore
from agentq.mcp.server import build_server
from agentq.schemas.errors import InvalidInput

PATH = "/mcp"
DEFAULT_HOST = "127.0.0.1"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# How long a stop waits for calls in flight (a queue_wait may block for minutes).
_GRACE_SECONDS = 5


class TokenVerifier:
    """The SDK's ``TokenVerifier``: a bearer token is agentq's when its SHA-256 is
    stored; the access it grants names the token's agent as ``client_id``."""

    def __init__(self, store: TokenStore) -> None:
        self._store = store

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            agent = await self._store.verify(token)
        except Exception as exc:  # Redis unreachable: no answer, not a refusal
            raise AuthenticationError(f"agentq cannot check the token now: {exc}") from exc
        return None if agent is None else AccessToken(token=token, client_id=agent, scopes=[])


def _unavailable(conn: HTTPConnection, exc: Exception) -> Response:
    return JSONResponse({"error": "temporarily_unavailable", "error_description": str(exc)},
                        status_code=503)


def caller_of(ctx: ServerRequestContext[Any]) -> str:
    """The agent of the request's bearer token (the transport refused any request
    without one, so there always is one)."""
    request = ctx.request
    user = request.scope.get("user") if isinstance(request, Request) else None
    if isinstance(user, AuthenticatedUser):
        return user.access_token.client_id
    token = get_access_token()
    if token is None:
        raise MCPError(code=INVALID_REQUEST, message="no bearer token on this request")
    return token.client_id


def _security(host: str) -> TransportSecuritySettings | None:
    if host not in _LOOPBACK:
        return None  # behind a proxy the Host is the proxy's name; the token guards the door
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )


def http_app(client: Client, host: str = DEFAULT_HOST) -> Starlette:
    """The ASGI app: ``POST``/``GET``/``DELETE /mcp`` behind bearer tokens."""
    manager = StreamableHTTPSessionManager(
        app=build_server(client, caller_of), stateless=True, security_settings=_security(host))
    endpoint = RequireAuthMiddleware(StreamableHTTPASGIApp(manager), required_scopes=[])

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    return Starlette(
        routes=[Route(PATH, endpoint=endpoint)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(TokenVerifier(
                client.tokens)), on_error=_unavailable),
            Middleware(AuthContextMiddleware),
        ],
        lifespan=lifespan,
    )


def parse_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[::1]:8765`` for IPv6) -> (host, port); the host defaults
    to the loopback address. Raises InvalidInput naming what is wrong."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535 or not host:
        raise InvalidInput(f"--http {text}: expected [HOST:]PORT, e.g. 8765 or 0.0.0.0:8765",
                           path="http")
    return host, port


async def serve_http(client: Client, host: str, port: int) -> None:
    """Serve until stopped (SIGINT/SIGTERM). Says where on standard error once it
    listens: ``agentq: MCP over HTTP at http://HOST:PORT/mcp`` (the port the system
    chose when ``port`` is 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a clear refusal, not uvicorn's
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidInput(f"--http: cannot listen on {host}:{port}: "
                               f"{exc.strerror or exc}; choose another address or port",
                               path="http") from exc
    # uvicorn binds itself (a socket handed to it answers each request 40 ms late:
    # its connections are left to Nagle's algorithm).
    config = uvicorn.Config(http_app(client, host), host=host, port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=_GRACE_SECONDS)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        while not server.started and not server.should_exit:
            await anyio.sleep(0.01)
        if server.started:
            bound = server.servers[0].sockets[0].getsockname()[1]
            print(f"agentq: MCP over HTTP at http://{shown}:{bound}{PATH}", file=sys.stderr,
                  flush=True)
