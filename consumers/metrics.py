"""Prometheus metrics: SPEC part two, "Metrics".

What must agree whichever process is scraped is read from Redis at scrape
time, for every agent, in one pipeline (one per node on a cluster):

- ``agentq_jobs{agent,state}``: the ``{A}:counts`` hash the transition
  scripts keep;
- ``agentq_jobs_total{agent,event}``: the events of each type the projection
  has applied (``n:<type>`` in ``{A}:proj``, counted by ``project.lua`` in the
  step that moves its position, so each event is counted once);
- ``agentq_workers{agent}``: the live workers of ``{A}:workers`` (heartbeat
  deadlines against Redis ``TIME``);

each partition's three read by one ``metrics.lua`` call.

What a process measures itself comes from what it already has in hand, with
no Redis call of its own: ``agentq_job_run_seconds`` and
``agentq_job_wait_seconds`` (its workers' attempts: started -> ended, from the
worker's clock, and queued -> started, from the record ``start.lua`` returns),
``agentq_dependency_release_seconds`` (its gates: a dependency's terminal
event -> its dependent released), ``agentq_redis_errors_total`` and
``agentq_breaker_open`` (its circuit breaker). Histograms are summed over
processes by Prometheus as usual.

Metrics are collected only once :func:`serve` has started a server: before,
the hooks below cost a global's look-up.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from agentq.eventlog.breaker import BREAKER
from agentq.eventlog.keys import Keys
from agentq.eventlog.registry import all_partitions
from agentq.eventlog.scripts import Scripts
from agentq.schemas.words import AGENT_ID_RE, STATES

log = structlog.get_logger("agentq.metrics")

# The projection's per-type counters in {A}:proj (written by project.lua).
COUNTER_PREFIX = "n:"
# How long a scrape waits for Redis before it answers without the cluster's numbers.
SCRAPE_TIMEOUT = 5.0
_RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                600, 1800, 3600)
_RELEASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class ClusterState:
    """What one scrape read from Redis."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    events: dict[str, dict[str, int]] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)


async def read_state(redis: Redis, keys: Keys) -> ClusterState:
    """Every agent's counts, event counters and live workers: the registry, then
    one ``metrics.lua`` call per agent, all in one round trip (one per node on a
    cluster)."""
    agents = await all_partitions(redis, keys)
    state = ClusterState()
    if not agents:
        return state
    replies = await Scripts(redis).call_many(
        [Scripts.metrics_call(keys.partition(agent)) for agent in agents])
    cut = len(COUNTER_PREFIX)
    for agent, (counts, live, proj) in zip(agents, replies, strict=True):
        state.counts[agent] = {counts[i]: int(counts[i + 1]) for i in range(0, len(counts), 2)}
        state.events[agent] = {proj[i][cut:]: int(proj[i + 1]) for i in range(0, len(proj), 2)
                               if proj[i].startswith(COUNTER_PREFIX)}
        state.workers[agent] = int(live)
    return state


class _ProcessCollector(Collector):
    """This process's breaker: its failed calls and whether it is open."""

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "agentq_redis_errors", "Redis calls of this process that failed (connection "
            "refused or lost, timeout, authentication)", value=BREAKER.errors)
        yield GaugeMetricFamily(
            "agentq_breaker_open", "1 while this process's circuit breaker refuses Redis "
            "calls (open or half-open), else 0", value=0 if BREAKER.state == "closed" else 1)


_EVENT_TYPE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def cluster_text(state: ClusterState) -> str:
    """The families read from Redis, in the Prometheus text format (0.0.4).

    Written here rather than through prometheus_client's families: its
    exposition costs about 10 µs a sample (label names checked and escaped one
    by one), 100 ms for the 10,000 samples of 1,000 agents, twice the scrape's
    budget; these labels need no escaping (agent ids, states and event types
    are checked against their patterns), and a line costs well under a µs.
    """
    agents = [a for a in state.counts if AGENT_ID_RE.match(a)]
    lines = ["# HELP agentq_jobs Jobs per agent and state, now (the {A}:counts hashes)",
             "# TYPE agentq_jobs gauge"]
    for agent in agents:
        counts = state.counts[agent]
        lines.extend(f'agentq_jobs{{agent="{agent}",state="{name}"}} {counts.get(name, 0)}'
                     for name in STATES)
    lines += ["# HELP agentq_jobs_total Events appended per agent and event type (as the "
              "projection applied them)", "# TYPE agentq_jobs_total counter"]
    for agent in agents:
        lines.extend(f'agentq_jobs_total{{agent="{agent}",event="{kind}"}} {n}'
                     for kind, n in sorted(state.events.get(agent, {}).items())
                     if _EVENT_TYPE.match(kind))
    lines += ["# HELP agentq_workers Live workers per agent", "# TYPE agentq_workers gauge"]
    lines.extend(f'agentq_workers{{agent="{agent}"}} {state.workers.get(agent, 0)}'
                 for agent in agents)
    lines.append("")
    return "\n".join(lines)


