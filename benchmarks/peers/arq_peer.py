"""arq under the peers benchmark.

enqueue    ``ArqRedis.enqueue_job`` run concurrently, ``asyncio.gather`` over ``--batch``
           (500) at a time: arq has no bulk enqueue (each is a WATCH/MULTI transaction)
drain      N jobs enqueued; one worker process (``arq.Worker``, ``max_jobs=--concurrency``);
           completion times: each result's ``finish_time`` (ms) in ``arq:result:<id>``
roundtrip  ``enqueue_job`` then ``job.result(poll_delay=--poll-ms)``
arq polls on both sides: the worker looks at its queue every ``poll_delay`` when it found
nothing, and ``Job.result`` polls the result key. Both are set to ``--poll-ms`` (5 ms
by default; arq's own default is 0.5 s for both, which makes a round trip ~0.5-1 s).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _common as c
from arq import Worker, create_pool
from arq.connections import RedisSettings
from arq.jobs import deserialize_result

QUEUE = "arq:queue"


async def noop(ctx: Any) -> None:
    return None


async def enqueue_all(pool: Any, n: int, batch: int) -> list[str]:
    ids: list[str] = []
    for size in c.chunks(n, batch):
        jobs = await asyncio.gather(*(pool.enqueue_job("noop") for _ in range(size)))
        ids += [j.job_id for j in jobs if j is not None]
    return ids


async def timed_enqueue(args: Any) -> tuple[list[str], float, str]:
    """Warm up, flush, enqueue N jobs (timed), check they are queued."""
    pool = await create_pool(RedisSettings.from_dsn(args.url))
    try:
        await enqueue_all(pool, args.batch, args.batch)  # warm-up: the connection pool
        await pool.flushall()
        t0 = time.perf_counter()
        ids = await enqueue_all(pool, args.n, args.batch)
        seconds = time.perf_counter() - t0
        queued = await pool.zcard(QUEUE)
        if len(ids) != args.n or queued != args.n:
            raise RuntimeError(f"{queued} jobs queued, expected {args.n}")
        return ids, seconds, f"enqueue_job() gathered {args.batch} at a time (no bulk API)"
    finally:
        await pool.aclose()


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = asyncio.run(timed_enqueue(args))
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    def times(ids: list[str]) -> tuple[int, float, float]:
        raw = c.mget_all(r, [f"arq:result:{i}" for i in ids])
        done = [deserialize_result(v).finish_time.timestamp() for v in raw if v is not None]
        return len(done), min(done, default=0), max(done, default=0)

    return c.drain(
        args,
        enqueue_all=lambda: asyncio.run(timed_enqueue(args)),
        start_worker=lambda: c.python_worker("arq_peer.py", args, args.n),
        done_count=lambda: args.n - int(r.call("ZCARD", QUEUE)),
        completion_times=times,
        time_source="each result's finish_time (ms) in arq:result:<id>",
        kept="each result in arq:result:<id> (keep_result, 1 h by default); the job "
             "is deleted",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    poll = args.poll_ms / 1000

    async def run(warmup: int, count: int) -> list[float]:
        pool = await create_pool(RedisSettings.from_dsn(args.url))

        async def one(timeout: float) -> None:
            job = await pool.enqueue_job("noop")
            await job.result(timeout=timeout, poll_delay=poll)

        try:
            await one(60)
            for _ in range(warmup):
                await one(args.rt_timeout)
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                await one(args.rt_timeout)
                samples.append(time.perf_counter() - t0)
            return samples
        finally:
            await pool.aclose()

    try:
        return c.roundtrip(args, start_worker=lambda: c.python_worker("arq_peer.py", args, 0),
                           run=lambda w, k: loop.run_until_complete(run(w, k)),
                           method=f"enqueue_job() + job.result(poll_delay={args.poll_ms:g} ms)")
    finally:
        loop.close()


def worker(args: Any) -> None:
    w = Worker(functions=[noop], redis_settings=RedisSettings.from_dsn(args.url),
               max_jobs=args.concurrency, poll_delay=args.poll_ms / 1000, handle_signals=True)
    w.run()


def main() -> None:
    c.serve("arq", ("arq", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip},
            worker=worker)


if __name__ == "__main__":
    main()
