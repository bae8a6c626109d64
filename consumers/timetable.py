"""When each partition next needs a look: a delayed job's run time, a lease's
deadline. Kept in memory from what the scripts said (their replies, the
doorbell's words), so that finding what is due costs no round trip per agent.

Times come in the server's milliseconds and are waited for on this process's
monotonic clock, through the offset between the two seen in the last reply
(the script judges what is due by Redis ``TIME`` itself: waking a little early
costs one call, which then says how long is left).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Awaitable, Callable

from agentq.consumers.waiting import until_stopped

# Wake this long after the time a script gave, so that the server's clock has
# surely passed it (the offset is known to within a round trip).
_AFTER = 0.001


class Timetable:
    """Per partition, the next time (server ms) something of it falls due."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}  # agent -> local (loop) time to look
        self._heap: list[tuple[float, str]] = []
        self._offset: float | None = None  # server seconds - loop seconds
        self._changed = asyncio.Event()

    def _local(self, server_ms: int) -> float:
        loop = asyncio.get_running_loop()
        if self._offset is None:
            return loop.time()  # no reply seen yet: look now, the reply will tell
        return server_ms / 1000 - self._offset + _AFTER

    def _clock(self, now_ms: int) -> None:
        self._offset = now_ms / 1000 - asyncio.get_running_loop().time()

    def set(self, agent: str, next_ms: int | None, now_ms: int) -> None:
        """A script judged ``agent`` at the server's time ``now_ms``: its next due
        time is ``next_ms`` (None: nothing waits then).

        A time known for ``agent`` stays when it is earlier: a ring that came while
        the reply was on its way (two connections: either may be read first) may
        tell of a job the script ran too early to see, and erasing it would leave
        that job to the slow sweep. A time known from before the look is gone
        already (:meth:`due` takes it); one that is stale costs one more look."""
        self._clock(now_ms)
        if next_ms is not None:
            self.earlier(agent, next_ms)

    def earlier(self, agent: str, due_ms: int) -> None:
        """Something of ``agent`` falls due at ``due_ms`` (server ms), perhaps
        before what was known."""
        at = self._local(due_ms)
        known = self._at.get(agent)
        if known is None or at < known:
            self._put(agent, at)

    def now(self, agent: str) -> None:
        """Look at ``agent`` at once."""
        self._put(agent, asyncio.get_running_loop().time())

    def forget(self, agent: str) -> None:
        self._at.pop(agent, None)

    def _put(self, agent: str, at: float) -> None:
        self._at[agent] = at
        heapq.heappush(self._heap, (at, agent))
        if self._heap[0] == (at, agent):
            self._changed.set()

    def poke(self) -> None:
        """End the current :meth:`wait` (there is other work)."""
        self._changed.set()

    def due_now(self) -> bool:
        """Whether some partition's time has come."""
        self._discard_superseded()
        return bool(self._heap) and self._heap[0][0] <= asyncio.get_running_loop().time()

    def _discard_superseded(self) -> None:
        while self._heap and self._at.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def due(self) -> list[str]:
        """The agents whose time has come (each forgotten until set again)."""
        now = asyncio.get_running_loop().time()
        found: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            at, agent = heapq.heappop(self._heap)
            if self._at.get(agent) == at:
                del self._at[agent]
                found.append(agent)
        return found

    async def act_on_due(
        self, serves: Callable[[str], bool],
        act: Callable[[str], Awaitable[tuple[int | None, int]]],
    ) -> None:
        """``act`` on each due partition this process ``serves``; its reply (the next
        time, the server's now) sets the partition's next time. When ``act``
        fails, the partitions not yet acted on stay due (for after a restart)."""
        due = self.due()
        for i, agent in enumerate(due):
            if not serves(agent):
                continue
            try:
                next_ms, now_ms = await act(agent)
            except BaseException:
                for left in due[i:]:
                    self.now(left)
                raise
            self.set(agent, next_ms, now_ms)

    async def wait(self, stop: asyncio.Event) -> None:
        """Until the earliest time comes, an earlier one is set, :meth:`poke`, or
        ``stop``."""
        self._discard_superseded()
        timeout = None
        if self._heap:
            timeout = max(0.0, self._heap[0][0] - asyncio.get_running_loop().time())
        self._changed.clear()
        await until_stopped(self._changed.wait(), stop, timeout=timeout)
