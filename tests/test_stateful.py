"""A stateful property test of the write side, on a real Redis server.

Hypothesis drives random dispatches (single and batched, delayed, prioritised,
with idempotency keys and dependencies, some requiring approval), approvals and
rejections, starts, completions, failed attempts,
stalls, promotions of delayed jobs, retries, cancels and drains over three
agents, while a model keeps the state every job should be in. It checks DESIGN's
rule 1 and SPEC's transition table against what Redis holds: after every step
for what the step touched (the jobs and partitions the model changed or whose
log has new entries), and over everything, read afresh, at the end of each
example:

- every job is in a legal state, and in the state the model expects;
- every transition the model made is in ``LEGAL_TRANSITIONS``;
- each partition's ``counts`` hash equals the number of jobs in each state;
- the job's state-changing events (walked through ``STATE_AFTER``) give exactly
  the sequence of states the model saw it enter: one event per change, none without;
- ``fold.records_from`` of the whole log equals every live state record;
- nothing is lost: the ready streams (and their consumer group), the delayed
  set, the leases and the active hash hold exactly the model's queued, delayed
  and active jobs; workers take them high priority first, FIFO within one.

Some steps are races: two operations whose steps interleave, one cut in
between another's reads and its script (drain's candidates and a promotion,
a rebuild's delete and the projector's batch, a worker's take and its
completion flush), or both sent at once (cancel and complete). Their outcome
may depend on the order; the model accepts each order's outcome and the same
invariants hold after them, plus: the views equal the log once caught up, and
no worker runs more handlers than its concurrency.

One suite, two backends (the ``backend`` fixture): real Redis, then fakeredis
with Lua in process (the same scripts, the same client code).
Each example gets its own key prefix and event loop; its keys are deleted at
teardown. ``AGENTQ_STATEFUL_EXAMPLES`` and ``AGENTQ_STATEFUL_STEPS`` set the
number of examples and the steps in each on real Redis (default 40 of 30 steps),
``AGENTQ_STATEFUL_FAKE_EXAMPLES`` and ``AGENTQ_STATEFUL_FAKE_STEPS`` on fakeredis
(default 300 of 5 steps: fakeredis is no faster per command than a local
Redis, so its many examples are short ones; see docs/architecture.md). The
defaults keep the suite under 10 minutes on two cores; a deeper run sets them
higher (AGENTQ_STATEFUL_EXAMPLES=500 takes about 8 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import pytest
from _backends import Backend
from _indexes import index_members
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

import agentq
from agentq.consumers.handlers import Job
from agentq.consumers.projector import Projector
from agentq.consumers.worker import Worker, WorkerSettings
from agentq.eventlog import fold, reader
from agentq.eventlog.ids import new_job_id
from agentq.eventlog.keys import PRIORITY_CODES, WORKERS_GROUP, Partition
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import Backoff, Refusal, StartedJob, ensure_work_groups
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config
from agentq.schemas.errors import InvalidState, NotFound, Unauthorized
from agentq.schemas.events import STATE_AFTER
from agentq.schemas.job import LEGAL_TRANSITIONS, STATES

EXAMPLES = {
    "redis": int(os.environ.get("AGENTQ_STATEFUL_EXAMPLES", "40")),
    "fakeredis": int(os.environ.get("AGENTQ_STATEFUL_FAKE_EXAMPLES", "300")),
}
STEPS = {
    "redis": int(os.environ.get("AGENTQ_STATEFUL_STEPS", "30")),
    "fakeredis": int(os.environ.get("AGENTQ_STATEFUL_FAKE_STEPS", "5")),
}

AGENTS = ("a", "b", "c")
OPERATOR = "main"  # the default system agent
DISPATCHERS = ("main", "a", "b", "c")
OUTSIDER = "x"  # neither dispatcher nor target of any job, not a system agent
CODES = ("h", "n", "l")  # ready streams, high priority first
PRIORITIES = ("high", "normal", "low")
KEYS = ("k0", "k1")  # idempotency keys: few, so that they repeat

# "soon" timers come due within a few milliseconds; "later" ones never in a test.
DELAYS = {"none": 0.0, "soon": 0.001, "later": 3600.0}
BACKOFFS = {
    "none": Backoff(0, 0),
    "soon": Backoff(2, 2),  # always 1 ms: floor(1 + 1 * spread) with spread in [0, 1)
    "later": Backoff(3_600_000, 7_200_000),
}
LEASES_MS = {"short": 1, "long": 600_000}
SETTLE_S = 0.004  # longer than every "soon" timer and short lease
BIG = 10**6


@dataclass
class ModelJob:
    job_id: str
    target: str
    dispatched_by: str
    code: str
    max_attempts: int
    state: str = ""
    states: list[str] = field(default_factory=list)
    attempt: int = 0
    budget_from: int = 0
    due: str | None = None  # when delayed: "soon" or "later"
    delay: str = "none"  # as dispatched (honoured when approved)
    deps: bool = False  # dispatched with a dependency (no gate runs: it stays open)
    lease: str | None = None  # when active: "short" or "long"
    worker: str | None = None


@dataclass(frozen=True)
class Item:
    """One dispatch input as the model sees it."""

    target: str
    delay: str
    priority: str
    max_attempts: int
    key: str | None
    dep: int | None
    approval: bool = False

    def fields(self, depends_on: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": self.target,
            # Long enough that the log holds it by reference (its SHA-256).
            "task": f"task for {self.target}: {'.' * 80}",
            "priority": self.priority,
            "maxAttempts": self.max_attempts,
            "delaySeconds": DELAYS[self.delay],
        }
        if self.key is not None:
            out["idempotencyKey"] = self.key
        if depends_on:
            out["dependsOn"] = depends_on
        if self.approval:
            out["requiresApproval"] = True
        return out


items = st.builds(
    Item,
    target=st.sampled_from(AGENTS),
    delay=st.sampled_from(("none", "none", "none", "soon", "soon", "later")),
    priority=st.sampled_from(PRIORITIES),
    max_attempts=st.sampled_from((1, 1, 2, 3)),
    key=st.none() | st.sampled_from(KEYS),
    # One job in six waits on an earlier one (no gate runs here: it stays waiting).
    dep=st.tuples(st.integers(0, 5), st.integers(0, BIG)).map(lambda t: None if t[0] else t[1]),
    # One job in five waits for approval.
    approval=st.sampled_from((False, False, False, False, True)),
)
picks = st.integers(0, BIG)
fences = st.sampled_from((0, 0, 0, 0, -1, 1))  # mostly the current attempt, sometimes not
# The last one long enough that the log holds it by reference.
results = st.sampled_from((None, "done", {"n": 1}, [1, "two"], {"long": "x" * 80}))
outcomes = st.sampled_from(
    ("complete", "progress", "fail-none", "fail-soon", "fail-later", "leave")
)


@contextlib.contextmanager
def cut_in(
    obj: Any, name: str, other: Callable[[], Awaitable[Any]], *, after: bool = False
) -> Iterator[list[Any]]:
    """Make the first call of ``obj.<name>`` run ``other`` just before it (or just
    after it): another operation cut in between the caller's reads and its write.
    The list returned receives ``other``'s result."""
    original = getattr(obj, name)
    results: list[Any] = []
    fired = False

    async def hooked(*args: Any, **kwargs: Any) -> Any:
        nonlocal fired
        if fired:
            return await original(*args, **kwargs)
        fired = True
        if not after:
            results.append(await other())
            return await original(*args, **kwargs)
        reply = await original(*args, **kwargs)
        results.append(await other())
        return reply

    setattr(obj, name, hooked)  # an instance attribute shadows the method
    try:
        yield results
    finally:
        delattr(obj, name)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds, yielding to the loop in between."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class AgentqMachine(RuleBasedStateMachine):
    backend: ClassVar[Backend]

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.prefix = f"st{uuid.uuid4().hex[:10]}"
        config = Config.model_validate(
            {"keyPrefix": self.prefix, "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
        )
        self.client = self.backend.connect(config)
        self.jobs: dict[str, ModelJob] = {}
        self.order: list[str] = []  # job ids in dispatch order
        # Per agent and priority code: the job ids of the ready entries not yet
        # delivered to a worker, oldest first (a cancelled job's entry stays).
        self.ready: dict[str, dict[str, list[str]]] = {
            agent: {code: [] for code in CODES} for agent in AGENTS
        }
        self.idem: dict[tuple[str, str, str], str] = {}  # (caller, target, key) -> job id
        self.missing: list[str] = []  # well-formed job ids never dispatched
        self.viewed: set[str] = set()  # agents whose views (projections) exist
        self.blocking: Redis | None = None  # a worker's connection for blocking reads
        # What the checks have read: each log up to log_end, its events by job;
        # what the steps since the last check touched.
        self.log_end = dict.fromkeys(AGENTS, "-")
        self.events: dict[str, list[RawEvent]] = {}
        self.touched_agents: set[str] = set()
        self.touched_jobs: set[str] = set()
        self.missing_checked = 0
        try:
            self.run(self._open())
        except BaseException:
            self.runner.run(self.client.aclose())
            self.runner.close()
            raise

    def run(self, awaitable: Any) -> Any:
        return self.runner.run(awaitable)

    async def _open(self) -> None:
        await self.client.open()
        for agent in AGENTS:
            await self.client.add_agent(agent)
            await ensure_work_groups(self.client.redis, self.part(agent))

    def teardown(self) -> None:
        try:
            # The full check ends every example that passed its steps (with an
            # exception on its way, a step failed: that is the one to report).
            if sys.exc_info()[0] is None:
                self.run(self._check(full=True))
        finally:
            self._close()

    def _close(self) -> None:
        try:
            self.run(self._delete_keys())
            self.run(self.client.aclose())
        finally:
            self.runner.close()

    async def _delete_keys(self) -> None:
        redis = self.client.redis
        keys = [k async for k in redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])

    # -- helpers -------------------------------------------------------------

    def part(self, agent: str) -> Partition:
        self._touch(agent)
        return self.client.partition(agent)

    def enter(self, job: ModelJob, state: str) -> None:
        self._touch(job.target, job.job_id)
        job.state = state
        job.states.append(state)
        job.due = job.lease = job.worker = None

    def queue(self, job: ModelJob) -> None:
        self.enter(job, "queued")
        self.ready[job.target][job.code].append(job.job_id)

    def delay(self, job: ModelJob, due: str) -> None:
        self.enter(job, "delayed")
        job.due = due

    def attempt_over(self, job: ModelJob, backoff: str) -> str:
        """An attempt failed or its lease expired: back to run again, or failed."""
        left = job.max_attempts - (job.attempt - job.budget_from)
        if left <= 0:
            self.enter(job, "failed")
        elif backoff == "none":
            self.queue(job)
        else:
            self.delay(job, backoff)
        return job.state

    def choose(self, pick: int, pool: list[str]) -> ModelJob:
        return self.jobs[pool[pick % len(pool)]]

    def in_state(self, *states: str, agent: str | None = None) -> list[str]:
        return [
            j
            for j in self.order
            if self.jobs[j].state in states and (agent is None or self.jobs[j].target == agent)
        ]

    def choose_job(self, pick: int, prefer: tuple[str, ...]) -> ModelJob:
        """Mostly a job in one of the ``prefer`` states, sometimes any job."""
        pool = self.in_state(*prefer)
        if not pool or pick % 5 == 0:
            pool = self.order
        return self.choose(pick // 5, pool)

    def has_jobs(self) -> bool:
        return bool(self.jobs)

    # -- dispatch ------------------------------------------------------------

    def _dispatched(
        self, caller: str, batch: list[Item], views: list[agentq.JobView], depends: list[list[str]]
    ) -> None:
        assert len(views) == len(batch)
        for item, view, deps in zip(batch, views, depends, strict=True):
            triple = (caller, item.target, item.key) if item.key is not None else None
            if triple is not None and triple in self.idem:
                first = self.idem[triple]
                assert view.job_id == first, (
                    f"idempotency key {item.key!r} repeated by {caller} for {item.target}: "
                    f"expected the first job {first}, got {view.job_id} "
                    f"(new job: {view.job_id not in self.jobs})"
                )
                assert view.state == self.jobs[first].state, (view.state, self.jobs[first])
                continue
            assert view.job_id not in self.jobs, f"dispatch returned an old job {view.job_id}"
            job = ModelJob(
                view.job_id, item.target, caller, PRIORITY_CODES[item.priority], item.max_attempts
            )
            self.jobs[job.job_id] = job
            self.order.append(job.job_id)
            job.delay, job.deps = item.delay, bool(deps)
            if item.approval:
                self.enter(job, "pending_approval")
            elif deps:
                self.enter(job, "waiting_dependencies")
            elif item.delay != "none":
                self.delay(job, item.delay)
            else:
                self.queue(job)
            assert view.state == job.state, (view.job_id, view.state, job.state)
            if triple is not None:
                self.idem[triple] = job.job_id

    def _depends(self, caller: str, item: Item) -> list[str]:
        """A dependency the caller may view (one it dispatched or that targets it;
        a system agent any): a job's view shows its dependencies' results."""
        pool = [
            j for j in self.order
            if caller == OPERATOR or caller in (self.jobs[j].dispatched_by, self.jobs[j].target)
        ]
        if item.dep is None or not pool:
            return []
        return [pool[item.dep % len(pool)]]

    @rule(caller=st.sampled_from(DISPATCHERS), item=items)
    def dispatch(self, caller: str, item: Item) -> None:
        deps = self._depends(caller, item)
        fields = item.fields(deps)
        view = self.run(
            self.client.dispatch(fields.pop("target"), fields.pop("task"), caller=caller, **fields)
        )
        self._dispatched(caller, [item], [view], [deps])

    @rule(caller=st.sampled_from(DISPATCHERS), batch=st.lists(items, min_size=1, max_size=3))
    def dispatch_many(self, caller: str, batch: list[Item]) -> None:
        deps = [self._depends(caller, item) for item in batch]
        inputs = [item.fields(d) for item, d in zip(batch, deps, strict=True)]
        views = self.run(self.client.dispatch_many(inputs, caller=caller))
        self._dispatched(caller, batch, views, deps)

    # -- work ----------------------------------------------------------------

    @rule(
        agent=st.sampled_from(AGENTS), n=st.integers(1, 4), lease=st.sampled_from(tuple(LEASES_MS))
    )
    def start(self, agent: str, n: int, lease: str) -> None:
        self._start(agent, n, lease)

    def _start(self, agent: str, n: int, lease: str) -> list[str]:
        part = self.part(agent)
        worker = f"w-{agent}"

        async def take() -> tuple[list[StartedJob], dict[str, str], list[str]]:
            started, tails = await self.client.scripts.start(part, worker, LEASES_MS[lease], n)
            ends = []
            for stream in part.ready_streams:
                last = await self.client.redis.xrevrange(stream, count=1)
                ends.append(last[0][0] if last else "0-0")
            return started, tails, ends

        started, tails, ends = self.run(take())
        # High priority first, FIFO within one; entries of jobs no longer queued
        # are dropped and do not count.
        expected: list[str] = []
        for code in CODES:
            fifo = self.ready[agent][code]
            while fifo and len(expected) < n:
                job = self.jobs[fifo.pop(0)]
                if job.state == "queued":
                    self.enter(job, "active")
                    job.attempt += 1
                    job.lease, job.worker = lease, worker
                    expected.append(job.job_id)
        assert [s.job_id for s in started] == expected, "ready jobs started out of order or lost"
        for s in started:
            assert s.record["state"] == "active"
            assert int(s.record["attempt"]) == self.jobs[s.job_id].attempt
        if len(started) < n:
            # The streams were read to their ends: blocking from the tails misses nothing
            # (no entry lies after them) and waits for the next entry.
            def position(entry_id: str) -> tuple[int, int]:
                ms, seq = entry_id.split("-")
                return int(ms), int(seq)

            assert set(tails) == set(part.ready_streams)
            for stream, end in zip(part.ready_streams, ends, strict=True):
                assert position(tails[stream]) >= position(end), (stream, tails, ends)
        return expected

    def _complete(self, job: ModelJob, fence: int, result: Any) -> None:
        (outcome,) = self.run(
            self.client.scripts.complete(
                self.part(job.target),
                job.worker or "w-late",
                [(job.job_id, job.attempt + fence, orjson.dumps(result))],
            )
        )
        if job.state == "active" and fence == 0:
            assert outcome is None, outcome
            self.enter(job, "completed")
        else:
            assert outcome == Refusal("invalid_state", (job.state, str(job.attempt))), outcome

    def _fail(self, job: ModelJob, fence: int, backoff: str) -> None:
        outcome = self.run(
            self.client.scripts.fail(
                self.part(job.target),
                job.worker or "w-late",
                job.job_id,
                job.attempt + fence,
                "boom",
                BACKOFFS[backoff],
            )
        )
        if job.state == "active" and fence == 0:
            assert outcome == self.attempt_over(job, backoff), outcome
        else:
            assert outcome == Refusal("invalid_state", (job.state, str(job.attempt))), outcome

    def _progress(self, job: ModelJob, fence: int, percent: int) -> None:
        outcome = self.run(
            self.client.scripts.progress(
                self.part(job.target),
                job.worker or "w-late",
                job.job_id,
                job.attempt + fence,
                orjson.dumps({"percent": percent, "message": f"{percent}%"}),
            )
        )
        if job.state == "active" and fence == 0:
            assert outcome is None, outcome
        else:
            assert outcome == Refusal("invalid_state", (job.state, str(job.attempt))), outcome

    @rule(
        agent=st.sampled_from(AGENTS),
        n=st.integers(1, 4),
        lease=st.sampled_from(tuple(LEASES_MS)),
        outcomes=st.lists(outcomes, max_size=4),
    )
    def work(self, agent: str, n: int, lease: str, outcomes: list[str]) -> None:
        """Start jobs, then finish some of them at once, as a worker would."""
        started = self._start(agent, n, lease)
        for job_id, outcome in zip(started, outcomes, strict=False):
            job = self.jobs[job_id]
            if outcome == "complete":
                self._complete(job, 0, "done")
            elif outcome == "progress":
                self._progress(job, 0, 50)
            elif outcome.startswith("fail-"):
                self._fail(job, 0, outcome.removeprefix("fail-"))

    @precondition(lambda self: bool(self.in_state("active")))
    @rule(pick=picks, fence=fences, result=results)
    def complete(self, pick: int, fence: int, result: Any) -> None:
        self._complete(self.choose_job(pick, ("active",)), fence, result)

    @precondition(lambda self: bool(self.in_state("active")))
    @rule(pick=picks, fence=fences, backoff=st.sampled_from(tuple(BACKOFFS)))
    def fail(self, pick: int, fence: int, backoff: str) -> None:
        self._fail(self.choose_job(pick, ("active",)), fence, backoff)

    @precondition(lambda self: bool(self.in_state("active")))
    @rule(pick=picks, fence=fences, percent=st.integers(0, 100))
    def progress(self, pick: int, fence: int, percent: int) -> None:
        self._progress(self.choose_job(pick, ("active",)), fence, percent)

    @precondition(lambda self: bool(self.in_state("active")))
    @rule(agent=st.sampled_from(AGENTS), backoff=st.sampled_from(tuple(BACKOFFS)))
    def stall(self, agent: str, backoff: str) -> None:
        # Every job of the agent is a candidate: only active ones past their lease move.
        candidates = [j for j in self.order if self.jobs[j].target == agent]
        expired = [
            j
            for j in candidates
            if self.jobs[j].state == "active" and self.jobs[j].lease == "short"
        ]

        async def sweep() -> list[str]:
            if expired:
                await asyncio.sleep(SETTLE_S)
            return await self.client.scripts.stall(
                self.part(agent), "sweeper", candidates, BACKOFFS[backoff]
            )

        reclaimed = self.run(sweep())
        assert reclaimed == expired
        for job_id in expired:
            self.attempt_over(self.jobs[job_id], backoff)

    @precondition(lambda self: bool(self.in_state("delayed")))
    @rule(agent=st.sampled_from(AGENTS))
    def promote(self, agent: str) -> None:
        candidates = [j for j in self.order if self.jobs[j].target == agent]
        due = [
            j for j in candidates if self.jobs[j].state == "delayed" and self.jobs[j].due == "soon"
        ]

        async def wake() -> tuple[list[str], int | None]:
            if due:
                await asyncio.sleep(SETTLE_S)
            return await self.client.scripts.promote(self.part(agent), "scheduler", candidates)

        moved, next_ms = self.run(wake())
        assert moved == due
        for job_id in due:
            self.queue(self.jobs[job_id])
        assert (next_ms is None) == (not self.in_state("delayed", agent=agent)), next_ms

    # -- operator commands ---------------------------------------------------

    @precondition(lambda self: bool(self.in_state("failed")))
    @rule(pick=picks, system=st.booleans() | st.just(True))
    def retry(self, pick: int, system: bool) -> None:
        job = self.choose_job(pick, ("failed",))
        caller = OPERATOR if system else "a"
        try:
            view = self.run(self.client.retry(job.job_id, caller=caller))
        except Unauthorized:
            assert not system
            return
        except InvalidState as exc:
            assert system and job.state != "failed", exc
            assert exc.state == job.state, (exc.state, job.state)
            return
        assert system and job.state == "failed", (job.job_id, job.state)
        job.budget_from = job.attempt
        self.queue(job)
        assert view.state == "queued"

    @precondition(has_jobs)
    @rule(pick=picks, who=st.sampled_from(("operator", "dispatcher", "target", "outsider")),
          approve=st.booleans())
    def decide(self, pick: int, who: str, approve: bool) -> None:
        """Approve or reject a job (approvers: the system agents, by default)."""
        job = self.choose_job(pick, ("pending_approval",))
        caller = {"operator": OPERATOR, "dispatcher": job.dispatched_by, "target": job.target,
                  "outsider": OUTSIDER}[who]
        decide = self.client.approve if approve else self.client.reject
        try:
            view = self.run(decide(job.job_id, caller=caller))
        except Unauthorized:
            assert caller != OPERATOR, (caller, job)
            return
        except InvalidState as exc:
            assert caller == OPERATOR and job.state != "pending_approval", exc
            assert exc.state == job.state, (exc.state, job.state)
            return
        assert caller == OPERATOR and job.state == "pending_approval", (caller, job)
        if not approve:
            self.enter(job, "cancelled")
        elif job.deps:
            self.enter(job, "waiting_dependencies")
        elif job.delay == "later" or (job.delay == "soon" and view.state == "delayed"):
            self.delay(job, job.delay)
        else:  # no delay, or a "soon" one that has passed
            self.queue(job)
        assert view.state == job.state, (view.state, job)

    @precondition(has_jobs)
    @rule(pick=picks, who=st.sampled_from(("operator", "dispatcher", "target", "outsider")))
    def cancel(self, pick: int, who: str) -> None:
        job = self.choose_job(pick, ("waiting_dependencies", "delayed", "queued", "active",
                                     "pending_approval"))
        caller = {
            "operator": OPERATOR,
            "dispatcher": job.dispatched_by,
            "target": job.target,
            "outsider": OUTSIDER,
        }[who]
        allowed = caller in (OPERATOR, job.dispatched_by, job.target)
        open_states = ("waiting_dependencies", "delayed", "queued", "active", "pending_approval")
        try:
            view = self.run(self.client.cancel(job.job_id, caller=caller))
        except Unauthorized:
            assert not allowed, (caller, job)
            return
        except InvalidState as exc:
            assert allowed and job.state not in open_states, exc
            assert exc.state == job.state, (exc.state, job.state)
            return
        assert allowed and job.state in open_states, (caller, job.job_id, job.state)
        # A queued job's ready entry stays behind; the worker that reads it drops it.
        self.enter(job, "cancelled")
        assert view.state == "cancelled"

    @rule(agent=st.sampled_from(AGENTS))
    def drain(self, agent: str) -> None:
        out = self.run(self.client.drain(agent))
        expected = self.in_state("queued", "delayed", agent=agent)
        assert sorted(out.job_ids) == sorted(expected), (out.job_ids, expected)
        assert out.drained == len(expected)
        for job_id in expected:
            job = self.jobs[job_id]
            if job.state == "queued":
                self.ready[agent][job.code].remove(job_id)
            self.enter(job, "cancelled")

    @rule(agent=st.sampled_from(AGENTS), op=st.sampled_from(("cancel", "retry", "status")))
    def unknown_job(self, agent: str, op: str) -> None:
        job_id = new_job_id(agent)
        self.missing.append(job_id)
        call = {
            "cancel": self.client.cancel,
            "retry": self.client.retry,
            "status": self.client.status,
        }[op]
        with pytest.raises(NotFound):
            self.run(call(job_id))

    # -- races -------------------------------------------------------------

    @precondition(lambda self: bool(self.in_state("delayed")))
    @rule(pick=picks)
    def drain_racing_promotion(self, pick: int) -> None:
        """drain reads its candidates; a promotion queues the due ones among them;
        then drain's script runs: every job that was queued or delayed is drained."""
        agent = self.choose(pick, self.in_state("delayed")).target
        part = self.part(agent)
        mine = [j for j in self.order if self.jobs[j].target == agent]
        candidates = self.in_state("queued", "delayed", agent=agent)
        due = [
            j for j in candidates if self.jobs[j].state == "delayed" and self.jobs[j].due == "soon"
        ]

        async def promotion() -> list[str]:
            if due:
                await asyncio.sleep(SETTLE_S)
            moved, _ = await self.client.scripts.promote(part, "scheduler", mine)
            return moved

        with cut_in(self.client.scripts, "drain", promotion) as promoted:
            out = self.run(self.client.drain(agent))
        assert promoted == [due], (promoted, due)
        for job_id in due:
            self.queue(self.jobs[job_id])
        assert sorted(out.job_ids) == sorted(candidates), (out.job_ids, candidates)
        entries = self.run(self._entries(part))
        for job_id in candidates:
            job = self.jobs[job_id]
            # drain deletes the ready entries it read; one written by the promotion
            # may stay behind, like a cancelled job's (the worker drops it).
            if job.state == "queued" and (job_id not in due or job_id not in entries):
                self.ready[agent][job.code].remove(job_id)
            self.enter(job, "cancelled")

    async def _entries(self, part: Partition) -> set[str]:
        """The job ids of the partition's ready entries."""
        found: set[str] = set()
        for stream in part.ready_streams:
            entries: list[Any] = await self.client.redis.xrange(stream)  # type: ignore[assignment]
            found |= {fields["j"] for _, fields in entries}
        return found

    @precondition(lambda self: bool(self.in_state("active")))
    @rule(pick=picks, cancel_first=st.booleans())
    def cancel_racing_complete(self, pick: int, cancel_first: bool) -> None:
        """An operator cancels a job while its worker completes it: one of them wins."""
        job = self.choose(pick, self.in_state("active"))
        part = self.part(job.target)

        async def race() -> tuple[Any, Any]:
            cancel = self.client.cancel(job.job_id)
            complete = self.client.scripts.complete(
                part, job.worker or "w-late", [(job.job_id, job.attempt, b'"done"')])
            first, second = (cancel, complete) if cancel_first else (complete, cancel)
            replies = await asyncio.gather(first, second, return_exceptions=True)
            cancelled, completed = replies if cancel_first else replies[::-1]
            assert isinstance(completed, list), completed
            return cancelled, completed[0]

        cancelled, completed = self.run(race())
        if completed is None:
            assert isinstance(cancelled, InvalidState), cancelled
            assert cancelled.state == "completed", cancelled.state
            self.enter(job, "completed")
        else:
            assert completed == Refusal("invalid_state", ("cancelled", str(job.attempt))), (
                completed, cancelled)
            assert isinstance(cancelled, agentq.JobView), cancelled
            assert cancelled.state == "cancelled"
            self.enter(job, "cancelled")

    @rule(
        agent=st.sampled_from(AGENTS),
        applied=picks,
        cut=st.sampled_from(("during", "after")),
    )
    def rebuild_racing_projector(self, agent: str, applied: int, cut: str) -> None:
        """The projector checks a batch follows its position; a rebuild of the views
        runs, and the batch is applied either while the rebuild reads the log or
        after the rebuild: no event is lost."""
        part = self.part(agent)

        async def race() -> None:
            events = await reader.read_partition(self.client.redis, part, count=BIG)
            await self.client.redis.delete(part.projection,
                                           *(part.index_state(s) for s in STATES),
                                           *(part.index_by(d) for d in DISPATCHERS))
            split = applied % (len(events) + 1)
            projector = Projector(self.client.redis, self.client.redis, self.client.keys)
            if split:
                await projector.projection.apply(part, events[:split])
            batch = events[split:]
            if not batch:
                await rebuild(self.client.redis, [part])
                return
            checked = asyncio.Event()
            go = asyncio.Event()

            async def hold() -> None:
                checked.set()
                await go.wait()

            async def apply_batch() -> None:
                go.set()
                await handling

            async def rebuilding() -> None:
                await checked.wait()
                if cut == "during":
                    # Right after the rebuild's first read of the log.
                    with cut_in(self.client.redis, "xrange", apply_batch, after=True):
                        await rebuild(self.client.redis, [part])
                else:
                    await rebuild(self.client.redis, [part])
                go.set()

            with cut_in(projector.projection.scripts, "project", hold):
                handling = asyncio.ensure_future(projector.handle(batch))
                await asyncio.gather(handling, rebuilding())

        self.run(race())
        self.viewed.add(agent)
        self.run(self._check_views([agent], catch_up=False))

    async def _check_views(self, agents: list[str], *, catch_up: bool) -> None:
        """The views of ``agents`` are up to the log's end and hold exactly the model's
        jobs: all, by dispatcher, by state. A query catches up first; without
        ``catch_up`` the views must be complete as they stand."""
        redis = self.client.redis
        parts = [self.part(a) for a in agents]
        if catch_up:
            await Projection(redis).catch_up(parts)
        for agent, part in zip(agents, parts, strict=True):
            mine = [self.jobs[j] for j in self.order if self.jobs[j].target == agent]
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hget(part.projection, "pos")
                pipe.xrevrange(part.log, count=1)
                replies = await pipe.execute()
            for index in [*(part.index_state(s) for s in STATES),
                          *(part.index_by(d) for d in DISPATCHERS)]:
                replies.append(sorted(await index_members(self.client, index)))
            pos, end = replies[0], replies[1]
            assert pos == (end[0][0] if end else None), (agent, pos, end)
            every = sorted(j for got in replies[2 : 2 + len(STATES)] for j in got)
            assert every == sorted(j.job_id for j in mine), (agent, "all", every)
            for state, got in zip(STATES, replies[2 : 2 + len(STATES)], strict=True):
                want = sorted(j.job_id for j in mine if j.state == state)
                assert got == want, f"{agent}: idx:state:{state} holds {got}, jobs {want}"
            for dispatcher, got in zip(DISPATCHERS, replies[2 + len(STATES) :], strict=True):
                want = sorted(j.job_id for j in mine if j.dispatched_by == dispatcher)
                assert got == want, f"{agent}: idx:by:{dispatcher} holds {got}, jobs {want}"

    @rule(agent=st.sampled_from(AGENTS), spare=st.integers(1, 2))
    def take_racing_completion(self, agent: str, spare: int) -> None:
        """A worker runs the agent's ready jobs with ``spare`` slots left over; new
        jobs arrive, and while its take loop starts some, a running handler
        finishes, whose completion takes jobs for the slot it frees: the worker
        never runs more handlers than its concurrency."""
        self._dispatch_plain(agent, 1)
        waiting = [j for code in CODES for j in self.ready[agent][code]
                   if self.jobs[j].state == "queued"]
        concurrency = len(waiting) + spare
        self.run(self._race_worker(agent, concurrency, spare + 2))

    def _dispatch_plain(self, agent: str, n: int) -> list[str]:
        batch = [Item(agent, "none", "normal", 1, None, None) for _ in range(n)]
        views = self.run(self.client.dispatch_many([i.fields([]) for i in batch],
                                                   caller=OPERATOR))
        self._dispatched(OPERATOR, batch, views, [[] for _ in batch])
        return [v.job_id for v in views]

    async def _race_worker(self, agent: str, concurrency: int, arriving: int) -> None:
        worker_id = f"w-{agent}-run"
        gates: dict[str, asyncio.Event] = {}
        ran: list[str] = []
        running: set[str] = set()
        most = 0

        async def handler(job: Job) -> str:
            nonlocal most
            ran.append(job.id)
            running.add(job.id)
            most = max(most, len(running))
            try:
                gate = gates.setdefault(job.id, asyncio.Event())
                await gate.wait()
            finally:
                running.discard(job.id)
            return "done"

        first = [j for code in CODES for j in self.ready[agent][code]
                 if self.jobs[j].state == "queued"]
        settings = WorkerSettings(agent, concurrency=concurrency, lease_ms=LEASES_MS["long"])
        if self.blocking is None:
            self.blocking = self.client.open_blocking()
        worker = Worker(self.client.redis, self.blocking, self.client.keys, settings, handler,
                        worker_id)
        stop = asyncio.Event()
        cut: list[str] = []
        take = worker.scripts.start
        part = self.part(agent)

        async def start(*args: Any, **kwargs: Any) -> Any:
            # The take loop counted its free slots and is about to start jobs
            # that have arrived: a running handler ends in between, and its
            # completion counts the slot it frees.
            if not cut and running and await self._entries(part):
                cut.append(min(running))
                gates[cut[0]].set()
                for _ in range(20):
                    await asyncio.sleep(0)
            return await take(*args, **kwargs)

        worker.scripts.start = start  # type: ignore[method-assign]
        task = asyncio.ensure_future(worker.run(stop))
        total = len(first) + arriving
        try:
            await eventually(lambda: len(running) == len(first), "the first jobs run")
            batch = [Item(agent, "none", "normal", 1, None, None) for _ in range(arriving)]
            views = await self.client.dispatch_many([i.fields([]) for i in batch],
                                                    caller=OPERATOR)
            arrived = [v.job_id for v in views]
            await eventually(lambda: bool(cut), "the take loop starts the new jobs")

            def done() -> bool:
                for job_id in ran:
                    gates.setdefault(job_id, asyncio.Event()).set()
                return len(ran) == total and not running and worker.running == 0

            await eventually(done, "every job has run")
        finally:
            stop.set()
            for gate in gates.values():
                gate.set()
            await asyncio.wait_for(task, 10)
        self._dispatched(OPERATOR, batch, views, [[] for _ in batch])
        assert most <= concurrency, (
            f"concurrency {concurrency}: {most} handlers ran at once (took {first}, "
            f"then {arrived})")
        assert sorted(ran) == sorted(first + arrived), (ran, first, arrived)
        for job_id in ran:
            job = self.jobs[job_id]
            self.enter(job, "active")
            job.attempt += 1
            self.enter(job, "completed")
        for code in CODES:
            self.ready[agent][code].clear()

    # -- invariants ------------------------------------------------------------
    #
    # After each step the check reads what the step can have changed: the new
    # entries of every log, and for the jobs and partitions the step touched
    # (the model changed them, or the log has new events of them) their records,
    # counts and structures. At the end of an example (teardown) the same check
    # runs over everything, read afresh: the whole logs, every record, every
    # job id that was never dispatched.

    def _touch(self, agent: str, job_id: str | None = None) -> None:
        self.touched_agents.add(agent)
        if job_id is not None:
            self.touched_jobs.add(job_id)

    async def _read_new_events(self) -> None:
        """Add the entries appended to each log since the last check."""
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for agent in AGENTS:
                end = self.log_end[agent]
                pipe.xrange(self.client.partition(agent).log, min=end if end == "-" else f"({end}")
            replies = await pipe.execute()
        for agent, entries in zip(AGENTS, replies, strict=True):
            # Payloads put back as they are read: written once, they never change.
            parsed = await reader.with_payloads(
                self.client.redis, self.client.partition(agent),
                [RawEvent.parse(agent, entry_id, fields) for entry_id, fields in entries])
            for event in parsed:
                entry_id = event.event_id
                assert event.job_id in self.jobs, (
                    f"{agent}: an event of a job the model does not know: {event.job_id}")
                assert self.jobs[event.job_id].target == agent, (event.job_id, agent)
                self.events.setdefault(event.job_id, []).append(event)
                self._touch(agent, event.job_id)
                self.log_end[agent] = entry_id

    async def _read_touched(self, job_ids: list[str], missing: list[str]) -> dict[str, Any]:
        redis = self.client.redis
        agents = sorted(self.touched_agents)
        per_agent = 5 + 2 * len(CODES)
        async with redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                part = self.client.partition(agent)
                pipe.hgetall(part.counts)
                pipe.zrange(part.delayed, 0, -1)
                pipe.zrange(part.leases, 0, -1)
                pipe.hgetall(part.active)
                pipe.xlen(part.log)
                for stream in part.ready_streams:
                    pipe.xinfo_groups(stream)
                    pipe.xrange(stream)
            for job_id in missing:
                pipe.exists(self.client.partition(job_id.rsplit(".", 1)[1]).job(job_id))
            replies = await pipe.execute()
        records = await reader.read_records(
            redis, [(self.client.partition(self.jobs[j].target), j) for j in job_ids])
        snap: dict[str, Any] = {}
        for index, agent in enumerate(agents):
            r = replies[index * per_agent : (index + 1) * per_agent]
            snap[agent] = {
                "counts": r[0], "delayed": r[1], "leases": r[2], "active": r[3], "length": r[4],
                "groups": r[5::2], "streams": r[6::2],
            }
        snap["records"] = dict(zip(job_ids, records, strict=True))
        snap["missing"] = dict(zip(missing, replies[len(agents) * per_agent :], strict=True))
        return snap

    @invariant()
    def consistent(self) -> None:
        self.run(self._check(full=False))

    async def _check(self, *, full: bool) -> None:
        if full:
            # Read everything afresh.
            self.log_end = dict.fromkeys(AGENTS, "-")
            self.events = {}
            self.touched_agents.update(AGENTS)
            self.touched_jobs.update(self.jobs)
            self.missing_checked = 0
        await self._read_new_events()
        job_ids = sorted(self.touched_jobs)
        missing = self.missing[self.missing_checked :]
        snap = await self._read_touched(job_ids, missing)
        records: dict[str, dict[str, str]] = snap["records"]

        for job_id, exists in snap["missing"].items():
            assert not exists, f"a call on the unknown job {job_id} created its record"

        # Every job in a legal state, the one the model expects; every model
        # transition legal.
        for job_id, record in records.items():
            job = self.jobs[job_id]
            assert record, f"{job_id}: no state record"
            assert record["state"] in STATES, (job_id, record["state"])
            assert record["state"] == job.state, (
                f"{job_id}: state {record['state']}, expected {job.state} (model saw {job.states})"
            )
            assert int(record["attempt"]) == job.attempt, (job_id, record["attempt"], job.attempt)
            assert int(record["budgetFrom"]) == job.budget_from, (job_id, record)
            assert int(record["maxAttempts"]) == job.max_attempts, (job_id, record)
            previous: str | None = None
            for state in job.states:
                assert state in LEGAL_TRANSITIONS[previous], (job_id, previous, state)
                previous = state

        # One state-changing event per state change, none without; folding the
        # job's events gives its live record.
        for job_id, record in records.items():
            events = self.events.get(job_id, [])
            seen: list[str] = []
            for event in events:
                after = STATE_AFTER[event.type]
                if after == "data":
                    after = event.data["state"]
                if after is not None:
                    seen.append(after)
            assert seen == self.jobs[job_id].states, (
                f"{job_id}: events {[e.type for e in events]} enter "
                f"{seen}; the model saw {self.jobs[job_id].states}"
            )
            folded = fold.records_from(events).get(job_id, {})
            live = normalize(record)
            if folded != live:
                diffs = [
                    f"{job_id}.{name}: fold {folded.get(name)!r} != live {live.get(name)!r}"
                    for name in sorted(set(folded) | set(live))
                    if folded.get(name) != live.get(name)
                ]
                raise AssertionError(
                    "fold.records_from differs from the live record:\n" + "\n".join(diffs))

        for agent in sorted(self.touched_agents):
            s = snap[agent]
            mine = [self.jobs[j] for j in self.order if self.jobs[j].target == agent]
            # The log was read to its end, and holds events of the model's jobs only.
            assert s["length"] == sum(len(self.events.get(j.job_id, [])) for j in mine), agent
            # The counts hash equals the jobs in each state.
            actual = Counter(j.state for j in mine)
            counts = {k: int(v) for k, v in s["counts"].items()}
            assert set(counts) <= set(STATES), counts
            for state in STATES:
                assert counts.get(state, 0) == actual[state], (
                    f"{agent}: counts[{state}] = {counts.get(state, 0)}, "
                    f"jobs in {state}: {actual[state]}"
                )
            # Nothing lost: the partition's structures hold exactly the model's jobs.
            active = [j for j in mine if j.state == "active"]
            assert sorted(s["delayed"]) == sorted(j.job_id for j in mine if j.state == "delayed")
            assert sorted(s["leases"]) == sorted(j.job_id for j in active)
            assert sorted(s["active"]) == sorted(j.job_id for j in active)
            for job in active:
                code, worker = s["active"][job.job_id].split(" ", 1)
                assert (code, worker) == (job.code, job.worker), s["active"][job.job_id]
            # Start takes, acknowledges and deletes entries in one step: a ready
            # stream holds exactly the entries no worker has read, in order.
            for code, groups, entries in zip(CODES, s["groups"], s["streams"], strict=True):
                (group,) = [g for g in groups if g["name"] == WORKERS_GROUP]
                last = _stream_id(group["last-delivered-id"])
                assert all(_stream_id(eid) > last for eid, _ in entries), (agent, code, entries)
                assert [f["j"] for _, f in entries] == self.ready[agent][code], (
                    agent,
                    code,
                    entries,
                    self.ready[agent][code],
                )
                assert group["pending"] == 0, (agent, code, group)

        self.touched_agents.clear()
        self.touched_jobs.clear()
        self.missing_checked = len(self.missing)

def test_a_blocking_read_is_cancelled_at_once(backend: Backend) -> None:
    """A worker stops by cancelling its blocking read of the ready streams: the
    read ends at once, whenever the cancel lands (here after 0 to 11 turns of
    the loop: while the command is sent, or while its reply is awaited)."""

    async def main() -> list[float]:
        config = Config.model_validate({"keyPrefix": f"st{uuid.uuid4().hex[:10]}"})
        client = await backend.connect(config).open()
        blocking = client.open_blocking()
        stream = f"{config.key_prefix}:blocked"
        took = []

        async def block() -> Any:
            return await blocking.xread({stream: "$"}, block=2_000)

        try:
            for turns in range(12):
                read = asyncio.ensure_future(block())
                for _ in range(turns):
                    await asyncio.sleep(0)
                began = time.monotonic()
                read.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await read
                took.append(time.monotonic() - began)
        finally:
            await client.aclose()
        return took

    took = asyncio.run(main())
    assert max(took) < 1.0, [round(t, 3) for t in took]


def machine_settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        # No explain phase: after a failure it traces every line of every example
        # (sys.settrace), which makes shrinking through redis-py and asyncio crawl.
        phases=[phase for phase in Phase if phase is not Phase.explain],
    )


# Generous: a failure is shrunk for up to five minutes before it is reported.
@pytest.mark.timeout(max(600, 2 * max(EXAMPLES.values())))
def test_write_side_state_machine(backend: Backend) -> None:
    AgentqMachine.backend = backend
    run_state_machine_as_test(AgentqMachine, settings=machine_settings(EXAMPLES[backend.name],
                                                                STEPS[backend.name]))
