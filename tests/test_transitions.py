"""Every legal transition of SPEC's table, against a real Redis, and the illegal ones refused.

A legal transition changes the state record, the counts hash and appends its
event; an illegal one is refused with ``invalid_state`` and changes nothing:
no event, no record field, no count, no stream entry. After each scenario the
records rebuilt from the log (``eventlog.fold``) equal the live ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from redis.exceptions import ResponseError

import agentq
from agentq._admission import parse_input, prepare
from agentq.eventlog import fold, reader, records
from agentq.eventlog.keys import Partition
from agentq.eventlog.scripts import Backoff, Refusal, Scripts, StartedJob, ensure_work_groups
from agentq.schemas.errors import InvalidState
from agentq.schemas.events import EVENT_MODELS

WORKER = "w1"
LEASE_MS = 60_000
NO_BACKOFF = Backoff(0, 0)
RESULT = b'{"answer":42}'
PROGRESS = b'{"percent":50,"message":"half"}'


# -- helpers -----------------------------------------------------------------


async def start_job(
    q: agentq.Client, part: Partition, job_id: str, lease_ms: int = LEASE_MS
) -> StartedJob:
    """Start the partition's one ready job, which must be ``job_id``."""
    started = await start_ready(q, part, want=10, lease_ms=lease_ms)
    assert [s.job_id for s in started] == [job_id]
    return started[0]


async def start_ready(
    q: agentq.Client, part: Partition, want: int, lease_ms: int = LEASE_MS
) -> list[StartedJob]:
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, lease_ms, want)
    return started


async def counts(q: agentq.Client, part: Partition) -> dict[str, int]:
    raw = await q.redis.hgetall(part.counts)
    return {state: int(n) for state, n in raw.items() if int(n) != 0}


async def record(q: agentq.Client, part: Partition, job_id: str) -> dict[str, str]:
    return await reader.read_record(q.redis, part, job_id)


async def events(
    q: agentq.Client, part: Partition, job_id: str
) -> list[tuple[str, dict[str, Any]]]:
    history = await reader.job_history(q.redis, part, job_id)
    assert history is not None
    return [(e.type, e.data) for e in history]


async def ready_len(q: agentq.Client, part: Partition) -> int:
    return sum([await q.redis.xlen(s) for s in part.ready_streams])


async def pending_entries(q: agentq.Client, part: Partition) -> int:
    total = 0
    for stream in part.ready_streams:
        if await q.redis.exists(stream):
            total += (await q.redis.xpending(stream, "workers"))["pending"]
    return total


async def snapshot(q: agentq.Client, part: Partition, job_id: str) -> dict[str, Any]:
    """Everything a transition of ``job_id`` could touch in its partition."""
    r = q.redis
    last = await r.xrevrange(part.log, count=1)
    return {
        "log_len": await r.xlen(part.log),
        "log_last": last[0][0] if last else None,
        "record": await r.hgetall(part.job(job_id)),
        "counts": await r.hgetall(part.counts),
        "delayed": await r.zrange(part.delayed, 0, -1, withscores=True),
        "leases": await r.zrange(part.leases, 0, -1, withscores=True),
        "active": await r.hgetall(part.active),
        "deps": await r.smembers(part.deps(job_id)),
        "ready": [await r.xrange(s) for s in part.ready_streams],
        "timers": await r.xrange(part.timers),
    }


async def assert_log_consistent(q: agentq.Client, *agents: str) -> None:
    """Rule 1: each record rebuilt from the log equals the live one; counts match;
    every stored event's data fits its type's schema."""
    for agent in agents:
        part = q.partition(agent)
        log = await reader.read_partition(q.redis, part)
        for event in log:
            EVENT_MODELS[event.type].model_validate(event.stored().data)
        rebuilt = fold.records_from(log)
        for job_id, rebuilt_record in rebuilt.items():
            live = records.normalize(await record(q, part, job_id))
            assert rebuilt_record == live, job_id
        assert await counts(q, part) == dict(Counter(r["state"] for r in rebuilt.values()))


def now_us() -> int:
    return time.time_ns() // 1000


# -- dispatch -> queued | delayed | waiting_dependencies ----------------------


async def test_dispatch_queued(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "do it", caller="b", priority="high", max_attempts=2)
    assert view.state == "queued"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "queued"
    assert rec["attempt"] == "0"
    assert rec["maxAttempts"] == "2"
    assert rec["prio"] == "h"
    assert rec["queuedAt"] == rec["createdAt"]
    assert "runAt" not in rec
    assert await counts(q, part) == {"queued": 1}
    [(kind, data)] = await events(q, part, view.job_id)
    assert kind == "JobDispatched"
    assert data["state"] == "queued"
    assert (data["target"], data["dispatchedBy"], data["task"]) == ("a", "b", "do it")
    assert (data["maxAttempts"], data["priority"]) == (2, "high")
    ((_, fields),) = await q.redis.xrange(part.ready("high"))
    assert fields == {"j": view.job_id}
    assert await q.redis.xlen(part.ready("normal")) == 0
    ((_, envelope),) = await q.redis.xrange(part.log)
    assert envelope["actor"] == "b"
    assert envelope["jobId"] == view.job_id
    await assert_log_consistent(q, "a")


