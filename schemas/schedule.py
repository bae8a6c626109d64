"""A schedule as the operator sees it: its name's rule and its view."""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from agentq.schemas._base import WireModel

SCHEDULE_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
SCHEDULE_NAME_RE: Final = re.compile(SCHEDULE_NAME_PATTERN)

ScheduleState = Literal["active", "paused"]


class ScheduleView(WireModel):
    """One schedule: when it fires, what it dispatches, where it stands.
    ``nextTick`` is null while paused; ``lastTick``/``lastJobId`` are null until its
    first tick (``lastJobId`` null too when that tick was refused, ``lastRefusal``
    saying why: ``unknown_agent`` or ``queue_full``)."""

    name: str
    target: str
    cron: str
    timezone: str
    task: str
    state: ScheduleState
    next_tick: str | None = None
    last_tick: str | None = None
    last_job_id: str | None = None
    last_refusal: str | None = None
    created_by: str
    created_at: str
    spec: dict[str, Any]


class ScheduleList(WireModel):
    """``schedule list``: every schedule, by name."""

    schedules: list[ScheduleView]
    count: int
