"""agentq at scale: 1, 10, 100 and 1,000 agents, on one redis-server and on a 3-master cluster.

    .venv/bin/python -m benchmarks.bench_scale                     # the full run (~12 min)
    .venv/bin/python -m benchmarks.bench_scale --quick             # a smoke run (~30 s)
    .venv/bin/python -m benchmarks.bench_scale --backends server --counts 1,1000

For each backend (``server``: a throwaway ``redis-server``, ``benchmarks/_server.py``;
``cluster``: a local cluster of 3 masters and 3 replicas, ``benchmarks/_cluster.py``) and
each agent count, with that many agents registered (ids ``s0000``, ``s0001``, …):

idle      One ``agentq run`` process (a config that names no handlers: it hosts only the
          background work) is started, left to settle, then the servers' ``INFO stats``
          ``total_commands_processed`` is read every ``--window`` seconds: commands/s per
          window, summed over the masters, minus the bench's own ``INFO`` calls; the figure
          is the median of the windows. CPU % of that process comes from ``/proc/<pid>/stat``
          (user + system time over the same wall time). At the largest count, four such
          processes run together and are measured the same way. What the servers count with
          no agentq process at all (the baseline: on a cluster, each replica's REPLCONF ACK
          every second) is measured once per backend and subtracted.
latency   With that process still running (it is the only host of the background work)
          and a worker in this process for up to three "hot" agents (on different masters
          of a cluster), one call at a time:
          - dispatch + wait: ``dispatch`` to a hot agent, ``wait`` until its worker completed
            the job; wall time in this process; measured again (not a target) with the
            workers' runner hosting the background work too, as ``agentq worker`` does;
          - dependency release: a dependency on a hot agent, a dependent on another agent
            (chosen at random; the same agent when there is only one), released by the
            dependency's completion, as ``bench_release`` does: the dependent's
            ``JobQueued.at`` minus the dependency's ``JobCompleted.at`` (Redis ``TIME``);
          - delayed jobs: jobs to random agents with delays spread over ``--spread``
            seconds; lateness is each job's ``JobQueued.at`` minus the ``runAt`` its
            ``JobDispatched`` asked for (both by Redis ``TIME``);
          - ``list`` (no filter, limit 20), ``activity`` of one agent and of all agents:
            latency p50 (after the workers stopped), and the Redis commands and round trips
            per call, counted in this process on every connection's writes (the counter of
            ``bench_dispatch``), which does not see the background process's commands.

A figure that fails (the system is broken at that size, or on a cluster) is recorded with its
error and the run goes on. Each figure's samples are bounded by a count and by a time budget,
so one slow figure cannot hold up the run. The cluster's figures are also given as ratios to
one server's, and the issue's targets (``TARGETS``) are judged at the largest count.

Writes ``benchmarks/results/scale-<UTC timestamp>[-<label>].json``; ``--label before`` names
the run that measured the code before a change (``benchmarks.readme_table`` shows the newest
unlabelled run next to the newest ``before`` run).
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
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_scale.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aredis
from redis.crc import key_slot

import agentq
from agentq._runner import WorkerSpec
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from benchmarks._server import machine_info, redis_server_version, throwaway_redis
from benchmarks.bench_dispatch import RoundTripCounter
from benchmarks.bench_release import Gate, percentile

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bscale"
COUNTS = (1, 10, 100, 1000)
BACKENDS = ("server", "cluster")
HOT_AGENTS = 3
CONCURRENCY = 4
REGISTER_TIMEOUT = 10.0
RELEASE_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
CONFIG: dict[str, Any] = {
    "keyPrefix": PREFIX,
    "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0},
    "limits": {"maxDepth": 100},
    "jobs": {"maxAttempts": 1},
}

# The targets: (figure, what is compared, the bound). "value" figures are judged at
# the largest count; "flat" compares the largest count with 1 agent; "four" the four idle
# processes with one; "cluster" every figure of the cluster with one server's.
TARGETS: list[dict[str, Any]] = [
    {"figure": "idle", "kind": "flat", "max": 2.0,
     "text": "idle commands/s of one process, 1,000 agents ÷ 1 agent ≤ 2x"},
    {"figure": "idle_four", "kind": "four", "max": 1.5,
     "text": "4 idle processes ÷ 1 (1,000 agents) ≤ 1.5x"},
    {"figure": "delayed", "stat": "p99_ms", "kind": "value", "max": 20.0,
     "text": "delayed job queued after due, p99 ≤ 20 ms"},
    {"figure": "release", "stat": "p99_ms", "kind": "value", "max": 10.0,
     "text": "dependency release p99 ≤ 10 ms"},
    {"figure": "dispatch_wait", "stat": "p99_ms", "kind": "value", "max": 10.0,
     "text": "dispatch + wait p99 ≤ 10 ms"},
    {"figure": "list", "stat": "p50_ms", "kind": "value", "max": 10.0,
     "text": "list (no filter, limit 20) p50 ≤ 10 ms"},
    {"figure": "activity_one", "stat": "p50_ms", "kind": "value", "max": 5.0,
     "text": "activity of one agent p50 ≤ 5 ms"},
    {"figure": "activity_all", "stat": "p50_ms", "kind": "value", "max": 50.0,
     "text": "activity of all agents p50 ≤ 50 ms"},
]
CLUSTER_RATIO_MAX = 1.5
IDLE_FLOOR = 1.0  # commands/s: the least an idle rate counts for in a ratio
# The number each figure is judged and compared by.
MAIN_STAT = {"idle": "commands_per_s", "idle_four": "commands_per_s", "delayed": "p99_ms",
             "release": "p99_ms", "dispatch_wait": "p99_ms", "dispatch_wait_hosting": "p99_ms",
             "list": "p50_ms",
             "activity_one": "p50_ms", "activity_all": "p50_ms"}


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def agent_ids(count: int) -> list[str]:
    return [f"s{i:04d}" for i in range(count)]


def summarize(values_ms: list[float]) -> dict[str, Any]:
    return {
        "n": len(values_ms),
        "p50_ms": round(percentile(values_ms, 50), 3),
        "p90_ms": round(percentile(values_ms, 90), 3),
        "p99_ms": round(percentile(values_ms, 99), 3),
        "mean_ms": round(statistics.fmean(values_ms), 3),
        "max_ms": round(max(values_ms), 3),
    }


def error_of(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Settings:
    """What one run measures and for how long."""

    counts: list[int]
    backends: list[str]
    settle: float = 8.0             # seconds after an idle process started, plus per agent:
    settle_per_agent: float = 0.008
    four_settle: float = 10.0       # more for four processes, to share out the work
    windows: int = 4
    window: float = 5.0
    four: bool = True
    hosting_settle: float = 3.0     # before dispatch + wait with the worker hosting too
    samples: int = 1000             # per latency figure: a p99 of 1,000 is its 10th slowest
    budget: float = 30.0            # seconds of sampling per figure, after which it stops
    view_calls: int = 300           # calls per list/activity figure (its p50 is of these)
    spread: float = 2.5             # delayed jobs' delays lie in 0.3 .. 0.3 + spread s
    seed: int = 1


# -- the servers -------------------------------------------------------------------------


@dataclass
class Backend:
    """A running Redis (one server or a cluster): agentq's URL, and its masters."""

    name: str
    url: str
    masters: list[tuple[str, int]]
    slots: list[tuple[int, int, tuple[str, int]]] = field(default_factory=list)

    def node_of(self, agent: str) -> tuple[str, int]:
        """The master that holds ``agent``'s partition (every key of it shares ``{agent}``)."""
        if not self.slots:
            return self.masters[0]
        slot = key_slot(f"{PREFIX}:{{{agent}}}:log".encode())
        return next(node for start, end, node in self.slots if start <= slot <= end)


