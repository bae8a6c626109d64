"""A worker under load and through an outage (issue 11 items 6, 7 and 8), in-process
against a real Redis: no more handlers than its concurrency, no outcome dropped
for want of a connection, none left behind by a failed completion batch."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from _redis_server import redis_server

import agentq
from agentq.consumers.handlers import Job
from agentq.schemas.config import Config

AGENT = "w"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}


def unretrieved_exceptions() -> list[dict[str, Any]]:
    """Installs a loop exception handler; returns the list it fills."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


async def test_concurrency_is_never_exceeded(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    """The take loop and the completion batch both start jobs; each reserves its
    slots before it asks, so together they never run more than `concurrency`."""
    q = await worker_client()
    running = peak = 0

    async def handler(job: Job) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(random.random() * 0.004)
        finally:
            running -= 1
        return job.task

    for round_ in range(3):
        jobs = await q.dispatch_many([{"target": AGENT, "task": f"{round_}:{i}"}
                                      for i in range(150)])
        run = q.worker(AGENT, handler, concurrency=2, background=False)
        task = asyncio.create_task(run.run())
        try:
            for job in jobs:
                view, timed_out = await q.wait(job.job_id, timeout=20)
                assert not timed_out and view.state == "completed", view
        finally:
            run.stop()
            await asyncio.wait_for(task, 10)
        assert peak <= 2, f"round {round_}: {peak} handlers ran at once with concurrency 2"


async def test_concurrency_1000_with_progress_loses_no_outcome(
    worker_client: Callable[..., Awaitable[agentq.Client]],
) -> None:
    """More jobs at once than the connection pool has connections: calls wait for a
    connection; every job completes on its first attempt."""
    q = await worker_client(jobs={"leaseSeconds": 20, "maxAttempts": 1})
    seen = unretrieved_exceptions()

    async def handler(job: Job) -> str:
        for percent in (10, 50, 90):
            await job.progress(percent, f"at {percent}")
            await asyncio.sleep(0.05)
        return job.task

    jobs = await q.dispatch_many([{"target": AGENT, "task": f"t{i}"} for i in range(1000)])
    run = q.worker(AGENT, handler, concurrency=1000, background=False)
    task = asyncio.create_task(run.run())
    try:
        views = [(await q.wait(job.job_id, timeout=60))[0] for job in jobs]
    finally:
        run.stop()
        await asyncio.wait_for(task, 30)
    states: dict[str, int] = {}
    for view in views:
        states[view.state] = states.get(view.state, 0) + 1
    assert states == {"completed": 1000}, states
    assert all(view.attempt == 1 for view in views)
    assert seen == []


async def test_outcomes_finished_during_an_outage_are_recorded_after_it(
    make_config: Callable[..., Config],
) -> None:
    """Handlers end one after another while Redis is down: the first completion
    batch fails and others queue behind it. Every outcome is kept and sent once
    the server is back; each job completes on its first attempt (its lease,
    longer than the outage, is never lost), and no task exception goes unseen."""
    with redis_server(["--appendonly", "yes", "--appendfsync", "always"]) as server:
        config = make_config(rateLimit=NO_RATE_LIMIT, workers={"shutdownGraceSeconds": 1},
                             jobs={"leaseSeconds": 6, "maxAttempts": 3},
                             circuitBreaker={"resetTimeoutSeconds": 0.3})
        seen = unretrieved_exceptions()
        async with agentq.connect(server.url, config) as q:
            await q.add_agent(AGENT)
            gates = {f"t{i}": asyncio.Event() for i in range(6)}
            started: set[str] = set()

            async def handler(job: Job) -> str:
                started.add(job.task)
                await gates[job.task].wait()
                return f"done {job.task}"

            jobs = [await q.dispatch(AGENT, task) for task in gates]
            run = q.worker(AGENT, handler, concurrency=6)
            runner = asyncio.create_task(run.run())
            try:
                deadline = time.monotonic() + 10
                while len(started) < len(gates):
                    assert time.monotonic() < deadline, started
                    await asyncio.sleep(0.01)
                server.stop()
                for gate in gates.values():  # they finish one by one in the outage
                    gate.set()
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                server.start()
                deadline = time.monotonic() + 5  # well inside the 6 s lease
                views: list[Any] = []
                while True:
                    try:
                        views = [await q.status(job.job_id) for job in jobs]
                        if all(v.state == "completed" for v in views):
                            break
                    except agentq.AgentqError:
                        pass
                    assert time.monotonic() < deadline, [(v.job_id, v.state) for v in views]
                    await asyncio.sleep(0.05)
                assert [v.result for v in views] == [f"done {t}" for t in gates]
                assert all(v.attempt == 1 for v in views), [v.attempt for v in views]
                for job in jobs:
                    types = [e.type for e in await q.history(job.job_id)]
                    assert types == ["JobDispatched", "JobStarted", "JobCompleted"], types
            finally:
                run.stop()
                await asyncio.wait_for(runner, 15)
        gc.collect()
        await asyncio.sleep(0)
        assert [c.get("message") for c in seen] == []


async def test_an_error_reply_to_a_completion_is_given_up_and_the_job_runs_again(
    worker_client: Callable[..., Awaitable[agentq.Client]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error reply (not a lost connection) is tried a few times, then given up:
    logged, never left as an unretrieved task exception, never holding the job's
    slot or renewing its lease; stall recovery runs the job again."""
    from redis.exceptions import ResponseError

    from agentq.consumers import worker as worker_module

    monkeypatch.setattr(worker_module, "_ERROR_REPLY_TRIES", 2)
    q = await worker_client(jobs={"leaseSeconds": 1, "backoffBaseSeconds": 0.05,
                                  "backoffMaxSeconds": 0.05})
    seen = unretrieved_exceptions()
    refused = 0
    run = q.worker(AGENT, lambda job: f"attempt {job.attempt}")
    runner = asyncio.create_task(run.run())
    try:
        while run.worker is None:
            await asyncio.sleep(0.01)
        call_many = run.worker.scripts.call_many

        async def refusing(calls: Any) -> Any:
            nonlocal refused
            if refused < 2 and any(call.name == "complete" for call in calls):
                refused += 1
                raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")
            return await call_many(calls)

        run.worker.scripts.call_many = refusing  # type: ignore[method-assign]
        job = await q.dispatch(AGENT, "once more")
        view, timed_out = await q.wait(job.job_id, timeout=10)
    finally:
        run.stop()
        await asyncio.wait_for(runner, 10)
    assert not timed_out and (view.state, view.result) == ("completed", "attempt 2"), view
    types = [e.type for e in await q.history(job.job_id)]
    assert types == ["JobDispatched", "JobStarted", "JobStalled", "JobQueued", "JobStarted",
                     "JobCompleted"], types
    gc.collect()
    await asyncio.sleep(0)
    assert refused == 2 and seen == []
