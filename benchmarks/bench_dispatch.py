"""agentq's dispatch path against raw Redis, on the same throwaway server, in the same run.

    .venv/bin/python -m benchmarks.bench_dispatch [--n 20000] [--runs 3] [--rt-n 1000]
                                                  [--profile 5000]

Throughput figures (each run ``--runs`` times, interleaved A B C D E A B C D E ...,
FLUSHALL before each measurement; median and min-max reported):

  raw_xadd_pipelined16   XADD of a small entry, 16 per pipeline execute          ops/s
  raw_xadd_unpipelined   XADD of a small entry, one await per command            ops/s
  dispatch               Client.dispatch in a sequential loop, one await per job jobs/s
  dispatch_many_16       Client.dispatch_many, batches of 16, one target agent   jobs/s
  dispatch_many_500      Client.dispatch_many, batches of 500, one target agent  jobs/s

Round trips are counted exactly: every call of redis-py's asyncio
``send_packed_command`` (one write of one command or of a whole pipeline,
followed by reading its replies) is one round trip. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import json
import logging
import os
import platform
import pstats
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_dispatch.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.asyncio.connection as aconn
import redis.utils

import agentq
from agentq.eventlog.connection import RedisTarget, open_redis
from agentq.eventlog.scripts import SCRIPT_NAMES, script_source
from agentq.schemas.config import Config
from benchmarks._server import redis_server_version, throwaway_redis

RESULTS_DIR = Path(__file__).resolve().parent / "results"
AGENT = "a"
TASK = "summarize the benchmark input"
# The raw baseline's entry: the shape of a ready-stream entry (field "j", a job id).
RAW_STREAM = "bench:{a}:raw"
RAW_ENTRY: dict[Any, Any] = {"j": "j_01J00000000000000000000000.a"}
WARMUP = 200


def bench_config(dispatches_per_minute: int = 0) -> Config:
    return Config.model_validate(
        {
            "keyPrefix": "bench",
            "rateLimit": {"dispatchesPerMinute": dispatches_per_minute, "maxQueueDepth": 0},
        }
    )


# -- progress ------------------------------------------------------------------


class Progress:
    """Progress lines on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


progress = Progress()


# -- interruption ----------------------------------------------------------------
#
# Ctrl-C must stop the benchmark (and with it the throwaway server) promptly. asyncio.run's
# own SIGINT handling cancels the main task, but on Python 3.11 that cancellation is often
# swallowed inside redis-py (asyncio.wait_for around every socket write when socket_timeout
# is set, CPython gh-86296), and the run just carries on. So SIGINT and SIGTERM raise
# KeyboardInterrupt directly, and every timed loop also checks a flag once per iteration.

_interrupted = False


