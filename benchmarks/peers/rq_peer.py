"""rq under the peers benchmark: rq's default ``Worker`` (it forks a work horse per job).

enqueue    ``Queue.enqueue_many`` (one pipeline) in batches of ``--batch`` (500)
drain      N jobs enqueued; one worker process (``rq.Worker(...).work()``, one job at a
           time: rq's worker has no concurrency setting); completion times: each job's
           ``ended_at`` (µs) in ``rq:job:<id>``
roundtrip  ``enqueue`` then ``job.latest_result(timeout)`` (XREAD BLOCK on the job's
           results stream)
"""

from __future__ import annotations

import time
from typing import Any

import _common as c
from redis import Redis
from rq import Queue, Worker
from rq.utils import utcparse

QUEUE = "bench"
FUNC = "rq_peer.noop"  # imported by name in the work horse (this directory is on its path)


def noop() -> None:
    return None


def enqueue_all(q: Queue, n: int, batch: int) -> list[str]:
    ids: list[str] = []
    for size in c.chunks(n, batch):
        jobs = q.enqueue_many([Queue.prepare_data(FUNC) for _ in range(size)])
        ids += [j.id for j in jobs]
    return ids


def timed_enqueue(args: Any) -> tuple[list[str], float, str]:
    """Warm up, flush, enqueue_many N jobs (timed), check they are queued."""
    conn = Redis.from_url(args.url)
    q = Queue(QUEUE, connection=conn)
    enqueue_all(q, 10, args.batch)
    conn.flushall()
    seconds, ids = c.timed(lambda: enqueue_all(q, args.n, args.batch))
    queued = len(q)
    conn.close()
    if queued != args.n:
        raise RuntimeError(f"{queued} jobs queued, expected {args.n}")
    return ids, seconds, f"enqueue_many, batches of {args.batch}"


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = timed_enqueue(args)
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    def times(ids: list[str]) -> tuple[int, float, float]:
        replies = r.many([("HGET", f"rq:job:{i}", "ended_at") for i in ids])
        done = [utcparse(v.decode()).timestamp() for v in replies if v]
        return len(done), min(done, default=0), max(done, default=0)

    return c.drain(
        args,  # rq's worker runs one job at a time: --concurrency does not apply
        enqueue_all=lambda: timed_enqueue(args),
        start_worker=lambda: c.python_worker("rq_peer.py", args, args.n),
        done_count=lambda: int(r.call("ZCARD", f"rq:finished:{QUEUE}")),
        completion_times=times,
        time_source="each job's ended_at in rq:job:<id>",
        kept="each job's hash and its result stream (result_ttl, 500 s by default) and "
             "its place in rq:finished:<queue>",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    conn = Redis.from_url(args.url)
    q = Queue(QUEUE, connection=conn)

    def one(timeout: float) -> None:
        job = q.enqueue(FUNC)
        result = job.latest_result(timeout=max(1, int(timeout)))
        if result is None or result.type != result.Type.SUCCESSFUL:
            raise RuntimeError(f"job {job.id}: {result}")

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

    return c.roundtrip(args, start_worker=lambda: c.python_worker("rq_peer.py", args, 0),
                       run=run, method="enqueue() + job.latest_result(timeout)")


def worker(args: Any) -> None:
    conn = Redis.from_url(args.url)
    Worker([Queue(QUEUE, connection=conn)], connection=conn).work(logging_level="WARNING")


def main() -> None:
    c.serve("rq", ("rq", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip},
            worker=worker)


if __name__ == "__main__":
    main()
