"""Release latency: from a dependency's ``JobCompleted`` to its dependent's ``JobQueued``.

    .venv/bin/python -m benchmarks.bench_release [--pairs 1000] [--warmup 20] [--url URL]

Two scenarios, each ``--pairs`` pairs (after ``--warmup`` pairs not counted):

  across_agents   dependency on agent ``a``, dependent on agent ``b``
  within_agent    dependency and dependent both on agent ``a``

One worker per agent (``q.worker``, concurrency 4) runs in this process, and
the background consumers (dependency gates, scheduler, stall recovery) run in
the same process, hosted by the first worker, as in an ``agentq worker``.

Per pair: dispatch the dependency D, dispatch the dependent X (depends on D),
wait until the gates have registered X with D (X is in D's dependents set),
then let D's handler return. So X is released by D's completion event (not at
its registration), one pair at a time. The latency is measured by the log's
own times: X's ``JobQueued.at`` minus D's ``JobCompleted.at``, both from the
``at`` of ``q.history`` (Redis ``TIME`` in the scripts: one clock).

Unless ``--url`` is given, a throwaway ``redis-server`` is started on a free
loopback port (``benchmarks/_server.py``) and stopped at the end. Prints p50
and p99 in ms and writes ``benchmarks/results/release-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_release.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agentq
from agentq.consumers.handlers import Job
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, server

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = {"across_agents": ("a", "b"), "within_agent": ("a", "a")}
CONCURRENCY = 4
REGISTER_TIMEOUT = 10.0


def bench_config() -> Config:
    return Config.model_validate(
        {
            "keyPrefix": "benchrel",
            "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
            "limits": {"maxDepth": 100},
            "jobs": {"maxAttempts": 1},
        }
    )


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(latencies_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(latencies_ms),
        "p50_ms": round(percentile(latencies_ms, 50), 3),
        "p90_ms": round(percentile(latencies_ms, 90), 3),
        "p99_ms": round(percentile(latencies_ms, 99), 3),
        "mean_ms": round(statistics.fmean(latencies_ms), 3),
        "min_ms": round(min(latencies_ms), 3),
        "max_ms": round(max(latencies_ms), 3),
    }


class Gate:
    """Holds dependency handlers until the bench lets them return."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}

    def hold(self, task: str) -> asyncio.Event:
        self.events[task] = asyncio.Event()
        return self.events[task]

    async def handler(self, job: Job) -> str:
        event = self.events.get(job.task)
        if event is not None:
            await event.wait()
            del self.events[job.task]
        return "ok"


async def run_pairs(q: agentq.Client, gate: Gate, scenario: str, count: int,
                    tag: str) -> list[tuple[str, str]]:
    """Run ``count`` pairs one at a time; returns (dependency id, dependent id) per pair."""
    dep_agent, dependent_agent = SCENARIOS[scenario]
    pairs: list[tuple[str, str]] = []
    for i in range(count):
        task = f"{tag} {scenario} dep {i}"
        release = gate.hold(task)
        dep = await q.dispatch(dep_agent, task, caller="bench")
        dependent = await q.dispatch(dependent_agent, f"{tag} {scenario} x {i}", caller="bench",
                                     depends_on=[dep.job_id])
        dependents_key = q.partition(dep_agent).dependents(dep.job_id)
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while not await q.redis.sismember(dependents_key, dependent.job_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{dependent.job_id} was never registered with {dep.job_id}")
            await asyncio.sleep(0.0005)
        release.set()
        view, timed_out = await q.wait(dependent.job_id, timeout=30)
        if timed_out or view.state != "completed":
            raise RuntimeError(f"{dependent.job_id} did not complete: {view.state}")
        pairs.append((dep.job_id, dependent.job_id))
    return pairs


async def latencies(q: agentq.Client, pairs: list[tuple[str, str]]) -> list[float]:
    out: list[float] = []
    for dep_id, dependent_id in pairs:
        (completed,) = [e for e in await q.history(dep_id) if e.type == "JobCompleted"]
        (queued,) = [e for e in await q.history(dependent_id) if e.type == "JobQueued"]
        if queued.data.get("reason") != "released":
            raise RuntimeError(f"{dependent_id} was queued by {queued.data}, not released")
        out.append((iso_to_micros(queued.at) - iso_to_micros(completed.at)) / 1000)
    return out


async def bench(url: str, pairs: int, warmup: int) -> dict[str, Any]:
    config = bench_config()
    gate = Gate()
    results: dict[str, Any] = {}
    async with agentq.connect(url, config) as q:
        stale = [k async for k in q.redis.scan_iter(match=f"{config.key_prefix}:*", count=1000)]
        if stale:
            await q.redis.delete(*stale)
        for agent in ("a", "b"):
            await q.add_agent(agent)
        runs = [
            q.worker("a", gate.handler, concurrency=CONCURRENCY, background=True),
            q.worker("b", gate.handler, concurrency=CONCURRENCY, background=False),
        ]
        tasks = [asyncio.create_task(run.run()) for run in runs]
        try:
            for scenario in SCENARIOS:
                await run_pairs(q, gate, scenario, warmup, "warmup")
                started = time.perf_counter()
                measured = await run_pairs(q, gate, scenario, pairs, "run")
                took = time.perf_counter() - started
                values = await latencies(q, measured)
                results[scenario] = summarize(values) | {"wall_seconds": round(took, 3)}
                print(f"{scenario:14s} n={len(values)}  p50 {results[scenario]['p50_ms']:.3f} ms"
                      f"  p99 {results[scenario]['p99_ms']:.3f} ms"
                      f"  (mean {results[scenario]['mean_ms']:.3f}, max "
                      f"{results[scenario]['max_ms']:.3f})", flush=True)
        finally:
            for run in runs:
                run.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            keys = [k async for k in q.redis.scan_iter(match=f"{config.key_prefix}:*",
                                                       count=1000)]
            for i in range(0, len(keys), 500):
                await q.redis.delete(*keys[i : i + 500])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--url", help="use this Redis instead of a throwaway server")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    started_at = datetime.now(UTC)
    info = machine_info()
    with server(args.url) as url:
        if not args.url:
            with contextlib.suppress(Exception):
                info["redis_server"] = redis_server_version()
        results = asyncio.run(bench(url, args.pairs, args.warmup))
    with contextlib.suppress(OSError):
        info["loadavg_after"] = list(os.getloadavg())
    data = {
        "benchmark": "release",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "params": {"pairs": args.pairs, "warmup": args.warmup, "concurrency": CONCURRENCY,
                   "throwaway_server": not args.url},
        "metric": "JobQueued.at of the dependent minus JobCompleted.at of its dependency (ms)",
        "results": results,
        "machine": info,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"release-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