async def cluster_slots(host: str, port: int) -> list[tuple[int, int, tuple[str, int]]]:
    """``CLUSTER SLOTS`` of the node at host:port: (first, last, master) per range."""
    r = aredis.Redis(host=host, port=port, decode_responses=True)
    try:
        reply: Any = await r.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    finally:
        await r.aclose()
    out: list[tuple[int, int, tuple[str, int]]] = []
    if isinstance(reply, dict):  # redis-py may parse the reply into {(start, end): {...}}
        for (start, end), info in reply.items():
            host_, port_ = info["primary"]
            out.append((int(start), int(end), (str(host_), int(port_))))
    else:
        for item in reply:
            out.append((int(item[0]), int(item[1]), (str(item[2][0]), int(item[2][1]))))
    return sorted(out)


@contextlib.asynccontextmanager
async def started(name: str) -> AsyncIterator[Backend]:
    """Start the backend ``name`` on free loopback ports; stop it by pid at the end."""
    if name == "server":
        with throwaway_redis() as url:
            host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            yield Backend(name, url, [(host, int(port))])
        return
    from benchmarks._cluster import local_cluster  # the fixture's launcher

    with local_cluster(masters=3, replicas=1) as cluster:
        node = next(iter(cluster.nodes))
        slots = await cluster_slots("127.0.0.1", node.port)
        masters = sorted({n for _, _, n in slots})
        yield Backend(name, cluster.url, masters, slots)


