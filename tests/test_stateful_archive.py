"""A stateful property test of retention and the archive, on a real Redis server
and on a local cluster.

Hypothesis interleaves dispatches (short and long tasks, some with a
dependency, some delayed for an hour or pending approval), work (starts,
completions with short and long results, failed attempts, retries of failed
jobs, cancels, approvals and rejections, drains), rebuilds of the views and
archiving passes over two agents, with an archive in a temporary folder and a
one-second retention. A pass's cutoff is chosen by the test rather than waited for: "now" (every
ended job whose events are archived leaves Redis, and the log is trimmed up to
the archive's end), the configured second, or the time of one recorded event
(the log is trimmed in the middle of jobs still running). Sleeping past the
retention would make every example slow; the plain test at the end waits the
real second once.

The model keeps every job's state and attempt, and every job's history as read
from the log while it was live (before any pass could trim it). After each step:

- every job's ``history`` read through the client equals that recorded history,
  whether its events are live, archived or split between the two;
- its ``status`` is the model's state and attempt; a job is in Redis exactly
  until a pass removed it, and only a terminal job is removed: after a pass,
  one that ended before its cutoff has left, one with an event after it stays;
- ``retry`` and ``cancel`` of a job that has left Redis answer ``invalid_state``
  with the state the archive holds (never ``not_found``: SPEC);
- ``audit verify`` of the live Redis with the archive finds nothing, and
  ``Client.verify_archive()`` (``audit verify --archive``) finds nothing.

No gate runs (the test acknowledges the gates' group itself, as the pass needs
every group to have read the log): a dependent stays ``waiting_dependencies``
until cancelled, while its dependency may leave Redis.

``AGENTQ_ARCHIVE_EXAMPLES`` and ``AGENTQ_ARCHIVE_STEPS`` set the number of
examples and the steps in each (default 6 of 15, after a start of two to four
jobs: the file runs in about 10 s on a local Redis; 30 of 25 take about a
minute and find more).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

import agentq
from agentq.consumers.archiver import GROUPS, Archiver
from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent, with_payloads
from agentq.eventlog.scripts import Backoff, ensure_group, ensure_work_groups
from agentq.projections.audit import verify
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config, RetentionConfig
from agentq.schemas.errors import InvalidState

EXAMPLES = int(os.environ.get("AGENTQ_ARCHIVE_EXAMPLES", "6"))
STEPS = int(os.environ.get("AGENTQ_ARCHIVE_STEPS", "15"))

AGENTS = ("a", "b")
WORKER = "w"
LEASE_MS = 600_000  # no lease expires during a test
BIG = 10**6
ENDED = ("completed", "failed", "cancelled")
# Longer than 72 bytes: the log holds such a task or result by reference.
LONG_TASK = "a long task: " + "." * 100
RESULTS = {"short": b'"ok"', "long": orjson.dumps({"long": "r" * 100})}
# The retention of a pass: the configured second, "now" (1 ms), or the time of
# one recorded event (the cutoff falls there).
# How a worker ends an attempt: completed with a short or a long result, failed
# (queued again while attempts are left, else failed), or left running.
OUTCOMES = st.sampled_from(("short", "long", "fail", "fail", "leave"))
CUTOFFS = ("configured", "now", "now", "event", "event")


@dataclass
class ModelJob:
    job_id: str
    target: str
    max_attempts: int
    state: str
    attempt: int = 0
    budget_from: int = 0
    removed: bool = False  # a pass removed it from Redis (its events are archived)
    history: list[dict[str, Any]] = field(default_factory=list)  # as read live


def config_for(prefix: str, archive: Path) -> Config:
    return Config.model_validate({
        "keyPrefix": prefix,
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "retention": {"jobsSeconds": 1, "archive": archive.as_uri()},
    })


async def read_log(client: agentq.Client, part: Partition, after: str) -> list[RawEvent]:
    """``part``'s log entries after ``after``, with their payloads put back."""
    start = "-" if after == "-" else f"({after}"
    entries: Any = await client.redis.xrange(part.log, start, "+")
    events = [RawEvent.parse(part.agent, entry_id, fields) for entry_id, fields in entries]
    return list(await with_payloads(client.redis, part, events))


