"""``audit verify``, the function and the CLI, on a real Redis.

After a mixed history (queued, delayed, waiting, active, completed, failed,
retried, cancelled and drained jobs, progress, failed attempts) it finds
nothing. Then, one at a time, something is changed behind the log's back —
a state record field, a per-state count, a view (a job removed from, or
added to, an index) — and it names that difference, and the CLI exits 1.
Undoing the change makes it clean again.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _indexes import add_ids, drop_ids, index_members

import agentq
from agentq.eventlog.reader import read_partition
from agentq.eventlog.registry import all_partitions
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.projections import audit, ticker
from agentq.projections.projection import Projection

ROOT = Path(__file__).resolve().parent.parent
WORKER = "w1"
LEASE_MS = 600_000


@dataclass
class Jobs:
    queued: str  # a -> dispatched by b, still queued
    completed: str  # on a
    failed: str  # on b, dead-lettered
    active: str  # on b
    waiting: str  # on c, waits for ``queued``
    delayed: str  # on c


async def mixed_history(q: agentq.Client) -> Jobs:
    for agent in ("a", "b", "c"):
        await ensure_work_groups(q.redis, q.partition(agent))
    pa, pb = q.partition("a"), q.partition("b")

    done = await q.dispatch("a", "finish me", caller="b")
    queued = await q.dispatch("a", "stay queued", caller="b", priority="low")
    (started,), _ = await q.scripts.start(pa, WORKER, LEASE_MS, 1)
    assert started.job_id == done.job_id
    await q.scripts.progress(pa, WORKER, done.job_id, 1, b'{"percent":50,"message":"half"}')
    assert await q.scripts.complete(pa, WORKER, [(done.job_id, 1, b'{"answer":42}')]) == [None]

    # A job that fails an attempt, runs again, fails for good, is retried,
    # and fails for good again.
    failing = await q.dispatch("b", "fail me", caller="c", max_attempts=2)
    for attempt in (1, 2):
        await q.scripts.start(pb, WORKER, LEASE_MS, 1)
        await q.scripts.fail(pb, WORKER, failing.job_id, attempt, f"boom {attempt}", Backoff(0, 0))
    await q.retry(failing.job_id)
    for attempt in (3, 4):
        await q.scripts.start(pb, WORKER, LEASE_MS, 1)
        await q.scripts.fail(pb, WORKER, failing.job_id, attempt, f"boom {attempt}", Backoff(0, 0))
    assert (await q.status(failing.job_id)).state == "failed"

    active = await q.dispatch("b", "keep running", caller="main", session_key="sk")
    (started,), _ = await q.scripts.start(pb, WORKER, LEASE_MS, 1)
    assert started.job_id == active.job_id

    cancelled = await q.dispatch("b", "cancel me", caller="a")
    await q.cancel(cancelled.job_id, caller="a")
    waiting = await q.dispatch("c", "after", caller="a", depends_on=[queued.job_id])
    delayed = await q.dispatch("c", "later", caller="b", delay_seconds=3600)
    for i in range(3):
        await q.dispatch("c", f"drained {i}", caller="main")
    assert (await q.drain("c")).drained == 4  # the three and the delayed one
    delayed = await q.dispatch("c", "later again", caller="b", delay_seconds=3600)
    batch = await q.dispatch_many(
        [{"target": t, "task": f"batch {t}"} for t in ("a", "b", "c", "a")], caller="x")
    assert len(batch) == 4
    # A query of an agent's jobs brings its partition's views up to date (a list
    # across agents reads the global index and the records instead).
    for agent in ("a", "b", "c"):
        await q.list(caller="main", agent=agent)
    return Jobs(queued.job_id, done.job_id, failing.job_id, active.job_id, waiting.job_id,
                delayed.job_id)


async def verify(q: agentq.Client) -> list[str]:
    agents = await all_partitions(q.redis, q.keys)
    assert sorted(agents) == ["a", "b", "c"]
    return await audit.verify(q.redis, [q.partition(a) for a in agents])


def cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env["AGENTQ_KEY_PREFIX"] = prefix
    return subprocess.run(
        [sys.executable, "-m", "agentq.cli", "--redis", url, "audit", "verify", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


async def run_cli(url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, url, prefix, *args)


@pytest.mark.both_backends
async def test_clean_after_a_mixed_history(q: agentq.Client, redis_url: str) -> None:
    await mixed_history(q)
    assert await verify(q) == []
    out = await run_cli(redis_url, q.keys.prefix)
    assert out.returncode == 0, out.stderr
    assert "3 agents agree with the log" in out.stdout
    out = await run_cli(redis_url, q.keys.prefix, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"ok": True, "differences": []}


@pytest.mark.both_backends
async def test_clean_with_views_never_projected(q: agentq.Client, redis_url: str) -> None:
    """No query and no projector ran: verify brings the views up first."""
    await q.dispatch("a", "one", caller="b")
    await q.dispatch("b", "two", caller="a", delay_seconds=60)
    assert not await q.redis.exists(q.partition("a").projection)
    out = await run_cli(redis_url, q.keys.prefix)
    assert out.returncode == 0, out.stdout + out.stderr


# -- a change behind the log's back ---------------------------------------------------


@dataclass
class Tamper:
    """Change something, say which words a difference must name, undo it."""

    change: Callable[[agentq.Client, Jobs], Awaitable[Callable[[], Awaitable[Any]]]]
    names: Callable[[Jobs], list[str]]


async def _hset(q: agentq.Client, job_id: str, field: str, value: str) -> Callable[[], Any]:
    key = q.partition(job_id.rsplit(".", 1)[-1]).job(job_id)
    old = await q.redis.hget(key, field)
    await q.redis.hset(key, field, value)

    async def undo() -> None:
        if old is None:
            await q.redis.hdel(key, field)
        else:
            await q.redis.hset(key, field, old)

    return undo


async def _record_state(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _hset(q, jobs.queued, "state", "completed")


async def _record_attempt(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _hset(q, jobs.completed, "attempt", "7")


async def _record_result(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _hset(q, jobs.completed, "result", '{"answer":43}')


async def _record_new_field(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _hset(q, jobs.active, "error", "made up")


async def _record_deleted(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    key = q.partition("c").job(jobs.delayed)
    dump = await q.redis.dump(key)
    assert isinstance(dump, bytes | str)
    await q.redis.delete(key)

    async def undo() -> None:
        await q.redis.restore(key, 0, dump)

    return undo


async def _spec_task(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    """A job only dispatched so far: the audit holds its JobDispatched, folded late."""
    key = q.partition("a").spec(jobs.queued)
    old = await q.redis.get(key)
    assert old is not None and '"task":"stay queued"' in old
    await q.redis.set(key, old.replace('"task":"stay queued"', '"task":"forged"'))

    async def undo() -> None:
        await q.redis.set(key, old)

    return undo


async def _count(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    key = q.partition("b").counts
    await q.redis.hincrby(key, "failed", 1)

    async def undo() -> None:
        await q.redis.hincrby(key, "failed", -1)

    return undo


async def _zrem(q: agentq.Client, key: str, job_id: str) -> Callable[[], Any]:
    assert job_id in await index_members(q, key)
    await drop_ids(q, key, [job_id])

    async def undo() -> None:
        await add_ids(q, key, [job_id])

    return undo


async def _zadd(q: agentq.Client, key: str, job_id: str) -> Callable[[], Any]:
    await add_ids(q, key, [job_id])

    async def undo() -> None:
        await drop_ids(q, key, [job_id])

    return undo


async def _unlisted(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zrem(q, q.partition("a").index_state("completed"), jobs.completed)


async def _unlisted_state(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zrem(q, q.partition("b").index_state("failed"), jobs.failed)


async def _unlisted_dispatcher(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zrem(q, q.partition("a").index_by("b"), jobs.queued)


async def _listed_twice(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zadd(q, q.partition("b").index_state("completed"), jobs.active)


async def _listed_for_wrong_dispatcher(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zadd(q, q.partition("a").index_by("c"), jobs.completed)


FAKE_ID = "j_01M90MXAMJ3ZKKQH1KZT8T0P99.a"  # a job id no event names


async def _record_without_events(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    part = q.partition("a")
    dump = await q.redis.dump(part.job(jobs.completed))
    assert isinstance(dump, bytes | str)
    await q.redis.restore(part.job(FAKE_ID), 0, dump)

    async def undo() -> None:
        await q.redis.delete(part.job(FAKE_ID))

    return undo


async def _listed_without_events(q: agentq.Client, jobs: Jobs) -> Callable[[], Any]:
    return await _zadd(q, q.partition("a").index_state("completed"), FAKE_ID)


TAMPERS = {
    "record_state": Tamper(_record_state, lambda j: [j.queued, "state", "completed", "queued"]),
    "record_attempt": Tamper(_record_attempt, lambda j: [j.completed, "attempt", "7", "1"]),
    "record_result": Tamper(_record_result, lambda j: [j.completed, "result", "43", "42"]),
    "record_new_field": Tamper(_record_new_field, lambda j: [j.active, "error", "made up"]),
    "record_deleted": Tamper(_record_deleted, lambda j: [j.delayed, "no state record"]),
    "spec_task": Tamper(_spec_task, lambda j: [j.queued, "spec", "forged", "stay queued"]),
    "count": Tamper(_count, lambda j: ["agent b", "failed", "2", "1"]),
    "unlisted": Tamper(_unlisted, lambda j: [j.completed, "not listed as completed"]),
    "unlisted_state": Tamper(_unlisted_state, lambda j: [j.failed, "failed"]),
    "unlisted_dispatcher": Tamper(_unlisted_dispatcher, lambda j: [j.queued, "b"]),
    "listed_twice": Tamper(_listed_twice, lambda j: [j.active, "completed", "active"]),
    "listed_for_wrong_dispatcher": Tamper(_listed_for_wrong_dispatcher,
                                          lambda j: [j.completed, "c"]),
    "record_without_events": Tamper(_record_without_events,
                                    lambda j: [FAKE_ID, "state record but no events"]),
    "listed_without_events": Tamper(_listed_without_events,
                                    lambda j: [FAKE_ID, "listed as completed", "nothing"]),
}


@pytest.mark.parametrize("name", list(TAMPERS))
async def test_names_a_change_made_behind_its_back(
    q: agentq.Client, redis_url: str, name: str
) -> None:
    jobs = await mixed_history(q)
    assert await verify(q) == []
    tamper = TAMPERS[name]
    undo = await tamper.change(q, jobs)
    words = tamper.names(jobs)

    problems = await verify(q)
    assert len(problems) == 1, f"{name}: expected one difference naming {words}, got {problems}"
    for word in words:
        assert word in problems[0], f"{name}: {word!r} not named in {problems[0]!r}"

    out = await run_cli(redis_url, q.keys.prefix, "--json")
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert json.loads(out.stdout) == {"ok": False, "differences": problems}

    await undo()
    assert await verify(q) == []


@pytest.mark.both_backends
@pytest.mark.parametrize("batch", [1, 500])
async def test_names_every_change_at_once(
    q: agentq.Client, redis_url: str, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # batch 1: each job is compared as soon as it has ended, before the log's end
    # (the failed job ended twice: its first ending is compared while its record
    # is further on, and it stays open).
    monkeypatch.setattr(audit, "_BATCH", batch)
    jobs = await mixed_history(q)
    for name in ("record_state", "count", "unlisted", "listed_twice"):
        await TAMPERS[name].change(q, jobs)
    problems = await verify(q)
    for name in ("record_state", "count", "unlisted", "listed_twice"):
        words = TAMPERS[name].names(jobs)
        assert any(all(w in p for w in words) for p in problems), (name, problems)
    out = await run_cli(redis_url, q.keys.prefix)
    assert out.returncode == 1, (out.stdout, out.stderr)
    for problem in problems:
        assert problem in out.stdout.splitlines()


async def test_holds_the_running_jobs_and_a_batch_not_the_log(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """600 jobs that ran ten at a time, and 5 still running: the audit never holds
    more than the jobs running at that point of the log and two batches of ended
    ones (one asked of Redis while the log is read on, the one before it still
    to compare), and the jobs ended since."""
    monkeypatch.setattr(audit, "_BATCH", 20)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    running = [await q.dispatch("a", f"run {i}") for i in range(5)]
    await q.scripts.start(part, WORKER, LEASE_MS, 5)
    for start in range(0, 600, 10):
        jobs = await q.dispatch_many([{"target": "a", "task": f"t {start + i}"}
                                      for i in range(10)])
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 10)
        assert {s.job_id for s in started} == {j.job_id for j in jobs}
        assert await q.scripts.complete(
            part, WORKER, [(j.job_id, 1, b"1") for j in jobs]) == [None] * 10
    held: list[int] = []
    ask = audit._PartitionAudit._ask

    async def counting(self: audit._PartitionAudit, job_ids: list[str],
                       *args: Any) -> Any:
        held.append(len(self.open))
        return await ask(self, job_ids, *args)

    monkeypatch.setattr(audit._PartitionAudit, "_ask", counting)
    assert await audit.verify(q.redis, [part]) == []
    assert len(held) >= 30  # compared batch by batch as the log was read
    assert max(held) <= 2 * 20 + 5 + 10, held
    assert {(await q.status(r.job_id)).state for r in running} == {"active"}


async def test_jobs_past_the_limit_are_set_aside_and_read_back(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 jobs dispatched before any ran (one failed twice and was retried), 5 that
    stay queued: with at most 50 jobs folded at once, the other 255 are compared
    afterwards from their chains. The log is found clean, and a difference in a job
    read back, or a chain broken, is named."""
    monkeypatch.setattr(audit, "_HELD", 50)
    monkeypatch.setattr(audit, "_BATCH", 20)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    jobs = await q.dispatch_many([{"target": "a", "task": f"t {i}"} for i in range(300)])
    retried = jobs[290].job_id
    for _ in range(3):
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 100)
        done = [s.job_id for s in started if s.job_id != retried]
        assert await q.scripts.complete(
            part, WORKER, [(job_id, 1, b"1") for job_id in done]) == [None] * len(done)
    for attempt in (1, 2, 3):
        await q.scripts.fail(part, WORKER, retried, attempt, "boom", Backoff(0, 0))
        if attempt < 3:
            await q.scripts.start(part, WORKER, LEASE_MS, 1)
    await q.retry(retried)
    waiting = await q.dispatch_many([{"target": "a", "task": f"w {i}"} for i in range(5)])
    held: list[int] = []
    compare = audit._PartitionAudit._compare

    async def counting(self: audit._PartitionAudit, job_ids: list[str], **kwargs: Any) -> None:
        held.append(len(self.open))
        await compare(self, job_ids, **kwargs)

    monkeypatch.setattr(audit._PartitionAudit, "_compare", counting)
    assert await audit.verify(q.redis, [part]) == []
    assert max(held) <= 50 and len(held) > 255 // 20, held
    assert (await q.status(retried)).state == "queued"
    late = jobs[280].job_id
    await q.redis.hset(part.job(late), "attempt", "9")
    await q.redis.hset(part.job(retried), "attempt", "2")
    assert sorted(await audit.verify(q.redis, [part])) == sorted([
        f"{late}: attempt is 9 in the state record, 1 by the log",
        f"{retried}: attempt is 2 in the state record, 3 by the log"])
    await q.redis.hset(part.job(late), "attempt", "1")
    await q.redis.hset(part.job(retried), "attempt", "3")
    # An entry of a chain deleted behind the log's back.
    dispatched, started_event, completed = await q.history(late)
    assert started_event.type == "JobStarted"
    assert await q.redis.xdel(part.log, started_event.event_id) == 1
    started_at = await q.redis.hget(part.job(late), "startedAt")
    assert sorted(await audit.verify(q.redis, [part])) == [
        f"{late}: attempt is 1 in the state record, 0 by the log",
        f"{late}: its event {completed.event_id} (JobCompleted) names "
        f"{started_event.event_id} as the job's event before it, but the log's is "
        f"{dispatched.event_id} (history, which follows the chain, and replay differ)",
        f"{late}: startedAt is {started_at} in the state record, None by the log"]
    assert {(await q.status(w.job_id)).state for w in waiting} == {"queued"}


