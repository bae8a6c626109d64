"""What every peer adapter shares. Standard library only: it is imported by
scripts that run under each peer's own virtualenv (``benchmarks/.peers/<name>``).

An adapter is run as

    <venv python> benchmarks/peers/<name>_peer.py MEASURE URL N [options]

with MEASURE one of ``versions``, ``enqueue``, ``dispatch``, ``drain``,
``roundtrip`` (and ``worker``, which the adapter starts itself for drain and
round trip). It prints exactly one JSON object on stdout: ``{"ok": true, ...}``
with its figures, or ``{"ok": false, "error": ...}``. Logs go to stderr.
"""

from __future__ import annotations

import argparse
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
POLL_S = 0.05  # how often the drain driver looks at the completion count
WORKER_STOP_GRACE = 8.0


# -- arguments and output ------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("measure", choices=["versions", "enqueue", "dispatch", "drain", "roundtrip",
                                       "worker"])
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
    p.add_argument("--rt-timeout", type=float, default=10.0, help="seconds one round trip may take")
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
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), 10)
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
) -> dict[str, Any]:
    """N queued jobs, one worker process: the rate from the first completion to the last.

    ``enqueue_all`` is the enqueue measurement (warm-up, flush, N jobs timed, count
    checked): it returns (whatever ``completion_times`` needs to find the jobs, its
    seconds, its method), so one invocation gives both figures; ``done_count`` is
    polled every 50 ms to know when the worker is done and to bracket the CPU window;
    ``completion_times`` returns (jobs found completed, first completion, last
    completion) in epoch seconds, read from the system where it keeps them
    (``time_source`` says where), and optionally a note on the jobs not found completed.
    """
    n = args.n
    r = Resp(args.url)
    handle, enqueue_s, enqueue_method = enqueue_all()
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
    settle = time.monotonic() + 5  # the last records may land just after the count moved
    while found < n and time.monotonic() < settle:
        time.sleep(0.2)
        found, first, last, *detail = completion_times(handle)
    if found != n:
        why = f" ({detail[0]})" if detail else ""
        raise RuntimeError(f"only {found} of {n} jobs found completed{why}")
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
    """Start a worker; ``run(warmup, count)`` does ``warmup`` untimed round trips (the
    first waits for the worker to come up) and returns ``count`` timings in seconds."""
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


def install_term_handler(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGTERM/SIGINT (for workers run in-process)."""

    def handler(signum: int, frame: Any) -> None:
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
