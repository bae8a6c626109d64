"""Inputs and outputs of the six agent tools."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import Field, field_validator

from agentq.schemas._base import WireModel
from agentq.schemas.job import AGENT_ID_PATTERN, JobState, JobView, OnDependencyFailure, Priority

METADATA_MAX_BYTES = 16 * 1024


class DispatchInput(WireModel):
    target: str = Field(pattern=AGENT_ID_PATTERN)
    task: str = Field(min_length=1, max_length=50_000)
    label: str | None = Field(default=None, max_length=500)
    project: str | None = Field(default=None, max_length=500)
    model: str | None = Field(default=None, max_length=200)
    thinking: str | None = Field(default=None, max_length=200)
    timeout_seconds: float | None = Field(default=None, ge=0)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    priority: Priority = "normal"
    delay_seconds: float = Field(default=0, ge=0, le=365 * 86400)
    depends_on: list[str] = Field(default_factory=list, max_length=20)
    on_dependency_failure: OnDependencyFailure = "fail"
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    metadata: dict[str, Any] | None = None
    origin: dict[str, Any] | None = None
    session_key: str | None = Field(default=None, max_length=1000)
    parent_job_id: str | None = None
    announce: bool = False

    @field_validator("metadata")
    @classmethod
    def _metadata_small(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(orjson.dumps(value)) > METADATA_MAX_BYTES:
            raise ValueError(f"metadata is larger than {METADATA_MAX_BYTES} bytes as JSON")
        return value

    @field_validator("depends_on")
    @classmethod
    def _no_repeats(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("dependsOn lists a job twice")
        return value


class JobIdInput(WireModel):
    job_id: str = Field(min_length=1, max_length=200)


class StatusInput(JobIdInput):
    pass


class HistoryInput(JobIdInput):
    pass


class WaitInput(JobIdInput):
    timeout_seconds: float = Field(default=60, ge=1, le=600)


class ListInput(WireModel):
    agent: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    dispatched_by: str | None = Field(default=None, pattern=AGENT_ID_PATTERN)
    state: list[JobState] | None = None
    limit: int = Field(default=20, ge=1, le=100)
    cursor: str | None = None


class ActivityInput(WireModel):
    agents: list[str] | None = None


class ListOutput(WireModel):
    jobs: list[JobView]
    count: int
    next_cursor: str | None = None


class DrainOutput(WireModel):
    agent: str
    drained: int
    job_ids: list[str]
