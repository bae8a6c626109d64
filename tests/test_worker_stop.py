"""A stopping worker hands back what it could not finish (issue 11 item 9): past the
grace period, or at a second SIGTERM/SIGINT, its jobs go back to `queued` without
using up an attempt; the attempt number (the fencing token) still only grows."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import agentq
from agentq.consumers.handlers import Job
from agentq.eventlog.scripts import Refusal
from agentq.projections.audit import verify_partition
from agentq.schemas.config import Config

AGENT = "w"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
ROOT = Path(__file__).resolve().parent.parent


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_stop_after_grace_hands_back_the_job_without_charging_the_attempt(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    """On its last attempt, a job still running when the grace period ends is not
    dead-lettered: it is queued again, runs again (attempt 2) and completes."""
    q = await worker_client(workers={"shutdownGraceSeconds": 0.3}, jobs={"leaseSeconds": 5})
    started = asyncio.Event()

    async def slow(job: Job) -> str:
        started.set()
        await asyncio.sleep(30)
        return "never"

    job = await q.dispatch(AGENT, "too slow", max_attempts=1)
    run = q.worker(AGENT, slow)
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(started.wait(), 10)
    assert run.worker is not None
    worker_id = run.worker.worker_id
    stopping = time.monotonic()
    run.stop()
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - stopping < 2

    view = await q.status(job.job_id)
    assert (view.state, view.attempt) == ("queued", 1), view
    assert view.error is None
    events = await q.history(job.job_id)
    assert [e.type for e in events] == ["JobDispatched", "JobStarted", "JobStalled"]
    assert events[-1].data == {"attempt": 1, "state": "queued", "workerId": worker_id,
                               "released": True}
    part = q.partition(AGENT)
    assert await verify_partition(q.redis, part) == []  # the fold agrees: budget kept
    assert run.worker.ended == {"released": 1}

    # The released attempt answers late: refused, the fencing token holds.
    late = await q.scripts.complete(part, worker_id, [(job.job_id, 1, b'"late"')])
    assert late == [Refusal("invalid_state", ("queued", "1"))]

    async with asyncio.timeout(10):
        again = q.worker(AGENT, lambda j: f"done on attempt {j.attempt}")
        runner = asyncio.create_task(again.run())
        view, _ = await q.wait(job.job_id, timeout=8)
        again.stop()
        await runner
    assert (view.state, view.result, view.attempt) == ("completed", "done on attempt 2", 2)
    assert await verify_partition(q.redis, part) == []


async def test_stop_now_hands_back_at_once(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    q = await worker_client(workers={"shutdownGraceSeconds": 60}, jobs={"leaseSeconds": 5})
    running = 0

    async def slow(job: Job) -> str:
        nonlocal running
        running += 1
        await asyncio.sleep(30)
        return "never"

    jobs = [await q.dispatch(AGENT, f"slow {i}", max_attempts=2) for i in range(3)]
    run = q.worker(AGENT, slow, concurrency=3)
    task = asyncio.create_task(run.run())

    async def all_running() -> bool:
        return running == 3

    await until(all_running, "three handlers")
    run.stop()
    await asyncio.sleep(0.2)
    assert not task.done()  # the grace period (60 s) runs
    stopping = time.monotonic()
    run.stop(now=True)
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - stopping < 1
    for job in jobs:
        view = await q.status(job.job_id)
        assert (view.state, view.attempt) == ("queued", 1), view
    assert await verify_partition(q.redis, q.partition(AGENT)) == []


def _cli_env(config: Config, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=config.key_prefix, AGENTQ_REDIS_URL=redis_url,
               AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
               AGENTQ_WORKERS__SHUTDOWN_GRACE_SECONDS="60", AGENTQ_JOBS__LEASE_SECONDS="10")
    return env


async def test_cli_worker_second_sigterm_stops_at_once_and_hands_back(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str, tmp_path: Path
) -> None:
    """`agentq worker`: the first SIGTERM waits for the running job (grace 60 s); a
    second one kills its process group and hands the job back, attempt uncharged.
    Each ended job gets a line, and a summary line is printed at exit."""
    q = await worker_client()
    pid_file = tmp_path / "pid"
    command = f"echo $$ > {shlex.quote(str(pid_file))}; sleep 60"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentq.cli", "worker", AGENT, "--exec", command,
        cwd=ROOT, env=_cli_env(q.config, redis_url),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        slow = await q.dispatch(AGENT, "slow", max_attempts=1)

        async def slow_running() -> bool:
            return pid_file.exists() and pid_file.read_text().strip() != ""

        await until(slow_running, "the slow job's command", timeout=20)
        shell = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.returncode is None  # the first signal lets the job run on
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert time.monotonic() - signalled < 3
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    view = await q.status(slow.job_id)
    assert (view.state, view.attempt) == ("queued", 1), view
    with pytest.raises(ProcessLookupError):
        os.kill(shell, 0)  # the handler's process group was killed
    text = err.decode()
    assert f"job {slow.job_id} released in " in text and "(attempt 1)" in text, text
    assert "stopped after" in text and "jobs ended" in text, text