class CommandMeter:
    """``total_commands_processed`` summed over the masters, on connections opened once."""

    def __init__(self, masters: Sequence[tuple[str, int]]) -> None:
        self.clients = [aredis.Redis(host=h, port=p, decode_responses=True) for h, p in masters]

    async def total(self) -> int:
        infos = await asyncio.gather(*(r.info("stats") for r in self.clients))
        return sum(int(info["total_commands_processed"]) for info in infos)

    @property
    def own_per_reading(self) -> int:
        """A reading's INFO calls, which the next reading's total counts."""
        return len(self.clients)

    async def aclose(self) -> None:
        for r in self.clients:
            await r.aclose()


# -- the background processes --------------------------------------------------------------


class BackgroundProcesses:
    """``agentq run`` processes with a config that names no handlers: each hosts the
    background work (presence, scheduler, stall recovery, gates, projector, alerts) and
    nothing else. Started in sessions of their own; stopped by pid."""

    def __init__(self, url: str, workdir: Path, count: int) -> None:
        self.url, self.workdir, self.count = url, workdir, count
        self.config_path = workdir / "agentq-bench.json"
        self.config_path.write_text(json.dumps(CONFIG))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in ("AGENTQ_REDIS_URL", "AGENTQ_CONFIG", "AGENTQ_AGENT")}
        env["AGENTQ_HOME"] = str(self.workdir / "home")
        for i in range(self.count):
            log = self.workdir / f"run-{len(self.logs)}-{i}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "agentq.cli", "--redis", self.url,
                     "--config", str(self.config_path), "run"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,
                ))

    def exited(self) -> list[int]:
        return [code for p in self.procs if (code := p.poll()) is not None]

    def cpu_seconds(self) -> list[float]:
        """User + system CPU time of each process, from /proc/<pid>/stat."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = []
        for p in self.procs:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out.append((int(fields[11]) + int(fields[12])) / ticks)
            except (OSError, IndexError, ValueError):
                out.append(float("nan"))
        return out

    def stop(self) -> dict[str, Any]:
        """Stop every process (SIGTERM, SIGKILL after a while); what their output said."""
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=STOP_TIMEOUT))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait(timeout=STOP_TIMEOUT))
        lines: list[str] = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                lines += log.read_text(errors="replace").splitlines()
        restarts = [line for line in lines if "restarting" in line or "Traceback" in line]
        return {"exit_codes": codes, "restarts_logged": len(restarts),
                "first_restart": restarts[0][:300] if restarts else None,
                "tail": [line[:300] for line in lines[-4:]]}


async def command_rates(meter: CommandMeter, settings: Settings) -> list[float]:
    """Commands/s in each of ``settings.windows`` windows, without the meter's own INFO."""
    t0, before = time.monotonic(), await meter.total()
    rates = []
    for _ in range(settings.windows):
        await asyncio.sleep(settings.window)
        now, t1 = await meter.total(), time.monotonic()
        rates.append((now - before - meter.own_per_reading) / (t1 - t0))
        before, t0 = now, t1
    return rates


async def measure_baseline(meter: CommandMeter, settings: Settings) -> dict[str, Any]:
    """What the servers count with no agentq process running (on a cluster, each replica's
    REPLCONF ACK every second reaches its master): subtracted from the idle figures."""
    rates = await command_rates(meter, settings)
    return {"commands_per_s": round(statistics.median(rates), 2),
            "windows_commands_per_s": [round(r, 2) for r in rates]}


async def measure_idle(meter: CommandMeter, procs: BackgroundProcesses, settle: float,
                       settings: Settings, baseline: float) -> dict[str, Any]:
    """Commands/s (median of the windows, less ``baseline``) and CPU % of ``procs``
    after ``settle`` seconds."""
    await asyncio.sleep(settle)
    if procs.exited():
        raise RuntimeError(f"agentq run exited ({procs.exited()}) before it settled")
    cpu0, start = procs.cpu_seconds(), time.monotonic()
    rates = await command_rates(meter, settings)
    cpu1, wall = procs.cpu_seconds(), time.monotonic() - start
    if procs.exited():
        raise RuntimeError(f"agentq run exited ({procs.exited()}) while measured")
    cpu_each = [round((b - a) / wall * 100, 2) for a, b in zip(cpu0, cpu1, strict=True)]
    return {
        "commands_per_s": round(statistics.median(rates) - baseline, 2),
        "raw_commands_per_s": round(statistics.median(rates), 2),
        "baseline_commands_per_s": baseline,
        "windows_commands_per_s": [round(r, 2) for r in rates],
        "cpu_percent": round(sum(cpu_each), 2),
        "cpu_percent_each": cpu_each,
        "processes": procs.count,
        "settle_s": round(settle, 1),
        "window_s": settings.window,
    }


