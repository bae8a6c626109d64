"""How long a `/metrics` scrape takes with N agents (issue 16's target: 50 ms at 1,000).

    python -m benchmarks.bench_metrics [--agents 1000] [--scrapes 50] [--url URL]

On a throwaway redis-server (or ``--url``, under a fresh key prefix deleted
afterwards): N agents, a few jobs each (so that every agent has counts, event
counters and a live worker heartbeat), then the metrics server of
``consumers/metrics.py`` started in this process, scraped over HTTP from a
thread the way Prometheus does, while the event loop is idle. Prints the
scrape time's p50, p90 and max, and the size of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import urllib.request
import uuid

import agentq
from agentq.consumers.metrics import serve
from agentq.eventlog.scripts import Scripts
from agentq.projections.projection import Projection
from agentq.schemas.config import Config
from benchmarks._server import throwaway_redis


def _scrape(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - started, len(body)


async def bench(url: str, agents: int, scrapes: int) -> None:
    config = Config.model_validate({"keyPrefix": f"bm{uuid.uuid4().hex[:8]}",
                                    "rateLimit": {"dispatchesPerMinute": 0,
                                                  "maxQueueDepth": 0}})
    async with agentq.connect(url, config) as q:
        names = [f"agent-{i:04d}" for i in range(agents)]
        try:
            for name in names:
                await q.add_agent(name)
            for i in range(0, agents, 200):
                await q.dispatch_many([{"target": n, "task": "t"} for n in names[i:i + 200]
                                       for _ in range(3)], caller="main")
            parts = [q.partition(n) for n in names]
            scripts = Scripts(q.redis)
            await scripts.call_many([Scripts.heartbeat_call(p, "bench-worker", 600_000)
                                     for p in parts])
            await Projection(q.redis).catch_up(parts)  # the event counters
            server = serve(q.redis, q.keys, "127.0.0.1", 0)
            try:
                target = f"http://127.0.0.1:{server.port}/metrics"
                await asyncio.to_thread(_scrape, target)  # warm
                times, size = [], 0
                for _ in range(scrapes):
                    seconds, size = await asyncio.to_thread(_scrape, target)
                    times.append(seconds * 1000)
            finally:
                await asyncio.to_thread(server.close)
            times.sort()
            p90 = times[int(len(times) * 0.9) - 1]
            print(f"{agents} agents, {scrapes} scrapes: p50 {statistics.median(times):.1f} ms, "
                  f"p90 {p90:.1f} ms, max {times[-1]:.1f} ms; {size:,} bytes")
        finally:
            keys = [k async for k in q.redis.scan_iter(f"{config.key_prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await q.redis.delete(*keys[i:i + 500])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--url", help="use this Redis instead of a throwaway server")
    args = parser.parse_args(argv)
    if args.url:
        asyncio.run(bench(args.url, args.agents, args.scrapes))
    else:
        with throwaway_redis() as url:
            asyncio.run(bench(url, args.agents, args.scrapes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
