"""Dispatching: SPEC's checks in SPEC's order, the rate-limit window, and the
dispatch scripts, for one batch of inputs."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from agentq._access import DEPEND_DENIED, may_view
from agentq._admission import (
    Prepared,
    allowed,
    dispatched_record,
    dispatched_view,
    parse_input,
    prepare,
)
from agentq._deployment import Deployment
from agentq.eventlog import reader, tracing
from agentq.eventlog.scripts import Refusal, Scripts
from agentq.projections.global_index import dispatch_indexed
from agentq.schemas.errors import (
    AgentqError,
    Forbidden,
    InvalidState,
    NotFound,
    QueueFull,
    RateLimited,
    Unauthorized,
    UnknownAgent,
)
from agentq.schemas.job import JobView, agent_of_job
from agentq.schemas.tools import DispatchInput

# How long a dispatch refused by a full rate window waits for places held by
# dispatches still in flight to settle.
_RATE_SETTLE_SECONDS = 1.0


class Remembered:
    """What a client remembers of the jobs it dispatched in the last few seconds,
    so that ``wait`` on one of them can start from the record the script wrote
    without reading it back (the usual dispatch-then-wait of an agent)."""

    SECONDS = 10.0
    MOST = 1024

    def __init__(self, seconds: float = SECONDS) -> None:
        """``seconds``: how long a job is remembered; shorter than the retention
        (``retention.jobsSeconds``), since the events a remembered record would be
        followed from may leave the log once that has passed."""
        self.seconds = seconds
        self._jobs: dict[str, tuple[float, Prepared, str, int, str]] = {}

    def add(self, prepared: Prepared, state: str, at: int, event_id: str) -> None:
        if len(self._jobs) >= self.MOST:
            del self._jobs[next(iter(self._jobs))]  # the oldest
        self._jobs[prepared.job.job_id] = (time.monotonic(), prepared, state, at, event_id)

    def record(self, job_id: str, *, forget: bool = False) -> dict[str, str] | None:
        """The job's record as dispatched, if remembered and recent."""
        found = self._jobs.pop(job_id, None) if forget else self._jobs.get(job_id)
        if found is None or time.monotonic() - found[0] > self.seconds:
            return None
        return dispatched_record(*found[1:])


def _carrying(prepared: Sequence[Prepared], traceparents: Sequence[str | None]
              ) -> list[Prepared]:
    """The jobs with their trace's ``traceparent`` in their spec (and so in their
    ``JobDispatched``), where they have one."""
    out = []
    for p, traceparent in zip(prepared, traceparents, strict=True):
        if traceparent is None:
            out.append(p)
            continue
        spec = {**p.spec, "traceparent": traceparent}
        out.append(Prepared(p.input, p.job._replace(spec_json=orjson.dumps(spec)), spec))
    return out


class StatusReader(Protocol):
    """A job's view as ``caller`` may see it (the client's ``status``)."""

    async def __call__(self, job_id: str, *, caller: str | None = None) -> JobView: ...


