"""taskiq + taskiq-redis under the peers benchmark: ``RedisStreamBroker`` (a stream with a
consumer group) and ``RedisAsyncResultBackend`` (results stored, as the round trip needs).

enqueue    ``task.kiq()`` run concurrently, ``asyncio.gather`` over ``--batch`` (500) at a
           time: taskiq has no bulk enqueue (each kiq is one XADD)
drain      N tasks kicked; one worker process (``taskiq.api.run_receiver_task``,
           ``max_async_tasks=--concurrency``); taskiq keeps no completion time, so a
           ``post_save`` middleware in the worker notes first and last
roundtrip  ``kiq()`` then ``wait_result(check_interval=--poll-ms)``: taskiq polls the
           result backend (its default interval is 0.2 s; 5 ms here)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import _common as c
from taskiq import TaskiqMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

QUEUE = "bench"


class RecorderMiddleware(TaskiqMiddleware):
    def __init__(self, recorder: c.Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def post_save(self, message: Any, result: Any) -> None:
        self.recorder.hit()


def setup(url: str, recorder: c.Recorder | None = None) -> tuple[Any, Any]:
    broker = RedisStreamBroker(url, queue_name=QUEUE).with_result_backend(
        RedisAsyncResultBackend(url)
    )
    if recorder is not None:
        broker = broker.with_middlewares(RecorderMiddleware(recorder))

    @broker.task(task_name="noop")
    async def noop() -> None:
        return None

    return broker, noop


async def kick_all(task: Any, n: int, batch: int) -> list[Any]:
    kicked: list[Any] = []
    for size in c.chunks(n, batch):
        kicked += await asyncio.gather(*(task.kiq() for _ in range(size)))
    return kicked


async def timed_enqueue(args: Any) -> tuple[None, float, str]:
    """Warm up, flush, kick N tasks (timed), check they are in the stream."""
    broker, noop = setup(args.url)
    await broker.startup()
    r = c.Resp(args.url)
    try:
        await kick_all(noop, args.batch, args.batch)  # warm-up: the connection pool
        r.call("FLUSHALL")
        await broker.startup()  # the consumer group again, at "$" of the empty stream
        t0 = time.perf_counter()
        await kick_all(noop, args.n, args.batch)
        seconds = time.perf_counter() - t0
        queued = int(r.call("XLEN", QUEUE))
        if queued != args.n:
            raise RuntimeError(f"{queued} tasks in the stream, expected {args.n}")
        return None, seconds, f"kiq() gathered {args.batch} at a time (no bulk API)"
    finally:
        await broker.shutdown()
        r.close()


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = asyncio.run(timed_enqueue(args))
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    return c.drain(
        args,
        enqueue_all=lambda: asyncio.run(timed_enqueue(args)),
        start_worker=lambda: c.python_worker("taskiq_peer.py", args, args.n),
        done_count=lambda: c.recorder_count(r),
        completion_times=lambda _: c.recorder_times(r),
        time_source="in the worker: post_save middleware, time.time()",
        kept="each result (no expiry by default) and each message in the stream "
             "(acked, not deleted; no maxlen by default)",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    interval = args.poll_ms / 1000

    async def run(warmup: int, count: int) -> list[float]:
        broker, noop = setup(args.url)
        await broker.startup()

        async def one(timeout: float) -> None:
            task = await noop.kiq()
            result = await task.wait_result(check_interval=interval, timeout=timeout)
            if result.is_err:
                raise RuntimeError(f"task failed: {result.error}")

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
            await broker.shutdown()

    try:
        return c.roundtrip(args, start_worker=lambda: c.python_worker("taskiq_peer.py", args, 0),
                           run=lambda w, k: loop.run_until_complete(run(w, k)),
                           method=f"kiq() + wait_result(check_interval={args.poll_ms:g} ms)")
    finally:
        loop.close()


async def worker(args: Any) -> None:
    from taskiq.api import run_receiver_task

    recorder = c.Recorder(args.url, args.n) if args.n else None
    broker, _ = setup(args.url, recorder)
    broker.is_worker_process = True
    await broker.startup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    c.install_term_handler(lambda: loop.call_soon_threadsafe(stop.set))
    task = asyncio.create_task(run_receiver_task(broker, max_async_tasks=args.concurrency))
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await broker.shutdown()


def main() -> None:
    c.serve("taskiq", ("taskiq", "taskiq-redis", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip},
            worker=lambda a: asyncio.run(worker(a)))


if __name__ == "__main__":
    main()
