"""SPEC's words that need no model: agent ids, job ids and job states. Kept apart from the
pydantic models so that the command line can build its parser (``--state``'s
choices, agent-id arguments) without importing them."""

from __future__ import annotations

import re
from typing import Final, Literal

JobState = Literal[
    "pending_approval", "waiting_dependencies", "delayed", "queued", "active", "completed",
    "failed", "cancelled",
]

STATES: Final[tuple[JobState, ...]] = (
    "pending_approval",
    "waiting_dependencies",
    "delayed",
    "queued",
    "active",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL_STATES: Final[frozenset[str]] = frozenset({"completed", "failed", "cancelled"})

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
