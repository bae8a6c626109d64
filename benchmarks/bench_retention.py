"""Retention and the archive (issue 14's targets): Redis memory after the window,
bytes per job inside it, archiving, reads from the archive, and whole-log work.

    .venv/bin/python -m benchmarks.bench_retention                 # the full run
    .venv/bin/python -m benchmarks.bench_retention --quick         # a smoke run (~1 min)
    .venv/bin/python -m benchmarks.bench_retention --only window --runs 5
    .venv/bin/python -m benchmarks.bench_retention --only audit --jobs 300000

Every scenario runs on a throwaway ``redis-server`` of its own (``benchmarks/_server.py``)
with key prefix ``bret``, one agent ``r``, the rate limit and queue cap off, and an
archive in a temporary folder (``file://``). Jobs are dispatched (``dispatch_many``, 500 a
call) while one worker (concurrency 64, hosting the background consumers: gates,
projector, alerts) completes them; a payload of "8 B" or "1 KB" is a string whose JSON is
exactly that long, as the task and as the handler's result. The worker's client has no
archive configured, so its process runs no archiving pass of its own: every pass is the
bench's, timed. Before a pass, the bench waits until every consumer group the pass waits
for (``archiver.GROUPS``) has read and acknowledged the whole log.

memory    (``--n`` jobs, default 200,000) ``retention.jobsSeconds`` 5: the jobs run, the
          bench waits until the last ended more than 5 s ago, then ``Archiver.archive_all``
          runs to the end (then once more, which must find nothing left). ``used_memory``
          (after ``MEMORY PURGE``, less the script cache, ``latency-tracking`` off, as
          ``bench_memory`` reads it) minus its value before the first dispatch (agent
          registered): target within 2 MB. In the same run: the archiving rate (events
          archived ÷ seconds of the first ``archive_all``, which also removes the jobs and
          trims the log), ``merged.replay`` over the archived partition (events/s; the log is
          empty by then, so every event comes from the archive; median of ``--runs`` reads)
          and ``Client.history`` of archived jobs (``--history-samples`` random jobs, p50/p99
          ms, after a few calls not counted).
window    (``--window-jobs`` jobs, default 20,000; ``--runs`` servers each, median) with
          ``jobsSeconds`` 3600, for 8 B and 1 KB payloads: once the groups have read
          everything, one archiving pass (it archives and records the ended jobs; nothing
          has ended long enough ago to leave), then ``MEMORY USAGE`` (``SAMPLES 0``) of every
          key of the prefix, summed, ÷ jobs: the whole footprint of a completed job inside
          the window, log, record, spec, views, global indexes and the archive's bookkeeping
          included (also broken down by kind). Targets 1,000 and 3,100 bytes.
audit     (``--jobs`` jobs, default 1,000,000) no archive, nothing leaves Redis: once the
          projector has caught up, ``audit verify`` (``projections.audit.verify``) and then
          ``projections rebuild`` (``projections.rebuild.rebuild``) each run in a child
          process of their own (``--audit-runs`` times, default 1: each takes minutes at
          1,000,000 jobs; median), which reports its peak RSS (``VmHWM``) and its RSS
          before the work began (the interpreter and agentq's imports); events/s = the
          log's entries ÷ the call's seconds. Targets: peak ≤ 150 MB for both, ``audit
          verify`` ≥ 100,000 events/s.

Prints a table of every figure against its target and writes
``benchmarks/results/retention-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_retention.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis
from redis.exceptions import ResponseError

import agentq
from agentq.consumers.archiver import GROUPS, Archiver, Totals
from agentq.eventlog import merged
from agentq.eventlog.archive import open_archive
from agentq.eventlog.keys import Partition
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, throwaway_redis
from benchmarks.bench_release import percentile
from benchmarks.bench_scale import code_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PREFIX = "bret"
AGENT = "r"
BATCH = 500
CONCURRENCY = 64
SETTLE_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0
WARM_HISTORY = 5
PAYLOADS = {"8 B": 8, "1 KB": 1024}
FIGURES = ("memory", "window", "audit")
MB = 1024 * 1024

# The targets: (key in the results, the bound, "max" or "min", the text).
TARGETS: list[dict[str, Any]] = [
    {"figure": "memory_delta_bytes", "max": 2 * MB, "unit": "bytes",
     "text": "used_memory after N jobs and every pass, minus at start, ≤ 2 MB"},
    {"figure": "window_bytes_per_job_8 B", "max": 1000, "unit": "bytes",
     "text": "bytes per completed job inside the window, 8 B payloads, ≤ 1,000"},
    {"figure": "window_bytes_per_job_1 KB", "max": 3100, "unit": "bytes",
     "text": "bytes per completed job inside the window, 1 KB task + result, ≤ 3,100"},
    {"figure": "archive_events_per_s", "min": 50_000, "unit": "events/s",
     "text": "archiving (Archiver.archive_all) ≥ 50,000 events/s"},
    {"figure": "replay_events_per_s", "min": 100_000, "unit": "events/s",
     "text": "replay from the archive (merged.replay) ≥ 100,000 events/s"},
    {"figure": "history_p50_ms", "max": 20.0, "unit": "ms",
     "text": "history of an archived job (Client.history) p50 ≤ 20 ms"},
    {"figure": "audit_peak_mb", "max": 150.0, "unit": "MB",
     "text": "audit verify peak memory (max RSS) ≤ 150 MB"},
    {"figure": "rebuild_peak_mb", "max": 150.0, "unit": "MB",
     "text": "projections rebuild peak memory (max RSS) ≤ 150 MB"},
    {"figure": "audit_events_per_s", "min": 100_000, "unit": "events/s",
     "text": "audit verify ≥ 100,000 events/s"},
]


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def payload(size: int) -> str:
    """A string whose JSON is ``size`` bytes long."""
    return "x" * (size - 2)


def error_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Settings:
    """What one run measures."""

    n: int = 200_000                 # jobs of the memory figure
    window_jobs: int = 20_000        # jobs per run of the window figure
    jobs: int = 1_000_000            # jobs of the audit figure
    runs: int = 3
    audit_runs: int = 1              # each takes minutes at 1,000,000 jobs
    history_samples: int = 200
    jobs_seconds: int = 5
    figures: tuple[str, ...] = FIGURES


def config(jobs_seconds: int, archive: str | None) -> Config:
    retention: dict[str, Any] = {"jobsSeconds": jobs_seconds}
    if archive is not None:
        retention["archive"] = archive
    return Config.model_validate({
        "keyPrefix": PREFIX,
        "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
        "jobs": {"maxAttempts": 1},
        "retention": retention,
    })


# -- Redis's memory ---------------------------------------------------------------------


async def used_memory(redis: Redis) -> int:
    """``used_memory`` after ``MEMORY PURGE``, less the script cache (as bench_memory)."""
    await redis.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"]) - int(info.get("used_memory_scripts", 0))


def kind_of(key: str, part: Partition) -> str:
    """What a key of the prefix holds, for the breakdown."""
    if key == part.log:
        return "log"
    if key.startswith(part.job_prefix):
        return "records"
    if key.startswith(part.spec_prefix):
        return "specs"
    if key.startswith(part.result_prefix):
        return "results"
    if key in part.ready_streams:
        return "ready streams"
    if ":idx:" in key:
        return "views"
    if key == part.ended:
        return "ended (archive bookkeeping)"
    if key.startswith(f"{PREFIX}:{{{AGENT}}}"):
        return "partition, other"
    return "global"


async def key_usage(redis: Redis, part: Partition) -> dict[str, int]:
    """``MEMORY USAGE key SAMPLES 0`` of every key of the prefix, summed by kind."""
    kinds: dict[str, int] = {}
    batch: list[str] = []

    async def measure() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.memory_usage(key, samples=0)
            sizes = await pipe.execute()
        for key, size in zip(batch, sizes, strict=True):
            kind = kind_of(key, part)
            kinds[kind] = kinds.get(kind, 0) + int(size or 0)
        batch.clear()

    async for key in redis.scan_iter(match=f"{PREFIX}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await measure()
    if batch:
        await measure()
    return kinds


# -- running jobs -----------------------------------------------------------------------


async def last_entry(redis: Redis, stream: str) -> str | None:
    found: list[tuple[str, Any]] = await redis.xrevrange(stream, count=1)  # type: ignore[assignment]
    return found[0][0] if found else None


async def settled(redis: Redis, part: Partition) -> bool:
    """Whether every group the archiving pass waits for has read and acknowledged
    the whole log."""
    last = await last_entry(redis, part.log)
    if last is None:
        return True
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(part.log)
    except ResponseError:
        return False
    found = {str(g["name"]): g for g in groups}
    return all(name in found and str(found[name]["last-delivered-id"]) == last
               and int(found[name]["pending"]) == 0 for name in GROUPS)


async def wait_until(check: Callable[[], Any], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def run_jobs(url: str, jobs: int, size: int, jobs_seconds: int) -> dict[str, Any]:
    """``jobs`` jobs dispatched while a worker completes them, until every group
    has read the log; returns the seconds it took and the server's time of the end."""
    value = payload(size)

    async def handler(job: Any) -> str:
        return value

    started = time.perf_counter()
    async with agentq.connect(url, config(jobs_seconds, None)) as q:
        part = q.partition(AGENT)
        runner = q.worker(AGENT, handler, concurrency=CONCURRENCY)
        running = asyncio.create_task(runner.run())
        try:
            for start in range(0, jobs, BATCH):
                await q.dispatch_many(
                    [{"target": AGENT, "task": value}] * min(BATCH, jobs - start))
                if running.done():
                    await running  # the worker failed: say why

            async def completed() -> bool:
                done = int(await q.redis.hget(part.counts, "completed") or 0)
                return done >= jobs or running.done()

            await wait_until(completed, f"{jobs:,} jobs completed",
                             SETTLE_TIMEOUT + jobs / 1000)
            if running.done():
                await running
            # The consumers follow a backlog of three events a job.
            await wait_until(lambda: settled(q.redis, part), "the consumer groups settled",
                             SETTLE_TIMEOUT + jobs / 1000)
        except BaseException:
            # Stopped (Ctrl-C) or failed midway: the worker's handlers stop at once and
            # its background consumers get a few seconds, not a backlog's catch-up.
            runner.stop(now=True)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(running, STOP_TIMEOUT)
            raise
        runner.stop()
        await running
        seconds, micros = await q.redis.time()
    return {"seconds": round(time.perf_counter() - started, 3),
            "ended_ms": int(seconds) * 1000 + int(micros) // 1000}


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


async def timed_pass(archiver: Archiver) -> tuple[Totals, float]:
    started = time.perf_counter()
    totals = await archiver.archive_all([AGENT])
    return totals, time.perf_counter() - started


# -- the memory figure (with archiving, replay and history) ------------------------------------


@contextlib.contextmanager
def archive_folder() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="agentq-bench-archive-") as tmp:
        yield (Path(tmp) / "archive").as_uri()


