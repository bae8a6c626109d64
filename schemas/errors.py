"""The error hierarchy. Every error carries one of SPEC's codes; callers branch on types."""

from __future__ import annotations

from typing import ClassVar, Final, Literal

ErrorCode = Literal[
    "invalid_input",
    "not_found",
    "unknown_agent",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "queue_full",
    "invalid_state",
    "unavailable",
]

EXIT_CODES: Final[dict[str, int]] = {
    "invalid_input": 2,
    "not_found": 3,
    "unknown_agent": 3,
    "unauthorized": 4,
    "forbidden": 4,
    "rate_limited": 5,
    "queue_full": 5,
    "invalid_state": 5,
    "unavailable": 6,
}


class AgentqError(Exception):
    """The root of every error agentq raises on purpose."""

    code: ClassVar[ErrorCode] = "invalid_input"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.code]

    def to_json(self) -> dict[str, dict[str, str]]:
        """The error object of SPEC: ``{"error": {"code", "message"}}``."""
        return {"error": {"code": self.code, "message": self.message}}


class InvalidInput(AgentqError):
    code = "invalid_input"

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class NotFound(AgentqError):
    code = "not_found"

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class UnknownAgent(AgentqError):
    code = "unknown_agent"

    def __init__(self, agent: str, message: str | None = None) -> None:
        """``message`` replaces SPEC's dispatch message where ``agent`` is no target."""
        super().__init__(message or f"Unknown target agent: {agent}")
        self.agent = agent


class Unauthorized(AgentqError):
    code = "unauthorized"


class Forbidden(AgentqError):
    code = "forbidden"


class RateLimited(AgentqError):
    code = "rate_limited"
    retryable = True

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"Rate limit exceeded: {count}/{limit} dispatches this minute")
        self.count = count
        self.limit = limit


class QueueFull(AgentqError):
    code = "queue_full"
    retryable = True

    def __init__(self, agent: str, pending: int, limit: int) -> None:
        super().__init__(
            f"Queue depth exceeded: {pending}/{limit} pending jobs for agent {agent}"
        )
        self.agent = agent
        self.pending = pending
        self.limit = limit


class InvalidState(AgentqError):
    """The job is not in a state the operation applies to; nothing was changed."""

    code = "invalid_state"

    def __init__(self, message: str, job_id: str | None = None, state: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state


class Unavailable(AgentqError):
    code = "unavailable"
    retryable = True
