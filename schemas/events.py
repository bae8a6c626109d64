"""The events of the log: one model per type, the stored envelope, and upcasting.

In Redis an event is a stream entry with the fields ``type``, ``jobId``, ``v``,
``at`` (epoch microseconds), ``actor`` and ``data`` (JSON; times inside it are
epoch microseconds too). As ``history`` and ``replay`` print it, it is a
:class:`StoredEvent` whose times are ISO-8601 strings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Final, Literal

from pydantic import Field

from agentq.schemas._base import WireModel
from agentq.schemas.job import JobState, OnDependencyFailure, Priority

EventType = Literal[
    "JobDispatched",
    "JobQueued",
    "JobDelayed",
    "JobStarted",
    "JobProgress",
    "JobCompleted",
    "JobAttemptFailed",
    "JobStalled",
    "JobFailed",
    "JobRetried",
    "JobCancelled",
    "DependencyResolved",
    "JobApproved",
    "JobRejected",
]


class JobDispatched(WireModel):
    """A job was created. ``state`` is where it starts: waiting, delayed or queued."""

    target: str
    dispatched_by: str
    task: str
    label: str | None = None
    project: str | None = None
    model: str | None = None
    thinking: str | None = None
    timeout_seconds: float = 0
    max_attempts: int
    priority: Priority = "normal"
    depends_on: list[str] = Field(default_factory=list)
    on_dependency_failure: OnDependencyFailure = "fail"
    idempotency_key: str | None = None
    parent_job_id: str | None = None
    depth: int = 0
    announce: bool = False
    session_key: str | None = None
    origin: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    # The W3C trace context of the dispatch's send span, when it was traced.
    traceparent: str | None = None
    state: Literal["pending_approval", "waiting_dependencies", "delayed", "queued"]
    run_at: str | None = None
    requires_approval: bool = False


class JobQueued(WireModel):
    """A delayed job came due, or a waiting job's dependencies were all resolved."""

    reason: Literal["due", "released"]


class JobDelayed(WireModel):
    """A waiting job was released but its delay has not passed yet."""

    run_at: str
    reason: Literal["released"] = "released"


class JobStarted(WireModel):
    """A worker took the job: attempt ``attempt`` under a lease."""

    attempt: int
    worker_id: str
    lease_seconds: float


class JobProgress(WireModel):
    attempt: int
    percent: float
    message: str | None = None


class JobCompleted(WireModel):
    attempt: int
    result: Any = None


class JobAttemptFailed(WireModel):
    """An attempt failed with attempts left; the job waits (``delayed``) or is re-queued."""

    attempt: int
    error: str
    state: Literal["queued", "delayed"]
    run_at: str | None = None


class JobStalled(WireModel):
    """The attempt's lease expired; the attempt is used up and the job goes back.
    With ``released``, a stopping worker handed the attempt back before it ended:
    the job is queued again and the attempt is not charged."""

    attempt: int
    worker_id: str | None = None
    state: Literal["queued", "delayed"]
    run_at: str | None = None
    released: bool = False


class JobFailed(WireModel):
    """The job is dead-lettered. ``dependencyId`` names the dependency that failed it."""

    attempt: int
    error: str
    reason: Literal["attempts_exhausted", "lease_expired", "dependency_failed", "poison"]
    dependency_id: str | None = None


class JobRetried(WireModel):
    """A failed job was re-queued with a fresh budget of attempts counted from
    ``attempt``; or, with ``state`` waiting_dependencies, a job that failed only
    because of dependency ``dependencyId`` waits for it again (it was retried)."""

    attempt: int
    state: Literal["queued", "waiting_dependencies"] = "queued"
    dependency_id: str | None = None


class JobCancelled(WireModel):
    """The job was cancelled. ``reason`` parent_cancelled: an ancestor was cancelled
    with ``cascade``; with ``cascade`` the job's own descendants are cancelled too."""

    from_state: JobState
    reason: Literal["cancel", "drain", "parent_cancelled"]
    cascade: bool = False
    parent_job_id: str | None = None


