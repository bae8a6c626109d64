"""Approvals and cancelling a tree (issue 15): two latencies.

    .venv/bin/python -m benchmarks.bench_approvals [--jobs 200] [--trees 5] [--url URL]

  approve_to_start   a job dispatched with requiresApproval is approved (``Client.approve``);
                     measured from just before the approve call to its handler starting
                     (the worker's ``JobStarted.at``, Redis ``TIME``, minus the job's
                     ``JobApproved.at``; and, by this process's clock, from the call to
                     the handler's first line). One approval at a time, ``--jobs`` of them.
  cascade_tree       a 3-level tree of 100 jobs (1 root on agent a, 9 children on b, 90
                     grandchildren on c, each dispatched from inside its parent, all queued
                     with no worker), then ``cancel --cascade`` of the root: from the root's
                     ``JobCancelled.at`` to the last descendant's ``JobCancelled.at`` (one
                     clock: Redis ``TIME``). ``--trees`` trees, one after the other.

One worker of agent ``w`` (concurrency 4) runs in this process and hosts the
background consumers (gates, which carry the cascade, and the rest), as an
``agentq worker`` does. Unless ``--url`` is given, a throwaway ``redis-server``
is started on a free loopback port and stopped at the end. Prints p50/p99 (ms)
and writes ``benchmarks/results/approvals-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agentq
from agentq.consumers.handlers import Job
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, server

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _config() -> Config:
    return Config.model_validate({
        "keyPrefix": f"benchappr{int(time.time())}",
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "approvals": {"sinks": []},
    })


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(_pct(values, 0.5), 2),
            "p99_ms": round(_pct(values, 0.99), 2), "mean_ms": round(statistics.mean(values), 2),
            "max_ms": round(max(values), 2)}


async def _at(q: agentq.Client, job_id: str, kind: str) -> int:
    events = await q.history(job_id)
    return max(iso_to_micros(e.at) for e in events if e.type == kind)


async def approve_to_start(q: agentq.Client, jobs: int) -> dict[str, Any]:
    started: dict[str, float] = {}
    arrived = asyncio.Event()

    async def handler(job: Job) -> str:
        started[job.id] = time.perf_counter()
        arrived.set()
        return "ok"

    run = q.worker("w", handler, concurrency=4)
    task = asyncio.create_task(run.run())
    by_log, by_clock = [], []
    try:
        for _ in range(jobs):
            view = await q.dispatch("w", "needs a yes", requires_approval=True)
            arrived.clear()
            asked = time.perf_counter()
            await q.approve(view.job_id)
            while view.job_id not in started:
                await asyncio.wait_for(arrived.wait(), 10)
                arrived.clear()
            by_clock.append((started[view.job_id] - asked) * 1000)
            await q.wait(view.job_id, timeout=10)
            by_log.append((await _at(q, view.job_id, "JobStarted")
                           - await _at(q, view.job_id, "JobApproved")) / 1000)
    finally:
        run.stop()
        await asyncio.wait_for(task, 30)
    return {"log_approved_to_started": _summary(by_log),
            "call_to_handler": _summary(by_clock)}


async def cascade_tree(q: agentq.Client, trees: int) -> dict[str, Any]:
    async def idle(job: Job) -> str:  # agent w's worker only hosts the background
        return "ok"

    run = q.worker("w", idle, concurrency=1)
    task = asyncio.create_task(run.run())
    spans = []
    try:
        for _ in range(trees):
            root = await q.dispatch("a", "root")
            kids = await q.dispatch_many(
                [{"target": "b", "task": f"kid {i}", "parentJobId": root.job_id}
                 for i in range(9)], caller="a")
            grandkids = []
            for kid in kids:
                grandkids += await q.dispatch_many(
                    [{"target": "c", "task": f"grandkid {i}", "parentJobId": kid.job_id}
                     for i in range(10)], caller="b")
            tree = [*kids, *grandkids]
            # Let the gates index every child first: the measure is the cascade alone.
            await _children_indexed(q, root.job_id, kids)
            await q.cancel(root.job_id, cascade=True)
            deadline = time.monotonic() + 60
            pending = {v.job_id for v in tree}
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} jobs of the tree not cancelled")
                states = [(j, (await q.status(j)).state) for j in list(pending)[:50]]
                pending -= {j for j, s in states if s == "cancelled"}
                await asyncio.sleep(0.005)
            first = await _at(q, root.job_id, "JobCancelled")
            last = max([await _at(q, v.job_id, "JobCancelled") for v in tree])
            spans.append((last - first) / 1000)
    finally:
        run.stop()
        await asyncio.wait_for(task, 30)
    return {"root_to_last_cancelled": _summary(spans), "jobs_per_tree": 100}


async def _children_indexed(q: agentq.Client, root: str, kids: list[agentq.JobView]) -> None:
    want = 1 + len(kids)
    for _ in range(2000):
        got = int(await q.redis.scard(q.partition("a").children(root)) > 0)
        for kid in kids:
            got += int(await q.redis.scard(q.partition("b").children(kid.job_id)) == 10)
        if got == want:
            return
        await asyncio.sleep(0.005)
    raise TimeoutError("the gates did not index the tree")


async def bench(url: str, jobs: int, trees: int) -> dict[str, Any]:
    async with agentq.connect(url, _config()) as q:
        for agent in ("w", "a", "b", "c"):
            await q.add_agent(agent)
        try:
            return {"approve_to_start": await approve_to_start(q, jobs),
                    "cascade_tree": await cascade_tree(q, trees)}
        finally:
            keys = [k async for k in q.redis.scan_iter(match=f"{q.keys.prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await q.redis.delete(*keys[i : i + 500])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="approvals to time")
    parser.add_argument("--trees", type=int, default=5, help="trees of 100 jobs to cancel")
    parser.add_argument("--url", help="use this Redis instead of a throwaway server")
    args = parser.parse_args(argv)
    with server(args.url) as url:
        results = asyncio.run(bench(url, args.jobs, args.trees))
        redis_version = redis_server_version() if not args.url else None
    out = {"results": results, "machine": machine_info(), "redis": redis_version,
           "args": {"jobs": args.jobs, "trees": args.trees, "throwaway_server": not args.url}}
    print(json.dumps(results, indent=1))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"approvals-{stamp}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
