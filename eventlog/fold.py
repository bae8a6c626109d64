"""The fold: a job's state record rebuilt from its events.

It mirrors, event type by event type, what the Lua scripts write, in the
normalized form of :func:`eventlog.records.normalize`. Rebuilding a record and
comparing it with the live one is how tests and ``audit verify`` check rule 1.

Events read with their payloads (``reader.with_payloads``) fold into the
record as it is. A payload the log holds by reference folds into its digest:
the spec's ``taskSha256`` (and no ``task``), the record's ``resultSha256``
(and no ``result``); ``audit verify`` compares those with the live record's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agentq.eventlog.keys import PRIORITY_CODES
from agentq.eventlog.reader import RawEvent, readable
from agentq.schemas.events import PAYLOAD_FIELDS, digest_field

Record = dict[str, Any]
_RESULT = PAYLOAD_FIELDS["JobCompleted"]
_RESULT_DIGEST = digest_field(_RESULT)


def _requeue(record: Record, event: RawEvent) -> None:
    record["state"] = event.data["state"]
    if event.data["state"] == "queued":
        record["queuedAt"] = event.at
    else:
        record["runAt"] = event.data["runAt"]


def apply(record: Record | None, event: RawEvent) -> Record:
    """The record after ``event``; ``record`` is None before the job's first event."""
    if record is not None and not readable(event):
        # A newer agentq's event: its id is on the record all the same.
        return {**record, "events": event.event_id}
    kind, data, at = event.type, event.data, event.at
    if record is None:
        if kind != "JobDispatched":
            raise ValueError(f"{event.job_id}: first event is {kind}, not JobDispatched")
        spec = {k: v for k, v in data.items() if k not in ("state", "runAt")}
        record = {
            "spec": spec,
            "maxAttempts": data["maxAttempts"],
            "attempt": 0,
            "budgetFrom": 0,
            "prio": PRIORITY_CODES[data.get("priority", "normal")],
            "createdAt": at,
            "state": data["state"],
            "events": event.event_id,
        }
        if data["state"] == "queued":
            record["queuedAt"] = at
        elif "runAt" in data:
            record["runAt"] = data["runAt"]
        return record

    record = {**record, "events": event.event_id}
    if kind == "JobQueued":
        record.update(state="queued", queuedAt=at)
        record.pop("runAt", None)
    elif kind == "JobDelayed":
        record.update(state="delayed", runAt=data["runAt"])
    elif kind == "JobStarted":
        record.update(state="active", attempt=data["attempt"], startedAt=at)
        record.pop("progress", None)
        record.pop("runAt", None)
    elif kind == "JobProgress":
        record["progress"] = {k: v for k, v in data.items() if k != "attempt"}
    elif kind == "JobCompleted":
        record.update(state="completed", finishedAt=at)
        if _RESULT_DIGEST in data and _RESULT not in data:
            record[_RESULT_DIGEST] = data[_RESULT_DIGEST]  # held by reference
        else:
            record[_RESULT] = data.get(_RESULT)
        record.pop("error", None)
    elif kind == "JobAttemptFailed":
        record["error"] = data["error"]
        _requeue(record, event)
    elif kind == "JobStalled" and data.get("released"):
        # Handed back by a stopping worker: the attempt is not charged.
        record["budgetFrom"] = record["budgetFrom"] + 1
        _requeue(record, event)
    elif kind == "JobStalled":
        record["error"] = "lease expired"
        _requeue(record, event)
    elif kind == "JobFailed":
        record.update(state="failed", error=data["error"], finishedAt=at)
        if data["reason"] == "dependency_failed":
            record["failedBy"] = data["dependencyId"]
    elif kind == "JobRetried" and data.get("state") == "waiting_dependencies":
        record["state"] = "waiting_dependencies"
        record.pop("finishedAt", None)
        record.pop("failedBy", None)
    elif kind == "JobRetried":
        record.update(state="queued", budgetFrom=data["attempt"], queuedAt=at)
        record.pop("finishedAt", None)
        record.pop("failedBy", None)
    elif kind == "JobCancelled":
        record.update(state="cancelled", finishedAt=at)
        record.pop("runAt", None)
    elif kind == "DependencyResolved":
        if (record["state"] == "pending_approval" and data["state"] != "completed"
                and record["spec"].get("onDependencyFailure") != "ignore"
                and "failedBy" not in record):
            # Kept until the job is approved, which then fails it (approve.lua).
            record.update(failedBy=data["dependencyId"],
                          error=f"dependency {data['dependencyId']} {data['state']}")
    elif kind == "JobApproved":
        record["state"] = data["state"]
        if data["state"] == "queued":
            record["queuedAt"] = at
            record.pop("runAt", None)
    elif kind == "JobRejected":
        record.update(state="cancelled", finishedAt=at)
        record.pop("runAt", None)
    else:
        raise ValueError(f"{event.job_id}: unknown event type {kind}")
    return record


def records_from(events: Iterable[RawEvent]) -> dict[str, Record]:
    """Every job's record from a stream of events, keyed by job id."""
    records: dict[str, Record] = {}
    for event in events:
        record = records.get(event.job_id)
        if record is not None or readable(event):
            records[event.job_id] = apply(record, event)
    return records
