"""Drain rate: N queued no-op jobs run by one worker process.

The worker runs in this process exactly as ``agentq worker`` runs it: the
worker plus the background consumers (scheduler, stall recovery, gates,
projector, alerts). The rate is timed from the first completion to the last,
by the ``JobCompleted`` event times in the log; each run starts on a flushed
server. Round trips are ``send_packed_command`` calls of every connection in
the process during the drain (one per command or per pipeline), divided by N.

    .venv/bin/python -m benchmarks.bench_drain [--n 20000] [--runs 3] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import agentq
from agentq.eventlog.reader import iter_partition
from agentq.schemas.config import Config
from benchmarks._server import redis_server_version, throwaway_redis
from benchmarks.bench_dispatch import RoundTripCounter

RESULTS = Path(__file__).parent / "results"


async def noop(job: Any) -> None:
    return None


async def drain_once(url: str, n: int, concurrency: int, counter: RoundTripCounter,
                     background: bool) -> dict[str, Any]:
    config = Config.model_validate(
        {"keyPrefix": "bench", "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
    )
    async with agentq.connect(url, config) as q:
        await q.redis.flushall()
        await q.add_agent("bench")
        for start in range(0, n, 500):
            await q.dispatch_many([{"target": "bench", "task": "noop"}] * min(500, n - start))
        part = q.partition("bench")
        runner = q.worker("bench", noop, concurrency=concurrency, background=background)
        cpu0 = time.process_time()
        with counter.counting():
            task = asyncio.create_task(runner.run())
            while int(await q.redis.hget(part.counts, "completed") or 0) < n:
                await asyncio.sleep(0.02)
            runner.stop()
            await task
        cpu = time.process_time() - cpu0
        done = [e.at async for e in iter_partition(q.redis, part) if e.type == "JobCompleted"]
    seconds = (max(done) - min(done)) / 1e6
    return {
        "jobs_per_second": n / seconds,
        "seconds": seconds,
        "round_trips_per_job": counter.round_trips / n,
        "commands_per_job": counter.commands / n,
        "client_cpu_us_per_job": cpu / n * 1e6,
        "round_trip_kinds": dict(counter.kinds.most_common(8)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    counter = RoundTripCounter()
    samples: dict[str, list[dict[str, Any]]] = {"with background": [], "worker only": []}
    with throwaway_redis() as url, counter.installed():
        for run in range(args.runs):
            # Interleaved, so drift on a shared machine hits both alike.
            for label, background in (("with background", True), ("worker only", False)):
                result = asyncio.run(drain_once(url, args.n, args.concurrency, counter,
                                                background))
                samples[label].append(result)
                print(f"run {run + 1} {label}: {result['jobs_per_second']:,.0f} jobs/s, "
                      f"{result['round_trips_per_job']:.3f} round trips/job", file=sys.stderr)
    summary = {}
    for label, runs in samples.items():
        rates = [r["jobs_per_second"] for r in runs]
        summary[label] = {
            "jobs_per_second_median": statistics.median(rates),
            "jobs_per_second_min": min(rates),
            "jobs_per_second_max": max(rates),
            "round_trips_per_job_median": statistics.median(r["round_trips_per_job"] for r in runs),
            "client_cpu_us_per_job_median": statistics.median(
                r["client_cpu_us_per_job"] for r in runs),
        }
    print(f"\nDrain of {args.n:,} no-op jobs, one worker process, concurrency "
          f"{args.concurrency}, median of {args.runs} (min-max):")
    for label, s in summary.items():
        print(f"  {label:<16} {s['jobs_per_second_median']:>8,.0f} jobs/s "
              f"({s['jobs_per_second_min']:,.0f}-{s['jobs_per_second_max']:,.0f}), "
              f"{s['round_trips_per_job_median']:.3f} round trips/job, "
              f"{s['client_cpu_us_per_job_median']:.0f} us client CPU/job")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"drain-{stamp}.json"
    out.write_text(json.dumps({
        "n": args.n, "runs": args.runs, "concurrency": args.concurrency,
        "summary": summary, "samples": samples,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "redis_server": redis_server_version()},
    }, indent=2))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
