"""celery under the peers benchmark: Redis broker and Redis result backend, worker with
the ``threads`` pool (``--concurrency`` threads), celery's defaults otherwise
(prefetch multiplier 4, acks early).

enqueue    ``task.delay()`` one at a time: celery has no bulk publish (a group publishes
           its members one by one too)
drain      N tasks sent; one worker process (``app.worker_main``, threads pool);
           completion times: each result's ``date_done`` (µs) in the result backend
roundtrip  ``delay()`` then ``AsyncResult.get()`` (the Redis backend's pub/sub)
release    ``chain(prerequisite.si(pair), dependent.si(pair)).apply_async()``: the worker
           sends B when A has succeeded (before storing A's result)
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import _common as c
from celery import Celery, chain

QUEUE = "bench"


def make_app(url: str, recorder: c.Recorder | None = None) -> tuple[Celery, Any]:
    app = Celery("bench", broker=url, backend=url)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        result_expires=None,
    )

    @app.task(name="noop")
    def noop() -> None:
        return None

    if recorder is not None:
        from celery.signals import task_success

        task_success.connect(lambda **_: recorder.hit(), weak=False)
    return app, noop


def add_release_tasks(app: Celery, url: str) -> None:
    """Prerequisite A and dependent B, for the worker (the driver sends them by name)."""
    clock = c.ReleaseClock(url)

    @app.task(name="prerequisite")
    def prerequisite(pair: str) -> None:
        clock.prerequisite(pair)

    @app.task(name="dependent")
    def dependent(pair: str) -> None:
        clock.dependent(pair, time.time())


def timed_enqueue(args: Any) -> tuple[list[str], float, str]:
    """Warm up, flush, send N tasks (timed), check they are queued."""
    _, noop = make_app(args.url)
    r = c.Resp(args.url)
    for _ in range(10):
        noop.delay()
    r.call("FLUSHALL")
    seconds, ids = c.timed(lambda: [noop.delay().id for _ in range(args.n)])
    queued = int(r.call("LLEN", QUEUE))
    r.close()
    if queued != args.n:
        raise RuntimeError(f"{queued} messages queued, expected {args.n}")
    return ids, seconds, "delay() in sequence (no bulk API)"


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = timed_enqueue(args)
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    def times(ids: list[str]) -> tuple[int, float, float]:
        raw = c.mget_all(r, [f"celery-task-meta-{i}" for i in ids])
        done = [datetime.fromisoformat(json.loads(v)["date_done"]).timestamp()
                for v in raw if v is not None]
        return len(done), min(done, default=0), max(done, default=0)

    return c.drain(
        args,
        enqueue_all=lambda: timed_enqueue(args),
        start_worker=lambda: c.python_worker("celery_peer.py", args, args.n),
        done_count=lambda: c.recorder_count(r),
        completion_times=times,
        time_source="each result's date_done in celery-task-meta-<id>",
        kept="each result in celery-task-meta-<id> (no expiry: result_expires=None "
             "here, celery's default is 1 day)",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    _, noop = make_app(args.url)

    def one(timeout: float) -> None:
        noop.delay().get(timeout=timeout)

    def run(warmup: int, count: int) -> list[float]:
        one(60)
        for _ in range(warmup):
            one(args.rt_timeout)
        samples = []
        for _ in range(count):
            t0 = time.perf_counter()
            one(args.rt_timeout)
            samples.append(time.perf_counter() - t0)
        return samples

    return c.roundtrip(args, start_worker=lambda: c.python_worker("celery_peer.py", args, 0),
                       run=run, method="delay() + AsyncResult.get() (Redis backend)")


def release(args: Any) -> dict[str, Any]:
    app, _ = make_app(args.url)

    def enqueue_pair(pair: str, _: float) -> None:
        chain(app.signature("prerequisite", (pair,), immutable=True),
              app.signature("dependent", (pair,), immutable=True)).apply_async()

    return c.release(
        args, start_worker=lambda: c.python_worker("celery_peer.py", args, 0, "--release"),
        enqueue_pair=enqueue_pair,
        method="chain(A.si(), B.si()).apply_async(): the worker sends B when A succeeds")


def worker(args: Any) -> None:
    recorder = c.Recorder(args.url, args.n) if args.n else None
    app, _ = make_app(args.url, recorder)
    if args.release:
        add_release_tasks(app, args.url)
    app.worker_main(["worker", "--pool", "threads", "--concurrency", str(args.concurrency),
                     "--loglevel", "WARNING", "--queues", QUEUE])


def main() -> None:
    c.serve("celery", ("celery", "kombu", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip, "release": release},
            worker=worker)


if __name__ == "__main__":
    main()
