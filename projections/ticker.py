"""When a long whole-log command (``audit verify``, ``projections rebuild``)
tells how far it is: at most once every :data:`EVERY_S` seconds, so that a
watcher sees it move without a line per page."""

from __future__ import annotations

import time

EVERY_S = 2.0


class Ticker:
    """``due()`` is True at most once every :data:`EVERY_S` seconds."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        now = time.monotonic()
        if now - self.last < EVERY_S:
            return False
        self.last = now
        return True
