"""The wire types: events, the job view, tool inputs, config, errors. Imports
nothing else of agentq's; ``python -m agentq.schemas.export`` writes their JSON Schemas."""

from agentq.schemas.config import Config
from agentq.schemas.errors import AgentqError
from agentq.schemas.events import EVENT_MODELS, StoredEvent
from agentq.schemas.job import JobState, JobView

__all__ = ["EVENT_MODELS", "AgentqError", "Config", "JobState", "JobView", "StoredEvent"]
