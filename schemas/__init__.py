"""The wire types: events, the job view, tool inputs, config, errors. Imports
nothing else of agentq's; ``python -m agentq.schemas.export`` writes their JSON Schemas.

The names below are imported on first use: ``agentq.schemas.errors`` and
``agentq.schemas.words`` stay cheap (no pydantic) for the command line's parser."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agentq.schemas.config import Config
    from agentq.schemas.errors import AgentqError
    from agentq.schemas.events import EVENT_MODELS, StoredEvent
    from agentq.schemas.job import JobState, JobView

_WHERE = {
    "AgentqError": "agentq.schemas.errors",
    "Config": "agentq.schemas.config",
    "EVENT_MODELS": "agentq.schemas.events",
    "JobState": "agentq.schemas.words",
    "JobView": "agentq.schemas.job",
    "StoredEvent": "agentq.schemas.events",
}

__all__ = ["EVENT_MODELS", "AgentqError", "Config", "JobState", "JobView", "StoredEvent"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'agentq.schemas' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value
