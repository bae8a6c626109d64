"""Job states, the transitions between them, and the job view."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import Field, field_validator

from agentq.schemas._base import WireModel
from agentq.schemas.errors import InvalidInput
from agentq.schemas.words import AGENT_ID_PATTERN as AGENT_ID_PATTERN  # re-exported
from agentq.schemas.words import AGENT_ID_RE as AGENT_ID_RE
from agentq.schemas.words import JOB_ID_RE as JOB_ID_RE
from agentq.schemas.words import STATES as STATES
from agentq.schemas.words import TERMINAL_STATES as TERMINAL_STATES
from agentq.schemas.words import JobState as JobState
from agentq.schemas.words import agent_of_job as agent_of_job

Priority = Literal["high", "normal", "low"]
OnDependencyFailure = Literal["fail", "ignore"]

# SPEC's table of legal transitions; None is "not yet dispatched".
LEGAL_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"pending_approval", "waiting_dependencies", "delayed", "queued"}),
    # Approved (to where its dependencies and delay put it), or rejected or cancelled.
    "pending_approval": frozenset({"waiting_dependencies", "delayed", "queued", "cancelled"}),
    "waiting_dependencies": frozenset({"queued", "delayed", "failed", "cancelled"}),
    "delayed": frozenset({"queued", "cancelled"}),
    "queued": frozenset({"active", "cancelled"}),
    "active": frozenset({"completed", "queued", "delayed", "failed", "cancelled"}),
    # waiting_dependencies: re-armed because the dependency that failed it was retried.
    "failed": frozenset({"queued", "waiting_dependencies"}),
    "completed": frozenset(),
    "cancelled": frozenset(),
}



def check_agent_id(value: object, path: str) -> str:
    """``value`` when it is an agent id (SPEC's "Words"), else InvalidInput naming
    ``path``: an id is never rewritten (no lower-casing, no trimming)."""
    if isinstance(value, str) and AGENT_ID_RE.fullmatch(value):
        return value
    raise InvalidInput(
        f"Invalid input: {path}: not an agent id: {value!r} (use {AGENT_ID_PATTERN})", path=path
    )


class Progress(WireModel):
    percent: float = Field(ge=0, le=100)
    message: str | None = None


class DependencyView(WireModel):
    state: JobState | Literal["unknown"]
    result: Any = None
    error: str | None = None


class JobView(WireModel):
    """A job as every tool returns it. Times are ISO-8601 UTC strings."""

    job_id: str
    target: str
    dispatched_by: str
    task: str
    label: str | None = None
    project: str | None = None
    state: JobState
    attempt: int = 0
    max_attempts: int
    priority: Priority = "normal"
    model: str | None = None
    thinking: str | None = None
    timeout_seconds: float = 0
    depends_on: list[str] = Field(default_factory=list)
    waiting_for_dependencies: bool = False
    dependencies: dict[str, DependencyView] = Field(default_factory=dict)
    on_dependency_failure: OnDependencyFailure = "fail"
    result: Any = None
    error: str | None = None
    progress: Progress | None = None
    created_at: str
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    run_at: str | None = None
    idempotency_key: str | None = None
    parent_job_id: str | None = None
    depth: int = 0
    announce: bool = False
    session_key: str | None = None
    origin: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("timeout_seconds", mode="before")
    @classmethod
    def _null_timeout_is_none(cls, value: Any) -> Any:
        # An older version stored a non-finite timeoutSeconds as null; such a job
        # must still read (and run), as one without a timeout.
        return 0 if value is None else value
