"""agentq against the Python Redis job queues, on one throwaway Redis server, in one run.

    .venv/bin/python -m benchmarks.bench_peers [--n 20000] [--runs 3] [--only agentq,saq]

Each peer is installed from PyPI into its own virtualenv under ``benchmarks/.peers/<name>``
(their redis-py pins conflict) and measured by a small adapter script run with that
venv's python (``benchmarks/peers/<name>_peer.py``); agentq's adapter runs with this
python. Systems are measured one at a time, interleaved (run 1 of every system, then
run 2 of every system, ...), with ``FLUSHALL`` before every measurement:

  enqueue    N no-op jobs with the system's bulk API (else batched, else sequential)
  drain      those N jobs, one worker process: first completion to last; and Redis's
             memory per job, queued and completed
  roundtrip  enqueue one job and wait for its result, 300 times in sequence: p50, p99
  release    (systems with job dependencies) a job that waits for another: from the
             end of the first's handler to the start of the second's, 300 pairs
  dispatch   (agentq only) ``dispatch`` one job per await

Every measurement has a timeout; a failure is recorded and the run goes on. The
results go to ``benchmarks/results/peers-<UTC timestamp>.json`` and a Markdown table
to stdout; progress to stderr. See benchmarks/peers/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a path (python benchmarks/bench_peers.py): make `benchmarks` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from benchmarks._server import redis_server_version, throwaway_redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ADAPTERS = HERE / "peers"
VENVS = HERE / ".peers"
RESULTS_DIR = HERE / "results"
SPEC_STAMP = ".bench-spec.json"


@dataclass(frozen=True)
class System:
    name: str
    label: str
    requirements: tuple[str, ...]  # pip requirements; empty: this python (agentq)
    dists: tuple[str, ...]  # the distributions whose versions matter
    measures: tuple[str, ...] = ("drain", "roundtrip")
    notes: str = ""

    @property
    def adapter(self) -> Path:
        return ADAPTERS / f"{self.name}_peer.py"

    @property
    def venv(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> str:
        return sys.executable if not self.requirements else str(self.venv / "bin" / "python")


WITH_RELEASE = ("drain", "roundtrip", "release")  # the systems with job dependencies

# The newest releases that install on Python 3.11 when this was written; pinned so that
# runs compare. `--latest` installs the newest instead (the JSON records what ran).
SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("agentq", "agentq", (), ("agentq", "redis", "hiredis"),
           ("drain", "dispatch", "roundtrip", "release")),
    System("bullmq", "bullmq (Python port)", ("bullmq==3.4.4", "hiredis"),
           ("bullmq", "redis", "hiredis"), WITH_RELEASE),
    System("dramatiq", "dramatiq (no results stored)", ("dramatiq[redis]==2.2.1", "hiredis"),
           ("dramatiq", "redis", "hiredis")),
    # saq 0.26.4 imports typing_extensions without declaring it.
    System("saq", "saq", ("saq[redis,hiredis]==0.26.4", "typing_extensions"),
           ("saq", "redis", "hiredis")),
    System("taskiq", "taskiq + taskiq-redis (streams)",
           ("taskiq==0.13.0", "taskiq-redis==1.2.4", "hiredis"),
           ("taskiq", "taskiq-redis", "redis", "hiredis")),
    System("celery", "celery (threads, Redis backend)", ("celery[redis]==5.7.0", "hiredis"),
           ("celery", "kombu", "redis", "hiredis"), WITH_RELEASE),
    System("streaq", "streaq", ("streaq==7.2.0", "hiredis"), ("streaq", "coredis", "anyio"),
           WITH_RELEASE),
    System("arq", "arq", ("arq==0.28.0", "hiredis"), ("arq", "redis", "hiredis")),
    System("rq", "rq (fork per job)", ("rq==3.0.0", "hiredis"), ("rq", "redis", "hiredis")),
]}

# Drain N for peers too slow to drain the full N within the run's budget (rq forks a
# process per job: ~40-60 jobs/s here, so 20,000 jobs would take 6 minutes a run).
DEFAULT_DRAIN_N = {"rq": 1000}

FIGURES = (  # key, title, unit, higher is better
    ("enqueue", "bulk enqueue", "jobs/s", True),
    ("dispatch", "single dispatch", "jobs/s", True),
    ("drain", "drain", "jobs/s", True),
    ("rt_p50", "round trip p50", "ms", False),
    ("rt_p99", "round trip p99", "ms", False),
    ("rel_p50", "dependency release p50", "ms", False),
    ("rel_p99", "dependency release p99", "ms", False),
    ("mem_queued_b", "memory per queued job", "bytes", False),
    ("mem_completed_b", "memory per completed job", "bytes", False),
)
COLUMNS = (  # the table of every system: figure, header
    ("enqueue", "bulk enqueue jobs/s"),
    ("drain", "drain jobs/s"),
    ("rt_p50", "round trip p50 ms"),
    ("rt_p99", "round trip p99 ms"),
    ("rel_p50", "release p50 ms"),
    ("rel_p99", "release p99 ms"),
    ("mem_queued_b", "bytes per queued job"),
    ("mem_completed_b", "bytes per completed job"),
)
UNITS = {key: unit for key, _, unit, _ in FIGURES}
# Peers left out of a figure's comparison, and why (their figure stays in the full table).
NOT_COMPARED = {
    "mem_completed_b": ({"dramatiq"}, "dramatiq keeps nothing of a completed job"),
}
TARGETS = {  # from issue 7: agentq against the best peer in the same run
    "enqueue": "≥ 1.5x bullmq addBulk",
    "drain": "≥ 2x best peer",
    "rt_p50": "≤ best peer",
    "rt_p99": "≤ 5 ms",
    "rel_p99": "< 5 ms",
}


# -- progress and interruption ---------------------------------------------------


def say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", file=sys.stderr, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- installing the peers --------------------------------------------------------


def ensure_installed(system: System, latest: bool) -> str | None:
    """Make the peer's venv if it is missing or its requirements changed; None when
    ready, else why not."""
    if not system.requirements:
        return None
    requirements = list(system.requirements)
    if latest:
        requirements = [r.split("==")[0] for r in requirements]
    stamp = system.venv / SPEC_STAMP
    wanted = {"requirements": requirements, "python": sys.version.split()[0]}
    with contextlib.suppress(OSError, ValueError):
        if json.loads(stamp.read_text()) == wanted and Path(system.python).exists():
            return None
    say(f"installing {system.name}: {' '.join(requirements)} into {system.venv}")
    try:
        if system.venv.exists():
            shutil.rmtree(system.venv)
        VENVS.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(system.venv)], check=True,
                       capture_output=True, text=True, timeout=300)
        pip = [system.python, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "install", "--upgrade", "pip"], capture_output=True, text=True,
                       timeout=600)
        done = subprocess.run([*pip, "install", *requirements], capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            return f"pip install failed:\n{(done.stdout + done.stderr)[-2000:]}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not make the virtualenv: {exc}"
    stamp.write_text(json.dumps(wanted))
    return None


# -- running one adapter -----------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    data: dict[str, Any]
    seconds: float
    error: str | None = None
    timed_out: bool = False


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def run_adapter(system: System, measure: str, url: str, n: int, opts: list[str],
                timeout: float) -> Outcome:
    """Run ``<venv python> <adapter> MEASURE URL N ...`` in a process group of its own
    (its worker processes join it); on timeout, stop the whole group."""
    argv = [system.python, str(system.adapter), measure, url, str(n), *opts]
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid, signal.SIGTERM)  # adapters stop their workers on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    except BaseException:
        _kill_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        _kill_group(proc.pid, signal.SIGKILL)
        raise
    finally:
        # Anything of this group still alive (a worker the adapter failed to stop).
        _kill_group(proc.pid, signal.SIGKILL)
    seconds = time.monotonic() - started
    data: dict[str, Any] = {}
    for line in reversed(stdout.strip().splitlines()):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            break
    if timed_out:
        return Outcome(False, data, seconds, f"timed out after {timeout:.0f} s", timed_out=True)
    if not data:
        tail = (stderr or stdout)[-1500:]
        return Outcome(False, {}, seconds, f"exit {proc.returncode}, no result:\n{tail}")
    if not data.get("ok"):
        return Outcome(False, data, seconds, str(data.get("error")))
    return Outcome(True, data, seconds)


# -- the run -----------------------------------------------------------------------


@dataclass
class Samples:
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # system→figure→runs

    def add(self, system: str, figure: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(system, {}).setdefault(figure, []).append(value)


def machine_info(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        server = client.info("server")
    finally:
        client.close()
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "redis_server": str(server.get("redis_version")),
        "redis_server_build": redis_server_version(),
        "agentq": metadata.version("agentq"),
        "loadavg_start": list(os.getloadavg()),
    }


def flush(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        client.flushall()
        client.config_resetstat()
        # The drain's memory readings need Redis 7's per-command latency histograms off
        # (see _common.untrack_latency); off for every measurement, so that all run alike.
        with contextlib.suppress(redis.ResponseError):
            client.config_set("latency-tracking", "no")
        return client.info("memory")
    finally:
        client.close()


def commandstats(url: str) -> dict[str, list[int]]:
    """[calls, server µs] per command since the flush (commands run by Lua scripts
    count too, and a script's µs include theirs)."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {k.removeprefix("cmdstat_"): [int(v["calls"]), int(v["usec"])]
            for k, v in stats.items()}