async def let_groups_read(client: agentq.Client, agents: tuple[str, ...]) -> None:
    """What the background consumers would do before a pass: the projector catches
    up, and every group the pass waits for has read and acknowledged the logs."""
    await Projection(client.redis).catch_up([client.partition(agent) for agent in agents])
    for agent in agents:
        log = client.partition(agent).log
        for group in GROUPS:
            await ensure_group(client.redis, log, group)
            read: Any = await client.redis.xreadgroup(group, "t", {log: ">"}, count=10_000)
            if read:
                await client.redis.xack(log, group, *[entry_id for entry_id, _ in read[0][1]])


async def server_ms(client: agentq.Client) -> int:
    seconds, micros = await client.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def archive_pass(client: agentq.Client, agents: tuple[str, ...], retention_ms: int) -> None:
    """One pass over every partition with the retention ``retention_ms``: the
    jobs that ended before the server's now minus it (and whose events are
    archived) leave Redis, and the log is trimmed at most to there."""
    await let_groups_read(client, agents)
    archive = client.archive
    assert archive is not None
    archiver = Archiver(client.redis, client.redis, client.keys, archive,
                        RetentionConfig(jobs_seconds=1))
    archiver.retention_ms = retention_ms  # the cutoff this pass uses, in place of 1 s
    totals = await archiver.archive_all(list(agents))
    assert not totals.stuck and not totals.busy, totals


