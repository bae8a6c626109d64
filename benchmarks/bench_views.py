"""The read side: projection lag, ``status``/``list`` latency as the log grows, rebuild rate.

    .venv/bin/python -m benchmarks.bench_views [--rate 2000] [--seconds 10]
        [--sizes 10000,100000,1000000] [--calls 300] [--url URL]

Three measurements, on a throwaway ``redis-server`` (``benchmarks/_server.py``)
unless ``--url`` is given:

1. **Projection lag** under a steady dispatch load: ``--rate`` dispatches per
   second for ``--seconds`` seconds (``dispatch_many`` batches of ``rate/100``
   jobs every 10 ms, spread over agents a, b and c, paced on absolute times),
   while a ``Projector`` (consumer group ``projector``) runs in another
   process. The projector process is instrumented: for every event it applies,
   lag = the wall time just after the projection script returned minus the
   event's ``at`` (Redis ``TIME`` in the dispatch script; one host, one clock).
   Nothing else applies events meanwhile (no query runs during the load).
2. **status and list latency** with ``--sizes`` events in the log: the log is
   filled with ``dispatch_many`` batches of 500 (rate limit 0, depth cap 0),
   400 of each batch started and 390 completed and 10 failed, so 1,300 events
   per 500 jobs; then the views are rebuilt (timed: the rebuild rate), then
   ``--calls`` calls of each query are timed one at a time (after 20 untimed):
   ``status`` of a random job; ``list`` unfiltered, by state, by agent and
   state, as a non-system caller, from a cursor deep in the history, with a
   sparse filter (one dispatcher's failed jobs: 2 % of its jobs) and with a
   filter nothing matches (one dispatcher's cancelled jobs). A query so slow
   that 320 calls would take over a minute is timed over fewer calls (>= 5).
3. **Rebuild rate** (``projections.rebuild.rebuild`` of every partition),
   events per second, at each size.

Progress goes to stderr; the table to stdout; the raw figures to
``benchmarks/results/views-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_views.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import agentq
from agentq.eventlog.scripts import ensure_work_groups
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, server

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
AGENTS = ("a", "b", "c")
DISPATCHERS = ("d0", "d1", "d2", "d3", "d4")
PREFIX = "benchviews"
BATCH = 500
STARTED, COMPLETED = 400, 390  # of each batch of 500; the other 10 started ones fail
WORKER = "bench-worker"
TICK = 0.01


def bench_config(prefix: str = PREFIX) -> Config:
    return Config.model_validate({
        "keyPrefix": prefix,
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "jobs": {"maxAttempts": 1},
    })


def note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarize(ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "max_ms": round(max(ms), 3),
    }


async def wipe(q: agentq.Client) -> None:
    keys = [k async for k in q.redis.scan_iter(match=f"{q.keys.prefix}:*", count=5000)]
    for i in range(0, len(keys), 1000):
        await q.redis.delete(*keys[i : i + 1000])


# -- 1. projection lag ------------------------------------------------------------


async def projector_child(url: str, config_json: str, out_path: str) -> int:
    """The projector process: applies events, records each one's lag (µs)."""
    from agentq.consumers.projector import Projector
    from agentq.eventlog.reader import RawEvent

    config = Config.model_validate_json(config_json)
    lags: list[int] = []

    class Timed(Projector):
        async def handle(self, events: list[RawEvent]) -> None:
            await super().handle(events)
            now = time.time_ns() // 1000
            lags.extend(now - e.at for e in events)

    async with agentq.connect(url, config) as q:
        projector = Timed(q.redis, q.open_blocking(), q.keys)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await projector.recover()  # creates the groups
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        await projector.run(stop)
    Path(out_path).write_text(json.dumps(lags))
    return 0


async def caught_up(q: agentq.Client) -> bool:
    for agent in AGENTS:
        part = q.partition(agent)
        last = await q.redis.xrevrange(part.log, count=1)
        if last and await q.redis.hget(part.projection, "pos") != last[0][0]:
            return False
    return True