class JobApproved(WireModel):
    """A job pending approval was approved by the event's actor; ``state`` is where
    its dependencies and delay put it."""

    state: Literal["waiting_dependencies", "delayed", "queued"]
    note: str | None = None
    run_at: str | None = None


class JobRejected(WireModel):
    """A job pending approval was rejected by the event's actor: it is cancelled."""

    reason: str | None = None


class DependencyResolved(WireModel):
    dependency_id: str
    state: JobState
    result: Any = None
    error: str | None = None


# -- schedules ---------------------------------------------------------------
# A schedule's events go to its target's schedule log (``{A}:schedules:log``),
# never to the job log: no job reader ever meets one.

ScheduleEventType = Literal["ScheduleAdded", "ScheduleRemoved", "SchedulePaused",
                            "ScheduleResumed"]


class ScheduleAdded(WireModel):
    """A schedule was added: at each tick of ``cron`` (in ``timezone``) it dispatches
    the job ``spec`` describes (the stored spec of a dispatch, without an id)."""

    target: str
    cron: str
    timezone: str
    spec: dict[str, Any]
    next_tick: str


class ScheduleRemoved(WireModel):
    """A schedule was removed; it dispatches nothing more."""


class SchedulePaused(WireModel):
    """A schedule was paused: its ticks pass without a job until it is resumed."""


class ScheduleResumed(WireModel):
    """A paused schedule was resumed; ticks missed while paused are not dispatched."""

    next_tick: str


SCHEDULE_EVENT_MODELS: Final[dict[str, type[WireModel]]] = {
    "ScheduleAdded": ScheduleAdded,
    "ScheduleRemoved": ScheduleRemoved,
    "SchedulePaused": SchedulePaused,
    "ScheduleResumed": ScheduleResumed,
}


class StoredScheduleEvent(WireModel):
    """A schedule's event as ``schedule history`` prints it: like a job's, with the
    schedule's name where a job's event has its job id."""

    event_id: str
    type: ScheduleEventType
    schedule: str
    agent: str
    at: str
    actor: str
    v: int
    data: dict[str, Any]


EVENT_MODELS: Final[dict[str, type[WireModel]]] = {
    "JobDispatched": JobDispatched,
    "JobQueued": JobQueued,
    "JobDelayed": JobDelayed,
    "JobStarted": JobStarted,
    "JobProgress": JobProgress,
    "JobCompleted": JobCompleted,
    "JobAttemptFailed": JobAttemptFailed,
    "JobStalled": JobStalled,
    "JobFailed": JobFailed,
    "JobRetried": JobRetried,
    "JobCancelled": JobCancelled,
    "DependencyResolved": DependencyResolved,
    "JobApproved": JobApproved,
    "JobRejected": JobRejected,
}

# The version each type is written with today. The Lua scripts write the same
# numbers; a test holds them together.
CURRENT_VERSIONS: Final[dict[str, int]] = {name: 1 for name in EVENT_MODELS}

# The state a job is in after an event of each type; None: the type does not
# change the state; "data": the event's own ``state`` field says.
STATE_AFTER: Final[dict[str, JobState | Literal["data"] | None]] = {
    "JobDispatched": "data",
    "JobQueued": "queued",
    "JobDelayed": "delayed",
    "JobStarted": "active",
    "JobProgress": None,
    "JobCompleted": "completed",
    "JobAttemptFailed": "data",
    "JobStalled": "data",
    "JobFailed": "failed",
    "JobRetried": "data",
    "JobCancelled": "cancelled",
    "DependencyResolved": None,
    "JobApproved": "data",
    "JobRejected": "cancelled",
}