class Metrics:
    """This process's metrics: a registry with what the process measures itself,
    and the reads of what Redis holds (:meth:`exposition`)."""

    def __init__(self, redis: Redis, keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.run_seconds = Histogram(
            "agentq_job_run_seconds", "Attempts run by this process's workers: started -> "
            "ended (completed or failed)", ("agent",), registry=self.registry,
            buckets=_RUN_BUCKETS)
        self.wait_seconds = Histogram(
            "agentq_job_wait_seconds", "Jobs started by this process's workers: queued -> "
            "started", ("agent",), registry=self.registry, buckets=_RUN_BUCKETS)
        self.release_seconds = Histogram(
            "agentq_dependency_release_seconds", "Dependents released by this process's "
            "gates: the dependency's terminal event -> the dependent leaves "
            "waiting_dependencies", registry=self.registry, buckets=_RELEASE_BUCKETS)
        self.registry.register(_ProcessCollector())
        self.redis, self.keys, self.loop = redis, keys, loop
        self._runs: dict[str, Any] = {}
        self._waits: dict[str, Any] = {}

    def observe_start(self, agent: str, queued_at_us: int, started_at_us: int) -> None:
        child = self._waits.get(agent)
        if child is None:
            child = self._waits[agent] = self.wait_seconds.labels(agent)
        child.observe(max(0.0, (started_at_us - queued_at_us) / 1e6))

    def observe_run(self, agent: str, seconds: float) -> None:
        child = self._runs.get(agent)
        if child is None:
            child = self._runs[agent] = self.run_seconds.labels(agent)
        child.observe(seconds)

    def observe_release(self, dependency_ended_at_us: int) -> None:
        self.release_seconds.observe(max(0.0, time.time() - dependency_ended_at_us / 1e6))

    def exposition(self) -> bytes:
        """A scrape's answer. Called in the server's thread: Redis is read on the
        process's event loop. When Redis cannot be read the process's own numbers
        are still served, and the cluster's are left out (absent, never stale)."""
        text = generate_latest(self.registry).decode()
        try:
            state = asyncio.run_coroutine_threadsafe(
                read_state(self.redis, self.keys), self.loop).result(SCRAPE_TIMEOUT)
        except Exception as exc:
            log.warning("metrics: could not read the counts from Redis",
                        error=str(exc) or type(exc).__name__)
        else:
            text += cluster_text(state)
        return text.encode()


_current: Metrics | None = None


def current() -> Metrics | None:
    """This process's metrics, once :func:`serve` started them; else None."""
    return _current


@dataclass
class MetricsServer:
    """A running ``/metrics`` server; :meth:`close` stops it."""

    host: str
    port: int
    metrics: Metrics
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        global _current
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if _current is self.metrics:
            _current = None


def parse_address(value: str) -> tuple[str, int]:
    """``[HOST:]PORT`` as (host, port); the host defaults to 127.0.0.1, port 0 is any
    free one (the server's note says which). Raises
    ValueError saying what is wrong."""
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ValueError(f"{value!r} is not [HOST:]PORT with a port from 0 to 65535 "
                         "(0: any free port)")
    return host, int(port_text)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape on standard error would drown the worker's


def _app(metrics: Metrics) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: ``/metrics`` (and ``/``) in the Prometheus text format 0.0.4,
    whatever the scraper accepts. SPEC's names give ``agentq_jobs`` (a gauge) and
    ``agentq_jobs_total`` (a counter), which that format carries and OpenMetrics
    (one family ``agentq_jobs`` for both) cannot."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"Not found: metrics are at /metrics\n"]
        body = metrics.exposition()
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve(redis: Redis, keys: Keys, host: str, port: int) -> MetricsServer:
    """Serve this process's metrics as Prometheus text at ``http://host:port/metrics``
    (in a thread of its own), and start observing. Call it from the event loop
    whose ``redis`` the scrapes read with. Port 0 takes a free port (see the
    returned server's ``port``). Raises OSError when the address cannot be
    listened on (a port in use)."""
    global _current
    metrics = Metrics(redis, keys, asyncio.get_running_loop())
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = family

    httpd = make_server(host, port, _app(metrics), Server,
                        handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="agentq-metrics", daemon=True)
    thread.start()
    _current = metrics
    return MetricsServer(host, httpd.server_address[1], metrics, httpd, thread)


__all__ = ["ClusterState", "Metrics", "MetricsServer", "current", "parse_address", "read_state",
           "serve"]
