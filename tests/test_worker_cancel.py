"""Cancelling an active job reaches its worker within a second (issue 11 item 12):
the cancel script publishes a notice, the worker checks the attempt at once and
kills the handler. The lease renewal (every lease/3) stays the sweep behind it."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import agentq
from agentq.consumers.handlers import exec_handler
from agentq.schemas.config import Config

AGENT = "w"


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0},
                         jobs={"leaseSeconds": 60}, workers={"shutdownGraceSeconds": 1})
    async with agentq.connect(redis_url, config) as client:
        await client.add_agent(AGENT)
        yield client


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # reaped between the two looks
        return True
    return stat[stat.rindex(")") + 2] == "Z"


async def test_cancel_kills_an_active_exec_handler_within_a_second(
    q: agentq.Client, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    handler = exec_handler(f"echo $$ > {shlex.quote(str(pid_file))}; sleep 60")
    run = q.worker(AGENT, handler, concurrency=2)
    task = asyncio.create_task(run.run())
    try:
        for round_ in range(3):  # each cancel is heard by the notice, not the 20 s renewal
            pid_file.unlink(missing_ok=True)
            job = await q.dispatch(AGENT, f"long {round_}")
            deadline = time.monotonic() + 10
            while not (pid_file.exists() and pid_file.read_text().strip()):
                assert time.monotonic() < deadline, "the command never started"
                await asyncio.sleep(0.01)
            pid = int(pid_file.read_text())
            asked = time.monotonic()
            assert (await q.cancel(job.job_id)).state == "cancelled"
            while not _gone(pid):
                took = time.monotonic() - asked
                assert took < 1.0, f"round {round_}: the handler still ran {took:.2f}s later"
                await asyncio.sleep(0.01)
            while run.worker is not None and job.job_id in run.worker._running:
                assert time.monotonic() - asked < 1.0, "the slot was not freed"
                await asyncio.sleep(0.01)
            types = [e.type for e in await q.history(job.job_id)]
            assert types == ["JobDispatched", "JobStarted", "JobCancelled"], types
    finally:
        run.stop()
        await asyncio.wait_for(task, 10)


async def test_a_cancel_sent_while_the_worker_was_not_listening_is_found_on_resubscribing(
    q: agentq.Client,
) -> None:
    """Pub/sub drops what is published while the connection is down: the worker
    checks all its jobs when it subscribes again, well before the lease renewal."""
    started = asyncio.Event()
    stopped: list[float] = []

    async def handler(job: Any) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.append(time.monotonic())
            raise
        return "never"

    run = q.worker(AGENT, handler, background=False)
    task = asyncio.create_task(run.run())
    try:
        job = await q.dispatch(AGENT, "long")
        await asyncio.wait_for(started.wait(), 10)
        assert run.worker is not None and run.worker.notices is not None
        pubsub = run.worker.notices.pubsub
        assert pubsub is not None and pubsub.connection is not None
        await pubsub.connection.disconnect()  # the subscription is gone
        asked = time.monotonic()
        await q.cancel(job.job_id)
        deadline = asked + 2
        while not stopped:
            assert time.monotonic() < deadline, "the cancel was never noticed"
            await asyncio.sleep(0.01)
        assert stopped[0] - asked < 1.0
    finally:
        run.stop()
        await asyncio.wait_for(task, 10)
