"""Progress reports of one running attempt, coalesced: at most one JobProgress
event a second, the last report always kept (sent before the outcome)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("agentq.worker")

INTERVAL_SECONDS = 1.0

Send = Callable[[float, str | None], Awaitable[object]]


class ProgressReports:
    """Sends the first report at once; reports that come within ``interval`` of the
    last one sent wait, and only the newest of them is sent when it ends.

    A report that cannot be sent (Redis unreachable) is logged, never raised
    into the handler: progress is advice, the outcome is what counts.
    """

    def __init__(self, send: Send, interval: float = INTERVAL_SECONDS) -> None:
        self._send = send
        self._interval = interval
        self._pending: tuple[float, str | None] | None = None
        self._last_sent = float("-inf")
        self._timer: asyncio.Task[None] | None = None

    async def report(self, percent: float, message: str | None) -> None:
        self._pending = (percent, message)
        if self._timer is not None:
            return  # a send is already due; it will carry this report
        wait = self._last_sent + self._interval - time.monotonic()
        if wait <= 0:
            await self._send_pending()
        else:
            self._timer = asyncio.create_task(self._send_later(wait))

    async def _send_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self._send_pending()

    async def _send_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        self._last_sent = time.monotonic()
        try:
            await self._send(*pending)
        except Exception as exc:
            log.warning("could not record progress", error=str(exc))
            return
        # Cleared only once sent: a send cut short is made again by flush().
        if self._pending is pending:
            self._pending = None

    async def flush(self) -> None:
        """Send the report still waiting, if any (before the attempt's outcome)."""
        self.discard_timer()
        await self._send_pending()

    def discard_timer(self) -> None:
        """Stop the timed send (the attempt ended; nothing more is sent by itself)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