# -- the latency figures -----------------------------------------------------------------


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        await asyncio.sleep(0.001)


async def dispatch_wait(q: agentq.Client, hot: list[str], settings: Settings) -> dict[str, Any]:
    """Dispatch to a hot agent and wait until its worker completed the job; wall ms."""
    values: list[float] = []
    deadline = time.monotonic() + settings.budget
    warmup = 5
    for i in range(settings.samples + warmup):
        began = time.perf_counter()
        job = await q.dispatch(hot[i % len(hot)], f"dispatch-wait {i}")
        view, timed_out = await q.wait(job.job_id, timeout=30)
        took = (time.perf_counter() - began) * 1000
        if timed_out or view.state != "completed":
            raise RuntimeError(f"{job.job_id} ended {view.state} (timed out: {timed_out})")
        if i >= warmup:
            values.append(took)
            if time.monotonic() > deadline:
                break
    return summarize(values)


async def release(q: agentq.Client, gate: Gate, agents: list[str], hot: list[str],
                  settings: Settings, rng: random.Random) -> dict[str, Any]:
    """Dependency on a hot agent, dependent elsewhere, released by the completion."""
    pairs: list[tuple[str, str]] = []
    deadline = time.monotonic() + settings.budget
    for i in range(settings.samples):
        owner = hot[i % len(hot)]
        dependent_agent = rng.choice([a for a in agents if a != owner] or [owner])
        task = f"release dep {i}"
        go = gate.hold(task)
        dep = await q.dispatch(owner, task)
        dependent = await q.dispatch(dependent_agent, f"release x {i}", depends_on=[dep.job_id])
        key = q.partition(owner).dependents(dep.job_id)

        async def registered(key: str = key, job_id: str = dependent.job_id) -> bool:
            return bool(await q.redis.sismember(key, job_id))

        await until(registered, REGISTER_TIMEOUT, f"{dependent.job_id} registered")
        go.set()

        async def released(job_id: str = dependent.job_id) -> bool:
            return (await q.status(job_id)).state != "waiting_dependencies"

        await until(released, RELEASE_TIMEOUT, f"{dependent.job_id} released")
        pairs.append((dep.job_id, dependent.job_id))
        if time.monotonic() > deadline:
            break
    values = []
    for dep_id, dependent_id in pairs:
        (completed,) = [e for e in await q.history(dep_id) if e.type == "JobCompleted"]
        (queued,) = [e for e in await q.history(dependent_id) if e.type == "JobQueued"]
        if queued.data.get("reason") != "released":
            raise RuntimeError(f"{dependent_id} was queued by {queued.data}, not released")
        values.append((iso_to_micros(queued.at) - iso_to_micros(completed.at)) / 1000)
    return summarize(values) | {"across_agents": len(agents) > 1}


async def delayed(q: agentq.Client, agents: list[str], settings: Settings,
                  rng: random.Random) -> dict[str, Any]:
    """Delayed jobs to random agents: JobQueued.at minus the runAt their dispatch asked for."""
    items = [{"target": rng.choice(agents), "task": f"delayed {i}",
              "delay_seconds": round(0.3 + rng.uniform(0, settings.spread), 3)}
             for i in range(settings.samples)]
    jobs = []
    for start in range(0, len(items), 100):
        jobs += await q.dispatch_many(items[start : start + 100])
    await asyncio.sleep(0.3 + settings.spread + 0.2)
    waiting = {job.job_id for job in jobs}
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        views = await asyncio.gather(*(q.status(job_id) for job_id in waiting))
        waiting = {v.job_id for v in views if v.state == "delayed"}
        if waiting:
            await asyncio.sleep(0.05)
    values = []
    for job in jobs:
        if job.job_id in waiting:
            continue
        events = await q.history(job.job_id)
        (dispatched,) = [e for e in events if e.type == "JobDispatched"]
        queued = [e for e in events if e.type == "JobQueued"]
        values.append((iso_to_micros(queued[0].at)
                       - iso_to_micros(dispatched.data["runAt"])) / 1000)
    if not values:
        raise RuntimeError(f"none of {len(jobs)} delayed jobs was queued within 30 s of its due")
    out = summarize(values) | {"not_queued_after_30s": len(waiting)}
    return out


