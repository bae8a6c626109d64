"""bullmq (the Python port) under the peers benchmark.

enqueue    ``Queue.addBulk`` in batches of ``--batch`` (500)
drain      N jobs added with addBulk; one worker process (``bullmq.Worker``, concurrency
           ``--concurrency``); completion times: the scores of the ``completed`` sorted
           set (finishedOn, ms; completed jobs are kept, bullmq's default)
roundtrip  ``Queue.add`` with a known job id, then wait for its ``completed:<id>`` event
           from ``QueueEvents`` (bullmq's XREAD BLOCK on the queue's event stream)
release    ``FlowProducer.add``: dependent B as the parent of prerequisite A (one MULTI;
           B waits in waiting-children until A completes)
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from typing import Any

import _common as c
from bullmq import FlowProducer, Queue, QueueEvents, Worker

QUEUE = "bench"


async def noop(job: Any, token: str) -> None:
    return None


def release_processor(url: str) -> Any:
    clock = c.ReleaseClock(url)

    async def step(job: Any, token: str) -> None:
        started = time.time()
        if job.name == "A":
            await clock.prerequisite_async(job.data["pair"])
        else:
            clock.dependent(job.data["pair"], started)

    return step


async def add_all(queue: Queue, n: int, batch: int) -> None:
    for size in c.chunks(n, batch):
        await queue.addBulk([{"name": "noop", "data": {}} for _ in range(size)])


async def timed_enqueue(args: Any) -> tuple[None, float, str]:
    """Warm up, flush, addBulk N jobs (timed), check they are waiting."""
    queue = Queue(QUEUE, {"connection": args.url})
    try:
        await add_all(queue, 10, args.batch)  # warm-up: connection, scripts
        await queue.client.flushall()
        t0 = time.perf_counter()
        await add_all(queue, args.n, args.batch)
        seconds = time.perf_counter() - t0
        waiting = await queue.getWaitingCount()
        if waiting != args.n:
            raise RuntimeError(f"{waiting} jobs waiting, expected {args.n}")
        return None, seconds, f"addBulk, batches of {args.batch}"
    finally:
        await queue.close()


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = asyncio.run(timed_enqueue(args))
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)
    completed = f"bull:{QUEUE}:completed"

    def times(_: Any) -> tuple[int, float, float]:
        scored = r.call("ZRANGE", completed, 0, -1, "WITHSCORES")
        scores = [float(s) for s in scored[1::2]]
        return len(scores), min(scores) / 1000, max(scores) / 1000

    return c.drain(
        args,
        enqueue_all=lambda: asyncio.run(timed_enqueue(args)),
        start_worker=lambda: c.python_worker("bullmq_peer.py", args, args.n),
        done_count=lambda: int(r.call("ZCARD", completed)),
        completion_times=times,
        time_source="scores of bull:<queue>:completed (finishedOn, ms)",
        kept="each job's hash and its place in bull:<queue>:completed "
             "(removeOnComplete is off by default); the event stream, trimmed to ~10,000 "
             "entries",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    loop = asyncio.new_event_loop()

    async def run(warmup: int, count: int) -> list[float]:
        queue = Queue(QUEUE, {"connection": args.url})
        # A short XREAD BLOCK only matters when idle; it lets close() return quickly.
        events = QueueEvents(QUEUE, {"connection": args.url, "blockingTimeout": 1000})
        await asyncio.sleep(0.2)  # let QueueEvents start its XREAD at "$"
        try:
            async def one(timeout: float) -> None:
                job_id = uuid.uuid4().hex
                done = loop.create_future()

                def on_done(*_: Any) -> None:
                    if not done.done():
                        done.set_result(None)

                events.on(f"completed:{job_id}", on_done)
                try:
                    await queue.add("noop", {}, {"jobId": job_id})
                    await asyncio.wait_for(done, timeout)
                finally:
                    events.off(f"completed:{job_id}", on_done)

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
            for closing in (events.close(), queue.close()):
                try:
                    await asyncio.wait_for(closing, 5)
                except Exception as exc:  # TimeoutError included
                    print(f"bullmq close: {exc!r}", file=sys.stderr)

    try:
        return c.roundtrip(args, start_worker=lambda: c.python_worker("bullmq_peer.py", args, 0),
                           run=lambda w, k: loop.run_until_complete(run(w, k)),
                           method="Queue.add + QueueEvents 'completed:<id>'")
    finally:
        loop.close()


def release(args: Any) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    flow = FlowProducer({"connection": args.url})

    async def enqueue_pair(pair: str) -> None:
        await flow.add({"name": "B", "queueName": QUEUE, "data": {"pair": pair},
                        "children": [{"name": "A", "queueName": QUEUE, "data": {"pair": pair}}]})

    try:
        return c.release(
            args, start_worker=lambda: c.python_worker("bullmq_peer.py", args, 0, "--release"),
            enqueue_pair=lambda pair, _: loop.run_until_complete(enqueue_pair(pair)),
            method="FlowProducer.add: B the parent of A (B waits in waiting-children)")
    finally:
        loop.run_until_complete(flow.close())
        loop.close()


async def worker(args: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    c.install_term_handler(lambda: loop.call_soon_threadsafe(stop.set))
    processor = release_processor(args.url) if args.release else noop
    w = Worker(QUEUE, processor, {"connection": args.url, "concurrency": args.concurrency})
    task = asyncio.create_task(w.run())
    await stop.wait()
    await w.close()
    await asyncio.gather(task, return_exceptions=True)


def main() -> None:
    c.serve("bullmq", ("bullmq", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip, "release": release},
            worker=lambda a: asyncio.run(worker(a)))


if __name__ == "__main__":
    main()
