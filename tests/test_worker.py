"""The worker in-process against a real Redis (DESIGN "How a job flows", step 3):
concurrency, priority order, retries with backoff, attempts used up, cancel of
an active job, lease renewal, stop with a grace period, presence heartbeats."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _redis_server import redis_server

import agentq
from agentq import embedded
from agentq.consumers.handlers import Job
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from agentq.schemas.events import StoredEvent

pytestmark = pytest.mark.both_backends  # whole flows: again on a local Redis Cluster (conftest)

AGENT = "w"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}


@asynccontextmanager
async def worker(
    q: agentq.Client, handler: Callable[[Job], Any], concurrency: int = 1
) -> AsyncIterator[Any]:
    run = q.worker(AGENT, handler, concurrency=concurrency)
    task = asyncio.create_task(run.run())
    try:
        yield run
    finally:
        run.stop()
        await asyncio.wait_for(task, timeout=10)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def of_type(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.type == kind]


def micros(iso: str) -> int:
    return iso_to_micros(iso)


# -- tests -----------------------------------------------------------------


async def test_concurrency_runs_that_many_at_once(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client()
    running = 0
    peak = 0

    async def handler(job: Job) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.3)
        finally:
            running -= 1
        return job.task

    jobs = [await q.dispatch(AGENT, f"job {i}") for i in range(12)]
    started = time.monotonic()
    async with worker(q, handler, concurrency=5):
        views = [(await q.wait(j.job_id, timeout=10))[0] for j in jobs]
    took = time.monotonic() - started
    assert [v.state for v in views] == ["completed"] * 12
    assert [v.result for v in views] == [f"job {i}" for i in range(12)]
    assert peak == 5
    assert took < 2.5, f"12 jobs of 0.3 s, 5 at a time, took {took:.2f}s"  # three rounds: ~0.9 s


async def test_priority_order_high_normal_low_fifo_within(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client()
    order: list[str] = []

    def handler(job: Job) -> None:
        order.append(job.task)

    dispatched = []
    for n in (1, 2):
        for priority in ("low", "normal", "high"):
            dispatched.append(await q.dispatch(AGENT, f"{priority}{n}", priority=priority))
    async with worker(q, handler, concurrency=1):
        for job in dispatched:
            view, _ = await q.wait(job.job_id, timeout=10)
            assert view.state == "completed"
    assert order == ["high1", "high2", "normal1", "normal2", "low1", "low2"]


async def test_retries_with_equal_jitter_backoff_then_success(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    base, cap = 0.2, 10.0
    q = await worker_client(
        jobs={
            "maxAttempts": 3,
            "backoffBaseSeconds": base,
            "backoffMaxSeconds": cap,
            "leaseSeconds": 5,
        }
    )

    def handler(job: Job) -> str:
        if job.attempt < 3:
            raise RuntimeError(f"attempt {job.attempt} broke")
        return "third time lucky"

    job = await q.dispatch(AGENT, "flaky")
    async with worker(q, handler):
        view, timed_out = await q.wait(job.job_id, timeout=10)
    assert not timed_out
    assert view.state == "completed", view
    assert view.result == "third time lucky"
    assert view.attempt == 3
    assert view.error is None

    events = await q.history(job.job_id)
    assert [e.type for e in events] == [
        "JobDispatched",
        "JobStarted", "JobAttemptFailed", "JobQueued",
        "JobStarted", "JobAttemptFailed", "JobQueued",
        "JobStarted", "JobCompleted",
    ]  # fmt: skip
    slack_us = 3_000  # a few ms: millisecond rounding of run times
    # How late the scheduler and the worker may be after the run time. The
    # scheduler times its wake-up with XREAD BLOCK, which Redis ends only at its
    # next serverCron tick (1/hz = 100 ms by default): see
    # test_backoff_retry_is_queued_at_its_run_time_on_an_idle_server.
    late_us = 150_000
    for k, failed in enumerate(of_type(events, "JobAttemptFailed"), start=1):
        d_us = int(min(cap, base * 2 ** (k - 1)) * 1_000_000)
        assert failed.data["attempt"] == k
        assert failed.data["error"] == f"attempt {k} broke"
        assert failed.data["state"] == "delayed"
        at = micros(failed.at)
        i = events.index(failed)
        queued, restarted = events[i + 1], events[i + 2]
        assert queued.data == {"reason": "due"}
        assert restarted.data["attempt"] == k + 1
        scheduled = micros(failed.data["runAt"]) - at
        assert d_us // 2 <= scheduled <= d_us, (k, scheduled, d_us)
        waited = micros(queued.at) - at
        assert d_us // 2 - slack_us <= waited <= d_us + late_us, (k, waited, d_us)
        assert micros(queued.at) >= micros(failed.data["runAt"]) - slack_us
        started_after = micros(restarted.at) - at
        assert d_us // 2 - slack_us <= started_after <= d_us + late_us, (k, started_after, d_us)


@pytest.fixture
def idle_redis_url() -> Iterator[str]:
    """A private embedded Redis nobody else talks to (timer precision needs an idle server)."""
    home = Path(tempfile.mkdtemp(prefix="aq-")) / "h"  # short: the socket lives in it
    try:
        yield embedded.ensure_server(home).url
    finally:
        embedded.stop_server(home)
        shutil.rmtree(home.parent, ignore_errors=True)


async def test_backoff_retry_is_queued_at_its_run_time_on_an_idle_server(
    idle_redis_url: str, make_config: Callable[..., Config]
) -> None:
    """A retry runs at its run time, not up to 1/hz (100 ms) later.

    The same backoff check as above with a few ms of slack, on a server with no
    other clients: on a busy server other traffic wakes Redis often and hides
    the lateness of XREAD BLOCK timeouts.
    """
    config = make_config(
        rateLimit=NO_RATE_LIMIT,
        workers={"shutdownGraceSeconds": 1},
        jobs={
            "maxAttempts": 4,
            "backoffBaseSeconds": 0.1,
            "backoffMaxSeconds": 10,
            "leaseSeconds": 5,
        },
    )

    def handler(job: Job) -> str:
        if job.attempt < 4:
            raise RuntimeError("not yet")
        return "done"

    async with agentq.connect(idle_redis_url, config) as q:
        await q.add_agent(AGENT)
        job = await q.dispatch(AGENT, "flaky")
        async with worker(q, handler):
            view, _ = await q.wait(job.job_id, timeout=10)
        assert view.state == "completed", view
        events = await q.history(job.job_id)
    lateness_ms = []
    for failed in of_type(events, "JobAttemptFailed"):
        queued = events[events.index(failed) + 1]
        assert queued.type == "JobQueued"
        lateness_ms.append((micros(queued.at) - micros(failed.data["runAt"])) / 1000)
    assert len(lateness_ms) == 3
    assert all(-3 <= late <= 15 for late in lateness_ms), (
        f"retries queued this many ms after their run time: {lateness_ms}"
    )


async def test_attempts_used_up_fail_the_job(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client(
        jobs={
            "maxAttempts": 2,
            "backoffBaseSeconds": 0.05,
            "backoffMaxSeconds": 0.1,
            "leaseSeconds": 5,
        }
    )
    calls: list[int] = []

    async def handler(job: Job) -> None:
        calls.append(job.attempt)
        raise ValueError("always broken")

    job = await q.dispatch(AGENT, "hopeless")
    assert job.max_attempts == 2
    async with worker(q, handler):
        view, timed_out = await q.wait(job.job_id, timeout=10)
        await asyncio.sleep(0.2)  # nothing more runs after the job failed
    assert not timed_out
    assert calls == [1, 2]
    assert view.state == "failed", view
    assert view.attempt == 2
    assert view.error == "always broken"
    assert view.finished_at is not None
    events = await q.history(job.job_id)
    assert [e.type for e in events] == [
        "JobDispatched", "JobStarted", "JobAttemptFailed", "JobQueued", "JobStarted", "JobFailed",
    ]  # fmt: skip
    failed = events[-1]
    assert failed.data["reason"] == "attempts_exhausted"
    assert failed.data["error"] == "always broken"
    assert failed.data["attempt"] == 2


async def test_cancel_of_active_job_stops_its_handler(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    lease = 0.6
    q = await worker_client(jobs={"leaseSeconds": lease})
    started = asyncio.Event()
    cancelled_at: list[float] = []
    finished: list[str] = []

    async def handler(job: Job) -> str:
        if job.task != "long":
            return "quick"
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled_at.append(time.monotonic())
            raise
        finished.append(job.id)
        return "should never complete"

    job = await q.dispatch(AGENT, "long")
    async with worker(q, handler):
        await asyncio.wait_for(started.wait(), timeout=10)
        asked = time.monotonic()
        view = await q.cancel(job.job_id)
        assert view.state == "cancelled"

        async def handler_stopped() -> bool:
            return bool(cancelled_at)

        await until(handler_stopped, timeout=3, what="the handler to be cancelled")
        noticed = cancelled_at[0] - asked
        # The worker learns at its next lease renewal, every lease/3.
        assert noticed <= lease / 3 + 0.15, f"handler stopped {noticed:.3f}s after the cancel"

        # The slot is free again: the next job runs.
        after = await q.dispatch(AGENT, "short")
        done, _ = await q.wait(after.job_id, timeout=5)
        assert done.state == "completed"
        assert done.result == "quick"

    assert finished == []
    final = await q.status(job.job_id)
    assert final.state == "cancelled"
    assert final.result is None
    events = await q.history(job.job_id)
    assert [e.type for e in events] == ["JobDispatched", "JobStarted", "JobCancelled"]
    assert events[-1].data == {"fromState": "active", "reason": "cancel"}


async def test_lease_is_renewed_while_a_long_job_runs(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client(jobs={"leaseSeconds": 0.6, "maxAttempts": 1})

    async def handler(job: Job) -> str:
        await asyncio.sleep(1.5)  # 2.5 leases
        return "outlived the lease"

    job = await q.dispatch(AGENT, "long")
    async with worker(q, handler):
        view, _ = await q.wait(job.job_id, timeout=10)
    assert view.state == "completed", view
    assert view.attempt == 1
    types = [e.type for e in await q.history(job.job_id)]
    assert types == ["JobDispatched", "JobStarted", "JobCompleted"]


async def test_stop_lets_running_job_finish_within_grace(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client(workers={"shutdownGraceSeconds": 3})
    started = asyncio.Event()

    async def handler(job: Job) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "finished after stop"

    job = await q.dispatch(AGENT, "finish me")
    run = q.worker(AGENT, handler, concurrency=2)
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(started.wait(), timeout=10)
    run.stop()
    late = await q.dispatch(AGENT, "too late")
    await asyncio.wait_for(task, timeout=5)
    assert (await q.status(job.job_id)).result == "finished after stop"
    assert (await q.status(late.job_id)).state == "queued"


async def test_presence_heartbeat_while_running_gone_after_stop(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    heartbeat = 3.0
    q = await worker_client(
        jobs={"leaseSeconds": 0.6},
        workers={"heartbeatTimeoutSeconds": heartbeat, "shutdownGraceSeconds": 1},
    )
    part = q.partition(AGENT)
    run = q.worker(AGENT, lambda job: None)
    task = asyncio.create_task(run.run())
    try:

        async def registered() -> bool:
            return (
                run.worker is not None
                and await q.redis.zscore(part.workers, run.worker.worker_id) is not None
            )

        await until(registered, timeout=5, what="the worker's presence entry")
        assert run.worker is not None
        worker_id = run.worker.worker_id
        assert worker_id.startswith(f"{AGENT}@")
        first = await q.redis.zscore(part.workers, worker_id)
        now_ms = time.time() * 1000
        assert first is not None
        assert now_ms < first <= now_ms + heartbeat * 1000 + 50
        await asyncio.sleep(0.5)  # more than one keepalive interval (lease/3)
        second = await q.redis.zscore(part.workers, worker_id)
        assert second is not None
        assert second > first, "the heartbeat deadline did not move forward"
        assert second > time.time() * 1000
    finally:
        run.stop()
        await asyncio.wait_for(task, timeout=5)
    assert await q.redis.zscore(part.workers, worker_id) is None
    assert await q.redis.zcard(part.workers) == 0


async def test_wait_returns_the_view_status_gives(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    """wait follows the job's events in the log to its end; the view it returns
    is the one its state record gives, whatever happened on the way: progress,
    failed attempts retried, a final failure, a cancel, or a wait timed out."""
    q = await worker_client(jobs={"backoffBaseSeconds": 0.01, "backoffMaxSeconds": 0.02})
    tries: dict[str, int] = {}

    async def handler(job: Job) -> Any:
        tries[job.task] = tries.get(job.task, 0) + 1
        await job.progress(50, "half way")
        if job.task == "flaky" and tries[job.task] < 3:
            raise RuntimeError(f"try {tries[job.task]} failed")
        if job.task == "broken":
            raise RuntimeError("always")
        if job.task == "slow":
            await asyncio.sleep(30)
        return {"task": job.task, "tries": tries[job.task]}

    waiting = await q.dispatch(AGENT, "never runs", delay_seconds=600)
    view, timed_out = await q.wait(waiting.job_id, timeout=1)
    assert timed_out and view == await q.status(waiting.job_id)

    async with worker(q, handler, concurrency=4):
        jobs = {task: await q.dispatch(AGENT, task, max_attempts=3)
                for task in ("plain", "flaky", "broken", "slow")}
        waits = {task: asyncio.create_task(q.wait(job.job_id, timeout=20))
                 for task, job in jobs.items()}
        while (await q.status(jobs["slow"].job_id)).progress is None:
            await asyncio.sleep(0.02)
        await q.cancel(jobs["slow"].job_id)
        ended = {task: await w for task, w in waits.items()}
    states = {task: (view.state, timed_out) for task, (view, timed_out) in ended.items()}
    assert states == {"plain": ("completed", False), "flaky": ("completed", False),
                      "broken": ("failed", False), "slow": ("cancelled", False)}
    assert ended["flaky"][0].result == {"task": "flaky", "tries": 3}
    for task, (view, _) in ended.items():
        assert view == await q.status(jobs[task].job_id), task


async def test_a_cancelled_job_task_does_not_stall_the_completions_batched_with_it(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    """Completions go in batches; when the task of one job in a batch is cancelled
    while the batch is in flight, the others still learn their outcome, their
    slots are freed, and the worker goes on taking jobs."""
    q = await worker_client()
    run = q.worker(AGENT, lambda job: job.task, concurrency=2)
    runner = asyncio.create_task(run.run())
    try:
        while run.worker is None:
            await asyncio.sleep(0.01)
        worker = run.worker
        gate, in_flight = asyncio.Event(), asyncio.Event()
        call_many = worker.scripts.call_many

        async def held(calls: Any) -> Any:
            in_flight.set()
            await gate.wait()
            return await call_many(calls)

        worker.scripts.call_many = held  # type: ignore[method-assign]
        first = await q.dispatch_many([{"target": AGENT, "task": f"job {i}"} for i in range(2)])
        await asyncio.wait_for(in_flight.wait(), 10)
        await asyncio.sleep(0.05)  # both jobs' completions are in the held batch
        worker._running[first[0].job_id].task.cancel()
        worker.scripts.call_many = call_many  # type: ignore[method-assign]
        gate.set()
        views = [(await q.wait(j.job_id, timeout=10))[0] for j in first]
        assert [v.state for v in views] == ["completed", "completed"]
        later = await q.dispatch(AGENT, "later")
        view, timed_out = await q.wait(later.job_id, timeout=10)
        assert not timed_out and view.result == "later"
        for _ in range(100):
            if not worker._running:
                break
            await asyncio.sleep(0.01)
        assert worker._running == {}
    finally:
        run.stop()
        await asyncio.wait_for(runner, 10)


async def test_worker_rides_out_a_redis_restart(make_config: Callable[..., Config]) -> None:
    """The server goes away and comes back (with its data, from its AOF): the
    worker process does not exit; it waits, takes up its streams again and runs
    what is dispatched after the restart."""
    with redis_server(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        config = make_config(rateLimit=NO_RATE_LIMIT, workers={"shutdownGraceSeconds": 1},
                             circuitBreaker={"resetTimeoutSeconds": 0.5})
        async with agentq.connect(server.url, config) as q:
            await q.add_agent(AGENT)
            run = q.worker(AGENT, lambda job: job.task, concurrency=2)
            runner = asyncio.create_task(run.run())
            try:
                before = await q.dispatch(AGENT, "before")
                assert (await q.wait(before.job_id, timeout=10))[0].state == "completed"
                server.stop()
                await asyncio.sleep(1.0)  # the worker meets the outage
                server.start()
                deadline = time.monotonic() + 20
                while True:  # the client's own breaker may refuse for a moment
                    try:
                        after = await q.dispatch(AGENT, "after")
                        break
                    except agentq.AgentqError:
                        assert time.monotonic() < deadline, "the client never reconnected"
                        await asyncio.sleep(0.2)
                view, timed_out = await q.wait(after.job_id, timeout=20)
                assert not timed_out and view.state == "completed" and view.result == "after"
                assert not runner.done()
            finally:
                run.stop()
                await asyncio.wait_for(runner, 15)


async def test_heartbeat_deadline_is_by_redis_time_not_the_host_clock(
    worker_client: Callable[..., Awaitable[agentq.Client]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker on a host whose clock is an hour ahead still writes its presence
    deadline as Redis TIME + heartbeatTimeoutSeconds (readers judge it by TIME)."""
    heartbeat = 3.0
    q = await worker_client(
        workers={"heartbeatTimeoutSeconds": heartbeat, "shutdownGraceSeconds": 1})
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    part = q.partition(AGENT)
    run = q.worker(AGENT, lambda job: None)
    task = asyncio.create_task(run.run())
    try:

        async def registered() -> bool:
            return (run.worker is not None
                    and await q.redis.zscore(part.workers, run.worker.worker_id) is not None)

        await until(registered, timeout=5, what="the worker's presence entry")
        assert run.worker is not None
        deadline = await q.redis.zscore(part.workers, run.worker.worker_id)
        seconds, micros = await q.redis.time()
        server_ms = seconds * 1000 + micros // 1000
        assert deadline is not None
        assert server_ms < deadline <= server_ms + heartbeat * 1000 + 50
    finally:
        run.stop()
        await asyncio.wait_for(task, 5)
