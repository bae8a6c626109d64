"""agentq: a job orchestrator for AI agents, event-sourced on Redis Streams.

The names below are imported on first use, so that ``import agentq`` (and the
CLI, before it knows its command) stays cheap."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentq import tools
    from agentq.client import Client, connect
    from agentq.consumers.handlers import Job
    from agentq.schemas.errors import (
        AgentqError,
        Forbidden,
        InvalidInput,
        InvalidState,
        NotFound,
        QueueFull,
        RateLimited,
        Unauthorized,
        Unavailable,
        UnknownAgent,
    )
    from agentq.schemas.job import JobView

_ERRORS = "agentq.schemas.errors"
_WHERE = {
    "AgentqError": _ERRORS,
    "Client": "agentq.client",
    "Forbidden": _ERRORS,
    "InvalidInput": _ERRORS,
    "InvalidState": _ERRORS,
    "Job": "agentq.consumers.handlers",
    "JobView": "agentq.schemas.job",
    "NotFound": _ERRORS,
    "QueueFull": _ERRORS,
    "RateLimited": _ERRORS,
    "Unauthorized": _ERRORS,
    "Unavailable": _ERRORS,
    "UnknownAgent": _ERRORS,
    "connect": "agentq.client",
}

__all__ = [
    "AgentqError",
    "Client",
    "Forbidden",
    "InvalidInput",
    "InvalidState",
    "Job",
    "JobView",
    "NotFound",
    "QueueFull",
    "RateLimited",
    "Unauthorized",
    "Unavailable",
    "UnknownAgent",
    "connect",
    "tools",
]


def __getattr__(name: str) -> Any:
    if name == "tools":
        return importlib.import_module("agentq.tools")
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'agentq' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value
