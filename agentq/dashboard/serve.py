"""Serving the dashboard with uvicorn until stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import TextIO

import uvicorn

from agentq.client import Client
from agentq.dashboard.app import dashboard_app
from agentq.schemas.errors import InvalidInput

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8321
READY = "agentq: dashboard at "
# How long a stop waits for requests in flight (live streams are closed at once).
_GRACE_SECONDS = 3


def check_address(host: str, port: int) -> None:
    """InvalidInput, naming what to do, when ``host:port`` cannot be listened on."""
    if not 0 <= port <= 65535:
        raise InvalidInput(f"dashboard: --port {port}: a port is from 0 to 65535 "
                           "(0: any free port)", path="port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise InvalidInput(f"dashboard: cannot listen on {host}:{port}: "
                           f"{exc.strerror or exc}; choose another --host or --port",
                           path="port") from exc


async def serve(client: Client, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                err: TextIO = sys.stderr) -> None:
    """Serve the dashboard of ``client``'s deployment until stopped; says where on
    ``err`` once it listens (the port the system chose when ``port`` is 0)."""
    check_address(host, port)
    config = uvicorn.Config(dashboard_app(client), host=host, port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=_GRACE_SECONDS)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if server.started:
        bound = server.servers[0].sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"{READY}http://{shown}:{bound}/", file=err, flush=True)
    await task