async def bench_lag(url: str, rate: int, seconds: float, workdir: Path) -> dict[str, Any]:
    config = bench_config(f"{PREFIX}lag")
    per_tick = max(1, round(rate * TICK))
    async with agentq.connect(url, config) as q:
        await wipe(q)
        for agent in AGENTS:
            await q.add_agent(agent)
        lag_file = workdir / "lags.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.bench_views", "--projector-child", url,
            config.model_dump_json(by_alias=True, exclude_none=True), str(lag_file),
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"READY":
                raise RuntimeError(f"the projector process did not start: {line!r}")
            # Warm-up, not measured by the load figures: scripts loaded, groups made.
            await q.dispatch_many([{"target": "a", "task": "warm-up"}], caller="d0")
            note(f"lag: {rate} dispatches/s for {seconds:g} s "
                 f"({per_tick} jobs every {TICK * 1000:g} ms) ...")
            ticks = round(seconds / TICK)
            sent = 0
            behind = 0
            started = time.perf_counter()
            for k in range(ticks):
                due = started + k * TICK
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    behind += 1
                jobs = [{"target": AGENTS[(sent + i) % 3], "task": f"load {sent + i}"}
                        for i in range(per_tick)]
                await q.dispatch_many(jobs, caller=DISPATCHERS[k % len(DISPATCHERS)])
                sent += per_tick
            took = time.perf_counter() - started
            deadline = time.monotonic() + 60
            while not await caught_up(q):
                if time.monotonic() > deadline:
                    raise RuntimeError("the projector did not catch up within 60 s")
                await asyncio.sleep(0.05)
            drained = time.perf_counter() - started - took
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
        lags_us: list[int] = json.loads(lag_file.read_text())
        await wipe(q)
    lags_ms = [x / 1000 for x in lags_us[1:]]  # the warm-up dispatch left out
    return {
        "target_rate": rate,
        "achieved_rate": round(sent / took, 1),
        "dispatched": sent,
        "seconds": round(took, 3),
        "ticks_behind_schedule": behind,
        "events_projected": len(lags_ms),
        "drain_after_load_s": round(drained, 3),
        "lag": summarize(lags_ms),
    }


# -- 2 and 3. latency with a growing log, rebuild rate ------------------------------