def folder_bytes(url: str) -> int:
    root = Path(url.removeprefix("file://"))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def memory_figure(settings: Settings) -> dict[str, Any]:
    n = settings.n
    with throwaway_redis() as url, archive_folder() as archive_url:
        cfg = config(settings.jobs_seconds, archive_url)
        async with agentq.connect(url, cfg) as q:
            await q.redis.config_set("latency-tracking", "no")
            await q.add_agent(AGENT)
            part = q.partition(AGENT)
            base = await used_memory(q.redis)
            note(f"  memory: {n:,} jobs")
            ran = await run_jobs(url, n, 8, settings.jobs_seconds)
            events = int(await q.redis.xlen(part.log))
            peak = await used_memory(q.redis)
            # Every job ended more than jobsSeconds ago (by the server's clock).
            seconds, micros = await q.redis.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            wait = ran["ended_ms"] + settings.jobs_seconds * 1000 + 500 - now_ms
            if wait > 0:
                await asyncio.sleep(wait / 1000)
            archive = open_archive(archive_url, q.keys.prefix)
            archiver = Archiver(q.redis, q.redis, q.keys, archive, cfg.retention)
            note(f"  memory: archiving {events:,} events")
            first, first_s = await timed_pass(archiver)
            second, _ = await timed_pass(archiver)
            after = await used_memory(q.redis)
            left = await key_usage(q.redis, part)
            result: dict[str, Any] = {
                "jobs": n, "events": events, "run_seconds": ran["seconds"],
                "used_memory_start": base, "used_memory_peak": peak,
                "used_memory_after": after, "memory_delta_bytes": after - base,
                "log_entries_left": int(await q.redis.xlen(part.log)),
                "keys_left_by_kind": left,
                "archive": {"events": first.events, "segments": first.segments,
                            "removed": first.removed, "trimmed": first.trimmed,
                            "seconds": round(first_s, 3), "held_back": first.held_back,
                            "busy": first.busy, "stuck": first.stuck,
                            "second_pass": asdict(second),
                            "archive_bytes": folder_bytes(archive_url)},
                "archive_events_per_s": rate(first.events, first_s),
            }
            # Replay: the log is empty, every event comes from the archive.
            replays = []
            for i in range(settings.runs):
                started = time.perf_counter()
                count = 0
                async for _ in merged.replay(q.redis, q.archive, [part]):
                    count += 1
                seconds_taken = time.perf_counter() - started
                replays.append({"events": count, "seconds": round(seconds_taken, 3),
                                "events_per_s": rate(count, seconds_taken)})
                note(f"  memory: replay {i + 1}: {count:,} events, {seconds_taken:.2f} s")
            result["replays"] = replays
            result["replay_events_per_s"] = statistics.median(r["events_per_s"] for r in replays)
            # History of archived jobs, chosen at random among those archived.
            result["history"] = await history_figure(q, settings.history_samples)
            result["history_p50_ms"] = result["history"].get("p50_ms")
    return result


