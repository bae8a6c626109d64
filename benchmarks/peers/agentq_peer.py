"""agentq under the peers benchmark (run with the project's .venv python).

    .venv/bin/python benchmarks/peers/agentq_peer.py MEASURE URL N [options]

enqueue    ``dispatch_many`` in batches of ``--batch`` (500) jobs
dispatch   ``dispatch`` one job per await, in sequence (agentq only)
drain      N jobs queued with ``dispatch_many``; one worker process
           (``python -m benchmarks.peers.agentq_worker``); the rate from the first
           JobCompleted event to the last, times (``at``, µs, from Redis TIME) read
           from the partition log with ``eventlog.reader.read_partition``
           (memory per job: after the drain, the projector catches up first)
roundtrip  ``q.dispatch`` then ``q.wait(job_id)``, 300 times in sequence, worker running
release    ``q.dispatch(A)`` then ``q.dispatch(B, depends_on=[A])``; once the dependency
           gates have registered B with A, A's handler may end
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Callable
from typing import Any

import _common as c

import agentq
from agentq.eventlog import reader
from agentq.projections.projection import Projection
from agentq.schemas.config import Config

AGENT = "bench"
TASK = "noop"


def bench_config() -> Config:
    return Config.model_validate(
        {"keyPrefix": "bench", "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
    )


async def connect(url: str) -> agentq.Client:
    q = agentq.connect(url, bench_config())
    await q.open()
    await q.add_agent(AGENT)
    return q


async def dispatch_all(q: agentq.Client, n: int, batch: int) -> None:
    for size in c.chunks(n, batch):
        await q.dispatch_many([{"target": AGENT, "task": TASK}] * size)


async def timed_enqueue(q: agentq.Client, args: Any) -> tuple[None, float, str]:
    """Warm up, flush, dispatch N jobs with dispatch_many (timed), check they are queued."""
    await q.dispatch_many([{"target": AGENT, "task": TASK}] * 10)  # warm-up: scripts, cache
    await q.redis.flushall()
    await q.add_agent(AGENT)
    t0 = time.perf_counter()
    await dispatch_all(q, args.n, args.batch)
    seconds = time.perf_counter() - t0
    queued = int(await q.redis.hget(q.partition(AGENT).counts, "queued") or 0)
    if queued != args.n:
        raise RuntimeError(f"{queued} jobs queued, expected {args.n}")
    return None, seconds, f"dispatch_many, batches of {args.batch}"


async def enqueue(args: Any) -> dict[str, Any]:
    q = await connect(args.url)
    try:
        _, seconds, method = await timed_enqueue(q, args)
        return c.rate_result(args.n, seconds, method)
    finally:
        await q.aclose()


async def dispatch(args: Any) -> dict[str, Any]:
    q = await connect(args.url)
    try:
        for _ in range(10):
            await q.dispatch(AGENT, TASK)
        await q.redis.flushall()
        await q.add_agent(AGENT)
        t0 = time.perf_counter()
        for _ in range(args.n):
            await q.dispatch(AGENT, TASK)
        seconds = time.perf_counter() - t0
        queued = int(await q.redis.hget(q.partition(AGENT).counts, "queued") or 0)
        if queued != args.n:
            raise RuntimeError(f"{queued} jobs queued, expected {args.n}")
        return c.rate_result(args.n, seconds, "dispatch, one await per job")
    finally:
        await q.aclose()


def start_worker(args: Any, *extra: str) -> c.WorkerProc:
    return c.WorkerProc([sys.executable, "-m", "benchmarks.peers.agentq_worker", args.url,
                         "--concurrency", str(args.concurrency), *extra], cwd=c.REPO)


Loop = asyncio.AbstractEventLoop


def on_client(measure: Callable[[Any, Loop, agentq.Client], dict[str, Any]]
              ) -> Callable[[Any], dict[str, Any]]:
    """Run ``measure(args, loop, q)`` with an open client on an event loop of its own
    (the drivers in _common are sync: they call back into the loop)."""

    @functools.wraps(measure)
    def run(args: Any) -> dict[str, Any]:
        loop = asyncio.new_event_loop()
        q = loop.run_until_complete(connect(args.url))
        try:
            return measure(args, loop, q)
        finally:
            loop.run_until_complete(q.aclose())
            loop.close()

    return run


@on_client
def drain(args: Any, loop: Loop, q: agentq.Client) -> dict[str, Any]:
    part = q.partition(AGENT)
    r = c.Resp(args.url)

    def done_count() -> int:
        v = r.call("HGET", part.counts, "completed")
        return int(v) if v else 0

    async def completion_times() -> tuple[int, float, float]:
        times: list[int] = []
        after = "-"
        while True:
            events = await reader.read_partition(q.redis, part, after, 10_000)
            times += [e.at for e in events if e.type == "JobCompleted"]
            if len(events) < 10_000:
                break
            after = events[-1].event_id
        return len(times), min(times) / 1e6, max(times) / 1e6

    return c.drain(
        args,
        enqueue_all=lambda: loop.run_until_complete(timed_enqueue(q, args)),
        start_worker=lambda: start_worker(args),
        done_count=done_count,
        completion_times=lambda _: loop.run_until_complete(completion_times()),
        time_source="JobCompleted events' `at` in the partition log",
        kept="everything: each job's state record, its whole history in the partition "
             "log and its place in the views (projector caught up)",
        settle=lambda _: loop.run_until_complete(Projection(q.redis).catch_up([part])),
    )


@on_client
def roundtrip(args: Any, loop: Loop, q: agentq.Client) -> dict[str, Any]:
    async def one(timeout: float) -> None:
        view = await q.dispatch(AGENT, TASK)
        final, timed_out = await q.wait(view.job_id, timeout=timeout)
        if timed_out or final.state != "completed":
            raise RuntimeError(f"job {view.job_id} ended {final.state} (timed out: {timed_out})")

    async def run(warmup: int, count: int) -> list[float]:
        await one(60)  # the worker is starting
        for _ in range(warmup):
            await one(args.rt_timeout)
        samples = []
        for _ in range(count):
            t0 = time.perf_counter()
            await one(args.rt_timeout)
            samples.append(time.perf_counter() - t0)
        return samples

    return c.roundtrip(args, start_worker=lambda: start_worker(args),
                       run=lambda w, k: loop.run_until_complete(run(w, k)),
                       method="q.dispatch + q.wait(job_id)")


@on_client
def release(args: Any, loop: Loop, q: agentq.Client) -> dict[str, Any]:
    part = q.partition(AGENT)

    async def enqueue_pair(pair: str, timeout: float) -> None:
        a = await q.dispatch(AGENT, f"A {pair}")
        b = await q.dispatch(AGENT, f"B {pair}", depends_on=[a.job_id])
        # The gates register B with A when they read B's JobDispatched. Until then A
        # must not end, or B would be released at its registration (finding A ended)
        # rather than by A's completion.
        deadline = time.monotonic() + timeout
        while not await q.redis.sismember(part.dependents(a.job_id), b.job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{b.job_id} was never registered with {a.job_id}")
            await asyncio.sleep(0.0005)

    return c.release(
        args, start_worker=lambda: start_worker(args, "--release"),
        enqueue_pair=lambda pair, timeout: loop.run_until_complete(enqueue_pair(pair, timeout)),
        method="q.dispatch(A), q.dispatch(B, depends_on=[A]); A ends once the gates have "
               "registered B with A",
    )


def main() -> None:
    c.serve("agentq", ("agentq", "redis", "hiredis", "orjson", "pydantic"), {
        "enqueue": lambda a: asyncio.run(enqueue(a)),
        "dispatch": lambda a: asyncio.run(dispatch(a)),
        "drain": drain, "roundtrip": roundtrip, "release": release,
    })


if __name__ == "__main__":
    main()
