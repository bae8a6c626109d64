"""The archive's one error class."""

from __future__ import annotations

from agentq.schemas.errors import Unavailable


class ArchiveError(Unavailable):
    """The archive could not do what was asked: its storage failed or cannot be
    reached (the message names the URL and what failed), or an append was refused
    (lines out of order, or not after the archive's last event).

    An ``Unavailable``: the CLI exits 6 and a retry may succeed. After a failed
    ``append`` read ``last()`` again before retrying: an object store may have
    taken a write whose answer was lost."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url
