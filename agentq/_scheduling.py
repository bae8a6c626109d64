"""Schedules for the client: who may manage them (system agents only: they are
the operator's, and not among the tools), and how a schedule's job is checked
and made into the spec every tick dispatches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from agentq._admission import parse_input, prepare
from agentq._deployment import Deployment
from agentq.eventlog.schedules import Change, Definition, Schedules, check_cron, time_zone
from agentq.schemas.errors import InvalidInput, Unauthorized
from agentq.schemas.events import StoredScheduleEvent
from agentq.schemas.schedule import ScheduleView

# Dispatch inputs a schedule's jobs cannot have: each tick's idempotency key is
# its own, and a recurring job neither waits for fixed jobs nor has a parent.
_NOT_SCHEDULED: Final = {
    "depends_on": "dependsOn", "delay_seconds": "delaySeconds",
    "idempotency_key": "idempotencyKey", "parent_job_id": "parentJobId",
}


def definition(deployment: Deployment, who: str, target: str, task: str, cron: str, tz: str,
               fields: Mapping[str, Any]) -> Definition:
    """The schedule a valid input makes; InvalidInput naming the bad part. The job's
    defaults (``maxAttempts``, ``timeoutSeconds``) are applied now, as a dispatch
    by ``who`` would, and stay the schedule's."""
    zone = time_zone(tz)
    checked = check_cron(cron, zone)
    inp = parse_input({"target": target, "task": task, **fields})
    for name, wire in _NOT_SCHEDULED.items():
        if name in inp.model_fields_set and getattr(inp, name) not in (None, [], 0):
            raise InvalidInput(f"Invalid input: {wire}: a schedule's jobs cannot have {wire}",
                               path=wire)
    spec = prepare(inp, who, 0, deployment.config).spec
    return Definition(target, checked, tz, spec, who, 0)


class Scheduling:
    """The client's schedule commands, each for caller ``who``."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment

    def _store(self) -> Schedules:
        d = self.deployment
        return Schedules(d.redis, d.scripts, d.keys)

    def _authorize(self, who: str, command: str) -> None:
        if not self.deployment.config.is_system(who):
            raise Unauthorized(f"Unauthorized: {command} requires a system agent.")

    async def add(self, who: str, name: str, target: str, task: str, cron: str, tz: str,
                  fields: Mapping[str, Any]) -> ScheduleView:
        self._authorize(who, "schedule add")
        made = definition(self.deployment, who, target, task, cron, tz, fields)
        view: ScheduleView = await self.deployment.call(self._store().add(name, made, who))
        return view

    async def change(self, who: str, name: str, op: Change) -> ScheduleView | None:
        """Remove (returns None), pause or resume (returns the schedule as it is now)."""
        self._authorize(who, f"schedule {op}")
        store = self._store()
        await self.deployment.call(store.change(name, op, who))
        if op == "remove":
            return None
        found: ScheduleView = await self.deployment.call(store.get(name))
        return found

    async def listing(self, who: str) -> list[ScheduleView]:
        self._authorize(who, "schedule list")
        views: list[ScheduleView] = await self.deployment.call(self._store().all())
        return views

    async def history(self, who: str, name: str, target: str | None
                      ) -> list[StoredScheduleEvent]:
        self._authorize(who, "schedule history")
        events: list[StoredScheduleEvent] = await self.deployment.call(
            self._store().history(name, target))
        return events
