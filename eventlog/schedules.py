"""Schedules: when a cron expression fires, and where schedules are kept.

A schedule targets one agent and lives in that agent's partition (same hash
tag, so every script stays in one slot): its definition in ``{A}:schedules``,
its next tick in ``{A}:schedule_next`` (only while active, so the scheduler
that serves the partition wakes at the set's head), its last tick in
``{A}:schedules:last``, and its events (``ScheduleAdded``, ``ScheduleRemoved``,
``SchedulePaused``, ``ScheduleResumed``) in ``{A}:schedules:log``, appended by
the script that makes the change (``schedule.lua``). Names are unique across
agents through a global index, name -> target (``schedule_name.lua``), claimed
before the partition's script runs; an entry whose partition holds no such
schedule is a stray of an add cut short, taken over once it is older than
:data:`STRAY_MS`.

Cron expressions are read by croniter: five fields, six with seconds first,
or an ``@`` alias; times are computed in the schedule's IANA zone (zoneinfo;
the ``tzdata`` package stands in where the system has no zone database), so a
daily 09:00 stays 09:00 local across daylight saving changes. Ticks are whole
instants: a schedule's next tick is always computed from a time Redis gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from croniter import CroniterBadDateError, CroniterError, croniter
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.scripts import Refusal, Scripts
from agentq.schemas._base import micros_to_iso
from agentq.schemas.errors import InvalidInput, InvalidState, NotFound, UnknownAgent
from agentq.schemas.events import (
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleResumed,
    StoredScheduleEvent,
)
from agentq.schemas.schedule import SCHEDULE_NAME_PATTERN, SCHEDULE_NAME_RE, ScheduleView

# An index entry younger than this may be an add still in flight, not a stray.
STRAY_MS: Final = 10_000
_CRON_HELP: Final = (
    "use five fields (minute hour day-of-month month day-of-week, e.g. '0 9 * * 1-5'), "
    "six with seconds first (e.g. '*/10 * * * * *'), or @hourly, @daily, @weekly, "
    "@monthly, @yearly"
)

Change = Literal["remove", "pause", "resume"]


# -- cron and zones ------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` when it is a valid schedule name, else InvalidInput."""
    if not SCHEDULE_NAME_RE.fullmatch(name):
        raise InvalidInput(f"Invalid schedule name {name!r}: use {SCHEDULE_NAME_PATTERN}",
                           path="name")
    return name


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; InvalidInput when there is none of that name."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"Unknown time zone {name!r}: use an IANA name such as UTC, "
                           "Europe/Paris or America/New_York", path="tz") from None


def check_cron(expression: str, zone: ZoneInfo) -> str:
    """``expression`` with its fields separated by single spaces, when croniter
    reads it and it fires at least once more; else InvalidInput."""
    cron = " ".join(expression.split())
    fields = cron.split(" ")
    if not cron or (not cron.startswith("@") and len(fields) not in (5, 6)):
        raise InvalidInput(f"Invalid cron expression {expression!r}: {len(fields)} fields; "
                           f"{_CRON_HELP}", path="cron")
    try:
        croniter(cron, datetime.now(zone), second_at_beginning=True).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidInput(f"Invalid cron expression {expression!r}: it never fires",
                           path="cron") from None
    except (CroniterError, ValueError, KeyError) as exc:
        raise InvalidInput(f"Invalid cron expression {expression!r}: {exc}; {_CRON_HELP}",
                           path="cron") from None
    return cron


def next_tick_ms(cron: str, zone: ZoneInfo, after_ms: int) -> int | None:
    """The first tick of ``cron`` in ``zone`` strictly after ``after_ms`` (epoch
    ms); None when it fires no more."""
    start = datetime.fromtimestamp(after_ms / 1000, zone)
    try:
        tick = croniter(cron, start, second_at_beginning=True).get_next(datetime)
    except CroniterBadDateError:
        return None
    ms = round(tick.timestamp() * 1000)
    # The start may sit on a tick to within float rounding: never return it again.
    return ms if ms > after_ms else next_tick_ms(cron, zone, after_ms + 1)


def ms_to_iso(ms: int | None) -> str | None:
    return micros_to_iso(None if ms is None else ms * 1000)