async def timed_calls(call: Callable[[], Awaitable[Any]], settings: Settings,
                      counter: RoundTripCounter) -> dict[str, Any]:
    """p50/p99 of ``call``, then its commands and round trips per call (counted apart,
    so the count's parsing does not slow the timed calls)."""
    await call()
    values: list[float] = []
    deadline = time.monotonic() + settings.budget / 2
    for _ in range(settings.view_calls):
        began = time.perf_counter()
        await call()
        values.append((time.perf_counter() - began) * 1000)
        if time.monotonic() > deadline and len(values) >= 3:
            break
    calls = 3
    with counter.counting():
        for _ in range(calls):
            await call()
    return summarize(values) | {
        "commands_per_call": round(counter.commands / calls, 1),
        "round_trips_per_call": round(counter.round_trips / calls, 1),
        "commands": dict(counter.kinds.most_common(6)),
    }


async def figure(name: str, work: Awaitable[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """Run one figure; a failure or a timeout is its result, and the run goes on."""
    began = time.monotonic()
    try:
        out = await asyncio.wait_for(work, timeout)
    except Exception as exc:  # the system may be broken at this size: record, go on
        out = {"error": error_of(exc)}
    out["seconds"] = round(time.monotonic() - began, 1)
    main = MAIN_STAT.get(name)
    shown = out.get(main) if main else None
    note(f"    {name:14s} " + (f"{main} {shown}" if shown is not None else str(out.get("error"))))
    return out


async def latency_figures(q: agentq.Client, agents: list[str], hot: list[str],
                          settings: Settings, counter: RoundTripCounter) -> dict[str, Any]:
    rng = random.Random(settings.seed)
    gate = Gate()
    out: dict[str, Any] = {}
    runner = q.runner([WorkerSpec(a, gate.handler, CONCURRENCY) for a in hot], background=False)
    running = asyncio.create_task(runner.run())
    hard = settings.budget * 3 + 30
    try:
        out["dispatch_wait"] = await figure("dispatch_wait", dispatch_wait(q, hot, settings), hard)
        out["release"] = await figure(
            "release", release(q, gate, agents, hot, settings, rng), hard)
        out["delayed"] = await figure(
            "delayed", delayed(q, agents, settings, rng), settings.spread + 60)
    finally:
        runner.stop(now=True)
        for event in list(gate.events.values()):
            event.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), STOP_TIMEOUT)
    # The default deployment: `agentq worker` hosts the background work in the worker's
    # process too (here beside the `agentq run` process, which keeps its share).
    runner = q.runner([WorkerSpec(a, gate.handler, CONCURRENCY) for a in hot], background=True)
    running = asyncio.create_task(runner.run())
    try:
        await asyncio.sleep(settings.hosting_settle)
        out["dispatch_wait_hosting"] = await figure(
            "dispatch_wait_hosting", dispatch_wait(q, hot, settings), hard)
    finally:
        runner.stop(now=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), STOP_TIMEOUT)
    one = hot[0]
    out["list"] = await figure("list", timed_calls(lambda: q.list(limit=20), settings, counter),
                               hard)
    out["activity_one"] = await figure(
        "activity_one", timed_calls(lambda: q.activity([one]), settings, counter), hard)
    out["activity_all"] = await figure(
        "activity_all", timed_calls(lambda: q.activity(), settings, counter), hard)
    return out


# -- one backend -------------------------------------------------------------------------


def pick_hot(backend: Backend, agents: list[str]) -> list[str]:
    """Up to HOT_AGENTS agents, one per master first."""
    hot: list[str] = []
    seen: set[tuple[str, int]] = set()
    for agent in agents:
        node = backend.node_of(agent)
        if node not in seen:
            seen.add(node)
            hot.append(agent)
        if len(hot) == HOT_AGENTS:
            return hot
    for agent in agents:
        if len(hot) == HOT_AGENTS:
            break
        if agent not in hot:
            hot.append(agent)
    return hot


async def register(q: agentq.Client, agents: list[str], known: set[str]) -> float:
    began = time.monotonic()
    todo = [a for a in agents if a not in known]
    for start in range(0, len(todo), 50):
        chunk = todo[start : start + 50]
        await asyncio.gather(*(q.add_agent(a) for a in chunk))
        known.update(chunk)
    return round(time.monotonic() - began, 2)