def record(samples: Samples, system: str, measure: str, data: dict[str, Any], n: int) -> None:
    if measure == "drain":
        samples.add(system, "drain", data.get("rate"))
        if data.get("count") == n:  # a reduced drain N has its own enqueue measurement
            samples.add(system, "enqueue", (data.get("enqueue") or {}).get("rate"))
        memory = data.get("memory") or {}
        samples.add(system, "mem_queued_b", memory.get("queued_per_job"))
        samples.add(system, "mem_completed_b", memory.get("completed_per_job"))
    elif measure == "enqueue":
        samples.add(system, "enqueue", data.get("rate"))
    elif measure == "dispatch":
        samples.add(system, "dispatch", data.get("rate"))
    elif measure in ("roundtrip", "release"):
        prefix = "rt" if measure == "roundtrip" else "rel"
        samples.add(system, f"{prefix}_p50", data.get("p50_ms"))
        samples.add(system, f"{prefix}_p99", data.get("p99_ms"))


def plan(system: System, n: int, drain_n: dict[str, int]) -> list[tuple[str, int]]:
    """The (measure, N) calls of one run of ``system``. The drain invocation also times
    the enqueue of its N jobs; when the drain N is reduced, enqueue runs on its own."""
    steps: list[tuple[str, int]] = []
    dn = drain_n.get(system.name, n)
    for measure in system.measures:
        if measure == "drain":
            if dn != n:
                steps.append(("enqueue", n))
            steps.append(("drain", dn))
        else:
            steps.append((measure, n))
    return steps


