"""Due times and deadlines are judged by Redis ``TIME``, never by the caller's
clock (issue 11, item 19): a scheduler or reclaimer whose host clock is a few
seconds off neither spins on jobs that are not due nor acts late, and a worker's
liveness is read against the server's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import agentq
from agentq.consumers.reclaim import Reclaimer
from agentq.consumers.scheduler import Scheduler
from agentq.eventlog.keys import Partition
from agentq.eventlog.scripts import Backoff, Scripts, ensure_work_groups

SKEWS = [pytest.param(3.0, id="client-ahead-3s"), pytest.param(-3.0, id="client-behind-3s")]


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Move this process's wall clock (``time.time``) by some seconds."""
    real = time.time

    def skew(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    return skew


def count_calls(scripts: Scripts, name: str, part: Partition) -> list[int]:
    """Count the calls of one script on one partition made through ``scripts``
    (a one-item list)."""
    calls = [0]
    original = scripts._call

    def counting(script: str, keys: Any, args: Any) -> Any:
        if script == name and keys[1] == part.log:
            calls[0] += 1
        return original(script, keys, args)

    scripts._call = counting  # type: ignore[method-assign]
    return calls


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Any], None]]:
    """Run consumer loops (``loop(stop)``) until the test ends."""
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(loop: Any) -> None:
        tasks.append(asyncio.create_task(loop(stop)))

    yield start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def state_of(q: agentq.Client, job_id: str) -> str:
    return str(await q.redis.hget(q.partition(job_id.rsplit(".", 1)[1]).job(job_id), "state"))


async def wait_for_state(q: agentq.Client, job_id: str, state: str, timeout: float) -> float:
    """Seconds until the job is in ``state``."""
    started = time.monotonic()
    while await state_of(q, job_id) != state:
        assert time.monotonic() - started < timeout, f"{job_id} not {state} after {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("skew", SKEWS)
async def test_scheduler_promotes_on_time_by_redis_time(
    q: agentq.Client, skewed: Callable[[float], None], running: Callable[[Any], None],
    skew: float,
) -> None:
    await q.dispatch("b", "early riser", caller="a")  # the partition exists
    scheduler = Scheduler(q.redis, q.open_blocking(), q.keys)
    promotes = count_calls(scheduler.scripts, "promote", q.partition("b"))
    skewed(skew)
    running(scheduler.run)
    await asyncio.sleep(0.2)  # the scheduler has looked once and is waiting
    job = await q.dispatch("b", "later", caller="a", delay_seconds=1)
    took = await wait_for_state(q, job.job_id, "queued", timeout=6)
    assert 0.9 <= took <= 1.5, took
    # Nothing was asked of the script before the job was due by the server's clock.
    assert promotes[0] <= 4, promotes[0]


@pytest.mark.parametrize("skew", SKEWS)
async def test_reclaimer_judges_leases_by_redis_time(
    q: agentq.Client, skewed: Callable[[float], None], running: Callable[[Any], None],
    skew: float,
) -> None:
    job = await q.dispatch("b", "will be abandoned", caller="a")
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)
    (started,), _ = await q.scripts.start(part, "gone-worker", 1_000, 1)  # a 1 s lease
    assert started.job_id == job.job_id
    reclaimer = Reclaimer(q.redis, q.keys, Backoff(0, 0))
    stalls = count_calls(reclaimer.scripts, "stall", part)
    skewed(skew)
    running(reclaimer.run)
    took = await wait_for_state(q, job.job_id, "queued", timeout=8)
    assert 0.9 <= took <= 1.5, took
    assert stalls[0] <= 4, stalls[0]


async def server_ms(q: agentq.Client) -> int:
    seconds, micros = await q.redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


@pytest.mark.parametrize("skew", SKEWS)
async def test_activity_reads_worker_heartbeats_by_redis_time(
    q: agentq.Client, skewed: Callable[[float], None], skew: float
) -> None:
    """A heartbeat is a deadline in the server's milliseconds; a worker is live
    until the server's clock passes it, whatever the reader's clock says."""
    part = q.partition("b")
    now = await server_ms(q)
    await q.redis.zadd(part.workers, {"live-worker": now + 1_500, "dead-worker": now - 1_500})
    skewed(skew)
    out = await q.activity(["b"])
    assert out["agents"]["b"]["workers"] == 1
    assert out["agents"]["b"]["status"] == "idle"
