"""dramatiq under the peers benchmark: RedisBroker with its default middleware,
no results stored (except for the round trip, which needs them).

enqueue    ``actor.send()`` one message at a time: dramatiq has no bulk or pipelined
           enqueue (each send is one Lua call)
drain      N messages sent; one worker process running ``dramatiq.Worker`` in-process
           (``--concurrency`` worker threads); dramatiq keeps no completion time, so an
           ``after_process_message`` middleware in the worker notes first and last
dramatiq's consumer polls Redis with a backoff capped at ``worker_timeout``: it is set
to ``--poll-ms`` (default 5 ms; dramatiq's own default is 1000 ms).
roundtrip  ``send()`` then ``message.get_result(block=True)`` (Results middleware,
           RedisBackend: BRPOPLPUSH on the result key)
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _common as c
import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

QUEUE = "bench"


def noop() -> None:
    return None


class RecorderMiddleware(Middleware):
    def __init__(self, recorder: c.Recorder) -> None:
        self.recorder = recorder

    def after_process_message(self, broker: Any, message: Any, *, result: Any = None,
                              exception: Any = None) -> None:
        self.recorder.hit()


def setup(url: str, *, results: bool, recorder: c.Recorder | None = None) -> Any:
    broker = RedisBroker(url=url)
    if results:
        broker.add_middleware(Results(backend=RedisBackend(url=url)))
    if recorder is not None:
        broker.add_middleware(RecorderMiddleware(recorder))
    dramatiq.set_broker(broker)
    options: dict[str, Any] = {"store_results": True} if results else {}
    return dramatiq.actor(noop, broker=broker, actor_name="noop", queue_name=QUEUE,
                          max_retries=0, **options)


def timed_enqueue(args: Any) -> tuple[None, float, str]:
    """Warm up, flush, send N messages (timed), check they are queued."""
    actor = setup(args.url, results=False)
    for _ in range(10):
        actor.send()
    actor.broker.client.flushall()
    seconds, _ = c.timed(lambda: [actor.send() for _ in range(args.n)])
    queued = actor.broker.client.hlen(f"dramatiq:{QUEUE}.msgs")
    if queued != args.n:
        raise RuntimeError(f"{queued} messages queued, expected {args.n}")
    return None, seconds, "actor.send() in sequence (no bulk API)"


def enqueue(args: Any) -> dict[str, Any]:
    _, seconds, method = timed_enqueue(args)
    return c.rate_result(args.n, seconds, method)


def drain(args: Any) -> dict[str, Any]:
    r = c.Resp(args.url)

    return c.drain(
        args,
        enqueue_all=lambda: timed_enqueue(args),
        start_worker=lambda: c.python_worker("dramatiq_peer.py", args, args.n),
        done_count=lambda: c.recorder_count(r),
        completion_times=lambda _: c.recorder_times(r),
        time_source="in the worker: after_process_message, time.time()",
        kept="nothing: a message is deleted when acked (no results in the drain)",
    )


def roundtrip(args: Any) -> dict[str, Any]:
    actor = setup(args.url, results=True)

    def one(timeout: float) -> None:
        message = actor.send()
        message.get_result(block=True, timeout=int(timeout * 1000))

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

    return c.roundtrip(
        args,
        start_worker=lambda: c.python_worker("dramatiq_peer.py", args, 0, "--results"),
        run=run, method="send() + message.get_result(block=True) (Results, RedisBackend)")


def worker(args: Any, results: bool) -> None:
    recorder = c.Recorder(args.url, args.n) if args.n else None
    actor = setup(args.url, results=results, recorder=recorder)
    w = dramatiq.Worker(actor.broker, worker_threads=args.concurrency,
                        worker_timeout=max(1, int(args.poll_ms)))
    stop = threading.Event()
    c.install_term_handler(stop.set)
    w.start()
    stop.wait()
    w.stop(timeout=5000)


def main() -> None:
    import sys

    results = "--results" in sys.argv
    args = c.parse_args([a for a in sys.argv[1:] if a != "--results"])
    c.serve("dramatiq", ("dramatiq", "redis", "hiredis"),
            {"enqueue": enqueue, "drain": drain, "roundtrip": roundtrip},
            worker=lambda a: worker(a, results), args=args)


if __name__ == "__main__":
    main()