# The states a job can leave with an event of each type (from SPEC's table of
# transitions); "" for none. JobCancelled names its own in ``fromState``.
STATES_BEFORE: Final[dict[str, str]] = {
    "JobDispatched": "",
    "JobQueued": "delayed,waiting_dependencies",
    "JobDelayed": "waiting_dependencies",
    "JobStarted": "queued",
    "JobCompleted": "active",
    "JobAttemptFailed": "active",
    "JobStalled": "active",
    "JobFailed": "active,waiting_dependencies",
    "JobRetried": "failed",
    "JobCancelled": "*",
    "JobApproved": "pending_approval",
    "JobRejected": "pending_approval",
}

# Fields inside ``data`` that hold times (epoch microseconds when stored).
TIME_FIELDS: Final[frozenset[str]] = frozenset({"runAt"})

# Payloads kept once: the field of a type's data that can be long. The spec
# (``{A}:spec:<job>``) holds the task and the state record the result; the
# log's entry carries, when the payload's JSON is longer than
# PAYLOAD_INLINE_MAX bytes, the payload's SHA-256 (hex) in the field
# ``<field>Sha256`` at the payload's place instead. The event keeps its
# version: the reference is how the log stores it, never what a reader sees
# (``eventlog.reader.with_payloads`` puts the payload back).
PAYLOAD_FIELDS: Final[dict[str, str]] = {"JobDispatched": "task", "JobCompleted": "result"}
# 72: ``"task":`` and 72 bytes of JSON take as much room as the reference
# ``"taskSha256":"<64 hex digits>"`` (79 bytes); up to there the payload stays
# inline, where it costs no more and needs no read to put back.
PAYLOAD_INLINE_MAX: Final = 72


def digest_field(field: str) -> str:
    """The name a payload's digest takes in a stored event's data."""
    return f"{field}Sha256"


def payload_digest(payload_json: bytes) -> str:
    """The SHA-256 (hex) that stands for a payload in the log: of the payload's
    JSON text, as the record holds it (a result) or as it stands in the spec (a
    task: its JSON string)."""
    return hashlib.sha256(payload_json).hexdigest()

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# (type, version) -> function turning that version's data into version + 1's.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcast(event_type: str, version: int, data: dict[str, Any]) -> dict[str, Any]:
    """Step ``data`` written at ``version`` up to the type's current version.

    Raises ValueError for a type or version this code cannot read.
    """
    current = CURRENT_VERSIONS.get(event_type)
    if current is None:
        raise ValueError(f"unknown event type {event_type!r}")
    if version > current:
        raise ValueError(f"{event_type} v{version} is newer than this agentq (v{current})")
    while version < current:
        step = UPCASTERS.get((event_type, version))
        if step is None:
            raise ValueError(f"no upcaster from {event_type} v{version}")
        data = step(data)
        version += 1
    return data


class StoredEvent(WireModel):
    """An event as ``history`` and ``replay`` print it."""

    event_id: str
    type: EventType
    job_id: str
    agent: str
    at: str
    actor: str
    v: int
    data: dict[str, Any]

    @classmethod
    def of_log(
        cls, event_id: str, type: str, job_id: str, agent: str, at: str, actor: str, v: int,
        data: dict[str, Any],
    ) -> StoredEvent:
        """The event built without validation, from values read back from the log
        (checked when written; the type one this version reads, see
        ``reader.readable``): a job's history of 10,000 events spent half its
        time validating them again. Equal to the validated model (a test holds
        them together); pydantic's ``model_construct`` does the same, slower."""
        event = cls.__new__(cls)
        _set(event, "__dict__", {
            "event_id": event_id, "type": type, "job_id": job_id, "agent": agent, "at": at,
            "actor": actor, "v": v, "data": data,
        })
        _set(event, "__pydantic_fields_set__", set(_STORED_FIELDS))
        _set(event, "__pydantic_extra__", None)
        _set(event, "__pydantic_private__", None)
        return event


_set = object.__setattr__
_STORED_FIELDS: Final[frozenset[str]] = frozenset(StoredEvent.model_fields)
