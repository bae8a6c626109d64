"""Ticking schedules: the scheduler's other half.

The scheduler that serves a partition wakes at the earliest of its next
delayed job and its schedules' next tick (``survey.lua`` and the doorbell
report both); :class:`Ticks` then dispatches each schedule whose tick has come
by Redis ``TIME`` (``schedule_due.lua``) and moves it to its next tick
(``schedule_tick.lua``). Exactly one job per tick, however many processes run:

- the dispatch carries the idempotency key ``schedule:<name>:<tick>``, so a
  second dispatch of the same tick (another process during a hand-over, or
  this one again after a crash between dispatch and move) returns the first
  job and creates nothing;
- the move happens only while the schedule's next tick is still the one
  dispatched, so it is made once.

A schedule whose ticks passed while no process ran (or while its partition
had no live owner) is dispatched once for the first tick missed, its job's
metadata saying ``catchUp: true``, and then moves to the first tick after
now: one catch-up, never a flood. Like announce jobs, a tick's job is the
system's own: no rate limit or allow list refuses it, but the queue-depth cap
does (``rateLimit.maxQueueDepth``): a refused tick (cap reached, or target no
longer known) is skipped, logged and recorded as the schedule's last tick.
"""

from __future__ import annotations

from typing import Any, Final

import orjson
import structlog
from redis.asyncio import Redis

from agentq.eventlog.ids import new_job_id
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.schedules import Definition, ms_to_iso
from agentq.eventlog.scripts import NewJob, Refusal, ScheduleDue, Scripts
from agentq.projections.global_index import dispatch_indexed

log = structlog.get_logger("agentq.schedules")

ACTOR: Final = "system"
_BATCH: Final = 100


def tick_key(name: str, tick_ms: int) -> str:
    """The idempotency key of schedule ``name``'s dispatch at ``tick_ms``."""
    return f"schedule:{name}:{ms_to_iso(tick_ms)}"


class Ticks:
    """Dispatches the due ticks of the schedules of the partitions it is given."""

    def __init__(self, redis: Redis, keys: Keys, *, max_queue_depth: int = 0,
                 idempotency_ttl: int = 86_400) -> None:
        self.keys = keys
        self.scripts = Scripts(redis)
        self.max_queue_depth = max_queue_depth
        self.idempotency_ttl = idempotency_ttl
        self.fired = 0
        """Ticks this process dispatched (idempotent repeats included)."""

    async def due(self, part: Partition) -> ScheduleDue:
        """The schedules of ``part`` whose tick has come, by Redis ``TIME``."""
        return await self.scripts.schedule_due(part, _BATCH)

    async def fire(self, part: Partition, due: ScheduleDue) -> tuple[int | None, int]:
        """Dispatch every due tick of ``part`` (starting with ``due``); returns the
        next tick of its schedules (None: no active schedule) and the server's time
        (ms) it was judged at."""
        while due.due:
            for name, tick_ms, text in due.due:
                if text:
                    await self._fire(part, name, tick_ms, Definition.of(text), due.now_ms)
                else:  # a tick without its schedule (never written so): let it go
                    await self.scripts.schedule_tick(part, name, tick_ms, None, "!gone")
            due = await self.due(part)
        return due.next_ms, due.now_ms

    async def _fire(self, part: Partition, name: str, tick_ms: int, definition: Definition,
                    now_ms: int) -> None:
        following = definition.next_after(tick_ms)
        key = tick_key(name, tick_ms)
        spec: dict[str, Any] = dict(definition.spec)
        metadata = dict(spec.get("metadata") or {})
        metadata.update(schedule=name, scheduledFor=ms_to_iso(tick_ms))
        if following is not None and following <= now_ms:
            metadata["catchUp"] = True  # later ticks were missed too: they are skipped
        spec["idempotencyKey"] = key
        spec["metadata"] = metadata
        job = NewJob(
            job_id=new_job_id(part.agent), spec_json=orjson.dumps(spec),
            max_attempts=int(spec["maxAttempts"]), priority=spec.get("priority", "normal"),
            delay_ms=0, idempotency_key=key, depends_on=(), caller=spec["dispatchedBy"],
        )
        call = Scripts.dispatch_call(part, [job], actor=ACTOR,
                                     max_queue_depth=self.max_queue_depth,
                                     idempotency_ttl=self.idempotency_ttl)
        (reply,) = await dispatch_indexed(self.scripts, self.keys, [call], [job])
        outcome = Scripts.dispatch_outcome(reply)
        if isinstance(outcome, Refusal):
            log.warning("schedule tick skipped: its dispatch was refused", schedule=name,
                        target=part.agent, tick=ms_to_iso(tick_ms), refusal=outcome.code,
                        details=list(outcome.details))
            done = f"!{outcome.code}"
        else:
            done = str(outcome.jobs[0][0])
            self.fired += 1
        await self.scripts.schedule_tick(part, name, tick_ms, definition.next_after(now_ms),
                                         done)


__all__ = ["Ticks", "tick_key"]