async def archived_job_ids(q: agentq.Client) -> list[str]:
    """Every job id the archive holds (a read of its dispatches)."""
    ids = []
    async for event in merged.replay(q.redis, q.archive, [q.partition(AGENT)]):
        if event.type == "JobDispatched":
            ids.append(event.job_id)
    return ids


async def history_figure(q: agentq.Client, samples: int) -> dict[str, Any]:
    ids = await archived_job_ids(q)
    if not ids:
        return {"error": "the archive holds no job"}
    chosen = random.Random(1).choices(ids, k=samples + WARM_HISTORY)
    times: list[float] = []
    lengths: set[int] = set()
    for i, job_id in enumerate(chosen):
        started = time.perf_counter()
        history = await q.history(job_id)
        elapsed = (time.perf_counter() - started) * 1000
        lengths.add(len(history))
        if i >= WARM_HISTORY:
            times.append(elapsed)
    return {"n": len(times), "p50_ms": round(percentile(times, 50), 3),
            "p99_ms": round(percentile(times, 99), 3), "max_ms": round(max(times), 3),
            "events_per_history": sorted(lengths), "archived_jobs": len(ids)}


# -- the window figure --------------------------------------------------------------------


async def window_run(jobs: int, size: int, jobs_seconds: int) -> dict[str, Any]:
    with throwaway_redis() as url, archive_folder() as archive_url:
        cfg = config(jobs_seconds, archive_url)
        async with agentq.connect(url, cfg) as q:
            await q.redis.config_set("latency-tracking", "no")
            await q.add_agent(AGENT)
            part = q.partition(AGENT)
            base_kinds = await key_usage(q.redis, part)
            base = await used_memory(q.redis)
            await run_jobs(url, jobs, size, jobs_seconds)
            archiver = Archiver(q.redis, q.redis, q.keys,
                                open_archive(archive_url, q.keys.prefix), cfg.retention)
            totals = await archiver.archive_all([AGENT])
            kinds = await key_usage(q.redis, part)
            used = await used_memory(q.redis) - base
            total = sum(kinds.values()) - sum(base_kinds.values())
            return {"jobs": jobs, "events": int(await q.redis.xlen(part.log)),
                    "archived": totals.events, "removed": totals.removed,
                    "bytes_per_job": round(total / jobs, 1),
                    "used_memory_per_job": round(used / jobs, 1),
                    "by_kind_per_job": {k: round((v - base_kinds.get(k, 0)) / jobs, 1)
                                        for k, v in sorted(kinds.items())}}


