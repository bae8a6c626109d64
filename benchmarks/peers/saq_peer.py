"""saq under the peers benchmark (Redis queue).

enqueue    ``Queue.enqueue`` run concurrently, ``asyncio.gather`` over ``--batch`` (500)
           at a time: saq has no bulk enqueue (its own ``Queue.map`` gathers enqueues the
           same way; saq caps operations in flight at 20 per queue)
drain      N jobs enqueued; one worker process (``saq.Worker``, concurrency
           ``--concurrency``); completion times: each job's ``completed`` (ms), stored
           on the job (kept for its ttl, 600 s by default)
roundtrip  ``enqueue`` and wait for the job's "complete" on its status channel (saq's
           pub/sub), subscribed before the enqueue (see ``roundtrip`` for why not
           ``job.refresh(until_complete=…)``)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import _common as c
from saq import Job, Queue, Worker

QUEUE = "bench"


async def noop(ctx: Any) -> None:
    return None


async def enqueue_all(queue: Queue, n: int, batch: int) -> list[str]:
    keys: list[str] = []
    for size in c.chunks(n, batch):
        jobs = await asyncio.gather(*(queue.enqueue("noop") for _ in range(size)))
        keys += [job.key for job in jobs if job is not None]
    return keys


async def timed_enqueue(args: Any) -> tuple[list[str], float, str]:
    """Warm up, flush, enqueue N jobs (timed), check they are queued."""
    queue = Queue.from_url(args.url, name=QUEUE)
    await queue.connect()
    try:
        await enqueue_all(queue, args.batch, args.batch)  # warm-up: connections, script
        await queue.redis.flushall()
        t0 = time.perf_counter()
        keys = await enqueue_all(queue, args.n, args.batch)
        seconds = time.perf_counter() - t0
        queued = await queue.count("queued")
        if len(keys) != args.n or queued != args.n:
            raise RuntimeError(f"{queued} jobs queued, expected {args.n}")
        return keys, seconds, f"enqueue() gathered {args.batch} at a time (no bulk API)"
    finally:
        await queue.disconnect()


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = asyncio.run(timed_enqueue(args))
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    def times(keys: list[str]) -> tuple[int, float, float, str]:
        raw = c.mget_all(r, [f"saq:job:{QUEUE}:{k}" for k in keys])
        jobs = [json.loads(v) if v is not None else {} for v in raw]
        done = [j["completed"] for j in jobs if j.get("status") == "complete"]
        others = Counter(f"{j.get('status', 'missing')}: {j.get('error', '')}"[:200]
                         for j in jobs if j.get("status") != "complete")
        return (len(done), min(done, default=0) / 1000, max(done, default=0) / 1000,
                f"the others: {dict(others)}")

    return c.drain(
        args,
        enqueue_all=lambda: asyncio.run(timed_enqueue(args)),
        start_worker=lambda: c.python_worker("saq_peer.py", args, args.n),
        done_count=lambda: args.n - int(r.call("ZCARD", f"saq:{QUEUE}:incomplete")),
        completion_times=times,
        time_source="each job's `completed` (ms) in saq:job:<queue>:<key>",
        kept="each job's JSON in saq:job:<queue>:<key>, for its ttl (600 s by default)",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    """saq's ``job.refresh(until_complete=…)`` subscribes only after it has read the job,
    and its multiplexer drops its PSUBSCRIBE whenever no one listens: a completion that
    lands in between is missed and the wait runs into its timeout (seen here, 10 s).
    So the adapter holds one subscription for the whole run and subscribes to the job's
    channel, through saq's own multiplexer, before enqueueing it."""
    loop = asyncio.new_event_loop()
    r = c.Resp(args.url)

    async def run(warmup: int, count: int) -> list[float]:
        queue = Queue.from_url(args.url, name=QUEUE)
        await queue.connect()
        mux = queue._pubsub
        keeper = await mux.subscribe(f"saq:job:{QUEUE}:bench-keepalive")
        while int(r.call("PUBSUB", "NUMPAT")) < 1:
            await asyncio.sleep(0.01)

        async def one(timeout: float) -> None:
            job = Job(function="noop")
            channel = await mux.subscribe(queue.job_id(job.key))
            try:
                await queue.enqueue(job)
                while True:
                    message = await asyncio.wait_for(channel.get(), timeout)
                    status = message["data"].decode()
                    if status in ("complete", "failed", "aborted"):
                        break
                if status != "complete":
                    raise RuntimeError(f"job {job.key} is {status}")
            finally:
                await mux.unsubscribe(channel)

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
            await mux.unsubscribe(keeper)
            await queue.disconnect()

    try:
        return c.roundtrip(args, start_worker=lambda: c.python_worker("saq_peer.py", args, 0),
                           run=lambda w, k: loop.run_until_complete(run(w, k)),
                           method="enqueue() + the job's status channel (saq's pub/sub "
                                  "multiplexer), subscribed before the enqueue")
    finally:
        loop.close()


async def worker(args: Any) -> None:
    queue = Queue.from_url(args.url, name=QUEUE)
    w = Worker(queue, functions=[noop], concurrency=args.concurrency)
    await w.start()  # stops on SIGTERM/SIGINT


def main() -> None:
    c.serve("saq", ("saq", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip},
            worker=lambda a: asyncio.run(worker(a)))


if __name__ == "__main__":
    main()
