"""Memory per job in Redis: ``used_memory`` growth / N, after ``MEMORY PURGE``.

Two figures: N jobs queued (state records, ready entries, log events, counts),
and the same N jobs completed with everything agentq keeps for a job: its
state record, its whole history in the log, and its place in the views.

    .venv/bin/python -m benchmarks.bench_memory [--n 20000] [--task-bytes 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.exceptions import ResponseError

import agentq
from agentq.projections.projection import Projection
from agentq.schemas.config import Config
from benchmarks._server import redis_server_version, throwaway_redis

RESULTS = Path(__file__).parent / "results"


async def used_memory(q: agentq.Client) -> int:
    """The bytes Redis holds for data: ``used_memory`` after ``MEMORY PURGE``, less
    the script cache (it follows the scripts loaded, not the jobs)."""
    await q.redis.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
    info: dict[str, Any] = await q.redis.info("memory")
    return int(info["used_memory"]) - int(info.get("used_memory_scripts", 0))


async def breakdown(q: agentq.Client, n: int) -> dict[str, Any]:
    """Where the bytes are, per job: ``MEMORY USAGE`` of the partition's keys by
    kind (job records sampled), and the encoding Redis chose for a record."""
    part = q.partition("mem")
    kinds: dict[str, float] = {}
    records = [k async for k in q.redis.scan_iter(match=f"{part.job_prefix}*", count=1000)]
    sample = records[:: max(1, len(records) // 200)]
    sizes = [int(await q.redis.memory_usage(k, samples=0) or 0) for k in sample]
    kinds["state record"] = sum(sizes) / max(1, len(sizes)) * len(records) / n
    others: dict[str, str] = {
        part.log: "log (every event)", **{s: "ready streams" for s in part.ready_streams},
    }
    async for key in q.redis.scan_iter(match=f"{part.base}:*", count=1000):
        if key.startswith(part.job_prefix):
            continue
        kind = others.get(key) or ("specs" if key.startswith(part.spec_prefix) else
                                   "views (indexes)" if ":idx:" in key else "other keys")
        kinds[kind] = kinds.get(kind, 0) + int(await q.redis.memory_usage(key, samples=0) or 0) / n
    encoding = await q.redis.object("encoding", records[0]) if records else None
    return {"bytes_per_job": {k: round(v, 1) for k, v in kinds.items()},
            "record_encoding": encoding}


async def measure(url: str, n: int, task: str) -> dict[str, Any]:
    config = Config.model_validate(
        {"keyPrefix": "mem", "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
    )
    async with agentq.connect(url, config) as q:
        await q.redis.flushall()
        # Redis 7 allocates a latency histogram (~25 KB) for each command on its
        # first call; with tracking on, those would count as the jobs' memory.
        with contextlib.suppress(ResponseError):  # before 7.0: no such setting
            await q.redis.config_set("latency-tracking", "no")
        await q.add_agent("mem")
        base = await used_memory(q)
        for start in range(0, n, 500):
            await q.dispatch_many([{"target": "mem", "task": task}] * min(500, n - start))
        queued = await used_memory(q) - base
        queued_parts = await breakdown(q, n)

        async def noop(job: Any) -> None:
            return None

        runner = q.worker("mem", noop, concurrency=64)
        running = asyncio.create_task(runner.run())
        part = q.partition("mem")
        while int(await q.redis.hget(part.counts, "completed") or 0) < n:
            await asyncio.sleep(0.05)
        runner.stop()
        await running
        await Projection(q.redis).catch_up([part])
        completed = await used_memory(q) - base
        completed_parts = await breakdown(q, n)
    return {"queued_bytes_per_job": queued / n, "completed_bytes_per_job": completed / n,
            "queued_breakdown": queued_parts, "completed_breakdown": completed_parts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--task-bytes", type=int, default=8, help="length of each job's task")
    args = parser.parse_args()
    with throwaway_redis() as url:
        result = asyncio.run(measure(url, args.n, "x" * args.task_bytes))
    print(f"memory per job in Redis (N = {args.n:,}, task of {args.task_bytes} bytes): "
          f"queued {result['queued_bytes_per_job']:,.0f} B, completed with its history and "
          f"views {result['completed_bytes_per_job']:,.0f} B")
    for phase in ("queued", "completed"):
        parts = result[f"{phase}_breakdown"]
        print(f"  {phase}: " + ", ".join(f"{k} {v:,.0f} B" for k, v in
                                          parts["bytes_per_job"].items())
              + f" (records encoded as {parts['record_encoding']})")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"memory-{stamp}.json"
    out.write_text(json.dumps({"n": args.n, "task_bytes": args.task_bytes, **result,
                               "redis_server": redis_server_version()}, indent=2))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