class Dispatcher:
    """Dispatches for one client: given its deployment, and how it reads a job's
    view (an idempotent repeat answers with the job as it is now)."""

    def __init__(self, deployment: Deployment, status: StatusReader) -> None:
        self.deployment = deployment
        retention = deployment.config.retention
        leaves = retention.archive is not None and retention.jobs_seconds > 0
        self.remembered = Remembered(
            min(Remembered.SECONDS, retention.jobs_seconds / 2) if leaves else Remembered.SECONDS)
        self._status = status

    async def dispatch_many(
        self, items: Sequence[DispatchInput | dict[str, Any]], who: str
    ) -> list[JobView]:
        """Validate, admit and dispatch ``items`` for caller ``who``; see
        :meth:`Client.dispatch_many`."""
        many = len(items) > 1
        inputs = [
            parse_input(item, f"[{i}]." if many else "") for i, item in enumerate(items)
        ]
        if not inputs:
            return []
        depths = await self._depths(inputs)
        config = self.deployment.config
        prepared = [prepare(inp, who, depths.get(inp.parent_job_id or "", -1) + 1, config)
                    for inp in inputs]
        # Traces: a send span per job, whose traceparent the job carries (in its spec).
        sends = tracing.start_sends([(p.input.target, p.job.job_id) for p in prepared])
        if sends is None:
            return await self._dispatch_prepared(prepared, who)
        try:
            views = await self._dispatch_prepared(_carrying(prepared, sends.traceparents), who)
        except BaseException as exc:
            sends.end(exc)
            raise
        sends.end()
        return views

    async def _dispatch_prepared(self, prepared: Sequence[Prepared], who: str) -> list[JobView]:
        """SPEC's checks and the dispatch scripts for jobs made ready."""
        token, taken = await self._admit(prepared, who)
        try:
            views = await self._run_dispatch(prepared, who)
        except BaseException as exc:
            # Jobs of other partitions may have been dispatched: they keep their places.
            if taken:
                used = min(taken, len(getattr(exc, "dispatched", [])))
                await self._settle_rate(who, token, taken, used)
            raise
        if taken:
            # Idempotent repeats dispatched nothing: their places go back.
            used = sum(1 for v in views if not v[1])
            await self._settle_rate(who, token, taken, used)
        return [view for view, _ in views]

    async def _depths(self, inputs: Sequence[DispatchInput]) -> dict[str, int]:
        """Parents' depths by job id; parents and dependencies that do not exist are
        left out (the admission checks report them in SPEC's order)."""
        parents = {i.parent_job_id for i in inputs if i.parent_job_id}
        if not parents:
            return {}
        found: dict[str, int] = {}
        ordered = sorted(parents)
        for job_id, spec in zip(ordered, await self.deployment.specs(ordered), strict=True):
            if spec is not None:
                found[job_id] = int(orjson.loads(spec).get("depth", 0))
        return found

    async def _dependency_refusal(
        self, inputs: Sequence[DispatchInput], caller: str
    ) -> AgentqError | None:
        """SPEC's check 6: every dependency exists (``not_found`` first), and a
        non-system caller may view it, since its result shows in the dependent's
        view (else ``unauthorized``)."""
        wanted = sorted({d for i in inputs for d in i.depends_on})
        if not wanted:
            return None
        specs = await self.deployment.specs(wanted)
        for job_id, spec in zip(wanted, specs, strict=True):
            if spec is None:
                return NotFound(f"Dependency job {job_id} not found", job_id=job_id)
        if self.deployment.config.is_system(caller):
            return None
        for job_id, spec in zip(wanted, specs, strict=True):
            if agent_of_job(job_id) != caller and not may_view(caller, orjson.loads(spec or "{}")):
                return Unauthorized(DEPEND_DENIED)
        return None

    async def _admit(self, prepared: Sequence[Prepared], caller: str) -> tuple[str, int]:
        """SPEC's checks 3, 4, 6 and 7 (the script makes 1, 2 and 5 atomically with
        the write). Returns the rate-limit token and how many dispatches it took."""
        allow = await self.deployment.allow_list(caller)
        limit = self.deployment.config.rate_limit.dispatches_per_minute
        token, taken = uuid.uuid4().hex, 0
        # The first of these checks to fail, as (SPEC's step number, error).
        refusal: tuple[int, AgentqError] | None = None
        barred = [p.input.target for p in prepared if not allowed(allow, p.input.target)]
        if barred:
            refusal = (3, Forbidden(f'Target agent "{barred[0]}" is not in allowAgents'))
        elif limit > 0:
            outcome, used = await self._take_rate(caller, limit, len(prepared), token)
            if outcome == "taken":
                taken = len(prepared)
            else:
                refusal = (4, RateLimited(used, limit))
        if refusal is None:
            dependency = await self._dependency_refusal([p.input for p in prepared], caller)
            refusal = (6, dependency) if dependency else None
        if refusal is None:
            depth = self._depth_refusal(prepared)
            refusal = (7, depth) if depth else None
        if refusal is not None:
            if taken:
                await self._settle_rate(caller, token, taken, 0)
            await self._refuse_in_order(prepared, caller, *refusal)
        return token, taken

    async def _take_rate(
        self, caller: str, limit: int, count: int, token: str
    ) -> tuple[str, int]:
        """Take places in the caller's window. While the window is full only
        because of dispatches still in flight, wait for them to settle (briefly):
        one refused elsewhere gives its place back."""
        deadline = time.monotonic() + _RATE_SETTLE_SECONDS
        while True:
            outcome, used = await self.deployment.call(self.deployment.scripts.take_rate(
                self.deployment.partition(caller), limit, count, token))
            if outcome != "busy":
                return outcome, used
            if time.monotonic() > deadline:
                return "refused", used
            await asyncio.sleep(0.002)

    async def _settle_rate(self, caller: str, token: str, taken: int, used: int) -> None:
        """Keep ``used`` of the ``taken`` places in the caller's window; the rest go back."""
        await self.deployment.scripts.settle_rate(
            self.deployment.partition(caller), token, taken, used)

    def _depth_refusal(self, prepared: Sequence[Prepared]) -> AgentqError | None:
        max_depth = self.deployment.config.limits.max_depth
        for p in prepared:
            depth = int(p.spec.get("depth", 0))
            if p.input.parent_job_id and depth == 0:
                return NotFound(f"Job {p.input.parent_job_id} not found",
                                job_id=p.input.parent_job_id)
            if depth > max_depth:
                return Forbidden(f"Dispatch depth exceeded: {depth}/{max_depth}")
        return None

    async def _refuse_in_order(
        self, prepared: Sequence[Prepared], caller: str, step: int, refusal: AgentqError
    ) -> None:
        """Raise the first failing check in SPEC's order, knowing check ``step``
        failed with ``refusal``: checks 2 (known agent) and 5 (depth cap) are
        made here; the others before ``step`` passed.

        Returns instead when every input is an idempotent repeat (those win).
        """
        async with self.deployment.redis.pipeline(transaction=False) as pipe:
            for p in prepared:
                part = self.deployment.partition(p.input.target)
                key = p.input.idempotency_key
                pipe.get(part.idempotency(caller, key) if key else part.no_idempotency)
                pipe.exists(part.meta)
                pipe.hmget(part.counts, "queued", "delayed", "active")
            replies = await self.deployment.call(pipe.execute())
        firsts = replies[0::3]
        if all(firsts):
            return
        for p, known in zip(prepared, replies[1::3], strict=True):
            if not known:
                raise UnknownAgent(p.input.target)
        if step < 5:  # allowAgents and the rate limit come before the queue-depth cap
            raise refusal
        cap = self.deployment.config.rate_limit.max_queue_depth
        fresh: dict[str, int] = defaultdict(int)
        for p in prepared:
            if not p.input.depends_on and not p.job.requires_approval:
                fresh[p.input.target] += 1
        for p, counts in zip(prepared, replies[2::3], strict=True):
            pending = sum(int(c or 0) for c in counts)
            if cap and pending + fresh[p.input.target] > cap:
                raise QueueFull(p.input.target, pending, cap)
        raise refusal

    async def _run_dispatch(
        self, prepared: Sequence[Prepared], caller: str
    ) -> list[tuple[JobView, bool]]:
        """Run the dispatch scripts; (view, was an idempotent repeat) per input, in order."""
        by_target: dict[str, list[int]] = defaultdict(list)
        for index, p in enumerate(prepared):
            by_target[p.input.target].append(index)
        targets = list(by_target)
        calls = [
            Scripts.dispatch_call(
                self.deployment.partition(target),
                [prepared[i].job for i in by_target[target]],
                actor=caller,
                max_queue_depth=self.deployment.config.rate_limit.max_queue_depth,
                idempotency_ttl=self.deployment.config.retention.idempotency_seconds,
            )
            for target in targets
        ]
        # The jobs go into the global indexes (for list) in the same round trip.
        replies = await self.deployment.call(dispatch_indexed(
            self.deployment.scripts, self.deployment.keys, calls, [p.job for p in prepared]))
        results: list[tuple[JobView, bool] | None] = [None] * len(prepared)
        repeats: list[tuple[int, str]] = []
        error: AgentqError | None = None
        show_session = self.deployment.config.is_system(caller)
        for target, reply in zip(targets, replies, strict=True):
            outcome = Scripts.dispatch_outcome(reply)
            if isinstance(outcome, Refusal):
                error = error or self._dispatch_refusal(target, outcome)
                continue
            for index, (job_id, state, event_id) in zip(by_target[target], outcome.jobs,
                                                         strict=True):
                if state == "existing":
                    repeats.append((index, job_id))
                else:
                    self.remembered.add(prepared[index], state, outcome.at, event_id)
                    view = dispatched_view(prepared[index], state, outcome.at, show_session)
                    if view.depends_on:
                        view = await reader.with_dependencies(
                            self.deployment.redis, self.deployment.keys, view)
                    results[index] = (view, False)
        for index, job_id in repeats:
            results[index] = (await self._status(job_id, caller=caller), True)
        if error is not None:
            error.dispatched = [r[0] for r in results if r is not None]  # type: ignore[attr-defined]
            raise error
        return [r for r in results if r is not None]

    @staticmethod
    def _dispatch_refusal(target: str, refusal: Refusal) -> AgentqError:
        if refusal.code == "unknown_agent":
            return UnknownAgent(target)
        if refusal.code == "queue_full":
            pending, cap = (int(x) for x in refusal.details)
            return QueueFull(target, pending, cap)
        return InvalidState(f"Job {refusal.details[0]} already exists")