class Filler:
    """Grows the log in units of 500 jobs (1,300 events)."""

    def __init__(self, q: agentq.Client) -> None:
        self.q = q
        self.events = 0
        self.units = 0
        self.job_ids: list[str] = []
        self.middle: str | None = None

    async def unit(self) -> None:
        q = self.q
        agent = AGENTS[self.units % 3]
        caller = DISPATCHERS[self.units % len(DISPATCHERS)]
        part = q.partition(agent)
        views = await q.dispatch_many(
            [{"target": agent, "task": f"fill {self.units}.{i} " + "x" * 60}
             for i in range(BATCH)], caller=caller)
        started, _ = await q.scripts.start(part, WORKER, 3_600_000, STARTED)
        ids = [s.job_id for s in started]
        await q.scripts.complete(part, WORKER, [(j, 1, b'"ok"') for j in ids[:COMPLETED]])
        await asyncio.gather(*(
            q.scripts.fail(part, WORKER, j, 1, "boom", q.backoff) for j in ids[COMPLETED:]
        ))
        self.job_ids += [v.job_id for v in views[::10]]
        self.events += BATCH + 2 * len(ids)
        self.units += 1

    async def fill_to(self, target: int) -> None:
        began, start_events, last_note = time.perf_counter(), self.events, 0.0
        while self.events < target:
            await self.unit()
            now = time.perf_counter()
            if now - last_note > 2 or self.events >= target:
                rate = (self.events - start_events) / max(now - began, 1e-9)
                note(f"  filled {self.events:,}/{target:,} events ({rate:,.0f} events/s)")
                last_note = now
        self.middle = self.job_ids[len(self.job_ids) // 2]


async def timed(calls: int, make: Callable[[], Awaitable[Any]],
                budget_s: float = 60) -> dict[str, Any]:
    """``calls`` timed calls after 20 untimed ones; fewer (at least 5, and no
    warm-up beyond one call) when one call is so slow that they would take
    more than ``budget_s``."""
    began = time.perf_counter()
    await make()
    first = time.perf_counter() - began
    if first * (calls + 20) > budget_s:
        calls = max(5, int(budget_s / first))
    else:
        for _ in range(19):
            await make()
    ms = []
    for _ in range(calls):
        began = time.perf_counter()
        await make()
        ms.append((time.perf_counter() - began) * 1000)
    return summarize(ms)


def make_queries(
    q: agentq.Client, ids: list[str], middle: str | None, rng: random.Random
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """The queries timed at each size."""
    return {
        "status": lambda: q.status(rng.choice(ids), caller="main"),
        "list": lambda: q.list(caller="main", limit=20),
        "list_state": lambda: q.list(caller="main", state=["failed"], limit=20),
        "list_agent_state": lambda: q.list(caller="main", agent="b", state=["queued"], limit=20),
        "list_non_system": lambda: q.list(caller="d1", limit=20),
        "list_deep_cursor": lambda: q.list(caller="main", limit=20, cursor=middle),
        "list_sparse_filter": lambda: q.list(caller="main", dispatched_by="d1",
                                             state=["failed"], limit=20),
        # Nothing matches: every job of the dispatcher is looked at.
        "list_empty_filter": lambda: q.list(caller="main", dispatched_by="d1",
                                            state=["cancelled"], limit=20),
    }


async def bench_sizes(url: str, sizes: list[int], calls: int) -> dict[str, Any]:
    config = bench_config()
    out: dict[str, Any] = {}
    async with agentq.connect(url, config) as q:
        await wipe(q)
        for agent in AGENTS:
            await q.add_agent(agent)
            await ensure_work_groups(q.redis, q.partition(agent))
        filler = Filler(q)
        rng = random.Random(7)
        for size in sizes:
            note(f"size {size:,}: filling ...")
            await filler.fill_to(size)
            log_events = sum([await q.redis.xlen(q.partition(a).log) for a in AGENTS])
            note(f"size {size:,}: rebuilding the views of {log_events:,} events ...")
            began = time.perf_counter()
            applied = await rebuild(q.redis, [q.partition(a) for a in AGENTS])
            took = time.perf_counter() - began
            note(f"  rebuilt {applied:,} events in {took:.1f} s "
                 f"({applied / took:,.0f} events/s)")
            memory = (await q.redis.info("memory"))["used_memory"]
            queries = make_queries(q, filler.job_ids, filler.middle, rng)
            latency: dict[str, Any] = {}
            for name, make in queries.items():
                latency[name] = await timed(calls, make)
                note(f"  {name:20s} p50 {latency[name]['p50_ms']:9.3f} ms"
                     f"  p99 {latency[name]['p99_ms']:9.3f} ms  (n={latency[name]['n']})")
            out[str(size)] = {
                "events": log_events,
                "jobs": filler.units * BATCH,
                "used_memory_mb": round(memory / 2**20, 1),
                "rebuild": {"events": applied, "seconds": round(took, 3),
                            "events_per_s": round(applied / took)},
                "latency": latency,
            }
        await wipe(q)
    return out


# -- report ----------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = []
    lag = results.get("lag")
    if lag:
        lines.append(
            f"projection lag at {lag['achieved_rate']:,.0f} dispatches/s "
            f"(target {lag['target_rate']:,}) for {lag['seconds']:.1f} s, "
            f"{lag['events_projected']:,} events: p50 {lag['lag']['p50_ms']:.2f} ms, "
            f"p99 {lag['lag']['p99_ms']:.2f} ms, max {lag['lag']['max_ms']:.2f} ms")
        lines.append("")
    sizes = results.get("sizes", {})
    if sizes:
        names = list(next(iter(sizes.values()))["latency"])
        head = f"{'query (ms, p50 / p99)':22s}" + "".join(
            f"{int(s):>20,}" for s in sizes)
        lines.append(head + "   events in the log")
        lines.append("-" * len(head))
        for name in names:
            row = f"{name:22s}"
            for s in sizes.values():
                cell = f"{s['latency'][name]['p50_ms']:.2f} / {s['latency'][name]['p99_ms']:.2f}"
                row += f"{cell:>20s}"
            lines.append(row)
        row = f"{'rebuild (events/s)':22s}" + "".join(
            f"{s['rebuild']['events_per_s']:>20,}" for s in sizes.values())
        lines.append(row)
        row = f"{'redis memory (MB)':22s}" + "".join(
            f"{s['used_memory_mb']:>20,.0f}" for s in sizes.values())
        lines.append(row)
    return "\n".join(lines)


async def bench(url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.seconds > 0:
        results["lag"] = await bench_lag(url, args.rate, args.seconds, workdir)
        print(table({"lag": results["lag"]}), flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        results["sizes"] = await bench_sizes(url, sizes, args.calls)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--projector-child"]:
        return asyncio.run(projector_child(*argv[1:4]))
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000, help="dispatches per second")
    parser.add_argument("--seconds", type=float, default=10, help="0 skips the lag figure")
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="events in the log, comma-separated, growing; '' skips")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--url", help="use this Redis instead of a throwaway server")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    started_at = datetime.now(UTC)
    info = machine_info()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentq-bench-views-") as tmp, \
            server(args.url) as url:
        if not args.url:
            with contextlib.suppress(Exception):
                info["redis_server"] = redis_server_version()
        results = asyncio.run(bench(url, args, Path(tmp)))
    with contextlib.suppress(OSError):
        info["loadavg_after"] = list(os.getloadavg())
    data = {
        "benchmark": "views",
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "params": {"rate": args.rate, "seconds": args.seconds, "sizes": args.sizes,
                   "calls": args.calls, "throwaway_server": not args.url,
                   "fill": f"{BATCH} jobs per dispatch_many; {STARTED} started, "
                           f"{COMPLETED} completed, {STARTED - COMPLETED} failed"},
        "metrics": {
            "lag": "projector's wall time after applying an event minus the event's `at` (ms)",
            "latency": "one call at a time, client side, perf_counter (ms)",
            "rebuild": "projections.rebuild.rebuild over every partition (events/s)",
        },
        "results": results,
        "machine": info,
    }
    print(table(results))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"views-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
