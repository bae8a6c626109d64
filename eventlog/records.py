"""State records: the hash a script keeps per job, and how it reads as a view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from agentq.schemas._base import micros_to_iso
from agentq.schemas.job import JobView, Progress

_INT_FIELDS = ("attempt", "maxAttempts", "budgetFrom", "createdAt", "queuedAt", "startedAt",
               "finishedAt", "runAt")
_JSON_FIELDS = ("spec", "result", "progress")


# The field of a state record that says its result is kept in a key of its own
# (``Partition.result``): only then is that key read.
LONG_RESULT: Final = "longResult"


def with_kept_apart(record: dict[str, str], spec: str | None, result: str | None
                    ) -> dict[str, str]:
    """A state record with its spec and long result, read from their own keys, put
    in, and its ``longResult`` mark taken out (``{}`` stays ``{}``: no job). A
    record written before either had a key of its own holds it already."""
    if record:
        if spec is not None:
            record["spec"] = spec
        marked = record.pop(LONG_RESULT, None) is not None
        if marked and result is not None and "result" not in record:
            record["result"] = result
    return record


def last_event_id(events: str) -> str:
    """The job's latest event id, from its record's ``events`` field (a record
    written before the log chained a job's events kept every id there, oldest
    first)."""
    return events.rsplit(" ", 1)[-1]


def normalize(record: Mapping[str, str]) -> dict[str, Any]:
    """A raw state record with its numbers and JSON fields parsed, for comparison."""
    out: dict[str, Any] = {}
    for name, value in record.items():
        if name in _INT_FIELDS:
            out[name] = int(value)
        elif name in _JSON_FIELDS:
            out[name] = orjson.loads(value)
        elif name == "events":
            out[name] = last_event_id(value)
        else:
            out[name] = value
    return out


def denormalize(record: Mapping[str, Any]) -> dict[str, str]:
    """A normalized record (as :mod:`agentq.eventlog.fold` makes) back in the raw form
    the scripts store, so that it reads as the same view."""
    out: dict[str, str] = {}
    for name, value in record.items():
        if name in _JSON_FIELDS:
            out[name] = orjson.dumps(value).decode()
        else:
            out[name] = str(value)
    return out


# Spec fields the view shows under the same name. The spec leaves out defaults
# and empty values, so they are copied when present and the view's defaults
# stand for the rest: validating fewer fields is most of what makes this fast.
_SPEC_FIELDS = ("target", "dispatchedBy", "task", "label", "project", "priority", "model",
                "thinking", "timeoutSeconds", "dependsOn", "onDependencyFailure",
                "idempotencyKey", "parentJobId", "depth", "announce", "origin", "metadata")
_TIME_FIELDS = ("createdAt", "queuedAt", "startedAt", "finishedAt", "runAt")
_validate_view = JobView.__pydantic_validator__.validate_python


def to_view(job_id: str, record: Mapping[str, str], *, with_session_key: bool = False) -> JobView:
    """The job view of a raw state record (``dependencies`` left empty); ``sessionKey``
    only when asked for (it is sensitive: system agents and handlers only)."""
    return view_of_spec(job_id, orjson.loads(record["spec"]), record,
                        with_session_key=with_session_key)


def view_of_spec(
    job_id: str, spec: Mapping[str, Any], record: Mapping[str, Any], *,
    with_session_key: bool = False,
) -> JobView:
    """The view of a record whose spec is already parsed; times and counts may
    be numbers or their digits."""
    state = record["state"]
    fields: dict[str, Any] = {name: spec[name] for name in _SPEC_FIELDS if name in spec}
    if with_session_key and "sessionKey" in spec:
        fields["sessionKey"] = spec["sessionKey"]
    fields["jobId"] = job_id
    fields["state"] = state
    fields["attempt"] = int(record["attempt"])
    fields["maxAttempts"] = int(record["maxAttempts"])
    if state == "waiting_dependencies":
        fields["waitingForDependencies"] = True
    for name in _TIME_FIELDS:
        value = record.get(name)
        if value is not None:
            fields[name] = micros_to_iso(int(value))
    if (result := record.get("result")) is not None:
        fields["result"] = orjson.loads(result)
    if (error := record.get("error")) is not None:
        fields["error"] = error
    if progress := record.get("progress"):
        fields["progress"] = Progress.model_validate_json(progress)
    view: JobView = _validate_view(fields)
    return view
