"""What every peer adapter shares. Standard library only: it is imported by
scripts that run under each peer's own virtualenv (``benchmarks/.peers/<name>``).

An adapter is run as

    <venv python> benchmarks/peers/<name>_peer.py MEASURE URL N [options]

with MEASURE one of ``versions``, ``enqueue``, ``dispatch``, ``drain``,
``roundtrip``, ``release`` (and ``worker``, which the adapter starts itself for
drain, round trip and release). It prints exactly one JSON object on stdout:
``{"ok": true, ...}`` with its figures, or ``{"ok": false, "error": ...}``. Logs
go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECORDER_KEY = "bench:recorder"
RELEASE_KEY = "bench:release"  # list: one [pair, A's end, B's start] per pair, pushed by B
GO_KEY = "bench:release:go:"  # + pair: the driver's word that B waits on A
GO_TIMEOUT_S = 30.0
SOCKET_TIMEOUT_S = 10.0
POLL_S = 0.05  # how often the drain driver looks at the completion count
WORKER_STOP_GRACE = 8.0


# -- arguments and output ------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("measure", choices=["versions", "enqueue", "dispatch", "drain", "roundtrip",
                                       "release", "worker"])
    p.add_argument("url")
    p.add_argument("n", type=int, nargs="?", default=0)
    p.add_argument("--rt", type=int, default=300, help="round trips to time")
    p.add_argument("--rt-warmup", type=int, default=20, help="round trips before timing")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--poll-ms", type=float, default=5.0,
                   help="poll interval for peers that poll (worker or result wait)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="seconds the drain may take before it is called a failure")
    p.add_argument("--rt-timeout", type=float, default=10.0,
                   help="seconds one round trip (or release pair) may take")
    p.add_argument("--release", action="store_true",
                   help="worker: run the release measurement's handlers")
    return p.parse_args(argv)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def reporting(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Yield the result dict; print it as JSON at the end, with ok/error filled in."""
    out: dict[str, Any] = {"measure": args.measure, "n": args.n}

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (the harness's timeout) unwinds like Ctrl-C, so the workers get stopped.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        yield out
    except BaseException as exc:  # report every failure as data, never crash the run
        out["ok"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()[-3000:]
        emit(out)
        if isinstance(exc, KeyboardInterrupt):
            raise
        sys.exit(1)
    else:
        out.setdefault("ok", True)
        emit(out)


def serve(
    system: str,
    dists: tuple[str, ...],
    measures: dict[str, Callable[[argparse.Namespace], dict[str, Any]]],
    worker: Callable[[argparse.Namespace], Any] | None = None,
    args: argparse.Namespace | None = None,
) -> None:
    """An adapter's main: run its worker (``worker`` measure), or one measurement
    (``versions``: those of ``dists``) and print its JSON."""
    args = args or parse_args()
    if args.measure == "worker" and worker is not None:
        worker(args)
        return
    with reporting(args) as out:
        if args.measure == "versions":
            out.update(versions(*dists))
        elif args.measure in measures:
            out.update(measures[args.measure](args))
        else:
            raise SystemExit(f"{system} has no {args.measure} measurement")


def versions(*dists: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in dists:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = sys.version.split()[0]
    return found


def chunks(n: int, size: int) -> Iterator[int]:
    """Sizes of the batches that make up ``n``."""
    left = n
    while left > 0:
        yield min(size, left)
        left -= size


# -- a minimal Redis client (every venv has a different redis-py, streaq has none) --


class Resp:
    """A blocking RESP2 client for the few commands the drivers need."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379),
                                             SOCKET_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        db = (u.path or "/0").strip("/") or "0"
        if db != "0":
            self.call("SELECT", db)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    @staticmethod
    def _encode(args: tuple[Any, ...]) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(parts)

    def _read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)
            return data[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._read() for _ in range(size)]
        raise RuntimeError(f"unexpected reply {line!r}")

    def call(self, *args: Any) -> Any:
        self.sock.sendall(self._encode(args))
        return self._read()

    def block(self, seconds: float, *args: Any) -> Any:
        """A blocking command whose last argument is its timeout (``BLPOP key``)."""
        self.sock.settimeout(seconds + SOCKET_TIMEOUT_S)
        try:
            return self.call(*args, seconds)
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT_S)

    def many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send a batch of commands in one write; read all their replies."""
        if not commands:
            return []
        self.sock.sendall(b"".join(self._encode(c) for c in commands))
        return [self._read() for _ in commands]

    def info(self, section: str) -> dict[str, str]:
        raw = self.call("INFO", section).decode()
        pairs = [line.split(":", 1) for line in raw.splitlines()
                 if ":" in line and not line.startswith("#")]
        return dict(pairs)

    def cpu_seconds(self) -> float:
        i = self.info("cpu")
        return float(i["used_cpu_user"]) + float(i["used_cpu_sys"])


def untrack_latency(r: Resp) -> None:
    """Turn off Redis 7's per-command latency histograms: each command's is allocated
    (~25 KB) on its first call and survives FLUSHALL, so it would count as the memory
    of the jobs whose enqueue or drain first used that command."""
    with contextlib.suppress(RuntimeError):  # before 7.0: no such setting, no histograms
        r.call("CONFIG", "SET", "latency-tracking", "no")


def data_memory(r: Resp) -> int:
    """The bytes Redis holds for data: ``used_memory`` after ``MEMORY PURGE``, less the
    clients' buffers (``tot-mem`` in ``CLIENT LIST``, ~40 KB per idle connection) and the
    script and function cache: those follow the connections open and the scripts
    loaded, not the jobs."""
    r.call("MEMORY", "PURGE")
    used = r.info("memory")
    clients = sum(int(field.removeprefix("tot-mem="))
                  for line in r.call("CLIENT", "LIST").decode().splitlines()
                  for field in line.split() if field.startswith("tot-mem="))
    return int(used["used_memory"]) - int(used["used_memory_scripts"]) - clients


def mget_all(r: Resp, keys: list[str], size: int = 1000) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(keys), size):
        out += r.call("MGET", *keys[i : i + size])
    return out


# -- the in-worker recorder (for peers that keep no completion time) -----------


class Recorder:
    """Counts completions in a worker process; writes count and first/last
    completion time (``time.time()``) to ``bench:recorder`` at the first, every
    1000th and the last one. Cheap: no Redis call on the other completions."""

    def __init__(self, url: str, n: int) -> None:
        self.url, self.n = url, n
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.lock = threading.Lock()
        self._resp: Resp | None = None

    def hit(self) -> None:
        t = time.time()
        with self.lock:
            self.count += 1
            if self.count == 1:
                self.first = t
            self.last = t
            c = self.count
            if c == 1 or c % 1000 == 0 or c == self.n:
                if self._resp is None:
                    self._resp = Resp(self.url)
                self._resp.call("HSET", RECORDER_KEY, "count", c, "first", repr(self.first),
                                "last", repr(self.last))


def recorder_count(r: Resp) -> int:
    c = r.call("HGET", RECORDER_KEY, "count")
    return int(c) if c else 0


def recorder_times(r: Resp) -> tuple[int, float, float]:
    c, first, last = r.call("HMGET", RECORDER_KEY, "count", "first", "last")
    return int(c or 0), float(first or 0), float(last or 0)


# -- the in-worker release clock (dependency release) ---------------------------


class ReleaseClock:
    """The release measurement's handlers, in the worker process. Prerequisite A
    waits for the driver's go (given once dependent B waits on A), then notes its
    end with ``time.time()`` as its last act, in this process; B's first act takes
    ``time.time()`` (the caller passes it), and B then pushes both to
    ``bench:release``. The clock itself does nothing in Redis between A's end and
    B's start."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ended: dict[str, float] = {}
        self._local = threading.local()  # a connection per thread (celery's pool)

    def _resp(self) -> Resp:
        resp: Resp | None = getattr(self._local, "resp", None)
        if resp is None:
            resp = self._local.resp = Resp(self.url)
        return resp

    def wait_for_go(self, pair: str) -> None:
        if self._resp().block(GO_TIMEOUT_S, "BLPOP", GO_KEY + pair) is None:
            raise TimeoutError(f"no go for pair {pair} in {GO_TIMEOUT_S:.0f} s")

    def prerequisite(self, pair: str) -> None:
        """A's body, for sync handlers."""
        self.wait_for_go(pair)
        self.ended[pair] = time.time()

    async def prerequisite_async(self, pair: str) -> None:
        """A's body, for async handlers: the go is awaited in a thread."""
        await asyncio.to_thread(self.wait_for_go, pair)
        self.ended[pair] = time.time()

    def dependent(self, pair: str, started: float) -> None:
        """B's body, after its first act, ``started = time.time()``."""
        ended = self.ended.pop(pair, None)
        self._resp().call("RPUSH", RELEASE_KEY, json.dumps([pair, ended, started]))


# -- worker processes ----------------------------------------------------------


class WorkerProc:
    """A worker process started by an adapter, in the adapter's process group
    (the harness kills that group if the adapter outlives its timeout)."""

    def __init__(self, argv: list[str], cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="bench-worker-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the worker and its reaped children (rq's forks)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, chars: int = 2000) -> str:
        self.log.flush()
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(WORKER_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WORKER_STOP_GRACE)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)
        return self.proc.returncode


def python_worker(script: str, args: argparse.Namespace, n: int, *extra: str) -> WorkerProc:
    """Start ``<this python> <script> worker URL N`` with the shared options."""
    argv = [sys.executable, str(HERE / script), "worker", args.url, str(n),
            "--concurrency", str(args.concurrency), "--poll-ms", str(args.poll_ms), *extra]
    return WorkerProc(argv, cwd=HERE)


# -- the measurement drivers ---------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def rate_result(count: int, seconds: float, method: str, **extra: Any) -> dict[str, Any]:
    return {"count": count, "seconds": seconds, "rate": count / seconds if seconds > 0 else None,
            "method": method, **extra}


def drain(
    args: argparse.Namespace,
    *,
    enqueue_all: Callable[[], tuple[Any, float, str]],
    start_worker: Callable[[], WorkerProc],
    done_count: Callable[[], int],
    completion_times: Callable[[Any], tuple[Any, ...]],
    time_source: str,
    kept: str,
    settle: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """N queued jobs, one worker process: the rate from the first completion to the last,
    and the memory per job in Redis, queued and completed.

    ``enqueue_all`` is the enqueue measurement (warm-up, flush, N jobs timed, count
    checked): it returns (whatever ``completion_times`` needs to find the jobs, its
    seconds, its method), so one invocation gives both figures; ``done_count`` is
    polled every 50 ms to know when the worker is done and to bracket the CPU window;
    ``completion_times`` returns (jobs found completed, first completion, last
    completion) in epoch seconds, read from the system where it keeps them
    (``time_source`` says where), and optionally a note on the jobs not found completed.

    Memory (``data_memory``) is read before the enqueue (the database is empty then:
    the harness flushed it, and ``enqueue_all`` flushes after its warm-up), after it,
    and once the drain is over and the worker stopped, after ``settle`` (whatever the
    system still does with completed jobs: agentq's projector catching up); ``kept``
    says what the system keeps of a completed job with its defaults.
    """
    n = args.n
    r = Resp(args.url)
    untrack_latency(r)
    empty = data_memory(r)
    handle, enqueue_s, enqueue_method = enqueue_all()
    queued = data_memory(r)
    worker = start_worker()
    out: dict[str, Any] = {"time_source": time_source, "concurrency": args.concurrency,
                           "enqueue": rate_result(n, enqueue_s, enqueue_method)}
    try:
        started = time.monotonic()
        deadline = started + args.deadline
        cpu0 = rcpu0 = w0 = None
        done = 0
        while True:
            done = done_count()
            now = time.monotonic()
            if done > 0 and w0 is None:
                cpu0, rcpu0, w0 = worker.cpu_seconds(), r.cpu_seconds(), now
            if done >= n:
                cpu1, rcpu1, w1 = worker.cpu_seconds(), r.cpu_seconds(), now
                break
            if not worker.alive():
                raise RuntimeError(f"the worker exited ({worker.proc.returncode}) after {done} of "
                                   f"{n} jobs:\n{worker.log_tail()}")
            if now > deadline:
                raise TimeoutError(f"{done} of {n} jobs done after {args.deadline:.0f} s")
            time.sleep(POLL_S)
        out["worker_startup_to_done_s"] = time.monotonic() - started
    finally:
        stopped_rc = worker.stop()
    found, first, last, *detail = completion_times(handle)
    records_by = time.monotonic() + 5  # the last records may land just after the count moved
    while found < n and time.monotonic() < records_by:
        time.sleep(0.2)
        found, first, last, *detail = completion_times(handle)
    if found != n:
        why = f" ({detail[0]})" if detail else ""
        raise RuntimeError(f"only {found} of {n} jobs found completed{why}")
    if settle is not None:
        settle(handle)
    completed = data_memory(r)
    out["memory"] = {
        "empty_bytes": empty, "queued_bytes": queued, "completed_bytes": completed,
        "queued_per_job": (queued - empty) / n, "completed_per_job": (completed - empty) / n,
        "kept": kept,
    }
    span = last - first
    out.update({
        "count": n,
        "seconds": span,
        "rate": (n - 1) / span if span > 0 else None,
        "worker_cpu_s": cpu1 - cpu0 if cpu0 is not None else None,
        "redis_cpu_s": rcpu1 - rcpu0 if rcpu0 is not None else None,
        "observed_window_s": w1 - w0 if w0 is not None else None,
        "worker_exit": stopped_rc,
    })
    if out["observed_window_s"]:
        out["worker_cpu_share"] = out["worker_cpu_s"] / out["observed_window_s"]
        out["redis_cpu_share"] = out["redis_cpu_s"] / out["observed_window_s"]
    r.close()
    return out


def latency_summary(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    ms = [s * 1000 for s in ordered]

    def rank(q: float) -> float:
        return ms[max(0, math.ceil(q * len(ms)) - 1)]

    return {
        "count": len(ms),
        "p50_ms": statistics.median(ms),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ms[-1],
        "mean_ms": statistics.fmean(ms),
        "samples_ms": [round(x, 4) for x in ms],
    }


def roundtrip(args: argparse.Namespace, *, start_worker: Callable[[], WorkerProc],
              run: Callable[[int, int], list[float]], method: str) -> dict[str, Any]:
    """Start a worker; ``run(warmup, count)`` does ``warmup`` untimed round trips (or
    release pairs; the first waits for the worker to come up) and returns ``count``
    timings in seconds."""
    worker = start_worker()
    try:
        samples = run(args.rt_warmup, args.rt)
        if not worker.alive():
            raise RuntimeError(f"the worker died:\n{worker.log_tail()}")
    except BaseException as exc:
        tail = worker.log_tail()
        raise RuntimeError(f"{type(exc).__name__}: {exc}\nworker log:\n{tail}") from exc
    finally:
        worker.stop()
    return {"method": method, "concurrency": args.concurrency, **latency_summary(samples)}


def release(args: argparse.Namespace, *, start_worker: Callable[[], WorkerProc],
            enqueue_pair: Callable[[str, float], None], method: str) -> dict[str, Any]:
    """Dependency release latency. One worker (its handlers use ``ReleaseClock``), idle
    queue, one pair at a time: ``enqueue_pair(pair, timeout)`` enqueues prerequisite A
    and dependent B, both carrying ``pair``, and returns once B waits on A; then A's
    handler gets its go, and the driver waits for B's record. The latency is B's start
    minus A's end, both ``time.time()`` in the worker process."""
    r = Resp(args.url)

    def one(pair: str, timeout: float) -> float:
        enqueue_pair(pair, timeout)
        r.call("RPUSH", GO_KEY + pair, 1)
        reply = r.block(timeout, "BLPOP", RELEASE_KEY)
        if reply is None:
            raise TimeoutError(f"pair {pair}: B did not start within {timeout:g} s of the go")
        got, ended, started = json.loads(reply[1])
        if got != pair or ended is None:
            raise RuntimeError(f"pair {pair}: B's record is {[got, ended, started]} (B ran in "
                               "another process, or before A ended)")
        if started < ended:
            raise RuntimeError(f"pair {pair}: B started {ended - started:.6f} s before A ended")
        return float(started - ended)

    def run(warmup: int, count: int) -> list[float]:
        one("warmup-0", 60)  # the worker is starting
        for i in range(1, warmup + 1):
            one(f"warmup-{i}", args.rt_timeout)
        return [one(f"pair-{i}", args.rt_timeout) for i in range(count)]

    try:
        return roundtrip(args, start_worker=start_worker, run=run, method=method)
    finally:
        r.close()


def install_term_handler(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM/SIGINT (for workers run in-process)."""

    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