def timeout_for(measure: str, args: argparse.Namespace) -> float:
    if measure == "drain":
        return float(args.drain_deadline) + 300  # the enqueue of N, worker start and stop
    if measure in ("roundtrip", "release"):
        return 240.0
    return 300.0


def summarize(samples: Samples) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for system, figures in samples.values.items():
        for figure, values in figures.items():
            out.setdefault(system, {})[figure] = {
                "median": statistics.median(values), "min": min(values), "max": max(values),
                "runs": len(values),
            }
    return out


def best_peers(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per figure: the best peer's median and agentq's ratio to it."""
    result: dict[str, dict[str, Any]] = {}
    for key, _, _, higher in FIGURES:
        left_out = NOT_COMPARED.get(key, (set(), ""))[0]
        peers = [(name, figs[key]["median"]) for name, figs in summary.items()
                 if name != "agentq" and name not in left_out and key in figs]
        mine = summary.get("agentq", {}).get(key, {}).get("median")
        entry: dict[str, Any] = {"agentq": mine}
        if peers:
            name, value = (max if higher else min)(peers, key=lambda p: p[1])
            entry.update(best_peer=name, best_value=value)
            if mine is not None and value:
                entry["ratio"] = mine / value
        if key == "enqueue" and "enqueue" in summary.get("bullmq", {}) and mine is not None:
            entry["ratio_to_bullmq"] = mine / summary["bullmq"]["enqueue"]["median"]
        result[key] = entry
    return result


# -- the table ---------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def _cell(stat: dict[str, float] | None, unit: str) -> str:
    if not stat:
        return "—"
    med, lo, hi = stat["median"], stat["min"], stat["max"]
    return f"{_fmt(med, unit)} ({_fmt(lo, unit)}-{_fmt(hi, unit)})"


def render(report: dict[str, Any]) -> str:
    summary, best = report["summary"], report["best"]
    systems = [s for s in report["systems"] if s in summary or s in report["failures"]]
    s = report["settings"]
    notes = []
    for key, title, _, _ in FIGURES:
        left_out, why = NOT_COMPARED.get(key, (set(), ""))
        if any(key in summary.get(name, {}) for name in left_out):
            notes.append(f"{title}: {why}, so it is left out of the comparison.")
    lines = [
        f"## agentq against the peers: N = {s['n']:,}, {s['runs']} interleaved runs, "
        f"worker concurrency {s['concurrency']}",
        "",
        "Medians (min-max) of the runs; the ratio divides agentq's median by the best "
        "peer's (for latencies and memory, below 1 means agentq is faster or smaller).",
        "",
        "| figure | agentq | best peer | agentq ÷ best | target (issue 7) |",
        "|---|---:|---|---:|---|",
    ]
    for key, title, unit, _ in FIGURES:
        entry = best.get(key, {})
        mine = summary.get("agentq", {}).get(key)
        if mine is None and "best_peer" not in entry:
            continue
        if "best_peer" in entry:
            peer = entry["best_peer"]
            peer_cell = f"{peer} {_cell(summary[peer][key], unit)}"
        else:
            peer_cell = "(agentq only)"
        ratio = f"{entry['ratio']:.2f}x" if entry.get("ratio") else "—"
        if key == "enqueue" and entry.get("ratio_to_bullmq"):
            ratio += f" ({entry['ratio_to_bullmq']:.2f}x bullmq)"
        lines.append(f"| {title} ({unit}) | {_cell(mine, unit)} | {peer_cell} | {ratio} | "
                     f"{TARGETS.get(key, '')} |")
    if notes:
        lines += ["", *notes]
    headers = " | ".join(header for _, header in COLUMNS)
    lines += ["", f"| system | version | {headers} | drain: worker CPU |",
              "|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name in systems:
        figs = summary.get(name, {})
        version = report["versions"].get(name, {}).get(SYSTEMS[name].dists[0], "?")
        cells = {key: _cell(figs.get(key), UNITS[key]) for key, _ in COLUMNS}
        drain_n = report["settings"]["drain_n"].get(name)
        if drain_n and drain_n != s["n"] and figs.get("drain"):
            cells["drain"] += f" [N={drain_n:,}]"
        cpu = report["diagnostics"].get(name, {}).get("worker_cpu_share")
        lines.append(f"| {SYSTEMS[name].label} | {version} | {' | '.join(cells.values())} | "
                     f"{f'{cpu:.0%}' if cpu is not None else '—'} |")
    methods = report["methods"]
    lines += ["", "Methods:"]
    for name in systems:
        m = methods.get(name, {})
        release = (f"; release: {m.get('release', '—')}"
                   if "release" in SYSTEMS[name].measures else "")
        lines.append(f"- {name}: enqueue: {m.get('enqueue', '—')}; round trip: "
                     f"{m.get('roundtrip', '—')}{release}; drain times: {m.get('drain', '—')}; "
                     f"kept after completion: {m.get('memory', '—')}")
    if report["failures"]:
        lines += ["", "Failures:"]
        for name, items in report["failures"].items():
            for item in items:
                first = str(item["error"]).strip().splitlines()[0] if item["error"] else "?"
                lines.append(f"- {name} {item['measure']} (run {item['run']}): {first}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="jobs per enqueue/drain measurement")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (≥ 1)")
    p.add_argument("--only", default="", help="comma-separated systems (default: all)")
    p.add_argument("--rt", type=int, default=300, help="round trips timed per run")
    p.add_argument("--concurrency", type=int, default=10,
                   help="worker concurrency (tasks/threads) for every system that has one")
    p.add_argument("--batch", type=int, default=500, help="jobs per bulk enqueue call")
    p.add_argument("--poll-ms", type=float, default=5.0,
                   help="poll interval given to the peers that poll (arq, taskiq, dramatiq)")
    p.add_argument("--drain-n", default=",".join(f"{k}={v}" for k, v in DEFAULT_DRAIN_N.items()),
                   help="per-system drain N, e.g. 'rq=1000,celery=5000' ('' for none)")
    p.add_argument("--drain-deadline", type=float, default=300.0,
                   help="seconds a drain may take before it counts as failed")
    p.add_argument("--latest", action="store_true",
                   help="install the newest peer releases instead of the pinned ones")
    p.add_argument("--no-install", action="store_true", help="use the venvs as they are")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.only_list = [s for s in args.only.split(",") if s] or list(SYSTEMS)
    unknown = [s for s in args.only_list if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    try:
        args.drain_n_map = {k: int(v) for k, v in
                            (kv.split("=") for kv in args.drain_n.split(",") if kv)}
    except ValueError:
        p.error("--drain-n wants name=N pairs separated by commas")
    if args.runs < 1 or args.n < 2:
        p.error("--runs must be ≥ 1 and --n ≥ 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    systems = [SYSTEMS[name] for name in args.only_list]
    opts = ["--rt", str(args.rt), "--concurrency", str(args.concurrency),
            "--batch", str(args.batch), "--poll-ms", str(args.poll_ms),
            "--deadline", str(args.drain_deadline)]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {
        "benchmark": "peers",
        "started": datetime.now(UTC).isoformat(),
        "settings": {
            "n": args.n, "runs": args.runs, "rt": args.rt, "concurrency": args.concurrency,
            "batch": args.batch, "poll_ms": args.poll_ms,
            "drain_n": {s.name: args.drain_n_map.get(s.name, args.n) for s in systems},
            "drain_deadline_s": args.drain_deadline, "latest": args.latest,
            "requirements": {s.name: list(s.requirements) for s in systems},
            "order": "run 1 of every system, then run 2, ...; FLUSHALL before each measurement",
            "redis_config": "latency-tracking no (Redis 7's per-command histograms would "
                            "count as job memory)",
        },
        "systems": [s.name for s in systems],
        "versions": {}, "failures": {}, "raw": [], "methods": {},
    }
    failures: dict[str, list[dict[str, Any]]] = report["failures"]
    ready: list[System] = []
    for system in systems:
        problem = None if args.no_install else ensure_installed(system, args.latest)
        if problem:
            say(f"{system.name}: not measured: {problem.splitlines()[0]}")
            failures.setdefault(system.name, []).append(
                {"measure": "install", "run": 0, "error": problem})
        else:
            ready.append(system)

    samples = Samples()
    diagnostics: dict[str, dict[str, list[float]]] = {}
    timed_out: set[tuple[str, str]] = set()
    interrupted = False
    try:
        with throwaway_redis() as url:
            report["machine"] = machine_info(url)
            for system in ready:
                out = run_adapter(system, "versions", url, 0, [], 120)
                report["versions"][system.name] = {
                    k: v for k, v in out.data.items() if k not in ("measure", "n", "ok")}
                if not out.ok:
                    failures.setdefault(system.name, []).append(
                        {"measure": "versions", "run": 0, "error": out.error})
            total = args.runs * sum(len(plan(s, args.n, args.drain_n_map)) for s in ready)
            done = 0
            for run in range(1, args.runs + 1):
                for system in ready:
                    for measure, n in plan(system, args.n, args.drain_n_map):
                        done += 1
                        if (system.name, measure) in timed_out:
                            failures[system.name].append({"measure": measure, "run": run,
                                                          "error": "skipped: timed out before"})
                            continue
                        say(f"[{done}/{total}] run {run}: {system.name} {measure} (N={n:,})")
                        memory = flush(url)
                        out = run_adapter(system, measure, url, n, opts,
                                          timeout_for(measure, args))
                        entry = {"system": system.name, "measure": measure, "run": run, "n": n,
                                 "ok": out.ok, "wall_s": out.seconds, "error": out.error,
                                 "result": out.data, "redis_commands": commandstats(url),
                                 "used_memory_before": memory.get("used_memory")}
                        report["raw"].append(entry)
                        if not out.ok:
                            say(f"    failed: {str(out.error).splitlines()[0]}")
                            failures.setdefault(system.name, []).append(
                                {"measure": measure, "run": run, "error": out.error})
                            if out.timed_out:
                                timed_out.add((system.name, measure))
                            continue
                        record(samples, system.name, measure, out.data, args.n)
                        methods = report["methods"].setdefault(system.name, {})
                        if measure == "drain":
                            methods["drain"] = out.data.get("time_source")
                            methods.setdefault("enqueue", out.data.get("enqueue", {}).get("method"))
                            methods["memory"] = out.data.get("memory", {}).get("kept")
                            for k in ("worker_cpu_share", "redis_cpu_share"):
                                if out.data.get(k) is not None:
                                    diagnostics.setdefault(system.name, {}).setdefault(
                                        k, []).append(out.data[k])
                        elif measure in ("enqueue", "roundtrip", "dispatch", "release"):
                            methods[measure] = out.data.get("method")
                        brief = {k: round(v, 2) for k, v in out.data.items()
                                 if k in ("rate", "p50_ms", "p99_ms", "worker_cpu_share")
                                 and isinstance(v, float)}
                        if measure == "drain" and out.data.get("enqueue"):
                            brief["enqueue_rate"] = round(out.data["enqueue"]["rate"])
                        if measure == "drain" and out.data.get("memory"):
                            brief.update({k: round(out.data["memory"][k]) for k in
                                          ("queued_per_job", "completed_per_job")})
                        say(f"    {brief}")
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: writing what was measured")
    report["interrupted"] = interrupted
    report["finished"] = datetime.now(UTC).isoformat()
    report.setdefault("machine", {})["loadavg_end"] = list(os.getloadavg())
    report["summary"] = summarize(samples)
    report["best"] = best_peers(report["summary"])
    report["diagnostics"] = {
        name: {k: statistics.median(v) for k, v in d.items()} for name, d in diagnostics.items()}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"peers-{stamp}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    print(render(report))
    print(f"\nResults: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
