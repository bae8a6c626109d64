"""Job states, the transitions between them, and the job view."""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import Field

from agentq.schemas._base import WireModel

JobState = Literal[
    "waiting_dependencies", "delayed", "queued", "active", "completed", "failed", "cancelled"
]
Priority = Literal["high", "normal", "low"]
OnDependencyFailure = Literal["fail", "ignore"]

STATES: Final[tuple[JobState, ...]] = (
    "waiting_dependencies",
    "delayed",
    "queued",
    "active",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL_STATES: Final[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})

# SPEC's table of legal transitions; None is "not yet dispatched".
LEGAL_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"waiting_dependencies", "delayed", "queued"}),
    "waiting_dependencies": frozenset({"queued", "delayed", "failed", "cancelled"}),
    "delayed": frozenset({"queued", "cancelled"}),
    "queued": frozenset({"active", "cancelled"}),
    "active": frozenset({"completed", "queued", "delayed", "failed", "cancelled"}),
    # waiting_dependencies: re-armed because the dependency that failed it was retried.
    "failed": frozenset({"queued", "waiting_dependencies"}),
    "completed": frozenset(),
    "cancelled": frozenset(),
}

AGENT_ID_PATTERN: Final[str] = r"^[a-z0-9][a-z0-9_-]{0,63}$"
AGENT_ID_RE: Final[re.Pattern[str]] = re.compile(AGENT_ID_PATTERN)
# A job id is "j_" + a 26-character ULID + "." + the target agent. The agent part
# lets any process find the job's partition without a global lookup.
JOB_ID_RE: Final[re.Pattern[str]] = re.compile(
    r"^j_[0-9A-HJKMNP-TV-Z]{26}\.([a-z0-9][a-z0-9_-]{0,63})$"
)


def agent_of_job(job_id: str) -> str | None:
    """The target agent encoded in a job id, or None when it is not a well-formed job id."""
    match = JOB_ID_RE.match(job_id)
    return match.group(1) if match else None


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
