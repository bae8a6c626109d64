"""The dashboard's targets (issue 16): the jobs page with 100,000 jobs in the views,
and how soon a dispatched job appears on an open page.

    .venv/bin/python -m benchmarks.bench_dashboard [--jobs 100000] [--calls 300]
        [--appear 30] [--url URL]

On a throwaway ``redis-server`` (``benchmarks/_server.py``) unless ``--url``:

1. ``--jobs`` jobs are dispatched (``dispatch_many`` batches of 500, to agents
   a, b and c, from dispatchers d0-d4; none runs, so they stay queued) and the
   views caught up by one untimed ``list`` per agent.
2. ``agentq dashboard --port 0`` runs as its own process; this process logs in
   over HTTP (keep-alive) and times ``--calls`` GETs of each page, one at a
   time, after 20 untimed: the jobs page (20 a page), filtered by agent and
   state, from a cursor 50,000 jobs deep, as a non-system agent (d0), a job's
   page, and the agents page. Client side, perf_counter, whole answer read.
3. Appearing live: with the jobs page open in Debian's chromium (Playwright),
   ``--appear`` jobs are dispatched one at a time (0.2 s apart) by this process's
   client; each is timed from just before its dispatch call to its row being in
   the page (``wait_for_selector``). Without chromium, the same is timed over the
   server-sent events stream: the event's arrival, then the page's own 50 ms
   wait and its fetch of the page's content, as dashboard.js does.

The table goes to stdout; the figures to ``benchmarks/results/dashboard-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx2

import agentq
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, server

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
AGENTS = ("a", "b", "c")
DISPATCHERS = ("d0", "d1", "d2", "d3", "d4")
PREFIX = "benchdash"
BATCH = 500
WARMUP = 20
READY = "agentq: dashboard at "


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def config() -> Config:
    return Config.model_validate({"keyPrefix": PREFIX, "rateLimit": {
        "dispatchesPerMinute": 0, "maxQueueDepth": 0}})


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda p: ordered[min(len(ordered) - 1, int(p * len(ordered)))]  # noqa: E731
    return {"n": len(samples), "p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p95_ms": round(pick(0.95) * 1000, 2), "p99_ms": round(pick(0.99) * 1000, 2),
            "max_ms": round(ordered[-1] * 1000, 2)}


async def fill(q: agentq.Client, jobs: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, jobs, BATCH):
        n = min(BATCH, jobs - start)
        caller = DISPATCHERS[(start // BATCH) % len(DISPATCHERS)]
        views = await q.dispatch_many(
            [{"target": AGENTS[(start + i) % 3], "task": f"job {start + i}"} for i in range(n)],
            caller=caller)
        ids += [v.job_id for v in views]
        if (start // BATCH) % 40 == 0:
            note(f"  dispatched {start + n:,}/{jobs:,}")
    for agent in AGENTS:  # the views catch up here, untimed
        await q.list(agent=agent, limit=1)
    await q.list(limit=1)
    return ids


async def timed(calls: int, call: Callable[[], Awaitable[None]]) -> dict[str, float]:
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(calls):
        began = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - began)
    return percentiles(samples)


async def login(http: httpx2.AsyncClient, token: str) -> None:
    answer = await http.post("/login", data={"token": token, "next": "/"})
    assert answer.status_code == 303, answer.text


async def pages(base: str, q: agentq.Client, ids: list[str], calls: int) -> dict[str, Any]:
    operator = (await q.tokens.add("main")).token
    stranger = (await q.tokens.add("d0")).token
    deep = (await q.list(limit=1, cursor=ids[len(ids) // 2])).jobs[0].job_id
    out: dict[str, Any] = {}
    async with httpx2.AsyncClient(base_url=base, timeout=60) as http, \
            httpx2.AsyncClient(base_url=base, timeout=60) as other:
        await login(http, operator)
        await login(other, stranger)
        cases: dict[str, tuple[httpx2.AsyncClient, str]] = {
            "jobs": (http, "/jobs"),
            "jobs_agent_state": (http, "/jobs?agent=b&state=queued"),
            "jobs_deep_cursor": (http, f"/jobs?cursor={deep}"),
            "jobs_non_system": (other, "/jobs"),
            "job": (http, f"/jobs/{ids[len(ids) // 3]}"),
            "agents": (http, "/"),
        }
        for name, (client, path) in cases.items():
            async def get(client: httpx2.AsyncClient = client, path: str = path) -> None:
                answer = await client.get(path)
                assert answer.status_code == 200, (path, answer.status_code)
            out[name] = {"path": path, **await timed(calls, get)}
            note(f"  {name}: p50 {out[name]['p50_ms']} ms")
    return out


async def appear_in_browser(base: str, q: agentq.Client, count: int, chromium: str
                            ) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    token = (await q.tokens.add("main")).token
    samples = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        page = await browser.new_page()
        await page.goto(f"{base}/login?next=/jobs")
        await page.fill("input[name=token]", token)
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{base}/jobs")
        await page.wait_for_selector("#live-status:text('●')")
        for i in range(count):
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            job = await q.dispatch("a", f"appear {i}", caller="main")
            await page.wait_for_selector(f'tr[data-job-id="{job.job_id}"]', timeout=10_000)
            samples.append(time.perf_counter() - began)
        await browser.close()
    return {"how": "chromium (Playwright): dispatch call -> row in the page",
            **percentiles(samples)}


async def appear_over_sse(base: str, q: agentq.Client, count: int) -> dict[str, Any]:
    token = (await q.tokens.add("main")).token
    arrived: dict[str, float] = {}
    ready = asyncio.Event()
    async with httpx2.AsyncClient(base_url=base, timeout=60) as http:
        await login(http, token)

        async def listen() -> None:
            async with http.stream("GET", "/events") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("event: ready"):
                        ready.set()
                    elif line.startswith("data: {\""):
                        arrived.setdefault(json.loads(line[6:])["jobId"], time.perf_counter())

        task = asyncio.create_task(listen())
        await asyncio.wait_for(ready.wait(), 30)
        samples = []
        for i in range(count):
            await asyncio.sleep(0.2)
            began = time.perf_counter()
            job = await q.dispatch("a", f"appear {i}", caller="main")
            while job.job_id not in arrived:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)  # dashboard.js waits 50 ms for more events
            content = await http.get("/jobs?partial=1")
            assert job.job_id in content.text
            samples.append(time.perf_counter() - began)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"how": "server-sent event, 50 ms, then the page's content fetched",
            **percentiles(samples)}


async def bench(url: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with agentq.connect(url, config()) as q:
        for agent in AGENTS:
            await q.add_agent(agent)
        note(f"filling {args.jobs:,} jobs")
        began = time.perf_counter()
        ids = await fill(q, args.jobs)
        results["fill_seconds"] = round(time.perf_counter() - began, 1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
        env["AGENTQ_KEY_PREFIX"] = PREFIX
        log = tmp / "dashboard.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentq.cli", "--redis", url, "dashboard", "--port", "0"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while READY not in (text := log.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard did not start: {text}")
                await asyncio.sleep(0.05)
            base = text.split(READY, 1)[1].split()[0].rstrip("/")
            note("timing the pages")
            results["pages"] = await pages(base, q, ids, args.calls)
            chromium = shutil.which("chromium")
            if args.appear:
                note("timing a dispatched job appearing on an open page")
                results["appear"] = (
                    await appear_in_browser(base, q, args.appear, chromium) if chromium
                    else await appear_over_sse(base, q, args.appear))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| page | path | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, row in results.get("pages", {}).items():
        lines.append(f"| {name} | `{row['path']}` | {row['p50_ms']} | {row['p95_ms']} | "
                     f"{row['p99_ms']} |")
    if "appear" in results:
        row = results["appear"]
        lines.append(f"| appears live ({row['how']}) | | {row['p50_ms']} | {row['p95_ms']} | "
                     f"{row['p99_ms']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--appear", type=int, default=30, help="0 skips the live figure")
    parser.add_argument("--url", help="use this Redis instead of a throwaway server")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    started_at = datetime.now(UTC)
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="agentq-bench-dashboard-") as tmp, \
            server(args.url) as url:
        if not args.url:
            with contextlib.suppress(Exception):
                info["redis_server"] = redis_server_version()
        results = asyncio.run(bench(url, args, Path(tmp)))
    with contextlib.suppress(OSError):
        info["loadavg_after"] = list(os.getloadavg())
    data = {"benchmark": "dashboard", "started_at": started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "params": {"jobs": args.jobs, "calls": args.calls, "appear": args.appear,
                       "throwaway_server": not args.url},
            "results": results, "machine": info}
    print(table(results))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"dashboard-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
