"""Inputs and outputs of the six agent tools."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import ComputedFieldInfo, FieldInfo

from agentq.schemas._base import WireModel, check_json_input
from agentq.schemas.events import StoredEvent
from agentq.schemas.job import AGENT_ID_PATTERN, JobState, JobView, OnDependencyFailure, Priority

METADATA_MAX_BYTES = 16 * 1024
_JOB_ID = ('The job\'s id, as queue_dispatch or queue_list return it: "j_", 26 letters and '
           'digits, a dot and the target agent (at most 200 characters in all).')


def _title(name: str, info: FieldInfo | ComputedFieldInfo) -> str:
    """A parameter's title from its Python name: ``timeout_seconds`` is "Timeout seconds"."""
    words = name.split("_")
    text = " ".join(words).capitalize()
    return text[:-2] + "ID" if words[-1] == "id" else text


class ToolInput(WireModel):
    """A tool's input. Each field's description is written for a language model choosing
    arguments (what it means, its default, its limits); MCP clients show it as is."""

    model_config = ConfigDict(field_title_generator=_title)

    @model_validator(mode="before")
    @classmethod
    def _fit_for_json(cls, data: Any) -> Any:
        # Anywhere in the input, metadata and origin included: raises InvalidInput
        # with the inner path, which a field validator could not name.
        check_json_input(data)
        return data


class DispatchInput(ToolInput):
    target: str = Field(
        pattern=AGENT_ID_PATTERN,
        description="The agent that is to run the task: a known agent id, lower-case (e.g. "
        '"researcher"). The server\'s instructions list the agents this caller may dispatch to.',
    )
    task: str = Field(
        min_length=1, max_length=50_000,
        description="What the target agent is to do, in plain words: the whole instruction it "
        "receives, with everything it needs to know. Required; 1 to 50,000 characters.",
    )
    label: str | None = Field(
        default=None, max_length=500,
        description='A short name for the job, shown in lists and activity (e.g. "find sources"). '
        "Optional; at most 500 characters.",
    )
    project: str | None = Field(
        default=None, max_length=500,
        description="A project the job belongs to, to group related jobs. Optional; at most 500 "
        "characters.",
    )
    model: str | None = Field(
        default=None, max_length=200,
        description="The model the target is to use for this job, handed to it as given. "
        "Optional (default: the target's own choice); at most 200 characters.",
    )
    thinking: str | None = Field(
        default=None, max_length=200,
        description='How hard the target is to think (e.g. "low", "high"), handed to it as given. '
        "Optional (default: the target's own choice); at most 200 characters.",
    )
    timeout_seconds: float | None = Field(
        default=None, ge=0,
        description="Seconds one attempt may run before it is stopped and counts as failed; 0 "
        "means no limit. Default: the target agent's configured timeout, else the global one "
        "(0 unless configured).",
    )
    max_attempts: int | None = Field(
        default=None, ge=1, le=20,
        description="How many times the job is tried before it is marked failed, 1 to 20. "
        "Default: the target agent's configured maxAttempts, else the global one (3 unless "
        "configured).",
    )
    priority: Priority = Field(
        default="normal",
        description='Order among the target\'s waiting jobs: "high" runs before "normal", '
        '"normal" before "low"; first in, first out within a priority. Default "normal".',
    )
    delay_seconds: float = Field(
        default=0, ge=0, le=365 * 86400,
        description="Seconds to wait before the job may start, 0 to 31,536,000 (a year). "
        "Default 0: ready at once.",
    )
    depends_on: list[str] = Field(
        default_factory=list, max_length=20,
        description="Ids of jobs that must end before this one starts; their results are handed "
        "to it. At most 20, no repeats, each an existing job this caller dispatched or that "
        "targets it. Default: none.",
    )
    on_dependency_failure: OnDependencyFailure = Field(
        default="fail",
        description='When a dependency fails or is cancelled: "fail" fails this job too '
        '(default); "ignore" runs it anyway.',
    )
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Makes a repeated dispatch safe: a second dispatch with the same key from the "
        "same caller returns the first job and creates nothing. Optional; 1 to 200 characters.",
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description='Any JSON object kept with the job and returned with it (e.g. {"ticket": '
        '"T-1"}). Optional; at most 16 KB as JSON.',
    )
    origin: dict[str, Any] | None = Field(
        default=None,
        description="Where the request came from in the dispatcher's runtime (e.g. channel, "
        "accountId, threadId), kept with the job and never put into alerts. Optional.",
    )
    session_key: str | None = Field(
        default=None, max_length=1000,
        description="An opaque session key from the dispatcher's runtime; shown only to system "
        "agents and the target's handler. Optional; at most 1,000 characters.",
    )
    parent_job_id: str | None = Field(
        default=None,
        description="The id of the job this caller is running inside, if any: the new job is its "
        "child, one level deeper (nesting past the configured limit, 3 by default, is refused). "
        "Omit when not running inside a job.",
    )
    announce: bool = Field(
        default=False,
        description="When true, a new job telling how this one ended (completed, failed or "
        "cancelled, with its result or error) is dispatched back to this caller: a way to hear "
        "back without calling queue_wait. Default false.",
    )
    requires_approval: bool | None = Field(
        default=None,
        description="When true, the job waits in state pending_approval until an approver "
        "approves it (queue_approve) or rejects it (queue_reject); nothing runs before. "
        "Default: the target agent's configured requiresApproval, else false.",
    )

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