async def window_figure(settings: Settings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, size in PAYLOADS.items():
        runs = []
        for i in range(settings.runs):
            note(f"  window: {name} payloads, run {i + 1}: {settings.window_jobs:,} jobs")
            runs.append(await window_run(settings.window_jobs, size, 3600))
        out[name] = {"runs": runs,
                     "bytes_per_job": statistics.median(r["bytes_per_job"] for r in runs),
                     "used_memory_per_job": statistics.median(r["used_memory_per_job"]
                                                              for r in runs)}
        out[f"window_bytes_per_job_{name}"] = out[name]["bytes_per_job"]
    return out


# -- the audit figure: audit verify and projections rebuild in child processes -------------------


def status_kb(field: str) -> int:
    """A KiB figure of /proc/self/status: ``VmRSS`` (resident now) or ``VmHWM`` (its
    peak). Not ``getrusage``'s ``ru_maxrss``: Linux carries that across exec, so a
    child started by a large parent reports the parent's size."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def child_work(what: str, url: str) -> dict[str, Any]:
    """In the child: ``audit verify`` or ``projections rebuild`` of the partition."""
    from agentq.projections.audit import verify
    from agentq.projections.rebuild import rebuild

    async with agentq.connect(url, config(0, None)) as q:
        parts = [q.partition(AGENT)]
        before = status_kb("VmRSS")
        started = time.perf_counter()
        if what == "audit":
            problems = await verify(q.redis, parts, None)
            out: dict[str, Any] = {"problems": len(problems), "first_problems": problems[:5]}
        else:
            out = {"applied": await rebuild(q.redis, parts)}
        out["seconds"] = time.perf_counter() - started
    out["rss_before_kb"] = before
    out["max_rss_kb"] = status_kb("VmHWM")
    return out


def in_child(what: str, url: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "benchmarks.bench_retention", "--child", what, "--url", url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{what} child exited {done.returncode}: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def audit_figure(settings: Settings) -> dict[str, Any]:
    jobs = settings.jobs
    with throwaway_redis() as url:
        async with agentq.connect(url, config(0, None)) as q:
            await q.add_agent(AGENT)
            part = q.partition(AGENT)
            note(f"  audit: {jobs:,} jobs")
            ran = await run_jobs(url, jobs, 8, 0)
            events = int(await q.redis.xlen(part.log))
            info: dict[str, Any] = await q.redis.info("memory")
        out: dict[str, Any] = {"jobs": jobs, "events": events, "run_seconds": ran["seconds"],
                               "used_memory": int(info["used_memory"])}
        for what in ("audit", "rebuild"):
            runs = []
            for i in range(settings.audit_runs):
                found = await asyncio.to_thread(in_child, what, url)
                found["events_per_s"] = rate(events, found["seconds"])
                found["peak_mb"] = round(found["max_rss_kb"] / 1024, 1)
                runs.append(found)
                note(f"  audit: {what} {i + 1}: {found['seconds']:.1f} s, "
                     f"peak {found['peak_mb']} MB")
            out[what] = {"runs": runs}
            out[f"{what}_events_per_s"] = statistics.median(r["events_per_s"] for r in runs)
            out[f"{what}_peak_mb"] = statistics.median(r["peak_mb"] for r in runs)
            out[f"{what}_rss_before_mb"] = round(
                statistics.median(r["rss_before_kb"] for r in runs) / 1024, 1)
    return out


# -- judging and the table ----------------------------------------------------------------------


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value, met or not (None: not measured)."""
    flat: dict[str, Any] = {}
    for section in results.values():
        if isinstance(section, dict):
            flat.update({k: v for k, v in section.items() if not isinstance(v, dict | list)})
    out = []
    for target in TARGETS:
        value = flat.get(target["figure"])
        met = None
        if value is not None:
            met = value <= target["max"] if "max" in target else value >= target["min"]
        out.append({**target, "value": value, "met": met})
    return out


def shown(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "bytes":
        return f"{value / MB:,.2f} MB" if abs(value) >= MB else f"{value:,.0f} B"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.1f} MB"
    return f"{value:,.0f}/s"


def _measured_at(figure: str, data: dict[str, Any]) -> str:
    """How many jobs a figure of ``data`` was measured with."""
    results, params = data["results"], data["params"]
    if figure.startswith("window"):
        return f"{params['window_jobs']:,} jobs"
    section = results.get("audit" if figure.startswith(("audit", "rebuild")) else "memory")
    return f"{section['jobs']:,} jobs" if section and "jobs" in section else ""


def readme_section(results_dir: Path, root: Path) -> list[str]:
    """Markdown for the README: each target from the newest ``retention-*.json`` that
    measured it (a run with ``--only`` measures some)."""
    found: dict[str, tuple[dict[str, Any], Path, dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("retention-*.json"), reverse=True):
        data = json.loads(path.read_text())
        for judged in data["targets"]:
            if judged["value"] is not None:
                found.setdefault(judged["figure"], (judged, path, data))
    if not found:
        return []
    lines = ["", "### Retention and the archive (issue 14's targets)", "",
             "| target | measured | met | with | source |", "|---|---:|:---:|---:|---|"]
    for target in TARGETS:
        if target["figure"] not in found:
            lines.append(f"| {target['text']} | not measured | - | | |")
            continue
        judged, path, data = found[target["figure"]]
        met = "met" if judged["met"] else "**missed**"
        lines.append(f"| {target['text']} | {shown(judged['value'], judged['unit'])} | {met} | "
                     f"{_measured_at(target['figure'], data)} | "
                     f"`{path.relative_to(root)}` |")
    lines += ["", "`python -m benchmarks.bench_retention` (see its docstring for what each "
              "figure is and its flags); each figure from the newest run that measured it. "
              "The rates move with the machine's hour: on this shared 2-core machine "
              "archiving ran at 84,651 events/s on 2026-12-04 and at 49,727-55,671 on "
              "2026-12-05 (50,000 jobs, six runs, d78d8bf and 62abc96 in turn, equal), "
              "so only runs of the same hour compare; the byte figures do not move."]
    return lines


def render(data: dict[str, Any]) -> list[str]:
    results, params = data["results"], data["params"]
    lines = ["", "| target | measured | met |", "|---|---:|:---:|"]
    for judged in data["targets"]:
        met = {True: "met", False: "**missed**", None: "-"}[judged["met"]]
        lines.append(f"| {judged['text']} | {shown(judged['value'], judged['unit'])} | {met} |")
    memory = results.get("memory")
    if memory and "error" not in memory:
        lines += ["", f"memory: {memory['jobs']:,} jobs, {memory['events']:,} events; "
                  f"used_memory start {memory['used_memory_start'] / MB:,.2f} MB, "
                  f"with the jobs {memory['used_memory_peak'] / MB:,.1f} MB, after "
                  f"{memory['used_memory_after'] / MB:,.2f} MB; archived "
                  f"{memory['archive']['events']:,} events in {memory['archive']['seconds']} s "
                  f"({memory['archive']['segments']} segments, "
                  f"{memory['archive']['archive_bytes'] / MB:,.1f} MB on disk), removed "
                  f"{memory['archive']['removed']:,} jobs, trimmed "
                  f"{memory['archive']['trimmed']:,} entries; history p99 "
                  f"{memory['history'].get('p99_ms')} ms"]
    window = results.get("window")
    if window and "error" not in window:
        for name in PAYLOADS:
            kinds = window[name]["runs"][0]["by_kind_per_job"]
            lines.append(f"window {name} ({params['window_jobs']:,} jobs): "
                         f"{window[name]['bytes_per_job']:,.0f} B/job by MEMORY USAGE "
                         f"(used_memory {window[name]['used_memory_per_job']:,.0f}): "
                         + ", ".join(f"{k} {v:,.0f}" for k, v in kinds.items() if v))
    audit = results.get("audit")
    if audit and "error" not in audit:
        lines.append(f"audit: {audit['jobs']:,} jobs, {audit['events']:,} events; verify "
                     f"{audit['audit_events_per_s']:,.0f} events/s, peak "
                     f"{audit['audit_peak_mb']} MB (before the work "
                     f"{audit['audit_rss_before_mb']} MB); rebuild "
                     f"{audit['rebuild_events_per_s']:,.0f} events/s, peak "
                     f"{audit['rebuild_peak_mb']} MB")
    for name, section in results.items():
        if isinstance(section, dict) and "error" in section:
            lines.append(f"{name}: failed: {section['error']}")
    return lines


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, one run each: a smoke run")
    parser.add_argument("--n", type=int, help="jobs of the memory figure (default 200,000)")
    parser.add_argument("--window-jobs", type=int,
                        help="jobs per run of the window figure (default 20,000)")
    parser.add_argument("--jobs", type=int,
                        help="jobs of the audit figure (default 1,000,000)")
    parser.add_argument("--runs", type=int, help="runs per median (default 3)")
    parser.add_argument("--audit-runs", type=int,
                        help="runs of audit verify and of rebuild, median (default 1)")
    parser.add_argument("--history-samples", type=int, help="history calls timed (200)")
    parser.add_argument("--only", help=f"some of {','.join(FIGURES)} (default all)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", choices=("audit", "rebuild"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings = Settings(n=5_000, window_jobs=2_000, jobs=20_000, runs=1, history_samples=50)
    for name in ("n", "window_jobs", "jobs", "runs", "audit_runs", "history_samples"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.only:
        figures = tuple(f.strip() for f in args.only.split(",") if f.strip())
        if set(figures) - set(FIGURES):
            parser.error(f"--only takes some of {','.join(FIGURES)}")
        settings.figures = figures
    if min(settings.n, settings.window_jobs, settings.jobs, settings.runs,
           settings.audit_runs, settings.history_samples) < 1:
        parser.error("sizes and --runs must be at least 1")
    return args, settings


async def run(settings: Settings, save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Each scenario in turn; ``save`` is given the results after each, so a run
    stopped midway keeps what it measured."""
    figures: dict[str, Callable[[Settings], Any]] = {
        "memory": memory_figure, "window": window_figure, "audit": audit_figure}
    results: dict[str, Any] = {}
    for name in settings.figures:
        note(f"{name}:")
        started = time.perf_counter()
        try:
            results[name] = await figures[name](settings)
        except Exception as exc:
            results[name] = {"error": error_of(exc)}
            note(f"  {name} failed: {results[name]['error']}")
        results[name]["wall_seconds"] = round(time.perf_counter() - started, 1)
        save(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(child_work(args.child, args.url))))
        return 0
    started_at = datetime.now(UTC)
    info = machine_info()
    with contextlib.suppress(Exception):
        info["redis_server"] = redis_server_version()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"retention-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    data: dict[str, Any] = {
        "benchmark": "retention",
        "quick": args.quick,
        "started_at": started_at.isoformat(),
        "code": code_info(None),
        "params": {**asdict(settings), "figures": list(settings.figures)},
        "machine": info,
    }

    def save(results: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            info["loadavg_after"] = list(os.getloadavg())
        data.update(finished_at=datetime.now(UTC).isoformat(), results=results,
                    targets=judge(results),
                    complete=set(results) == set(settings.figures))
        path.write_text(json.dumps(data, indent=2) + "\n")

    asyncio.run(run(settings, save))
    print("\n".join(render(data)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
