"""The wire types: events, the job view, tool inputs, config, errors. Imports
nothing else of agentq's; ``python -m schemas.export`` writes their JSON Schemas."""

from schemas.config import Config
from schemas.errors import AgentqError
from schemas.events import EVENT_MODELS, StoredEvent
from schemas.job import JobState, JobView

__all__ = ["EVENT_MODELS", "AgentqError", "Config", "JobState", "JobView", "StoredEvent"]