# -- definitions ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Definition:
    """What a schedule is: its target, cron and zone, the spec of the job each tick
    dispatches (a dispatch's stored spec; ``dispatchedBy`` is who added it), and
    who added it when (µs)."""

    target: str
    cron: str
    timezone: str
    spec: dict[str, Any]
    created_by: str
    created_at_us: int

    def json(self) -> bytes:
        return orjson.dumps({
            "target": self.target, "cron": self.cron, "timezone": self.timezone,
            "spec": self.spec, "createdBy": self.created_by, "createdAt": self.created_at_us,
        })

    @classmethod
    def of(cls, text: str | bytes) -> Definition:
        data = orjson.loads(text)
        return cls(data["target"], data["cron"], data["timezone"], data["spec"],
                   data["createdBy"], int(data["createdAt"]))

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def next_after(self, ms: int) -> int | None:
        return next_tick_ms(self.cron, self.zone, ms)


def view(name: str, definition: Definition, next_ms: int | None, last: str | None
         ) -> ScheduleView:
    """The schedule as ``schedule list`` shows it."""
    last_tick = last_job = refusal = None
    if last:
        tick, _, outcome = last.partition(" ")
        last_tick = ms_to_iso(int(tick))
        if outcome.startswith("!"):
            refusal = outcome[1:]
        else:
            last_job = outcome
    return ScheduleView(
        name=name, target=definition.target, cron=definition.cron,
        timezone=definition.timezone, task=str(definition.spec.get("task", "")),
        state="active" if next_ms is not None else "paused", next_tick=ms_to_iso(next_ms),
        last_tick=last_tick, last_job_id=last_job, last_refusal=refusal,
        created_by=definition.created_by,
        created_at=micros_to_iso(definition.created_at_us) or "", spec=definition.spec,
    )


# -- the store -----------------------------------------------------------------