class ArchiveMachine(RuleBasedStateMachine):
    redis_url: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.prefix = f"sa{uuid.uuid4().hex[:10]}"
        self.folder = Path(tempfile.mkdtemp(prefix="agentq-archive-"))
        self.client = agentq.connect(self.redis_url, config_for(self.prefix, self.folder / "a"))
        self.jobs: dict[str, ModelJob] = {}
        self.order: list[str] = []
        # Per agent: the queued jobs in the order a worker takes them (one priority).
        self.ready: dict[str, list[str]] = {agent: [] for agent in AGENTS}
        self.log_end = dict.fromkeys(AGENTS, "-")
        self.event_ms: list[int] = []  # every recorded event's time (its id's ms)
        try:
            self.run(self._open())
        except BaseException:
            self._close()
            raise

    def run(self, awaitable: Any) -> Any:
        return self.runner.run(awaitable)

    async def _open(self) -> None:
        await self.client.open()
        for agent in AGENTS:
            await self.client.add_agent(agent)
            await ensure_work_groups(self.client.redis, self.client.partition(agent))

    def teardown(self) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self.run(self._delete_keys())
            self.run(self.client.aclose())
        finally:
            self.runner.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    async def _delete_keys(self) -> None:
        redis = self.client.redis
        keys = [k async for k in redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])

    # -- helpers -------------------------------------------------------------

    def part(self, agent: str) -> Partition:
        return self.client.partition(agent)

    def enter(self, job: ModelJob, state: str) -> None:
        if job.state == "queued":
            self.ready[job.target].remove(job.job_id)
        job.state = state
        if state == "queued":
            self.ready[job.target].append(job.job_id)

    def pick(self, pick: int, states: tuple[str, ...]) -> ModelJob | None:
        """Mostly a job in one of ``states``, sometimes any job (to see refusals)."""
        pool = [j for j in self.order if self.jobs[j].state in states]
        if not pool or pick % 6 == 0:
            pool = self.order
        return self.jobs[pool[pick % len(pool)]] if pool else None

    async def _record_live_events(self) -> None:
        """Read every log past what was read: each event goes to its job's history."""
        for agent in AGENTS:
            events = await read_log(self.client, self.part(agent), self.log_end[agent])
            for event in events:
                self.jobs[event.job_id].history.append(event.stored().wire())
                self.event_ms.append(_ms(event.event_id))
                self.log_end[agent] = event.event_id

    # -- rules ---------------------------------------------------------------

    @initialize(jobs=st.lists(st.tuples(st.sampled_from(AGENTS), st.booleans()),
                              min_size=2, max_size=4))
    def some_jobs(self, jobs: list[tuple[str, bool]]) -> None:
        """Every example starts with a few jobs, so that its passes have work."""
        for agent, long in jobs:
            self.dispatch(agent, long, 1, None)

    @rule(agent=st.sampled_from(AGENTS), long=st.booleans(), max_attempts=st.sampled_from((1, 2)),
          dep=st.none() | st.none() | st.integers(0, BIG),
          held=st.sampled_from(("", "", "", "", "delayed", "pending_approval")))
    def dispatch(self, agent: str, long: bool, max_attempts: int, dep: int | None,
                 held: str = "") -> None:
        """A job queued, waiting for another, delayed for an hour or pending approval
        (the last two stay so past every pass: only their dispatch, which passes trim)."""
        fields: dict[str, Any] = {"max_attempts": max_attempts}
        state = "queued"
        if dep is not None and self.order:
            fields["depends_on"] = [self.order[dep % len(self.order)]]
            state = "waiting_dependencies"
        elif held == "delayed":
            fields["delay_seconds"] = 3600
            state = held
        elif held == "pending_approval":
            fields["requires_approval"] = True
            state = held
        task = LONG_TASK if long else "short"
        view = self.run(self.client.dispatch(agent, task, **fields))
        assert view.state == state, (view.state, fields)
        job = ModelJob(view.job_id, agent, max_attempts, "")
        self.jobs[job.job_id] = job
        self.order.append(job.job_id)
        self.enter(job, state)

    @rule(agent=st.sampled_from(AGENTS), outcomes=st.lists(OUTCOMES, min_size=1, max_size=3))
    def work(self, agent: str, outcomes: list[str]) -> None:
        """A worker takes up to one job per outcome, then ends each attempt so."""
        started, _ = self.run(self.client.scripts.start(self.part(agent), WORKER, LEASE_MS,
                                                        len(outcomes)))
        expected = self.ready[agent][: len(outcomes)]
        assert [s.job_id for s in started] == expected, (started, self.ready[agent])
        for s, outcome in zip(started, outcomes, strict=False):
            job = self.jobs[s.job_id]
            self.enter(job, "active")
            job.attempt += 1
            assert int(s.record["attempt"]) == job.attempt, (s.record, job)
            self.run(self._end_attempt(job, outcome))

    @rule(pick=st.integers(0, BIG), outcome=OUTCOMES)
    def finish(self, pick: int, outcome: str) -> None:
        """A job left running ends its attempt."""
        job = self.pick(pick, ("active",))
        if job is not None and job.state == "active":
            self.run(self._end_attempt(job, outcome))

    async def _end_attempt(self, job: ModelJob, outcome: str) -> None:
        part = self.part(job.target)
        if outcome in RESULTS:
            (refusal,) = await self.client.scripts.complete(
                part, WORKER, [(job.job_id, job.attempt, RESULTS[outcome])])
            assert refusal is None, refusal
            self.enter(job, "completed")
        elif outcome == "fail":
            state = await self.client.scripts.fail(part, WORKER, job.job_id, job.attempt,
                                                   "boom", Backoff(0, 0))
            left = job.max_attempts - (job.attempt - job.budget_from)
            expected = "failed" if left <= 0 else "queued"
            assert state == expected, (state, job)
            self.enter(job, expected)

    @rule(pick=st.integers(0, BIG))
    def retry(self, pick: int) -> None:
        job = self.pick(pick, ("failed",))
        if job is None:
            return
        if job.removed:
            # Its record left Redis, the archive holds it: never not_found (SPEC),
            # refused as a job in the state the archive holds.
            with pytest.raises(InvalidState) as refused:
                self.run(self.client.retry(job.job_id))
            assert refused.value.state == job.state and "left Redis" in str(refused.value)
            return
        if job.state != "failed":
            with pytest.raises(InvalidState):
                self.run(self.client.retry(job.job_id))
            return
        view = self.run(self.client.retry(job.job_id))
        assert view.state == "queued", view
        job.budget_from = job.attempt
        self.enter(job, "queued")

    @rule(pick=st.integers(0, BIG))
    def cancel(self, pick: int) -> None:
        job = self.pick(pick, ("queued", "waiting_dependencies", "delayed", "pending_approval",
                               "active"))
        if job is None:
            return
        if job.state in ENDED:
            with pytest.raises(InvalidState) as refused:
                self.run(self.client.cancel(job.job_id))
            assert refused.value.state == job.state
            return
        view = self.run(self.client.cancel(job.job_id))
        assert view.state == "cancelled", view
        self.enter(job, "cancelled")

    @rule(cutoff=st.sampled_from(CUTOFFS), pick=st.integers(0, BIG))
    def archive(self, cutoff: str, pick: int) -> None:
        self.run(self._archive(cutoff, pick))

    async def _archive(self, cutoff: str, pick: int) -> None:
        await self._record_live_events()  # nothing written since the last check, but be sure
        now = await server_ms(self.client)
        if cutoff == "configured":
            retention_ms = 1000
        elif cutoff == "now" or not self.event_ms:
            retention_ms = 1
        else:
            retention_ms = max(1, now - self.event_ms[pick % len(self.event_ms)])
        await archive_pass(self.client, AGENTS, retention_ms)
        after = await server_ms(self.client)
        async with self.client.redis.pipeline(transaction=False) as pipe:
            for job_id in self.order:
                pipe.exists(self.part(self.jobs[job_id].target).job(job_id))
            present = await pipe.execute()
        for job_id, exists in zip(self.order, present, strict=True):
            job = self.jobs[job_id]
            # Every event is archived (the groups have read them all): a job
            # that ended before the cutoff leaves, one whose last event is
            # after it stays (a few ms of slack: the pass reads the clock itself).
            last_ms = _ms(job.history[-1]["eventId"])
            if job.state in ENDED and last_ms < now - retention_ms - 5:
                assert not exists, f"{job_id} ({job.state}) ended before the cutoff, stays"
            if last_ms > after - retention_ms + 5 and not job.removed:
                assert exists, f"{job_id} ({job.state}) left Redis before its retention"
            if not exists and not job.removed:
                assert job.state in ENDED, f"{job_id} left Redis while {job.state}"
                job.removed = True
            assert exists == (not job.removed), f"{job_id} is back in Redis"

    @rule(pick=st.integers(0, BIG), approve=st.booleans())
    def decide(self, pick: int, approve: bool) -> None:
        """A job pending approval is approved (queued) or rejected (cancelled)."""
        job = self.pick(pick, ("pending_approval",))
        if job is None or job.state != "pending_approval":
            return
        if approve:
            assert self.run(self.client.approve(job.job_id)).state == "queued"
            self.enter(job, "queued")
        else:
            assert self.run(self.client.reject(job.job_id)).state == "cancelled"
            self.enter(job, "cancelled")

    @rule(agent=st.sampled_from(AGENTS))
    def drain(self, agent: str) -> None:
        """Every queued and delayed job of the agent is cancelled, those made before a
        pass too."""
        queued = [self.jobs[j] for j in self.order if self.jobs[j].target == agent
                  and self.jobs[j].state in ("queued", "delayed")]
        assert self.run(self.client.drain(agent)).drained == len(queued)
        for job in queued:
            self.enter(job, "cancelled")

    @rule()
    def rebuild_views(self) -> None:
        """The views rebuilt from a log the passes may have trimmed: every job still
        in Redis stays listed (the invariant's audit compares them)."""
        self.run(rebuild(self.client.redis, [self.part(agent) for agent in AGENTS]))

    # -- the check after each step --------------------------------------------

    @invariant()
    def reads_agree(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        await self._record_live_events()
        q = self.client
        for job_id in self.order:
            job = self.jobs[job_id]
            history = [event.wire() for event in await q.history(job_id)]
            assert history == job.history, (
                f"{job_id} ({job.state}, removed={job.removed}): history read "
                f"{[e['type'] for e in history]}, recorded live "
                f"{[e['type'] for e in job.history]}")
            view = await q.status(job_id)
            assert (view.state, view.attempt) == (job.state, job.attempt), (view, job)
        parts = [self.part(agent) for agent in AGENTS]
        problems = await verify(q.redis, parts, q.archive)
        assert problems == [], "\n".join(problems)
        damaged = await q.verify_archive()
        assert damaged == [], "\n".join(damaged)


def _ms(event_id: str) -> int:
    """The time part of a stream id (ms)."""
    return int(event_id.split("-")[0])


# Generous: a failure is shrunk for minutes before it is reported.
@pytest.mark.timeout(600)
@pytest.mark.both_backends
def test_reads_across_archive_passes_state_machine(redis_url: str) -> None:
    ArchiveMachine.redis_url = redis_url
    run_state_machine_as_test(ArchiveMachine, settings=settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        # No explain phase: it traces every line through redis-py and asyncio.
        phases=[phase for phase in Phase if phase is not Phase.explain],
    ))