class JobIdInput(ToolInput):
    job_id: str = Field(min_length=1, max_length=200, description=_JOB_ID)


class StatusInput(JobIdInput):
    pass


class HistoryInput(JobIdInput):
    pass


class ApproveInput(JobIdInput):
    note: str | None = Field(
        default=None, max_length=2000,
        description="Why the job is approved, kept in its history (JobApproved). Optional; at "
        "most 2,000 characters.",
    )


class RejectInput(JobIdInput):
    reason: str | None = Field(
        default=None, max_length=2000,
        description="Why the job is rejected, kept in its history (JobRejected); the job is "
        "cancelled. Optional; at most 2,000 characters.",
    )


class WaitInput(JobIdInput):
    timeout_seconds: float = Field(
        default=60, ge=1, le=600,
        description="How long to wait for the job to end, in seconds, 1 to 600. Default 60. "
        "When it passes, the job comes back as it stands with timedOut true: call again to "
        "keep waiting.",
    )


def _one_or_many(value: object) -> object:
    """One state given alone is a list of one."""
    return [value] if isinstance(value, str) else value


_States = Annotated[list[JobState], Field(min_length=1)]


class ListInput(ToolInput):
    agent: str | None = Field(
        default=None, pattern=AGENT_ID_PATTERN,
        description="Only jobs whose target is this agent. Default: jobs of any target.",
    )
    dispatched_by: str | None = Field(
        default=None, pattern=AGENT_ID_PATTERN,
        description="Only jobs dispatched by this agent. Default: jobs of any dispatcher.",
    )
    state: Annotated[
        _States | None,
        BeforeValidator(_one_or_many, json_schema_input_type=JobState | _States | None),
    ] = Field(
        default=None,
        description='Only jobs in this state, or in any of these states: one state ("failed") '
        'or a list (["queued", "active"]). States: waiting_dependencies, delayed, queued, '
        "active, completed, failed, cancelled. Default: every state.",
    )
    limit: int = Field(
        default=20, ge=1, le=100,
        description="At most this many jobs in the page, 1 to 100. Default 20.",
    )
    cursor: str | None = Field(
        default=None,
        description="Where the page starts: the nextCursor of the page before. Omit for the "
        "first page (the newest jobs).",
    )


class ActivityInput(ToolInput):
    agents: list[Annotated[str, Field(pattern=AGENT_ID_PATTERN)]] | None = Field(
        default=None,
        description="Only these agents (known agent ids). Default: every agent the caller may "
        "see, which for an agent other than a system agent is itself and the agents it may "
        "dispatch to.",
    )


class ListOutput(WireModel):
    jobs: list[JobView]
    count: int
    next_cursor: str | None = None


class WaitOutput(JobView):
    """queue_wait's answer: the job view, and whether the wait ended before the job did."""

    timed_out: bool


class HistoryOutput(WireModel):
    job_id: str
    events: list[StoredEvent]


class CurrentJob(WireModel):
    job_id: str
    label: str | None = None
    task: str


class AgentActivity(WireModel):
    status: Literal["offline", "idle", "working"]
    queued: int
    delayed: int
    waiting_dependencies: int
    active: int
    completed: int
    failed: int
    current_jobs: list[CurrentJob]
    last_activity_at: str | None = None
    workers: int


class ActivitySummary(WireModel):
    agents: int
    offline: int
    idle: int
    working: int
    queued: int
    delayed: int
    waiting_dependencies: int
    active: int
    completed: int
    failed: int


class ActivityOutput(WireModel):
    """queue_activity's answer (the tool builds it as a plain dict; this is its schema)."""

    agents: dict[str, AgentActivity]
    summary: ActivitySummary


class DrainOutput(WireModel):
    agent: str
    drained: int
    job_ids: list[str]