async def test_a_job_set_aside_that_ran_on_is_read_again_along_its_chain(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs held, three set aside; one of those runs to its end after the log
    was read and before it is compared: its record names a later event than the
    ones set aside, so its events are read again along its chain (no difference)."""
    monkeypatch.setattr(audit, "_HELD", 2)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    jobs = await q.dispatch_many([{"target": "a", "task": f"t {i}"} for i in range(5)])
    compare_set_aside = audit._PartitionAudit._compare_spilled

    async def running_on(self: audit._PartitionAudit, spilled: Any) -> None:
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 5)
        assert len(started) == 5
        assert await q.scripts.complete(part, WORKER, [(jobs[4].job_id, 1, b"1")]) == [None]
        await compare_set_aside(self, spilled)

    monkeypatch.setattr(audit._PartitionAudit, "_compare_spilled", running_on)
    problems = await audit.verify(q.redis, [part])
    # Each record set aside agrees with its events (the views, brought up to the
    # log before it was read, lag behind what ran after: not asked here).
    assert not [p for p in problems if "state record" in p
                and any(j.job_id in p for j in jobs[2:])], problems
    assert [p for p in problems if jobs[4].job_id in p] == [
        f"{jobs[4].job_id}: completed by the log, but not listed as completed",
        f"{jobs[4].job_id}: listed as queued, but the log says completed"]
    assert (await q.status(jobs[4].job_id)).state == "completed"


async def test_a_record_behind_the_events_set_aside_is_named(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job set aside whose record names an earlier event than the log holds (or
    no event id at all) is not read again along its chain, which would hide the
    later events: the difference is named, as for a job held."""
    monkeypatch.setattr(audit, "_HELD", 1)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    jobs = await q.dispatch_many([{"target": "a", "task": f"t {i}"} for i in range(3)])
    started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 3)
    assert len(started) == 3
    behind, garbled = jobs[1].job_id, jobs[2].job_id
    (dispatched, started_event) = [e.event_id for e in await q.history(behind)]
    await q.redis.hset(part.job(behind), "events", dispatched)
    await q.redis.hset(part.job(garbled), "events", "garbled")
    problems = await audit.verify(q.redis, [part])
    assert f"{behind}: events is {dispatched!r} in the state record, {started_event!r} by " \
           "the log" in problems, problems
    assert any(p.startswith(f"{garbled}: events is 'garbled'") for p in problems), problems