def _interrupt(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    # Tasks torn down mid-write would log "exception was never retrieved": expected here.
    logging.getLogger("asyncio").disabled = True
    raise KeyboardInterrupt


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


# -- throughput measurements --------------------------------------------------


@dataclass(frozen=True)
class Sample:
    count: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def _batches(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]


async def _timed(body: Callable[[], Awaitable[None]], count: int) -> Sample:
    gc.collect()
    start = time.perf_counter()
    await body()
    return Sample(count, time.perf_counter() - start)


async def raw_xadd(url: str, n: int, depth: int) -> Sample:
    """XADD ``n`` small entries, ``depth`` per pipeline (1: one await per command).

    The client is opened exactly as agentq opens its own (eventlog.connection.open_redis),
    so the only difference from the agentq figures is agentq's own work.
    """
    r = open_redis(RedisTarget(url=url))
    try:
        if depth == 1:

            async def body() -> None:
                for _ in range(n):
                    check_interrupted()
                    await r.xadd(RAW_STREAM, RAW_ENTRY)

        else:
            sizes = _batches(n, depth)

            async def body() -> None:
                for size in sizes:
                    check_interrupted()
                    async with r.pipeline(transaction=False) as pipe:
                        for _ in range(size):
                            pipe.xadd(RAW_STREAM, RAW_ENTRY)
                        await pipe.execute()

        for _ in range(WARMUP):
            await r.xadd(RAW_STREAM + ":warmup", RAW_ENTRY)
        sample = await _timed(body, n)
        written = await r.xlen(RAW_STREAM)
        if written != n:
            raise AssertionError(f"raw XADD wrote {written} entries, expected {n}")
        return sample
    finally:
        await r.aclose()


def _items(size: int) -> list[dict[str, Any]]:
    return [{"target": AGENT, "task": TASK} for _ in range(size)]


async def _ready_count(q: agentq.Client) -> int:
    return int(await q.redis.xlen(q.partition(AGENT).ready("normal")))


async def agentq_dispatch(url: str, n: int, batch: int) -> Sample:
    """Dispatch ``n`` jobs to one agent: ``batch`` 1 is Client.dispatch in a loop,
    larger batches are Client.dispatch_many."""
    async with agentq.connect(url, bench_config()) as q:
        await q.add_agent(AGENT)
        if batch == 1:
            for _ in range(WARMUP):
                await q.dispatch(AGENT, TASK)

            async def body() -> None:
                for _ in range(n):
                    check_interrupted()
                    await q.dispatch(AGENT, TASK)

            warm = WARMUP
        else:
            warm_items = _items(batch)
            warm = 0
            while warm < WARMUP:
                await q.dispatch_many(warm_items)
                warm += batch
            sizes = _batches(n, batch)
            full = _items(batch)
            chunks = [full if size == batch else _items(size) for size in sizes]

            async def body() -> None:
                for chunk in chunks:
                    check_interrupted()
                    await q.dispatch_many(chunk)

        sample = await _timed(body, n)
        queued = await _ready_count(q)
        if queued != n + warm:
            raise AssertionError(f"agentq queued {queued} jobs, expected {n + warm}")
        return sample


@dataclass(frozen=True)
class Measurement:
    name: str
    label: str
    unit: str
    run: Callable[[str, int], Awaitable[Sample]]


MEASUREMENTS: tuple[Measurement, ...] = (
    Measurement("raw_xadd_pipelined16", "raw XADD, pipelined 16 deep", "ops/s",
                lambda url, n: raw_xadd(url, n, 16)),
    Measurement("raw_xadd_unpipelined", "raw XADD, one await each", "ops/s",
                lambda url, n: raw_xadd(url, n, 1)),
    Measurement("dispatch", "agentq dispatch, sequential", "jobs/s",
                lambda url, n: agentq_dispatch(url, n, 1)),
    Measurement("dispatch_many_16", "agentq dispatch_many, batch 16", "jobs/s",
                lambda url, n: agentq_dispatch(url, n, 16)),
    Measurement("dispatch_many_500", "agentq dispatch_many, batch 500", "jobs/s",
                lambda url, n: agentq_dispatch(url, n, 500)),
)  # fmt: skip
BASELINES = ("raw_xadd_pipelined16", "raw_xadd_unpipelined")


async def flushall(url: str) -> None:
    r = open_redis(RedisTarget(url=url))
    try:
        await r.flushall()
    finally:
        await r.aclose()


async def throughput(url: str, n: int, runs: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {m.name: [] for m in MEASUREMENTS}
    for run in range(1, runs + 1):
        for m in MEASUREMENTS:
            await flushall(url)
            sample = await m.run(url, n)
            samples[m.name].append(sample)
            progress(
                f"run {run}/{runs}  {m.label:<34} {sample.rate:>10,.0f} {m.unit}"
                f"  ({sample.seconds:.2f} s)"
            )
    await flushall(url)
    return samples


# -- round trips -----------------------------------------------------------------


def _script_names() -> dict[str, str]:
    """EVALSHA sha -> agentq script name, to label round trips."""
    return {hashlib.sha1(script_source(name).encode()).hexdigest(): name for name in SCRIPT_NAMES}


def _parse_commands(buf: bytes, shas: dict[str, str]) -> list[str]:
    """The commands in one packed write (RESP arrays of bulk strings), as labels."""
    labels: list[str] = []
    i = 0
    while i < len(buf):
        if buf[i : i + 1] != b"*":
            raise ValueError(f"unexpected RESP at {i}: {buf[i : i + 20]!r}")
        j = buf.index(b"\r\n", i)
        argc = int(buf[i + 1 : j])
        i = j + 2
        head: list[bytes] = []
        for k in range(argc):
            j = buf.index(b"\r\n", i)
            length = int(buf[i + 1 : j])
            i = j + 2
            if k < 2:
                head.append(buf[i : i + length])
            i += length + 2
        name = head[0].decode().upper()
        if name in ("EVALSHA", "EVALSHA_RO") and len(head) > 1:
            name += " " + shas.get(head[1].decode(), head[1].decode()[:8])
        elif name in ("SCRIPT", "CLIENT", "CONFIG", "COMMAND") and len(head) > 1:
            name += " " + head[1].decode().upper()
        labels.append(name)
    return labels


class RoundTripCounter:
    """Counts ``send_packed_command`` calls on every asyncio connection while active."""

    def __init__(self) -> None:
        self.shas = _script_names()
        self.active = False
        self.round_trips = 0
        self.commands = 0
        self.kinds: Counter[str] = Counter()

    def reset(self) -> None:
        self.round_trips = 0
        self.commands = 0
        self.kinds = Counter()

    def record(self, command: Any) -> None:
        if isinstance(command, str):
            buf = command.encode()
        elif isinstance(command, (bytes, bytearray, memoryview)):
            buf = bytes(command)
        else:
            buf = b"".join(bytes(part) for part in command)
        labels = _parse_commands(buf, self.shas)
        self.round_trips += 1
        self.commands += len(labels)
        if len(labels) == 1:
            kind = labels[0]
        else:
            parts = ", ".join(f"{c}x{name}" for name, c in Counter(labels).items())
            kind = f"pipeline[{parts}]"
        self.kinds[kind] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[RoundTripCounter]:
        owner = next(cls for cls in aconn.Connection.__mro__ if "send_packed_command" in vars(cls))
        original = vars(owner)["send_packed_command"]
        counter = self

        async def counting(self: Any, command: Any, check_health: bool = True) -> None:
            if counter.active:
                counter.record(command)
            await original(self, command, check_health)

        setattr(owner, "send_packed_command", counting)  # noqa: B010
        try:
            yield self
        finally:
            setattr(owner, "send_packed_command", original)  # noqa: B010

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        self.reset()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def result(self, units: int, calls: int) -> dict[str, Any]:
        return {
            "units": units,
            "calls": calls,
            "round_trips": self.round_trips,
            "commands": self.commands,
            "round_trips_per_unit": self.round_trips / units,
            "round_trips_per_call": self.round_trips / calls,
            "commands_per_unit": self.commands / units,
            "breakdown": dict(self.kinds.most_common()),
        }


async def _count_raw(counter: RoundTripCounter, url: str, n: int, depth: int) -> dict[str, Any]:
    r = open_redis(RedisTarget(url=url))
    try:
        await r.ping()
        sizes = _batches(n, depth)
        with counter.counting():
            for size in sizes:
                check_interrupted()
                if depth == 1:
                    await r.xadd(RAW_STREAM, RAW_ENTRY)
                else:
                    async with r.pipeline(transaction=False) as pipe:
                        for _ in range(size):
                            pipe.xadd(RAW_STREAM, RAW_ENTRY)
                        await pipe.execute()
        return counter.result(n, len(sizes))
    finally:
        await r.aclose()


async def _count_agentq(
    counter: RoundTripCounter, url: str, n: int, batch: int, per_minute: int
) -> dict[str, Any]:
    async with agentq.connect(url, bench_config(per_minute)) as q:
        await q.add_agent(AGENT)
        # Warm up: connection made, scripts loaded, allow list cached.
        if batch == 1:
            await q.dispatch(AGENT, TASK)
        else:
            await q.dispatch_many(_items(min(batch, 16)))
        sizes = _batches(n, batch)
        start = time.perf_counter()
        with counter.counting():
            for size in sizes:
                check_interrupted()
                if batch == 1:
                    await q.dispatch(AGENT, TASK)
                else:
                    await q.dispatch_many(_items(size))
        out = counter.result(n, len(sizes))
        out["seconds"] = time.perf_counter() - start
        return out


async def round_trips(url: str, n: int) -> dict[str, dict[str, Any]]:
    counter = RoundTripCounter()
    cases: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("raw_xadd_unpipelined", lambda: _count_raw(counter, url, n, 1)),
        ("raw_xadd_pipelined16", lambda: _count_raw(counter, url, n, 16)),
        ("dispatch, rate limit 0", lambda: _count_agentq(counter, url, n, 1, 0)),
        ("dispatch, rate limit 1000000/min",
         lambda: _count_agentq(counter, url, n, 1, 1_000_000)),
        ("dispatch_many 16, rate limit 0", lambda: _count_agentq(counter, url, n, 16, 0)),
        ("dispatch_many 500, rate limit 0", lambda: _count_agentq(counter, url, n, 500, 0)),
        ("dispatch_many 500, rate limit 1000000/min",
         lambda: _count_agentq(counter, url, n, 500, 1_000_000)),
    ]  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    with counter.installed():
        for name, case in cases:
            await flushall(url)
            out[name] = await case()
            progress(f"round trips  {name:<44} {out[name]['round_trips_per_unit']:.3f} per op")
    await flushall(url)
    return out


# -- profile -----------------------------------------------------------------------

PROJECT_DIRS = ("agentq", "eventlog", "schemas")


async def profile_dispatch(url: str, n: int) -> dict[str, Any]:
    """cProfile ``n`` sequential dispatches; the project's functions by cumulative time."""
    await flushall(url)
    profiler = cProfile.Profile()
    async with agentq.connect(url, bench_config()) as q:
        await q.add_agent(AGENT)
        for _ in range(WARMUP):
            await q.dispatch(AGENT, TASK)
        gc.collect()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(n):
            check_interrupted()
            await q.dispatch(AGENT, TASK)
        profiler.disable()
        seconds = time.perf_counter() - start
    await flushall(url)
    stats = pstats.Stats(profiler)
    root = Path(agentq.__file__).resolve().parent.parent
    rows = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        path = Path(filename)
        try:
            rel = path.resolve().relative_to(root)
        except (ValueError, OSError):
            rel = None
        rows.append({
            "function": f"{rel or filename}:{line}({func})",
            "project": rel is not None and rel.parts[0] in PROJECT_DIRS,
            "calls": nc,
            "tottime": tt,
            "cumtime": ct,
        })  # fmt: skip
    project = sorted((r for r in rows if r["project"]), key=lambda r: -r["cumtime"])
    by_self = sorted(rows, key=lambda r: -r["tottime"])
    return {
        "dispatches": n,
        "seconds_under_profiler": seconds,
        "project_by_cumtime": project[:25],
        "all_by_tottime": by_self[:25],
    }


# -- report ------------------------------------------------------------------------


def summarize(samples: dict[str, list[Sample]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for m in MEASUREMENTS:
        rates = [s.rate for s in samples[m.name]]
        summary[m.name] = {
            "label": m.label,
            "unit": m.unit,
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
        }
    for entry in summary.values():
        for base in BASELINES:
            entry[f"ratio_to_{base}"] = entry["median"] / summary[base]["median"]
    return summary


def machine_info(url: str) -> dict[str, Any]:
    sync = redis.Redis.from_url(url)
    try:
        server = sync.info("server")
    finally:
        sync.close()
    try:
        import hiredis

        hiredis_version: str | None = hiredis.__version__
    except ImportError:
        hiredis_version = None
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "redis_server": str(server.get("redis_version")),
        "redis_server_build": redis_server_version(),
        "redis_py": redis.__version__,
        "hiredis": hiredis_version,
        "hiredis_used": bool(redis.utils.HIREDIS_AVAILABLE),
        "async_parser": aconn.DefaultParser.__name__,
        "agentq": metadata.version("agentq"),
        "event_loop": type(asyncio.get_event_loop_policy()).__name__,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def render_table(summary: dict[str, dict[str, Any]], n: int, runs: int) -> str:
    head = ("figure", "unit", "median", "min - max", "/ raw pipe16", "/ raw unpiped")
    rows = [head]
    for m in MEASUREMENTS:
        s = summary[m.name]
        rows.append((
            s["label"],
            s["unit"],
            _fmt_rate(s["median"]),
            f"{_fmt_rate(s['min'])} - {_fmt_rate(s['max'])}",
            f"{s['ratio_to_raw_xadd_pipelined16']:.3f}x",
            f"{s['ratio_to_raw_xadd_unpipelined']:.3f}x",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"Throughput: N={n:,} per run, {runs} runs interleaved; median and min - max"]
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_round_trips(rt: dict[str, dict[str, Any]], n: int) -> str:
    lines = [f"Round trips (send_packed_command calls), {n:,} operations per case"]
    width = max(len(k) for k in rt)
    lines.append(
        f"{'case':<{width}}  {'calls':>6}  {'round trips':>11}  {'per op':>7}  "
        f"{'per call':>8}  {'cmds/op':>7}  breakdown"
    )
    for name, r in rt.items():
        breakdown = "; ".join(f"{k}: {v}" for k, v in r["breakdown"].items())
        lines.append(
            f"{name:<{width}}  {r['calls']:>6}  {r['round_trips']:>11}  "
            f"{r['round_trips_per_unit']:>7.3f}  {r['round_trips_per_call']:>8.3f}  "
            f"{r['commands_per_unit']:>7.3f}  {breakdown}"
        )
    return "\n".join(lines)


def render_profile(profile: dict[str, Any], top: int = 15) -> str:
    lines = [
        f"cProfile of {profile['dispatches']:,} sequential dispatches "
        f"({profile['seconds_under_profiler']:.2f} s under the profiler); "
        f"project functions by cumulative time"
    ]
    lines.append(f"{'cumtime':>8}  {'tottime':>8}  {'calls':>8}  function")
    for r in profile["project_by_cumtime"][:top]:
        lines.append(
            f"{r['cumtime']:>8.3f}  {r['tottime']:>8.3f}  {r['calls']:>8}  {r['function']}"
        )
    lines.append("")
    lines.append("all functions by own time (tottime)")
    lines.append(f"{'tottime':>8}  {'cumtime':>8}  {'calls':>8}  function")
    for r in profile["all_by_tottime"][:top]:
        lines.append(
            f"{r['tottime']:>8.3f}  {r['cumtime']:>8.3f}  {r['calls']:>8}  {r['function']}"
        )
    return "\n".join(lines)


def write_results(data: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"dispatch-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


# -- main --------------------------------------------------------------------------


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    started = datetime.now(UTC)
    data: dict[str, Any] = {
        "benchmark": "dispatch",
        "started_at": started.isoformat(),
        "params": {
            "n": args.n,
            "runs": args.runs,
            "rt_n": args.rt_n,
            "profile": args.profile,
            "warmup": WARMUP,
            "order": [m.name for m in MEASUREMENTS],
        },
        "config": bench_config().wire(),
        "machine": machine_info(url),
    }
    if args.runs > 0:
        samples = await throughput(url, args.n, args.runs)
        summary = summarize(samples)
        data["samples"] = {
            name: [
                {"run": i + 1, "count": s.count, "seconds": s.seconds, "rate": s.rate}
                for i, s in enumerate(runs)
            ]
            for name, runs in samples.items()
        }
        data["summary"] = summary
        print(render_table(summary, args.n, args.runs), flush=True)
        print(flush=True)
    if args.rt_n > 0:
        rt = await round_trips(url, args.rt_n)
        data["round_trips"] = rt
        print(render_round_trips(rt, args.rt_n), flush=True)
        print(flush=True)
    if args.profile > 0:
        prof = await profile_dispatch(url, args.profile)
        data["profile"] = prof
        print(render_profile(prof), flush=True)
        print(flush=True)
    data["machine"]["loadavg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    data["finished_at"] = datetime.now(UTC).isoformat()
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks.bench_dispatch",
        description="agentq dispatch throughput and round trips against raw Redis XADD.",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=20_000,
        help="operations per throughput measurement (default 20000)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="interleaved runs of each measurement (default 3; 0 skips)",
    )
    parser.add_argument(
        "--rt-n",
        type=int,
        default=1_000,
        help="operations per round-trip count (default 1000; 0 skips)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also cProfile N sequential dispatches (default 0: off)",
    )
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help=f"where the JSON goes (default {RESULTS_DIR})",
    )
    parser.add_argument(
        "--redis-server", default=None, help="redis-server binary (default $REDIS_SERVER or PATH)"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.runs < 0 or args.rt_n < 0 or args.profile < 0:
        parser.error("--n must be positive; --runs, --rt-n and --profile not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Installed before asyncio.run, which then leaves SIGINT alone (see _interrupt).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with throwaway_redis(binary=args.redis_server) as url:
            progress(f"redis-server at {url}")
            data = asyncio.run(run(args, url))
    except KeyboardInterrupt:
        print("interrupted; the throwaway redis-server was stopped", file=sys.stderr)
        return 130
    path = write_results(data, args.results_dir)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
