"""streaq under the peers benchmark (coredis + anyio; Redis streams).

enqueue    ``Worker.enqueue_many`` (one pipeline) in batches of ``--batch`` (500)
drain      N tasks enqueued with enqueue_many; one worker process (``Worker.run_async``,
           ``concurrency=--concurrency``); completion times: each result's ``ft``
           (finish time, ms) in ``streaq:<queue>:task:results:<id>``
roundtrip  ``await task.enqueue()`` then ``await task.result(timeout)`` (pub/sub on the
           task's channel)
release    ``await prerequisite.enqueue(pair)``, then ``await
           dependent.enqueue(pair).start(after=<its id>)`` (streaq's task dependencies)
"""

from __future__ import annotations

import pickle
import time
from typing import Any

import _common as c
from anyio import run
from anyio.from_thread import start_blocking_portal
from streaq import Worker

QUEUE = "bench"


def make_worker(url: str, concurrency: int) -> tuple[Worker, Any]:
    worker = Worker(redis_url=url, queue_name=QUEUE, concurrency=concurrency)

    @worker.task
    async def noop() -> None:
        return None

    return worker, noop


def release_tasks(worker: Worker, url: str) -> tuple[Any, Any]:
    """Prerequisite A and dependent B, registered on ``worker``."""
    clock = c.ReleaseClock(url)

    @worker.task
    async def prerequisite(pair: str) -> None:
        await clock.prerequisite_async(pair)

    @worker.task
    async def dependent(pair: str) -> None:
        clock.dependent(pair, time.time())

    return prerequisite, dependent


async def enqueue_all(worker: Worker, noop: Any, n: int, batch: int) -> list[str]:
    ids: list[str] = []
    for size in c.chunks(n, batch):
        tasks = [noop.enqueue() for _ in range(size)]
        await worker.enqueue_many(tasks)
        ids += [t.id for t in tasks]
    return ids


def timed_enqueue(args: Any) -> tuple[list[str], float, str]:
    """Warm up, flush, enqueue_many N tasks (timed), check they are in the stream."""
    worker, noop = make_worker(args.url, args.concurrency)
    r = c.Resp(args.url)

    async def go() -> tuple[list[str], float]:
        async with worker:
            await enqueue_all(worker, noop, 10, args.batch)
            r.call("FLUSHALL")
            t0 = time.perf_counter()
            ids = await enqueue_all(worker, noop, args.n, args.batch)
            return ids, time.perf_counter() - t0

    ids, seconds = run(go)
    queued = int(r.call("XLEN", f"streaq:{QUEUE}:queues:normal"))
    r.close()
    if queued != args.n:
        raise RuntimeError(f"{queued} tasks in the stream, expected {args.n}")
    return ids, seconds, f"enqueue_many, batches of {args.batch}"


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = timed_enqueue(args)
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)
    results = f"streaq:{QUEUE}:task:results:"

    def times(ids: list[str]) -> tuple[int, float, float]:
        raw = c.mget_all(r, [results + i for i in ids])
        done = [pickle.loads(v)["ft"] for v in raw if v is not None]
        return len(done), min(done, default=0) / 1000, max(done, default=0) / 1000

    return c.drain(
        args,
        enqueue_all=lambda: timed_enqueue(args),
        start_worker=lambda: c.python_worker("streaq_peer.py", args, args.n),
        done_count=lambda: int(r.call("ZCARD", f"streaq:{QUEUE}:index:results")),
        completion_times=times,
        time_source="each result's `ft` (ms) in streaq:<queue>:task:results:<id>",
        kept="each result (5 min ttl by default) and its place in "
             "streaq:<queue>:index:results; the task and its stream entry are deleted",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    worker, noop = make_worker(args.url, args.concurrency)

    async def go(warmup: int, count: int) -> list[float]:
        async with worker:
            async def one(timeout: float) -> None:
                task = await noop.enqueue()
                res = await task.result(timeout=int(timeout))
                if not res.success:
                    raise RuntimeError(f"task failed: {res}")

            await one(60)
            for _ in range(warmup):
                await one(args.rt_timeout)
            samples = []
            for _ in range(count):
                t0 = time.perf_counter()
                await one(args.rt_timeout)
                samples.append(time.perf_counter() - t0)
            return samples

    return c.roundtrip(args, start_worker=lambda: c.python_worker("streaq_peer.py", args, 0),
                       run=lambda w, k: run(go, w, k),
                       method="await task.enqueue() + task.result()")


def release(args: Any) -> dict[str, Any]:
    worker, _ = make_worker(args.url, args.concurrency)
    prerequisite, dependent = release_tasks(worker, args.url)

    async def enqueue_pair(pair: str) -> None:
        a = await prerequisite.enqueue(pair)
        await dependent.enqueue(pair).start(after=a.id)

    # The driver is sync: the client lives on an event loop in the portal's thread.
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(worker):
        return c.release(
            args, start_worker=lambda: c.python_worker("streaq_peer.py", args, 0, "--release"),
            enqueue_pair=lambda pair, _: portal.call(enqueue_pair, pair),
            method="enqueue(A), then enqueue(B).start(after=A's id)")


def worker_main(args: Any) -> None:
    worker, _ = make_worker(args.url, args.concurrency)
    if args.release:
        release_tasks(worker, args.url)
    worker.run_sync()  # handles SIGINT/SIGTERM itself


def main() -> None:
    c.serve("streaq", ("streaq", "coredis", "anyio", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip, "release": release},
            worker=worker_main)


if __name__ == "__main__":
    main()