class Schedules:
    """Adds, changes and reads schedules; raises AgentqError subclasses for what
    a user can get wrong. Authorization is the caller's."""

    def __init__(self, redis: Redis, scripts: Scripts, keys: Keys) -> None:
        self.redis = redis
        self.scripts = scripts
        self.keys = keys

    async def _server_ms(self, part: Partition) -> int:
        return (await self.scripts.schedule_due(part, 0)).now_ms

    async def add(self, name: str, definition: Definition, actor: str) -> ScheduleView:
        """Add schedule ``name``; its first tick is the first after Redis's time now."""
        check_name(name)
        part = self.keys.partition(definition.target)
        if not await self.redis.exists(part.meta):
            raise UnknownAgent(definition.target)
        await self._claim(name, definition.target)
        now_ms = await self._server_ms(part)
        definition = replace(definition, created_at_us=now_ms * 1000)
        next_ms = definition.next_after(now_ms)
        if next_ms is None:
            await self.scripts.schedule_name(self.keys, "release", name, definition.target)
            raise InvalidInput(f"Invalid cron expression {definition.cron!r}: it never fires "
                               "again", path="cron")
        data = ScheduleAdded(target=definition.target, cron=definition.cron,
                             timezone=definition.timezone, spec=definition.spec,
                             next_tick=ms_to_iso(next_ms) or "")
        outcome = await self.scripts.schedule(
            part, "add", name, actor, orjson.dumps(data.wire()), ring=self.keys.ring,
            next_ms=next_ms, definition=definition.json())
        if isinstance(outcome, Refusal):
            raise _duplicate(name, definition.target)
        return view(name, definition, next_ms, None)

    async def _claim(self, name: str, target: str) -> None:
        """Hold ``name`` for ``target`` in the global index, taking over a stray."""
        reply = await self.scripts.schedule_name(self.keys, "claim", name, target)
        if reply[0] == "claimed":
            return
        held, now_ms = str(reply[1]), int(reply[2])
        held_target, _, held_ms = held.partition(" ")
        if held_target == target:
            return  # the partition's script refuses a duplicate itself
        there = await self.redis.hexists(self.keys.partition(held_target).schedules, name)
        if there or now_ms - int(held_ms or 0) < STRAY_MS:
            raise _duplicate(name, held_target)
        reply = await self.scripts.schedule_name(self.keys, "take", name, target, held)
        if reply[0] != "claimed":
            raise _duplicate(name, str(reply[1]).partition(" ")[0])

    async def target_of(self, name: str) -> str:
        """The agent schedule ``name`` targets; NotFound when there is none."""
        check_name(name)
        held = await self.redis.hget(self.keys.schedules, name)
        if not held:
            raise NotFound(f"Schedule {name} not found")
        return str(held).partition(" ")[0]

    async def change(self, name: str, op: Change, actor: str) -> None:
        """Remove, pause or resume schedule ``name``. A resumed schedule's next tick
        is the first after now: ticks passed while it was paused are not dispatched."""
        target = await self.target_of(name)
        part = self.keys.partition(target)
        next_ms: int | None = None
        data: bytes = orjson.dumps(ScheduleRemoved().wire())  # {}, as SchedulePaused's
        if op == "resume":
            text = await self.redis.hget(part.schedules, name)
            if text is None:
                raise NotFound(f"Schedule {name} not found")
            next_ms = Definition.of(text).next_after(await self._server_ms(part))
            if next_ms is None:
                raise InvalidState(f"Schedule {name} has no tick left: its cron expression "
                                   "fires no more; remove it")
            data = orjson.dumps(ScheduleResumed(next_tick=ms_to_iso(next_ms) or "").wire())
        outcome = await self.scripts.schedule(part, op, name, actor, data,
                                              ring=self.keys.ring, next_ms=next_ms)
        if isinstance(outcome, Refusal):
            if outcome.code == "not_found":
                # The index named a partition without it: a stray, gone now.
                await self.scripts.schedule_name(self.keys, "release", name, target)
                raise NotFound(f"Schedule {name} not found")
            if op == "pause":
                raise InvalidState(f"Schedule {name} is already paused; resume it with: "
                                   f"agentq schedule resume {name}", state="paused")
            raise InvalidState(f"Schedule {name} is not paused: only a paused schedule can "
                               "be resumed", state="active")
        if op == "remove":
            await self.scripts.schedule_name(self.keys, "release", name, target)

    async def get(self, name: str) -> ScheduleView:
        """Schedule ``name``; NotFound when there is none."""
        part = self.keys.partition(await self.target_of(name))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(part.schedules, name)
            pipe.zscore(part.schedule_next, name)
            pipe.hget(part.schedule_last, name)
            text, score, last = await pipe.execute()
        if text is None:
            raise NotFound(f"Schedule {name} not found")
        return view(name, Definition.of(text), None if score is None else int(score), last)

    async def all(self) -> list[ScheduleView]:
        """Every schedule, by name."""
        index: dict[str, str] = dict(await self.redis.hgetall(self.keys.schedules))  # type: ignore[arg-type]
        names = sorted(index)
        parts = [self.keys.partition(index[name].partition(" ")[0]) for name in names]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, part in zip(names, parts, strict=True):
                pipe.hget(part.schedules, name)
                pipe.zscore(part.schedule_next, name)
                pipe.hget(part.schedule_last, name)
            replies: list[Any] = await pipe.execute()
        views = []
        for i, name in enumerate(names):
            text, score, last = replies[3 * i: 3 * i + 3]
            if text is None:
                continue  # a stray of an add cut short
            next_ms = None if score is None else int(score)
            views.append(view(name, Definition.of(text), next_ms, last))
        return views

    async def history(self, name: str, target: str | None = None
                      ) -> list[StoredScheduleEvent]:
        """Schedule ``name``'s events, oldest first; ``target`` finds those of a
        removed schedule (no longer in the index)."""
        agent = target if target is not None else await self.target_of(check_name(name))
        part = self.keys.partition(agent)
        entries: Sequence[Any] = await self.redis.xrange(part.schedule_log) or []
        events = [
            StoredScheduleEvent(
                event_id=entry_id, type=fields["type"], schedule=fields["schedule"],
                agent=agent, at=micros_to_iso(int(fields["at"])) or "", actor=fields["actor"],
                v=int(fields["v"]), data=orjson.loads(fields["data"]))
            for entry_id, fields in entries if fields.get("schedule") == name
        ]
        if not events:
            raise NotFound(f"Schedule {name} not found")
        return events


def _duplicate(name: str, target: str) -> InvalidState:
    return InvalidState(f"Schedule {name} already exists (target {target}): remove it "
                        "first, or choose another name")


__all__ = ["Definition", "Schedules", "check_cron", "check_name", "next_tick_ms", "time_zone"]