async def one_count(q: agentq.Client, backend: Backend, count: int, known: set[str],
                    settings: Settings, workdir: Path, counter: RoundTripCounter,
                    last: bool, baseline: float) -> dict[str, Any]:
    agents = agent_ids(count)
    entry: dict[str, Any] = {}
    try:
        entry["register_s"] = await asyncio.wait_for(register(q, agents, known), 300)
    except Exception as exc:
        entry["error"] = f"registering {count} agents: {error_of(exc)}"
        note(f"    {entry['error']}")
        return entry
    hot = pick_hot(backend, agents)
    entry["hot_agents"] = {a: f"{h}:{p}" for a in hot for h, p in [backend.node_of(a)]}
    meter = CommandMeter(backend.masters)
    settle = settings.settle + settings.settle_per_agent * count
    window_total = settle + settings.windows * settings.window
    try:
        procs = BackgroundProcesses(backend.url, workdir, 1)
        procs.start()
        try:
            entry["idle"] = await figure(
                "idle", measure_idle(meter, procs, settle, settings, baseline), window_total + 30)
            entry.update(await latency_figures(q, agents, hot, settings, counter))
        finally:
            entry["process"] = procs.stop()
        if last and settings.four:
            four = BackgroundProcesses(backend.url, workdir, 4)
            four.start()
            try:
                entry["idle_four"] = await figure(
                    "idle_four",
                    measure_idle(meter, four, settle + settings.four_settle, settings, baseline),
                    window_total + settings.four_settle + 30)
            finally:
                entry["processes_four"] = four.stop()
    finally:
        await meter.aclose()
    return entry


async def one_backend(name: str, settings: Settings, counter: RoundTripCounter) -> dict[str, Any]:
    out: dict[str, Any] = {"counts": {}}
    with tempfile.TemporaryDirectory(prefix="agentq-bench-scale-") as tmp:
        try:
            async with started(name) as backend:
                out["url"] = backend.url
                out["masters"] = [f"{h}:{p}" for h, p in backend.masters]
                meter = CommandMeter(backend.masters)
                try:
                    out["baseline"] = await measure_baseline(meter, settings)
                finally:
                    await meter.aclose()
                baseline = out["baseline"]["commands_per_s"]
                try:
                    async with agentq.connect(backend.url, Config.model_validate(CONFIG)) as q:
                        known: set[str] = set()
                        for count in settings.counts:
                            note(f"  {name}, {count} agents")
                            out["counts"][str(count)] = await one_count(
                                q, backend, count, known, settings, Path(tmp), counter,
                                last=count == settings.counts[-1], baseline=baseline)
                except Exception as exc:
                    out["error"] = f"agentq on the {name}: {error_of(exc)}"
                    note(f"  {out['error']}")
        except Exception as exc:
            out["error"] = f"starting the {name}: {error_of(exc)}"
            note(f"  {out['error']}")
    return out


# -- judging -------------------------------------------------------------------------------


def value_of(backend: dict[str, Any], count: int, name: str) -> float | None:
    """The main number of a figure, or None when it failed or was not measured."""
    found = backend.get("counts", {}).get(str(count), {}).get(name)
    if not isinstance(found, dict) or "error" in found:
        return None
    value = found.get(MAIN_STAT[name])
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None, floor: float = 0.0) -> float | None:
    """a ÷ b; with ``floor``, b counts as at least that much (idle rates: a process that
    makes under one command a second is at the floor, and 0 would divide by zero)."""
    if a is None or b is None:
        return None
    b = max(b, floor)
    return round(a / b, 2) if b else None


def cluster_ratios(results: dict[str, Any], counts: list[int]) -> dict[str, dict[str, Any]]:
    """Each figure of the cluster ÷ one server's, per count."""
    server, cluster = results.get("server", {}), results.get("cluster", {})
    return {name: {str(c): ratio(value_of(cluster, c, name), value_of(server, c, name))
                   for c in counts}
            for name in MAIN_STAT}


