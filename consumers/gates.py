"""Dependency gates and announcements: consumer group ``gates`` on every log.

- A dispatched job that waits for dependencies is registered with each
  dependency in the dependency's partition; a dependency that has already
  ended is resolved at once.
- When a job ends, each registered dependent gets ``DependencyResolved`` in
  its own partition; the resolution that leaves nothing open releases it. A
  failure fails the dependent, whose own end cascades the same way.
- When a failed job is retried, dependents it failed wait for it again.
- When a job that asked to ``announce`` ends, one job carrying its outcome is
  dispatched back to its dispatcher, with an idempotency key made from the
  terminal event's id: handled twice, it is dispatched once.

Every step is idempotent (see the scripts), so redelivered events change
nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from agentq.consumers import metrics
from agentq.consumers.cascade import Family
from agentq.consumers.logconsumer import LogConsumer
from agentq.consumers.ownership import Ownership
from agentq.eventlog import tracing
from agentq.eventlog.archive import Archive
from agentq.eventlog.ids import new_job_id
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.merged import archived_record
from agentq.eventlog.reader import RawEvent, dependency_views, read_specs
from agentq.eventlog.scripts import NewJob, Scripts
from agentq.projections.global_index import dispatch_indexed
from agentq.schemas.job import agent_of_job

ACTOR = "system"
_ENDINGS = {"JobCompleted": "completed", "JobFailed": "failed", "JobCancelled": "cancelled",
            "JobRejected": "cancelled"}
_ANNOUNCE_TEXT_CHARS = 2000
# What resolve.lua answers when a resolution ends the dependent's wait.
_RELEASED = frozenset({"queued", "delayed", "failed"})


class Gates(LogConsumer):
    group = "gates"
    hears_quiet = False  # acts on dispatches with dependencies, loud endings, retries

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, consumer: str | None = None,
                 *, max_attempts: int = 3, idempotency_ttl: int = 86_400,
                 claim_idle_ms: int | None = None, ownership: Ownership | None = None,
                 archive: Archive | None = None):
        """``archive``: where a dependency that has left Redis is found."""
        super().__init__(redis, blocking, keys, consumer, claim_idle_ms=claim_idle_ms,
                         ownership=ownership)
        self.scripts = Scripts(redis)
        self.max_attempts = max_attempts
        self.idempotency_ttl = idempotency_ttl
        self.archive = archive
        # Children of jobs and cancelling a tree (consumers/cascade.py).
        self.family = Family(redis, keys, self.scripts)

    async def handle(self, events: list[RawEvent]) -> None:
        # A batch is one partition's. Most endings matter to nobody: those marked
        # quiet are known not to; one script call picks out, of the others, those
        # with dependents or an announce.
        ended = [e.job_id for e in events if e.type in _ENDINGS and not e.quiet]
        relevant = await self.scripts.endings(self.keys.partition(events[0].agent), ended) \
            if ended else {}
        await self.family.handle(events)
        for event in events:
            if event.type == "JobDispatched" and event.data.get("dependsOn"):
                await self._register(event)
            elif event.type in _ENDINGS and event.job_id in relevant:
                result, error, spec, dependents = relevant[event.job_id]
                await self._ended(event, dependents, spec, result or None, error or None)
            elif event.type == "JobRetried":
                await self._retried(event)

    # -- registration ------------------------------------------------------

    async def _register(self, event: RawEvent) -> None:
        job_part = self.keys.partition(event.agent)
        ignore = event.data.get("onDependencyFailure") == "ignore"
        for dep_id in event.data["dependsOn"]:
            dep_agent = agent_of_job(dep_id)
            if dep_agent is None:
                continue
            ended = await self.scripts.register(
                self.keys.partition(dep_agent), dep_id, event.job_id
            )
            if ended is None:
                continue
            status, state, result, error = ended
            if status == "missing":
                # Gone from Redis: ended long ago, and archived (else it never existed).
                record = await archived_record(self.archive, self.keys.partition(dep_agent),
                                               dep_id)
                state = record.get("state", "cancelled")
                result = record.get("result", "") if state == "completed" else ""
                error = record.get("error", "") if record else \
                    f"dependency {dep_id} no longer exists"
            outcome = await self.scripts.resolve(job_part, ACTOR, event.job_id, dep_id, state,
                                                 result, error, ignore_failure=ignore)
            if outcome != "seen" and tracing.tracer() is not None:
                await self._trace_early_release(event, dep_id, outcome)

    async def _trace_early_release(self, event: RawEvent, dep_id: str, outcome: str) -> None:
        """A dependent released as it registered (its dependency had ended before):
        the same release span as one released by the ending, from the dependency's
        end, linked to its send (both read only when tracing is on)."""
        dep_agent = agent_of_job(dep_id)
        if dep_agent is None:
            return
        dep_part = self.keys.partition(dep_agent)
        (dep_spec,) = await read_specs(self.redis, [(dep_part, dep_id)])
        finished: str | None = await self.redis.hget(  # type: ignore[assignment]
            dep_part.job(dep_id), "finishedAt")
        started_ns = int(finished) * 1000 if finished else time.time_ns()
        tracing.record_release(
            event.agent, event.job_id, dep_id, outcome, tracing.spec_traceparent(event.data),
            tracing.spec_traceparent(orjson.loads(dep_spec)) if dep_spec else None, started_ns)

    # -- endings -----------------------------------------------------------

    async def _ended(
        self, event: RawEvent, dependents: list[str], spec_json: str | None,
        result: str | None, error: str | None,
    ) -> None:
        part = self.keys.partition(event.agent)
        state = _ENDINGS[event.type]
        if dependents:
            await self._resolve_dependents(event.job_id, state, dependents,
                                           result or "", error or "", event.at, spec_json)
            if state != "failed":
                # Resolved, and never to run again: nothing registers with it any
                # more (register.lua). A failed job keeps its set for a retry.
                await self.redis.delete(part.dependents(event.job_id))
        spec: dict[str, Any] = orjson.loads(spec_json) if spec_json else {}
        if spec.get("announce"):
            await self._announce(event, part, spec, state, result, error)

    async def _resolve_dependents(
        self, dep_id: str, state: str, dependents: Sequence[str], result: str, error: str,
        ended_at: int = 0, dep_spec: str | None = None,
    ) -> None:
        """``ended_at``: when the dependency ended (µs), for the release's metric and
        span; ``dep_spec``: its spec, whose trace the release spans link to."""
        if state != "completed":
            result = ""
        targets = [(self.keys.partition(agent), dependent) for dependent in dependents
                   if (agent := agent_of_job(dependent)) is not None]
        # Whether a dependent ignores failures matters only when this one did not
        # complete: a completion resolves without reading the dependents' specs.
        ignore = [False] * len(targets)
        specs: list[str | None] = []
        if state != "completed" or tracing.tracer() is not None:  # traces: the dependents'
            specs = await read_specs(self.redis, targets)
        if state != "completed":
            ignore = [s is not None and orjson.loads(s).get("onDependencyFailure") == "ignore"
                      for s in specs]
        # Every dependent's resolution in one round trip (each in its own partition).
        replies = await self.scripts.call_many([
            Scripts.resolve_call(part, ACTOR, dependent, dep_id, state, result, error,
                                 ignore_failure=flag)
            for (part, dependent), flag in zip(targets, ignore, strict=True)
        ])
        if ended_at:
            self._released(dep_id, targets, [str(r[0]) for r in replies], ended_at, specs,
                           dep_spec)

    @staticmethod
    def _released(dep_id: str, targets: Sequence[tuple[Partition, str]], outcomes: list[str],
                  ended_at: int, specs: Sequence[str | None], dep_spec: str | None) -> None:
        """Metrics and traces of a dependency's resolutions: each dependent released
        (queued, delayed, or failed with it) is observed; with tracing on, each
        resolution is a ``release`` span in the dependent's trace."""
        observed = metrics.current()
        trace = tracing.tracer() is not None
        dep_traceparent = tracing.spec_traceparent(orjson.loads(dep_spec)) \
            if trace and dep_spec else None
        for i, ((part, dependent), outcome) in enumerate(zip(targets, outcomes, strict=True)):
            if outcome == "seen":
                continue
            if observed is not None and outcome in _RELEASED:
                observed.observe_release(ended_at)
            if trace:
                spec = specs[i] if i < len(specs) else None
                tracing.record_release(
                    part.agent, dependent, dep_id, outcome,
                    tracing.spec_traceparent(orjson.loads(spec)) if spec else None,
                    dep_traceparent, ended_at * 1000)

    async def _retried(self, event: RawEvent) -> None:
        part = self.keys.partition(event.agent)
        dependents: set[str] = await self.redis.smembers(  # type: ignore[assignment]
            part.dependents(event.job_id)
        )
        for dependent in sorted(dependents):
            agent = agent_of_job(dependent)
            if agent is not None:
                await self._rearm(self.keys.partition(agent), dependent, event.job_id)

    async def _rearm(self, part: Partition, job_id: str, retried: str) -> None:
        """Re-arm ``job_id`` if ``retried`` failed it: it waits again for ``retried``
        and for each other dependency that has not completed."""
        (spec_json,) = await read_specs(self.redis, [(part, job_id)])
        if spec_json is None:
            return
        spec = orjson.loads(spec_json)
        others = [d for d in spec.get("dependsOn", []) if d != retried]
        states = await dependency_views(self.redis, self.keys, others)
        still_open = [d for d in others if states[d].state != "completed"]
        if not await self.scripts.rearm(part, ACTOR, job_id, retried, still_open):
            return
        ignore = spec.get("onDependencyFailure") == "ignore"
        for dep_id in still_open:
            # As at dispatch: either this sees the dependency ended, or its ending
            # comes later and finds the job among its dependents.
            dep_agent = agent_of_job(dep_id)
            if dep_agent is None:
                continue
            ended = await self.scripts.register(self.keys.partition(dep_agent), dep_id, job_id)
            if ended is not None and ended[0] == "ended":
                _, state, result, error = ended
                await self.scripts.resolve(part, ACTOR, job_id, dep_id, state, result, error,
                                           ignore_failure=ignore)

    # -- announce ----------------------------------------------------------

    async def _announce(
        self, event: RawEvent, part: Partition, spec: dict[str, Any], state: str,
        result: str | None, error: str | None,
    ) -> None:
        dispatcher, target = spec["dispatchedBy"], spec["target"]
        home = self.keys.partition(dispatcher)
        if not await self.redis.exists(home.meta):
            return  # SPEC: no announce job when the dispatcher is not a known agent
        if state == "completed":
            detail = _result_text(result)
        elif state == "failed":
            detail = error or "failed"
        else:
            detail = f"cancelled by {event.actor}"
        task = f"Job {event.job_id} {state}: {detail}"[:_ANNOUNCE_TEXT_CHARS]
        announcement = {
            "target": dispatcher,
            "dispatchedBy": target,
            "task": task,
            "maxAttempts": self.max_attempts,
            "idempotencyKey": f"announce:{event.event_id}",
            "metadata": {"announceFor": event.job_id, "outcome": state},
        }
        job = NewJob(
            job_id=new_job_id(dispatcher),
            spec_json=orjson.dumps(announcement),
            max_attempts=self.max_attempts,
            priority="normal",
            delay_ms=0,
            idempotency_key=f"announce:{event.event_id}",
            depends_on=(),
            caller=target,
        )
        # Announce jobs are the system's own: no rate limit, allow list, cap or depth check.
        call = Scripts.dispatch_call(
            home, [job], actor=ACTOR, max_queue_depth=0, idempotency_ttl=self.idempotency_ttl
        )
        # Into the global job indexes (for list) in the same round trip, as any dispatch.
        await dispatch_indexed(self.scripts, self.keys, [call], [job])


def _result_text(result: str | None) -> str:
    """A completed job's stored result (JSON) as an announcement reads it: a string
    as it is, anything else as JSON."""
    if result is None:
        return "null"
    try:
        value = orjson.loads(result)
    except orjson.JSONDecodeError:
        return result
    return value if isinstance(value, str) else result


__all__ = ["Gates"]
