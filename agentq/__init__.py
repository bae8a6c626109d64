"""agentq: a job orchestrator for AI agents, event-sourced on Redis Streams."""

from agentq import tools
from agentq.client import Client, connect
from schemas.errors import (
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
from schemas.job import JobView

__all__ = [
    "AgentqError",
    "Client",
    "Forbidden",
    "InvalidInput",
    "InvalidState",
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