async def test_dispatch_delayed(q: agentq.Client) -> None:
    part = q.partition("a")
    bell = q.redis.pubsub(ignore_subscribe_messages=True)
    await bell.subscribe(q.keys.ring)
    before = now_us()
    view = await q.dispatch("a", "later", caller="b", delay_seconds=30)
    assert view.state == "delayed"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "delayed"
    run_at = int(rec["runAt"])
    assert before + 29_000_000 <= run_at <= now_us() + 31_000_000
    assert "queuedAt" not in rec
    assert await q.redis.zrange(part.delayed, 0, -1, withscores=True) == [
        (view.job_id, float(run_at // 1000))
    ]
    # The doorbell tells whoever serves the partition the run time, once per call.
    rang = None
    deadline = time.monotonic() + 5
    while rang is None and time.monotonic() < deadline:  # None: the subscription's reply
        rang = await bell.get_message(timeout=1)
    await bell.aclose()  # type: ignore[no-untyped-call]
    assert rang is not None and rang["data"] == f"a d{run_at // 1000}"
    assert await ready_len(q, part) == 0
    assert await counts(q, part) == {"delayed": 1}
    [(kind, data)] = await events(q, part, view.job_id)
    assert kind == "JobDispatched"
    assert (data["state"], data["runAt"]) == ("delayed", run_at)
    await assert_log_consistent(q, "a")


async def test_dispatch_waiting_dependencies(q: agentq.Client) -> None:
    dep = await q.dispatch("b", "first", caller="c")
    part = q.partition("a")
    view = await q.dispatch("a", "second", caller="c", depends_on=[dep.job_id])
    assert view.state == "waiting_dependencies"
    assert (await record(q, part, view.job_id))["state"] == "waiting_dependencies"
    assert await q.redis.smembers(part.deps(view.job_id)) == {dep.job_id}
    assert await ready_len(q, part) == 0
    assert await q.redis.zcard(part.delayed) == 0
    assert await counts(q, part) == {"waiting_dependencies": 1}
    [(kind, data)] = await events(q, part, view.job_id)
    assert kind == "JobDispatched"
    assert data["state"] == "waiting_dependencies"
    assert data["dependsOn"] == [dep.job_id]
    await assert_log_consistent(q, "a", "b")


# -- delayed -> queued | cancelled --------------------------------------------


async def test_delayed_promoted_to_queued_when_due(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "soon", caller="b", delay_seconds=0.05)
    moved: list[str] = []
    deadline = time.monotonic() + 5
    while not moved and time.monotonic() < deadline:
        moved, _ = await q.scripts.promote(part, "scheduler", [view.job_id])
        if not moved:
            await asyncio.sleep(0.01)
    assert moved == [view.job_id]
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "queued"
    assert "runAt" not in rec
    # Due time is kept in ms (floor), so promotion may come up to 1 ms before runAt.
    assert int(rec["queuedAt"]) >= int(rec["createdAt"]) + 49_000
    assert await q.redis.zcard(part.delayed) == 0
    ((_, fields),) = await q.redis.xrange(part.ready("normal"))
    assert fields == {"j": view.job_id}
    assert await counts(q, part) == {"queued": 1}
    assert [kind for kind, _ in await events(q, part, view.job_id)] == [
        "JobDispatched",
        "JobQueued",
    ]
    assert (await events(q, part, view.job_id))[1][1] == {"reason": "due"}
    envelope = (await q.redis.xrange(part.log))[-1][1]
    assert envelope["actor"] == "scheduler"
    # Promoting it again does nothing.
    before = await snapshot(q, part, view.job_id)
    assert (await q.scripts.promote(part, "scheduler", [view.job_id]))[0] == []
    assert await snapshot(q, part, view.job_id) == before
    await assert_log_consistent(q, "a")


async def test_delayed_not_promoted_before_due(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "later", caller="b", delay_seconds=30)
    before = await snapshot(q, part, view.job_id)
    moved, next_ms = await q.scripts.promote(part, "scheduler", [view.job_id])
    assert moved == []
    assert next_ms == int(before["record"]["runAt"]) // 1000
    assert await snapshot(q, part, view.job_id) == before


async def test_delayed_cancelled(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "later", caller="b", delay_seconds=30)
    cancelled = await q.cancel(view.job_id, caller="b")
    assert cancelled.state == "cancelled"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "cancelled"
    assert "runAt" not in rec
    assert "finishedAt" in rec
    assert await q.redis.zcard(part.delayed) == 0
    assert await counts(q, part) == {"cancelled": 1}
    assert (await events(q, part, view.job_id))[1:] == [
        ("JobCancelled", {"fromState": "delayed", "reason": "cancel"})
    ]
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == "b"
    await assert_log_consistent(q, "a")


async def test_delayed_and_queued_drained(q: agentq.Client) -> None:
    part = q.partition("a")
    queued = await q.dispatch("a", "now", caller="b")
    delayed = await q.dispatch("a", "later", caller="b", delay_seconds=30)
    out = await q.drain("a")
    assert sorted(out.job_ids) == sorted([queued.job_id, delayed.job_id])
    assert out.drained == 2
    for job, from_state in ((queued, "queued"), (delayed, "delayed")):
        assert (await record(q, part, job.job_id))["state"] == "cancelled"
        assert (await events(q, part, job.job_id))[-1] == (
            "JobCancelled",
            {"fromState": from_state, "reason": "drain"},
        )
    assert await counts(q, part) == {"cancelled": 2}
    assert await ready_len(q, part) == 0
    assert await q.redis.zcard(part.delayed) == 0
    await assert_log_consistent(q, "a")


# -- queued -> active | cancelled ---------------------------------------------


async def test_queued_started(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    before = now_us()
    started = await start_job(q, part, view.job_id)
    rec = await record(q, part, view.job_id)
    assert started.record == rec
    assert rec["state"] == "active"
    assert rec["attempt"] == "1"
    assert int(rec["startedAt"]) >= before
    ((job_id, deadline),) = await q.redis.zrange(part.leases, 0, -1, withscores=True)
    assert job_id == view.job_id
    assert before // 1000 + LEASE_MS <= deadline <= now_us() // 1000 + LEASE_MS
    assert await q.redis.hgetall(part.active) == {view.job_id: f"n {WORKER}"}
    assert await ready_len(q, part) == 0  # the entry is consumed by the start
    assert await pending_entries(q, part) == 0
    assert await counts(q, part) == {"active": 1}
    assert (await events(q, part, view.job_id))[1:] == [
        ("JobStarted", {"attempt": 1, "workerId": WORKER, "leaseSeconds": 60})
    ]
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == WORKER
    await assert_log_consistent(q, "a")


async def test_start_takes_high_priority_first_and_batches(q: agentq.Client) -> None:
    part = q.partition("a")
    low = await q.dispatch("a", "low", caller="b", priority="low")
    normal = await q.dispatch("a", "normal", caller="b")
    high = await q.dispatch("a", "high", caller="b", priority="high")
    first = await start_ready(q, part, want=1)
    assert [s.job_id for s in first] == [high.job_id]
    rest = await start_ready(q, part, want=5)
    assert [s.job_id for s in rest] == [normal.job_id, low.job_id]
    assert await counts(q, part) == {"active": 3}
    await assert_log_consistent(q, "a")


async def test_queued_cancelled(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    cancelled = await q.cancel(view.job_id, caller="a")  # the target may cancel
    assert cancelled.state == "cancelled"
    assert (await record(q, part, view.job_id))["state"] == "cancelled"
    assert await counts(q, part) == {"cancelled": 1}
    assert (await events(q, part, view.job_id))[1:] == [
        ("JobCancelled", {"fromState": "queued", "reason": "cancel"})
    ]
    await assert_log_consistent(q, "a")


# -- active -> completed | queued | delayed | failed | cancelled --------------


async def test_active_completed(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    await start_job(q, part, view.job_id)
    assert await q.scripts.complete(part, WORKER, [(view.job_id, 1, RESULT)]) == [None]
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "completed"
    assert rec["result"] == RESULT.decode()
    assert int(rec["finishedAt"]) >= int(rec["startedAt"])
    assert await counts(q, part) == {"completed": 1}
    # The hold on the partition is released: no lease, no active entry, no ready entry.
    assert await q.redis.zcard(part.leases) == 0
    assert await q.redis.hlen(part.active) == 0
    assert await ready_len(q, part) == 0
    assert await pending_entries(q, part) == 0
    assert (await events(q, part, view.job_id))[2:] == [
        ("JobCompleted", {"attempt": 1, "result": {"answer": 42}})
    ]
    assert (await q.status(view.job_id)).result == {"answer": 42}
    await assert_log_consistent(q, "a")


async def test_active_failed_attempt_requeued_without_backoff(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=3)
    await start_job(q, part, view.job_id)
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "boom", NO_BACKOFF) == "queued"
    rec = await record(q, part, view.job_id)
    assert (rec["state"], rec["error"], rec["attempt"]) == ("queued", "boom", "1")
    assert await counts(q, part) == {"queued": 1}
    assert await q.redis.zcard(part.leases) == 0
    assert await q.redis.hlen(part.active) == 0
    assert await pending_entries(q, part) == 0
    assert (await events(q, part, view.job_id))[2:] == [
        ("JobAttemptFailed", {"attempt": 1, "error": "boom", "state": "queued"})
    ]
    # Back in the ready stream: the next start is attempt 2.
    again = await start_job(q, part, view.job_id)
    assert again.record["attempt"] == "2"
    await assert_log_consistent(q, "a")


async def test_active_failed_attempt_delayed_with_backoff(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=3)
    await start_job(q, part, view.job_id)
    before = now_us()
    backoff = Backoff(base_ms=10_000, max_ms=60_000)
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "boom", backoff) == "delayed"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "delayed"
    run_at = int(rec["runAt"])
    # First failure of the budget: base delay, equal jitter -> between base/2 and base.
    assert before + 5_000_000 <= run_at <= now_us() + 10_000_000
    assert await q.redis.zrange(part.delayed, 0, -1, withscores=True) == [
        (view.job_id, float(run_at // 1000))
    ]
    assert await ready_len(q, part) == 0
    assert await counts(q, part) == {"delayed": 1}
    assert (await events(q, part, view.job_id))[2:] == [
        ("JobAttemptFailed", {"attempt": 1, "error": "boom", "state": "delayed", "runAt": run_at})
    ]
    await assert_log_consistent(q, "a")


async def test_active_failed_when_attempts_used_up(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=2)
    await start_job(q, part, view.job_id)
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "one", NO_BACKOFF) == "queued"
    await start_job(q, part, view.job_id)
    assert await q.scripts.fail(part, WORKER, view.job_id, 2, "two", NO_BACKOFF) == "failed"
    rec = await record(q, part, view.job_id)
    assert (rec["state"], rec["error"], rec["attempt"]) == ("failed", "two", "2")
    assert "finishedAt" in rec
    assert await counts(q, part) == {"failed": 1}
    assert await q.redis.zcard(part.leases) == 0
    assert await ready_len(q, part) == 0
    assert (await events(q, part, view.job_id))[-1] == (
        "JobFailed",
        {"attempt": 2, "error": "two", "reason": "attempts_exhausted"},
    )
    await assert_log_consistent(q, "a")


async def test_active_cancelled(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    await start_job(q, part, view.job_id)
    assert (await q.cancel(view.job_id)).state == "cancelled"  # the operator
    assert (await record(q, part, view.job_id))["state"] == "cancelled"
    assert await counts(q, part) == {"cancelled": 1}
    assert await q.redis.zcard(part.leases) == 0
    assert await q.redis.hlen(part.active) == 0
    assert await ready_len(q, part) == 0
    assert await pending_entries(q, part) == 0
    assert (await events(q, part, view.job_id))[-1] == (
        "JobCancelled",
        {"fromState": "active", "reason": "cancel"},
    )
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == "main"
    # The worker can no longer renew, report progress or finish the attempt.
    before = await snapshot(q, part, view.job_id)
    assert await q.scripts.renew(part, LEASE_MS, [(view.job_id, 1)]) == [False]
    refusal = await q.scripts.progress(part, WORKER, view.job_id, 1, PROGRESS)
    assert isinstance(refusal, Refusal) and refusal.code == "invalid_state"
    [refusal] = await q.scripts.complete(part, WORKER, [(view.job_id, 1, RESULT)])
    assert isinstance(refusal, Refusal) and refusal.code == "invalid_state"
    assert await snapshot(q, part, view.job_id) == before
    await assert_log_consistent(q, "a")


async def _start_and_expire(q: agentq.Client, part: Partition, job_id: str) -> None:
    await start_job(q, part, job_id, lease_ms=5)
    await asyncio.sleep(0.03)


async def test_stall_reclaims_to_queued(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=2)
    await _start_and_expire(q, part, view.job_id)
    assert await q.scripts.stall(part, "reaper", [view.job_id], NO_BACKOFF) == [view.job_id]
    rec = await record(q, part, view.job_id)
    assert (rec["state"], rec["error"], rec["attempt"]) == ("queued", "lease expired", "1")
    assert await counts(q, part) == {"queued": 1}
    assert await q.redis.zcard(part.leases) == 0
    assert await q.redis.hlen(part.active) == 0
    assert await pending_entries(q, part) == 0
    assert (await events(q, part, view.job_id))[-1] == (
        "JobStalled",
        {"attempt": 1, "state": "queued", "workerId": WORKER},
    )
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == "reaper"
    # A late answer from the dead attempt is refused; the next attempt is 2.
    [refusal] = await q.scripts.complete(part, WORKER, [(view.job_id, 1, RESULT)])
    assert isinstance(refusal, Refusal) and refusal.code == "invalid_state"
    assert (await start_job(q, part, view.job_id)).record["attempt"] == "2"
    await assert_log_consistent(q, "a")


async def test_stall_reclaims_to_delayed_with_backoff(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=2)
    await _start_and_expire(q, part, view.job_id)
    backoff = Backoff(base_ms=10_000, max_ms=60_000)
    assert await q.scripts.stall(part, "reaper", [view.job_id], backoff) == [view.job_id]
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "delayed"
    run_at = int(rec["runAt"])
    assert await q.redis.zscore(part.delayed, view.job_id) == run_at // 1000
    assert await counts(q, part) == {"delayed": 1}
    assert await ready_len(q, part) == 0
    assert (await events(q, part, view.job_id))[-1] == (
        "JobStalled",
        {"attempt": 1, "state": "delayed", "workerId": WORKER, "runAt": run_at},
    )
    await assert_log_consistent(q, "a")


async def test_stall_fails_when_attempts_used_up(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=1)
    await _start_and_expire(q, part, view.job_id)
    assert await q.scripts.stall(part, "reaper", [view.job_id], NO_BACKOFF) == [view.job_id]
    rec = await record(q, part, view.job_id)
    assert (rec["state"], rec["error"]) == ("failed", "lease expired")
    assert await counts(q, part) == {"failed": 1}
    assert await ready_len(q, part) == 0
    assert (await events(q, part, view.job_id))[-1] == (
        "JobFailed",
        {"attempt": 1, "error": "lease expired", "reason": "lease_expired"},
    )
    await assert_log_consistent(q, "a")


async def test_stall_leaves_unexpired_lease(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    await start_job(q, part, view.job_id)
    before = await snapshot(q, part, view.job_id)
    assert await q.scripts.stall(part, "reaper", [view.job_id], NO_BACKOFF) == []
    assert await snapshot(q, part, view.job_id) == before


# -- failed -> queued (retry) ---------------------------------------------------


async def test_failed_retried(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=1)
    await start_job(q, part, view.job_id)
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "boom", NO_BACKOFF) == "failed"
    retried = await q.retry(view.job_id)
    assert retried.state == "queued"
    rec = await record(q, part, view.job_id)
    assert (rec["state"], rec["budgetFrom"], rec["attempt"]) == ("queued", "1", "1")
    assert "finishedAt" not in rec
    assert await counts(q, part) == {"queued": 1}
    kind, data = (await events(q, part, view.job_id))[-1]
    assert kind == "JobRetried"
    assert data["attempt"] == 1
    assert data.get("state", "queued") == "queued"
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == "main"
    # A fresh budget of maxAttempts (1): attempt 2 runs, and its failure ends the job.
    assert (await start_job(q, part, view.job_id)).record["attempt"] == "2"
    assert await q.scripts.fail(part, WORKER, view.job_id, 2, "again", NO_BACKOFF) == "failed"
    assert await counts(q, part) == {"failed": 1}
    await assert_log_consistent(q, "a")


# -- waiting_dependencies -> cancelled ------------------------------------------


async def test_waiting_dependencies_cancelled(q: agentq.Client) -> None:
    dep = await q.dispatch("b", "first", caller="c")
    part = q.partition("a")
    view = await q.dispatch("a", "second", caller="c", depends_on=[dep.job_id])
    assert (await q.cancel(view.job_id, caller="c")).state == "cancelled"
    assert (await record(q, part, view.job_id))["state"] == "cancelled"
    assert await q.redis.exists(part.deps(view.job_id)) == 0
    assert await counts(q, part) == {"cancelled": 1}
    assert (await events(q, part, view.job_id))[-1] == (
        "JobCancelled",
        {"fromState": "waiting_dependencies", "reason": "cancel"},
    )
    await assert_log_consistent(q, "a", "b")


async def finished_dependency(q: agentq.Client, outcome: str) -> str:
    """A job of agent b that ended ``completed`` (result RESULT) or ``failed``."""
    part = q.partition("b")
    dep = await q.dispatch("b", "dependency", caller="c", max_attempts=1)
    await start_job(q, part, dep.job_id)
    if outcome == "completed":
        assert await q.scripts.complete(part, WORKER, [(dep.job_id, 1, RESULT)]) == [None]
    else:
        assert await q.scripts.fail(part, WORKER, dep.job_id, 1, "boom", NO_BACKOFF) == "failed"
    return dep.job_id


async def resolve(
    q: agentq.Client, job_id: str, dep_id: str, dep_state: str, *, ignore: bool = False
) -> str:
    result, error = (RESULT.decode(), "") if dep_state == "completed" else ("", "boom")
    return await q.scripts.resolve(
        q.partition("a"), "gates", job_id, dep_id, dep_state, result, error, ignore_failure=ignore
    )


async def test_waiting_dependencies_released_to_queued(q: agentq.Client) -> None:
    part = q.partition("a")
    dep_id = await finished_dependency(q, "completed")
    view = await q.dispatch("a", "second", caller="c", depends_on=[dep_id])
    assert await resolve(q, view.job_id, dep_id, "completed") == "queued"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "queued"
    assert "queuedAt" in rec
    assert await q.redis.exists(part.deps(view.job_id)) == 0
    ((_, fields),) = await q.redis.xrange(part.ready("normal"))
    assert fields == {"j": view.job_id}
    assert await counts(q, part) == {"queued": 1}
    assert (await events(q, part, view.job_id))[1:] == [
        (
            "DependencyResolved",
            {"dependencyId": dep_id, "state": "completed", "result": {"answer": 42}},
        ),
        ("JobQueued", {"reason": "released"}),
    ]
    assert (await q.redis.xrange(part.log))[-1][1]["actor"] == "gates"
    # The same resolution delivered again changes nothing.
    before = await snapshot(q, part, view.job_id)
    assert await resolve(q, view.job_id, dep_id, "completed") == "seen"
    assert await snapshot(q, part, view.job_id) == before
    await assert_log_consistent(q, "a", "b")


async def test_waiting_dependencies_released_to_delayed(q: agentq.Client) -> None:
    part = q.partition("a")
    dep_id = await finished_dependency(q, "completed")
    view = await q.dispatch("a", "later", caller="c", depends_on=[dep_id], delay_seconds=3600)
    run_at = int((await record(q, part, view.job_id))["runAt"])
    assert await resolve(q, view.job_id, dep_id, "completed") == "delayed"
    rec = await record(q, part, view.job_id)
    assert (rec["state"], int(rec["runAt"])) == ("delayed", run_at)
    assert await q.redis.zscore(part.delayed, view.job_id) == run_at // 1000
    assert await ready_len(q, part) == 0
    assert await counts(q, part) == {"delayed": 1}
    assert (await events(q, part, view.job_id))[-1] == (
        "JobDelayed",
        {"runAt": run_at, "reason": "released"},
    )
    await assert_log_consistent(q, "a", "b")


async def test_waiting_dependencies_failed_by_a_failed_dependency(q: agentq.Client) -> None:
    part = q.partition("a")
    dep_id = await finished_dependency(q, "failed")
    view = await q.dispatch("a", "second", caller="c", depends_on=[dep_id])
    assert await resolve(q, view.job_id, dep_id, "failed") == "failed"
    rec = await record(q, part, view.job_id)
    assert rec["state"] == "failed"
    assert dep_id in rec["error"]
    assert "finishedAt" in rec
    assert await ready_len(q, part) == 0
    assert await counts(q, part) == {"failed": 1}
    kind, data = (await events(q, part, view.job_id))[-1]
    assert kind == "JobFailed"
    assert (data["reason"], data["dependencyId"], data["attempt"]) == (
        "dependency_failed",
        dep_id,
        0,
    )
    await assert_log_consistent(q, "a", "b")


async def test_waiting_dependencies_ignoring_failure_is_queued(q: agentq.Client) -> None:
    part = q.partition("a")
    dep_id = await finished_dependency(q, "failed")
    view = await q.dispatch(
        "a", "second", caller="c", depends_on=[dep_id], on_dependency_failure="ignore"
    )
    assert await resolve(q, view.job_id, dep_id, "failed", ignore=True) == "queued"
    assert await counts(q, part) == {"queued": 1}
    await assert_log_consistent(q, "a", "b")


async def test_waiting_for_two_dependencies_waits_for_both(q: agentq.Client) -> None:
    part = q.partition("a")
    first = await finished_dependency(q, "completed")
    second = await finished_dependency(q, "completed")
    view = await q.dispatch("a", "both", caller="c", depends_on=[first, second])
    assert await resolve(q, view.job_id, first, "completed") == "resolved"
    assert (await record(q, part, view.job_id))["state"] == "waiting_dependencies"
    assert await q.redis.smembers(part.deps(view.job_id)) == {second}
    assert await counts(q, part) == {"waiting_dependencies": 1}
    assert await resolve(q, view.job_id, second, "completed") == "queued"
    assert await counts(q, part) == {"queued": 1}
    await assert_log_consistent(q, "a", "b")


async def test_resolving_a_cancelled_waiting_job_changes_nothing(q: agentq.Client) -> None:
    part = q.partition("a")
    dep_id = await finished_dependency(q, "completed")
    view = await q.dispatch("a", "second", caller="c", depends_on=[dep_id])
    await q.cancel(view.job_id, caller="c")
    before = await snapshot(q, part, view.job_id)
    assert await resolve(q, view.job_id, dep_id, "completed") == "seen"
    assert await snapshot(q, part, view.job_id) == before


# -- illegal transitions ----------------------------------------------------------

STATES = (
    "pending_approval", "waiting_dependencies", "delayed", "queued", "active", "completed",
    "failed", "cancelled",
)  # fmt: skip


async def job_in(q: agentq.Client, state: str) -> tuple[Partition, str, int]:
    """A job of agent a in ``state``; (its partition, its id, its attempt)."""
    part = q.partition("a")
    if state == "pending_approval":
        view = await q.dispatch("a", "task", caller="c", requires_approval=True)
    elif state == "waiting_dependencies":
        dep = await q.dispatch("b", "dep", caller="c")
        view = await q.dispatch("a", "task", caller="c", depends_on=[dep.job_id])
    elif state == "delayed":
        view = await q.dispatch("a", "task", caller="c", delay_seconds=3600)
    else:
        view = await q.dispatch("a", "task", caller="c", max_attempts=1)
    if state in ("active", "completed", "failed"):
        await start_job(q, part, view.job_id)
    if state == "completed":
        assert await q.scripts.complete(part, WORKER, [(view.job_id, 1, RESULT)]) == [None]
    elif state == "failed":
        assert await q.scripts.fail(part, WORKER, view.job_id, 1, "x", NO_BACKOFF) == "failed"
    elif state == "cancelled":
        await q.cancel(view.job_id)
    rec = await record(q, part, view.job_id)
    assert rec["state"] == state
    return part, view.job_id, int(rec["attempt"])


async def attempt_op(q: agentq.Client, op: str, part: Partition, job_id: str, attempt: int) -> None:
    """Try ``op`` and assert it was refused (or found nothing to do)."""
    if op == "complete":
        [outcome] = await q.scripts.complete(part, WORKER, [(job_id, attempt, RESULT)])
        assert isinstance(outcome, Refusal) and outcome.code == "invalid_state", outcome
    elif op == "fail":
        failed = await q.scripts.fail(part, WORKER, job_id, attempt, "x", NO_BACKOFF)
        assert isinstance(failed, Refusal) and failed.code == "invalid_state", failed
    elif op == "progress":
        refusal = await q.scripts.progress(part, WORKER, job_id, attempt, PROGRESS)
        assert isinstance(refusal, Refusal) and refusal.code == "invalid_state", refusal
    elif op == "retry":
        with pytest.raises(InvalidState) as info:
            await q.retry(job_id)
        assert info.value.code == "invalid_state"
    elif op == "cancel":
        with pytest.raises(InvalidState) as info:
            await q.cancel(job_id)
        assert info.value.code == "invalid_state"
    elif op in ("approve", "reject"):
        with pytest.raises(InvalidState) as info:
            await (q.approve(job_id) if op == "approve" else q.reject(job_id))
        assert info.value.state == (await record(q, part, job_id))["state"]
    elif op == "stall":  # the lease (if any) has not expired
        assert await q.scripts.stall(part, "reaper", [job_id], NO_BACKOFF) == []
    elif op == "promote":  # not due (if delayed at all)
        assert (await q.scripts.promote(part, "scheduler", [job_id]))[0] == []
    else:
        raise AssertionError(op)


LEGAL = {
    ("complete", "active"), ("fail", "active"), ("progress", "active"), ("retry", "failed"),
    ("cancel", "waiting_dependencies"), ("cancel", "delayed"), ("cancel", "queued"),
    ("cancel", "active"), ("cancel", "pending_approval"), ("approve", "pending_approval"),
    ("reject", "pending_approval"),
}  # fmt: skip
ILLEGAL = [
    (op, state)
    for op in ("complete", "fail", "progress", "retry", "cancel", "stall", "promote", "approve",
               "reject")
    for state in STATES
    if (op, state) not in LEGAL
]


@pytest.mark.parametrize(("op", "state"), ILLEGAL)
async def test_illegal_transition_refused_and_changes_nothing(
    q: agentq.Client, op: str, state: str
) -> None:
    part, job_id, attempt = await job_in(q, state)
    before = await snapshot(q, part, job_id)
    await attempt_op(q, op, part, job_id, attempt)
    assert await snapshot(q, part, job_id) == before


async def test_retry_refusal_names_the_state(q: agentq.Client) -> None:
    _, job_id, _ = await job_in(q, "completed")
    with pytest.raises(InvalidState) as info:
        await q.retry(job_id)
    assert info.value.state == "completed"
    assert "completed" in info.value.message


async def test_cancel_refusal_names_the_state(q: agentq.Client) -> None:
    _, job_id, _ = await job_in(q, "failed")
    with pytest.raises(InvalidState) as info:
        await q.cancel(job_id)
    assert info.value.state == "failed"
    assert "failed" in info.value.message


@pytest.mark.parametrize("op", ["complete", "fail", "progress"])
@pytest.mark.parametrize("stale", [0, 1, 3])
async def test_finish_with_stale_attempt_is_fenced(q: agentq.Client, op: str, stale: int) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b", max_attempts=3)
    await start_job(q, part, view.job_id)
    assert await q.scripts.fail(part, WORKER, view.job_id, 1, "x", NO_BACKOFF) == "queued"
    await start_job(q, part, view.job_id)  # attempt 2 is current
    before = await snapshot(q, part, view.job_id)
    await attempt_op(q, op, part, view.job_id, stale)
    assert await q.scripts.renew(part, LEASE_MS, [(view.job_id, stale)]) == [False]
    assert await snapshot(q, part, view.job_id) == before
    # The current attempt still completes.
    assert await q.scripts.complete(part, WORKER, [(view.job_id, 2, RESULT)]) == [None]
    await assert_log_consistent(q, "a")


async def test_completing_twice_is_refused(q: agentq.Client) -> None:
    part, job_id, attempt = await job_in(q, "completed")
    before = await snapshot(q, part, job_id)
    [refusal] = await q.scripts.complete(part, WORKER, [(job_id, attempt, b'"other"')])
    assert refusal == Refusal("invalid_state", ("completed", "1"))
    assert await snapshot(q, part, job_id) == before


async def test_start_skips_and_acks_a_cancelled_jobs_entry(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    await q.cancel(view.job_id, caller="b")
    assert await ready_len(q, part) == 1  # the cancelled job's entry is still there
    record_before = await record(q, part, view.job_id)
    log_len = await q.redis.xlen(part.log)
    assert await start_ready(q, part, want=5) == []
    assert await record(q, part, view.job_id) == record_before
    assert await q.redis.xlen(part.log) == log_len
    assert await counts(q, part) == {"cancelled": 1}
    assert await pending_entries(q, part) == 0  # acknowledged
    assert await ready_len(q, part) == 0  # and deleted
    assert await q.redis.zcard(part.leases) == 0
    assert await q.redis.hlen(part.active) == 0


async def test_start_skips_a_cancelled_entry_and_takes_the_next(q: agentq.Client) -> None:
    part = q.partition("a")
    gone = await q.dispatch("a", "cancelled", caller="b")
    kept = await q.dispatch("a", "kept", caller="b")
    await q.cancel(gone.job_id, caller="b")
    started = await start_ready(q, part, want=1)
    assert [s.job_id for s in started] == [kept.job_id]
    assert (await record(q, part, gone.job_id))["state"] == "cancelled"
    assert await counts(q, part) == {"cancelled": 1, "active": 1}
    await assert_log_consistent(q, "a")


async def test_start_does_not_start_an_active_job_again(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    started = await start_job(q, part, view.job_id)
    log_len = await q.redis.xlen(part.log)
    assert await start_ready(q, part, want=5) == []
    assert await record(q, part, view.job_id) == started.record
    assert await q.redis.xlen(part.log) == log_len
    assert await counts(q, part) == {"active": 1}


async def test_dispatching_an_existing_job_id_is_refused(q: agentq.Client) -> None:
    part = q.partition("a")
    view = await q.dispatch("a", "work", caller="b")
    prepared = prepare(parse_input({"target": "a", "task": "again"}), "b", 0, q.config)
    clash = prepared.job._replace(job_id=view.job_id)
    before = await snapshot(q, part, view.job_id)
    call = q.scripts.dispatch_call(part, [clash], actor="b", max_queue_depth=0, idempotency_ttl=60)
    (reply,) = await q.scripts.call_many([call])
    assert Scripts.dispatch_outcome(reply) == Refusal("invalid_state", (view.job_id,))
    assert await snapshot(q, part, view.job_id) == before


# -- the log rebuilds every record ----------------------------------------------


async def test_rebuild_from_log_equals_records_after_a_mixed_history(q: agentq.Client) -> None:
    part = q.partition("a")
    jobs = [await q.dispatch("a", f"job {i}", caller="b", max_attempts=2) for i in range(4)]
    delayed = await q.dispatch("a", "later", caller="b", delay_seconds=3600, priority="low")
    dep = await q.dispatch("b", "dep", caller="c")
    await q.dispatch("a", "waits", caller="c", depends_on=[dep.job_id], label="w")
    assert len(await start_ready(q, part, want=4)) == 4
    ids = [j.job_id for j in jobs]
    assert await q.scripts.progress(part, WORKER, ids[0], 1, PROGRESS) is None
    assert await q.scripts.complete(part, WORKER, [(ids[0], 1, RESULT), (ids[1], 1, b"null")]) == [
        None,
        None,
    ]
    assert await q.scripts.fail(part, WORKER, ids[2], 1, "x", NO_BACKOFF) == "queued"
    assert await q.scripts.fail(part, WORKER, ids[3], 1, "y", Backoff(1000, 2000)) == "delayed"
    await start_job(q, part, ids[2])
    assert await q.scripts.progress(part, WORKER, ids[2], 2, PROGRESS) is None
    assert await q.scripts.fail(part, WORKER, ids[2], 2, "z", NO_BACKOFF) == "failed"
    await q.retry(ids[2])
    await q.cancel(delayed.job_id)
    await assert_log_consistent(q, "a", "b")
    live_states = {j: (await record(q, part, j))["state"] for j in ids}
    assert live_states == {
        ids[0]: "completed",
        ids[1]: "completed",
        ids[2]: "queued",
        ids[3]: "delayed",
    }


async def test_calls_survive_an_emptied_script_cache(q: agentq.Client) -> None:
    """A server whose script cache was emptied (restart, SCRIPT FLUSH) refuses
    EVALSHA with NOSCRIPT; the call is made again with the script and nothing is
    done twice: one call alone, and several in one round trip."""
    await q.add_agent("b")
    await q.redis.script_flush()
    single = await q.dispatch("a", "alone")
    await q.redis.script_flush()
    both = await q.dispatch_many([{"target": "a", "task": "x"}, {"target": "b", "task": "y"}])
    assert [v.state for v in (single, *both)] == ["queued"] * 3
    assert await counts(q, q.partition("a")) == {"queued": 2}
    assert await counts(q, q.partition("b")) == {"queued": 1}
    await assert_log_consistent(q, "a", "b")


async def test_jobs_whose_spec_is_in_their_record_still_work(q: agentq.Client) -> None:
    """Before specs had a key of their own, a job's spec was a field of its
    record. Such jobs (an embedded server keeps its data) are still read,
    authorized, started, completed, cancelled and used as parents."""
    part = q.partition("a")

    async def old_layout(job_id: str) -> None:
        spec = await q.redis.get(part.spec(job_id))
        await q.redis.hset(part.job(job_id), "spec", spec)
        await q.redis.delete(part.spec(job_id))

    run = await q.dispatch("a", "run me", caller="b", label="old")
    stop = await q.dispatch("a", "cancel me", caller="b", announce=True)
    for job_id in (run.job_id, stop.job_id):
        await old_layout(job_id)
    assert await q.status(run.job_id, caller="b") == run
    assert [v.job_id for v in (await q.list(caller="b")).jobs] == [stop.job_id, run.job_id]
    child = await q.dispatch("b", "child", caller="a", parent_job_id=run.job_id)
    assert child.depth == 1
    started = await start_ready(q, part, want=1)
    assert [s.job_id for s in started] == [run.job_id]
    assert orjson.loads(started[0].record["spec"])["label"] == "old"
    (outcome,) = await q.scripts.complete(part, WORKER, [(run.job_id, 1, b'"ok"')])
    assert outcome is None
    cancelled = await q.cancel(stop.job_id, caller="b")  # b dispatched it: allowed
    assert cancelled.state == "cancelled"
    await assert_log_consistent(q, "a", "b")


async def test_drain_cancels_a_candidate_promoted_after_it_was_read(q: agentq.Client) -> None:
    """Issue 11 item 15: drain reads its candidates, then the script checks each.
    A delayed candidate promoted in between is queued (with a ready entry drain
    never read): it is drained like any queued job, and the jobs before it are
    not left cancelled behind an error."""
    part = q.partition("a")
    queued = await q.dispatch("a", "now", caller="b")
    delayed = await q.dispatch("a", "later", caller="b", delay_seconds=3600)
    (entry_id, _), = await q.redis.xrange(part.ready("normal"))
    stale = [(queued.job_id, f"n {entry_id}"), (delayed.job_id, "")]
    # The promotion that races the drain: the run time comes, the scheduler queues it.
    await q.redis.zadd(part.delayed, {delayed.job_id: 0})
    moved, _ = await q.scripts.promote(part, "system", [delayed.job_id])
    assert moved == [delayed.job_id]
    drained = await q.scripts.drain(part, "main", stale)
    assert drained == [queued.job_id, delayed.job_id]
    assert await counts(q, part) == {"cancelled": 2}
    # The promoted job's ready entry is left to the next start, which drops it.
    assert await start_ready(q, part, want=5) == []
    assert await ready_len(q, part) == 0
    await assert_log_consistent(q, "a")


async def test_drain_reading_a_job_both_delayed_and_queued_drains_it_once(
    q: agentq.Client,
) -> None:
    """The client reads the delayed set, then the ready streams: a job promoted
    between the two reads is a candidate twice, once as each."""
    part = q.partition("a")
    delayed = await q.dispatch("a", "later", caller="b", delay_seconds=3600)
    await q.redis.zadd(part.delayed, {delayed.job_id: 0})
    await q.scripts.promote(part, "system", [delayed.job_id])
    (entry_id, _), = await q.redis.xrange(part.ready("normal"))
    twice = [(delayed.job_id, ""), (delayed.job_id, f"n {entry_id}")]
    assert await q.scripts.drain(part, "main", twice) == [delayed.job_id]
    assert await counts(q, part) == {"cancelled": 1}
    assert await ready_len(q, part) == 0
    await assert_log_consistent(q, "a")


async def test_drain_racing_the_scheduler_drains_every_job(q: agentq.Client) -> None:
    """The same race, run for real: jobs come due while the operator drains.
    Every job is a candidate (delayed when drain reads the delayed set, else
    queued when it reads the streams), so every one ends cancelled."""
    part = q.partition("a")
    total = 0
    for _ in range(10):
        jobs = [await q.dispatch("a", f"j{i}", caller="b", delay_seconds=3600)
                for i in range(30)]
        total += len(jobs)
        await q.redis.zadd(part.delayed, {j.job_id: 0 for j in jobs})

        async def promote_all(batch: list[agentq.JobView]) -> None:
            for job in batch:
                await q.scripts.promote(part, "system", [job.job_id])
                await asyncio.sleep(0)

        await asyncio.gather(q.drain("a"), promote_all(jobs))
        assert await counts(q, part) == {"cancelled": total}
        assert await start_ready(q, part, want=100) == []
    await assert_log_consistent(q, "a")


async def test_start_without_a_group_on_a_later_stream_changes_nothing(q: agentq.Client) -> None:
    """Issue 11 item 15: start reads the ready streams in priority order. When a
    later stream has no ``workers`` group (a server that came back without it),
    the script refuses before starting anything: no job is left active behind
    an error with the counts unmoved."""
    part = q.partition("a")
    high = await q.dispatch("a", "high", caller="b", priority="high")
    normal = await q.dispatch("a", "normal", caller="b")
    await ensure_work_groups(q.redis, part)
    await q.redis.xgroup_destroy(part.ready("normal"), "workers")
    before = await snapshot(q, part, high.job_id)
    with pytest.raises(ResponseError, match="NOGROUP"):
        await q.scripts.start(part, WORKER, LEASE_MS, 10)
    assert await snapshot(q, part, high.job_id) == before
    assert await counts(q, part) == {"queued": 2}
    started = await start_ready(q, part, want=10)  # makes the groups again
    assert [s.job_id for s in started] == [high.job_id, normal.job_id]
    assert await counts(q, part) == {"active": 2}
    await assert_log_consistent(q, "a")