@pytest.mark.parametrize("held", [audit._HELD, 1])
async def test_an_event_taken_out_of_a_chain_is_named(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch, held: int
) -> None:
    """The failed job's first attempt (its JobStarted and JobAttemptFailed) deleted
    from the log: what the rest folds to is the same record (the later attempts
    overwrite it), but ``history``, which walks the job's chain back from its
    record, would stop at the gap that ``replay`` reads past. The event that names
    a deleted one is named, whether the job was held or set aside (``held`` 1)."""
    monkeypatch.setattr(audit, "_HELD", held)
    jobs = await mixed_history(q)
    assert await verify(q) == []
    part = q.partition("b")
    events = await q.history(jobs.failed)
    dispatched, first_start, first_failure, second_start = (e.event_id for e in events[:4])
    assert [e.type for e in events[:4]] == [
        "JobDispatched", "JobStarted", "JobAttemptFailed", "JobStarted"]
    assert await q.redis.xdel(part.log, first_start, first_failure) == 2

    assert await verify(q) == [
        f"{jobs.failed}: its event {second_start} (JobStarted) names {first_failure} as "
        f"the job's event before it, but the log's is {dispatched} (history, which "
        "follows the chain, and replay differ)"]


async def test_tells_how_far_it_is(q: agentq.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long audit tells how far it is (``ticker.EVERY_S`` 0: at every chance):
    events read and jobs compared grow, the jobs set aside are compared once the
    log is read, and the last report of a partition holds its totals."""
    monkeypatch.setattr(ticker, "EVERY_S", 0)
    monkeypatch.setattr(audit, "_HELD", 50)
    monkeypatch.setattr(audit, "_BATCH", 20)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    jobs = await q.dispatch_many([{"target": "a", "task": f"t {i}"} for i in range(3000)])
    for _ in range(30):
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 100)
        assert await q.scripts.complete(part, WORKER, [(s.job_id, 1, b"1") for s in started]) \
            == [None] * len(started)
    reports: list[audit.Progress] = []
    assert await audit.verify(q.redis, [part], progress=reports.append) == []
    assert len(reports) > 3
    assert all(r.agent == "a" for r in reports)
    assert [r.events for r in reports] == sorted(r.events for r in reports)
    assert [r.compared for r in reports] == sorted(r.compared for r in reports)
    reading = [r for r in reports if not r.log_read]
    assert reading and reports[-1].log_read
    assert reading[-1].set_aside > 0  # a backlog: most jobs set aside
    assert (reports[-1].events, reports[-1].compared) == (3 * len(jobs), len(jobs))


async def test_a_job_asked_for_twice_is_compared_once(q: agentq.Client) -> None:
    """The fold asks for a batch before the one before is compared, so a job that
    ended again in between can be in both. The first comparison closes it; the
    second passes it over (no count twice, no error)."""
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    job = await q.dispatch("a", "once")
    await q.scripts.start(part, WORKER, LEASE_MS, 1)
    assert await q.scripts.complete(part, WORKER, [(job.job_id, 1, b"1")]) == [None]
    await Projection(q.redis).catch_up([part])
    checking = audit._PartitionAudit(q.redis, part, None)
    raw = await read_partition(q.redis, part)
    assert [e.type for e in raw] == ["JobDispatched", "JobStarted", "JobCompleted"]
    checking.open[job.job_id] = checking._dispatched(raw[0])
    for event in raw[1:]:
        checking.open[job.job_id] = checking._step(checking._derived(job.job_id), event)
    first = await checking._ask([job.job_id])
    second = await checking._ask([job.job_id])
    assert first is not None and second is not None
    checking._judge(first, last=False)
    checking._judge(second, last=False)
    assert checking.compared == 1 and checking.problems == []
    assert checking.states["completed"] == 1