def judge(results: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    """Each target with the measured value (server, largest count) and whether it is met;
    then the cluster's ratios at the largest count."""
    top, server = counts[-1], results.get("server", {})
    out = []
    for target in TARGETS if "server" in results else []:
        name = target["figure"]
        if target["kind"] == "flat":
            value = ratio(value_of(server, top, "idle"), value_of(server, counts[0], "idle"),
                          IDLE_FLOOR)
        elif target["kind"] == "four":
            value = ratio(value_of(server, top, "idle_four"), value_of(server, top, "idle"),
                          IDLE_FLOOR)
        else:
            value = value_of(server, top, name)
        out.append({"target": target["text"], "backend": "server", "at": top, "value": value,
                    "unit": "ms" if target["kind"] == "value" else "x",
                    "max": target["max"], "met": value is not None and value <= target["max"]})
    if "cluster" in results:
        ratios = cluster_ratios(results, counts)
        for name in (t["figure"] for t in TARGETS):
            value = ratios[name][str(top)]
            out.append({"target": f"cluster ÷ server, {name} ({MAIN_STAT[name]}) ≤ 1.5x",
                        "backend": "cluster", "at": top, "value": value, "unit": "x",
                        "max": CLUSTER_RATIO_MAX,
                        "met": value is not None and value <= CLUSTER_RATIO_MAX})
    return out


# -- the README's table ------------------------------------------------------------------------


def _cell(backend: dict[str, Any], count: int, name: str) -> str:
    found = backend.get("counts", {}).get(str(count), {}).get(name)
    if found is None:
        err = backend.get("counts", {}).get(str(count), {}).get("error") or backend.get("error")
        return "failed" if err else "-"
    if "error" in found:
        return "failed"
    value = found[MAIN_STAT[name]]
    if name in ("idle", "idle_four"):
        return f"{value:,.0f}/s, {found['cpu_percent']:.1f}% CPU"
    extra = f" ({found['commands_per_call']:,.0f} cmds)" if "commands_per_call" in found else ""
    return f"{value:,.1f}{extra}"


ROW_TITLES = {
    "idle": "idle commands/s, CPU of 1 process",
    "idle_four": "idle commands/s, CPU of 4 processes",
    "delayed": "delayed job late by, p99 ms",
    "release": "dependency release p99 ms",
    "dispatch_wait": "dispatch + wait p99 ms",
    "dispatch_wait_hosting": "the same, the worker's process hosting the background too",
    "list": "`list` p50 ms (Redis commands per call)",
    "activity_one": "`activity` one agent p50 ms (commands)",
    "activity_all": "`activity` all agents p50 ms (commands)",
}


def render(data: dict[str, Any], before: tuple[Path, dict[str, Any]] | None = None) -> list[str]:
    """Markdown: per backend, each figure by agent count; then the targets, met or missed,
    with the ``before`` run's value next to this one's."""
    counts = [int(c) for c in data["params"]["counts"]]
    results = data["results"]
    parts: list[str] = []
    for name, backend in results.items():
        title = "one redis-server" if name == "server" else "a 3-master cluster"
        parts += ["", f"### agentq at scale, on {title}", ""]
        if "error" in backend and not backend.get("counts"):
            parts.append(f"Not measured: {backend['error']}")
            continue
        parts += ["| figure | " + " | ".join(f"{c:,} agent{'s' * (c > 1)}" for c in counts) + " |",
                  "|---|" + "---:|" * len(counts)]
        for fig, row in ROW_TITLES.items():
            parts.append(f"| {row} | " + " | ".join(_cell(backend, c, fig) for c in counts)
                         + " |")
        if "error" in backend:
            parts += ["", f"Stopped early: {backend['error']}"]
    earlier = {}
    if before:
        earlier = {j["target"]: j["value"] for j in judge(
            before[1]["results"], [int(c) for c in before[1]["params"]["counts"]])}
    parts += ["", f"### The scale targets (issue 13), at {counts[-1]:,} agents", ""]
    head = "| target | before | now | met |" if before else "| target | now | met |"
    parts += [head, "|---|---:|---:|:---:|" if before else "|---|---:|:---:|"]
    def shown(value: float | None, unit: str) -> str:
        if value is None:
            return "failed"
        return f"{value:,.1f} ms" if unit == "ms" else f"{value:,.2f}x"

    for judged in judge(results, counts):
        now = shown(judged["value"], judged.get("unit", ""))
        met = "met" if judged["met"] else "**missed**"
        if before:
            was = shown(earlier.get(judged["target"]), judged.get("unit", ""))
            parts.append(f"| {judged['target']} | {was} | {now} | {met} |")
        else:
            parts.append(f"| {judged['target']} | {now} | {met} |")
    taken = [found["n"] for backend in results.values()
             for figures in backend.get("counts", {}).values()
             for name, found in figures.items()
             if isinstance(found, dict) and name in ("delayed", "release", "dispatch_wait")
             and "n" in found]
    if taken:
        of = f"{min(taken):,}" if min(taken) == max(taken) else f"{min(taken):,} to {max(taken):,}"
        parts += ["", f"Each p99 is of {of} samples in one run "
                  f"(at most {data['params']['samples']:,}, or what {data['params']['budget']:g} s "
                  "of sampling gave): on this shared 2-core machine, tails of 100 samples moved "
                  "by up to 2-3x between two runs. Each p50 of `list` and `activity` is of "
                  f"{data['params'].get('view_calls', 30):,} calls."]
    parts += ["", "\"failed\": the figure could not be measured (the result file says why)."]
    return parts


def newest(results_dir: Path, *, before: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``scale-*.json`` labelled ``before`` (or, with before=False, unlabelled)."""
    files = [p for p in sorted(results_dir.glob("scale-*.json"))
             if p.stem.endswith("-before") == before and (before or p.stem.count("-") == 1)]
    return (files[-1], json.loads(files[-1].read_text())) if files else None


def readme_section(results_dir: Path, root: Path) -> list[str]:
    """The README's scale tables: the newest run, its targets beside the newest ``before``
    run's; only the ``before`` run while there is no other."""
    after, before = newest(results_dir, before=False), newest(results_dir, before=True)
    shown = after or before
    if shown is None:
        return []
    path, data = shown
    parts = render(data, before if after else None)
    sources = f"Source: `{path.relative_to(root)}` (commit {data['code'].get('commit', '?')[:7]})"
    if after and before:
        commit = before[1]["code"].get("commit", "?")[:7]
        sources += f"; before: `{before[0].relative_to(root)}` (commit {commit})"
    elif not after:
        parts = ["", "The code before the scale work of issue 13 (commit "
                 f"{data['code'].get('commit', '?')[:7]}):", *parts]
    return [*parts, "", sources + "."]


# -- main ------------------------------------------------------------------------------------


def code_info(given: str | None) -> dict[str, Any]:
    """Which agentq was measured: its folder, and its git commit when it is a checkout."""
    where = Path(agentq.__file__).resolve().parent.parent
    info: dict[str, Any] = {"agentq_path": str(where)}
    if given:
        info["commit"] = given
        return info
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                    "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            info["uncommitted_changes"] = bool(dirty.stdout.strip())
    return info


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)),
                        help="agent counts, ascending (default 1,10,100,1000)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="server, cluster or both (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and short windows, one server: a smoke run")
    parser.add_argument("--window", type=float, help="seconds per idle window (default 5)")
    parser.add_argument("--windows", type=int, help="idle windows (default 3)")
    parser.add_argument("--samples", type=int, help="samples per latency figure (default 1000)")
    parser.add_argument("--budget", type=float, help="seconds of sampling per figure (30)")
    parser.add_argument("--view-calls", type=int, help="calls per list/activity figure (300)")
    parser.add_argument("--no-four", action="store_true", help="skip the 4-process idle figure")
    parser.add_argument("--label", help="added to the results file's name (e.g. before)")
    parser.add_argument("--code-commit", help="the commit of the code measured, when the "
                        "agentq imported is not a git checkout")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()})
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.quick:
        if args.counts == ",".join(map(str, COUNTS)):
            counts = [1, 3]
        if args.backends == ",".join(BACKENDS):
            backends = ["server"]
        settings = Settings(counts, backends, settle=3.0, settle_per_agent=0.0, four_settle=0.0,
                            windows=2, window=1.0, hosting_settle=1.0, samples=10, budget=3.0,
                            view_calls=5, spread=0.5)
    else:
        settings = Settings(counts, backends)
    for name in ("window", "windows", "samples", "budget", "view_calls"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.four = not args.no_four
    unknown = set(backends) - set(BACKENDS)
    if unknown or not counts or counts[0] < 1:
        parser.error(f"bad --backends or --counts: {sorted(unknown) or counts}")
    return args, settings


async def run(settings: Settings) -> dict[str, Any]:
    counter = RoundTripCounter()
    results: dict[str, Any] = {}
    with counter.installed():
        for name in settings.backends:
            note(f"{name}:")
            results[name] = await one_backend(name, settings, counter)
    return results


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    started_at = datetime.now(UTC)
    info = machine_info()
    with contextlib.suppress(Exception):
        info["redis_server"] = redis_server_version()
    results = asyncio.run(run(settings))
    with contextlib.suppress(OSError):
        info["loadavg_after"] = list(os.getloadavg())
    params = {k: v for k, v in vars(settings).items()}
    data: dict[str, Any] = {
        "benchmark": "scale",
        "label": args.label,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "code": code_info(args.code_commit),
        "params": params,
        "results": results,
        "cluster_ratios": cluster_ratios(results, settings.counts) if "cluster" in results
        else None,
        "targets": judge(results, settings.counts),
        "machine": info,
    }
    print("\n".join(render(data)))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    path = args.results_dir / f"scale-{started_at.strftime('%Y%m%dT%H%M%SZ')}{suffix}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
