"""What of a failed job may leave the system in a dead-letter alert.

Tasks and errors written by agents often carry inlined files (``data:`` URIs,
base64 blobs) and secrets shaped like long tokens. An alert goes to places
with weaker access control than Redis (a chat channel, a log pipeline), so
both are redacted and cut before they leave. The dispatcher's ``origin``, the
``sessionKey`` and ``metadata`` never leave at all: an alert is built from an
explicit list of fields, not from the job minus some.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from agentq.schemas.job import JobView

REDACTED: Final = "[redacted-base64]"
ALERT_HEADER: Final = "agentq: job failed"
ALERT_LIMIT: Final = 200
_ELLIPSIS: Final = "..."

# A data URI: a media type of bounded length and ``;param`` parts, then the
# payload. The bounds keep a task full of "data:" from making the scan quadratic.
_DATA_URI: Final = re.compile(
    r"data:[^\s,;]{0,128}(?:;[^\s,;]{0,128}){0,8}?;base64,[A-Za-z0-9+/_%=-]*",
    # ASCII only: Unicode case folding would also match U+017F (long s) for "s".
    re.IGNORECASE | re.ASCII,
)
# Base64 (standard or URL-safe) of 40+ characters, with its padding. Short runs
# are left alone: they are words, ids and hashes a reader needs.
_BASE64_RUN: Final = re.compile(r"[A-Za-z0-9+/_-]{40,}=*")


def redact(text: str, limit: int = ALERT_LIMIT) -> str:
    """``text`` with data URIs and base64-looking runs of 40+ characters replaced
    by ``[redacted-base64]``, then cut to at most ``limit`` characters, ending in
    ``...`` exactly when it was cut. ``limit`` must be at least 3."""
    if limit < len(_ELLIPSIS):
        raise ValueError(f"limit must be at least {len(_ELLIPSIS)}, got {limit}")
    # Data URIs first: their media type would otherwise survive next to the marker.
    cleaned = _BASE64_RUN.sub(REDACTED, _DATA_URI.sub(REDACTED, text))
    if len(cleaned) <= limit:
        return cleaned
    return cleaned[: limit - len(_ELLIPSIS)] + _ELLIPSIS


@dataclass(frozen=True, slots=True)
class AlertContent:
    """The part of a failed job an alert may carry, already redacted and cut.

    Build it with :meth:`of_job` or :meth:`build`, which redact; ``None`` marks
    what is unknown (the job's state record was gone when the alert was made).
    """

    job_id: str
    agent: str
    dispatched_by: str | None
    attempts_used: int
    max_attempts: int | None
    error: str
    task: str | None

    @classmethod
    def build(
        cls,
        *,
        job_id: str,
        agent: str,
        dispatched_by: str | None,
        attempts_used: int,
        max_attempts: int | None,
        error: str | None,
        task: str | None,
        limit: int = ALERT_LIMIT,
    ) -> AlertContent:
        """The content with ``error`` and ``task`` redacted and cut to ``limit``."""
        return cls(
            job_id=job_id,
            agent=agent,
            dispatched_by=dispatched_by,
            attempts_used=attempts_used,
            max_attempts=max_attempts,
            error=redact(error or "", limit),
            task=redact(task, limit) if task is not None else None,
        )

    @classmethod
    def of_job(
        cls,
        job: JobView,
        *,
        attempts_used: int | None = None,
        error: str | None = None,
        limit: int = ALERT_LIMIT,
    ) -> AlertContent:
        """The content of ``job``; ``attempts_used`` and ``error`` default to the
        view's ``attempt`` and ``error`` (pass the failure's own after a retry)."""
        return cls.build(
            job_id=job.job_id,
            agent=job.target,
            dispatched_by=job.dispatched_by,
            attempts_used=job.attempt if attempts_used is None else attempts_used,
            max_attempts=job.max_attempts,
            error=job.error if error is None else error,
            task=job.task,
            limit=limit,
        )

    def text(self) -> str:
        """The alert's human-readable text: a header line, then one line per field."""
        maximum = "?" if self.max_attempts is None else str(self.max_attempts)
        lines = [
            ALERT_HEADER,
            f"Job: {self.job_id}",
            f"Agent: {self.agent}",
            f"Dispatched by: {self.dispatched_by or 'unknown'}",
            f"Attempts: {self.attempts_used}/{maximum}",
            f"Error: {self.error}",
            f"Task: {self.task if self.task is not None else '(unknown: the job record is gone)'}",
        ]
        return "\n".join(lines)

    def fields(self) -> dict[str, Any]:
        """The content as camelCase JSON fields."""
        return {
            "jobId": self.job_id,
            "agent": self.agent,
            "dispatchedBy": self.dispatched_by,
            "attemptsUsed": self.attempts_used,
            "maxAttempts": self.max_attempts,
            "error": self.error,
            "task": self.task,
        }


def alert_text(
    job: JobView,
    *,
    attempts_used: int | None = None,
    error: str | None = None,
    limit: int = ALERT_LIMIT,
) -> str:
    """The text of the alert for failed ``job`` (see :meth:`AlertContent.of_job`).

    Carries the header, job id, agent, dispatcher, attempts used / maximum, the
    redacted error and task; never ``origin``, ``sessionKey`` or ``metadata``.
    """
    return AlertContent.of_job(job, attempts_used=attempts_used, error=error, limit=limit).text()
