"""MCP round trip over HTTP: ``queue_dispatch`` then ``queue_status`` of that job,
through ``agentq mcp --http`` with the official SDK's client.

    .venv/bin/python -m benchmarks.bench_mcp [--calls 300] [--warmup 20] [--url URL]

One ``agentq mcp --http 127.0.0.1:0`` process (started here, stopped by its pid),
one SDK client (protocol 2026-07-28, bearer token from ``agentq tokens``), calls
one after another: each sample is a dispatch and the status of the job it made,
timed in this process (so it includes the client's own work: JSON-RPC framing,
the output-schema check of each answer). Each call alone is reported as well.

Unless ``--url`` is given, a throwaway ``redis-server`` is started on a free
loopback port (``benchmarks/_server.py``). Prints p50 and p99 in ms and writes
``benchmarks/results/mcp-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

import agentq
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, server

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFIX = "benchmcp"
READY = "MCP over HTTP at "


def _config() -> Config:
    return Config.model_validate({"keyPrefix": PREFIX,
                                  "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}})


@contextmanager
def mcp_http(url: str) -> Iterator[str]:
    """``agentq mcp --http`` on a free loopback port; yields its /mcp URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=PREFIX, AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
               AGENTQ_RATE_LIMIT__MAX_QUEUE_DEPTH="0")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentq.cli", "--redis", url, "mcp", "--http", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        try:
            deadline = time.monotonic() + 30
            while True:
                err.seek(0)
                text = err.read().decode(errors="replace")
                if READY in text:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"agentq mcp --http did not start: {text}")
                time.sleep(0.05)
            yield text.split(READY, 1)[1].split()[0]
        finally:
            proc.terminate()
            proc.wait(15)


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


async def bench(redis_url: str, calls: int, warmup: int) -> dict[str, Any]:
    async with agentq.connect(redis_url, _config()) as q:
        await q.add_agent("researcher")
        token = (await q.tokens.add("planner")).token
        with mcp_http(redis_url) as url:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                httpx2.AsyncClient(headers=headers, timeout=30) as http,
                Client(streamable_http_client(url, http_client=http)) as client,
            ):
                pairs, dispatches, statuses = [], [], []
                for i in range(warmup + calls):
                    start = time.perf_counter()
                    sent = await client.call_tool("queue_dispatch", {"target": "researcher",
                                                                     "task": f"task {i}"})
                    middle = time.perf_counter()
                    assert not sent.is_error and sent.structured_content is not None
                    seen = await client.call_tool("queue_status",
                                                  {"jobId": sent.structured_content["jobId"]})
                    end = time.perf_counter()
                    assert not seen.is_error
                    if i >= warmup:
                        pairs.append(end - start)
                        dispatches.append(middle - start)
                        statuses.append(end - middle)
                protocol = client.protocol_version
        keys = [key async for key in q.redis.scan_iter(match=f"{PREFIX}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await q.redis.delete(*keys[i:i + 500])
    return {"protocol": protocol, "dispatch_then_status": summarize(pairs),
            "dispatch": summarize(dispatches), "status": summarize(statuses)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--url", default=None, help="a Redis URL (default: a throwaway server)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    info = machine_info()
    with server(args.url) as url:
        if args.url is None:
            info["redis_server"] = redis_server_version()
        results = asyncio.run(bench(url, args.calls, args.warmup))
    for name in ("dispatch_then_status", "dispatch", "status"):
        r = results[name]
        print(f"{name:22s} n={r['n']}  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
              f"  (mean {r['mean_ms']:.3f}, max {r['max_ms']:.3f})")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.results_dir / f"mcp-{stamp}.json"
    path.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