async def test_a_retried_job_whose_first_events_were_archived_keeps_its_whole_history(
    redis_url: str, tmp_path: Path
) -> None:
    """A job fails, its first events are archived and trimmed (they are older
    than the retention; the job ended within it, so it stays); it is retried
    and runs again: its history is whole and in order, live and archived."""
    config = config_for(f"sa{uuid.uuid4().hex[:10]}", tmp_path / "archive")
    async with agentq.connect(redis_url, config) as q:
        try:
            await q.add_agent("a")
            part = q.partition("a")
            await ensure_work_groups(q.redis, part)
            job = await q.dispatch("a", LONG_TASK, max_attempts=1)
            (started,), _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
            assert started.job_id == job.job_id
            await asyncio.sleep(1.1)  # its dispatch and start fall out of the retention
            assert await q.scripts.fail(part, WORKER, job.job_id, 1, "boom",
                                        Backoff(0, 0)) == "failed"
            before = [e.wire() for e in await q.history(job.job_id)]
            await archive_pass(q, ("a",), 1000)
            entries: Any = await q.redis.xrange(part.log)
            left = [fields["type"] for _, fields in entries]
            assert left == ["JobFailed"], left  # the first two left the log
            assert await q.redis.exists(part.job(job.job_id))

            await q.retry(job.job_id)
            (again,), _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
            await q.scripts.complete(part, WORKER, [(job.job_id, int(again.record["attempt"]),
                                                     RESULTS["long"])])
            history: list[dict[str, Any]] = [e.wire() for e in await q.history(job.job_id)]
            assert history[: len(before)] == before
            assert [e["type"] for e in history] == [
                "JobDispatched", "JobStarted", "JobFailed", "JobRetried", "JobStarted",
                "JobCompleted"]
            ids = [tuple(map(int, e["eventId"].split("-"))) for e in history]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert history[-1]["data"]["result"] == orjson.loads(RESULTS["long"])
            # Once it left Redis, every event comes from the archive, the same.
            await archive_pass(q, ("a",), 1)
            assert not await q.redis.exists(part.job(job.job_id))
            assert [e.wire() for e in await q.history(job.job_id)] == history
            assert (await q.status(job.job_id)).state == "completed"
            assert await verify(q.redis, [part], q.archive) == []
            assert await q.verify_archive() == []
        finally:
            keys = [k async for k in q.redis.scan_iter(match=f"{q.keys.prefix}:*", count=1000)]
            if keys:
                await q.redis.delete(*keys)
