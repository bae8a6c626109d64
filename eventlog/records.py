"""State records: the hash a script keeps per job, and how it reads as a view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from schemas._base import micros_to_iso
from schemas.job import JobView, Progress

_INT_FIELDS = ("attempt", "maxAttempts", "budgetFrom", "createdAt", "queuedAt", "startedAt",
               "finishedAt", "runAt")
_JSON_FIELDS = ("spec", "result", "progress")


def normalize(record: Mapping[str, str]) -> dict[str, Any]:
    """A raw state record with its numbers and JSON fields parsed, for comparison."""
    out: dict[str, Any] = {}
    for name, value in record.items():
        if name in _INT_FIELDS:
            out[name] = int(value)
        elif name in _JSON_FIELDS:
            out[name] = orjson.loads(value)
        elif name == "events":
            out[name] = value.split(" ")
        else:
            out[name] = value
    return out


def _time(record: Mapping[str, str], name: str) -> str | None:
    value = record.get(name)
    return micros_to_iso(int(value)) if value is not None else None


def to_view(job_id: str, record: Mapping[str, str], *, with_session_key: bool = True) -> JobView:
    """The job view of a raw state record (``dependencies`` left empty)."""
    spec = orjson.loads(record["spec"])
    progress = record.get("progress")
    result = record.get("result")
    state = record["state"]
    return JobView.model_validate(
        {
            "jobId": job_id,
            "target": spec["target"],
            "dispatchedBy": spec["dispatchedBy"],
            "task": spec["task"],
            "label": spec.get("label"),
            "project": spec.get("project"),
            "state": state,
            "attempt": int(record["attempt"]),
            "maxAttempts": int(record["maxAttempts"]),
            "priority": spec.get("priority", "normal"),
            "model": spec.get("model"),
            "thinking": spec.get("thinking"),
            "timeoutSeconds": spec.get("timeoutSeconds", 0),
            "dependsOn": spec.get("dependsOn", []),
            "waitingForDependencies": state == "waiting_dependencies",
            "onDependencyFailure": spec.get("onDependencyFailure", "fail"),
            "result": orjson.loads(result) if result is not None else None,
            "error": record.get("error"),
            "progress": Progress.model_validate_json(progress) if progress else None,
            "createdAt": _time(record, "createdAt"),
            "queuedAt": _time(record, "queuedAt"),
            "startedAt": _time(record, "startedAt"),
            "finishedAt": _time(record, "finishedAt"),
            "runAt": _time(record, "runAt"),
            "idempotencyKey": spec.get("idempotencyKey"),
            "parentJobId": spec.get("parentJobId"),
            "depth": spec.get("depth", 0),
            "announce": spec.get("announce", False),
            "sessionKey": spec.get("sessionKey") if with_session_key else None,
            "origin": spec.get("origin"),
            "metadata": spec.get("metadata"),
        }
    )
