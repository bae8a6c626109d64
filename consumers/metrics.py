"""Prometheus metrics: SPEC part two, "Metrics".

What must agree whichever process is scraped is read from Redis at scrape
time, for every agent, in one pipeline (one per node on a cluster):

- ``agentq_jobs{agent,state}``: the ``{A}:counts`` hash the transition
  scripts keep;
- ``agentq_jobs_total{agent,event}``: the events of each type the projection
  has applied (``n:<type>`` in ``{A}:proj``, counted by ``project.lua`` in the
  step that moves its position, so each event is counted once);
- ``agentq_workers{agent}``: the live workers of ``{A}:workers`` (heartbeat
  deadlines against Redis ``TIME``).

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
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis

from agentq.eventlog.breaker import BREAKER
from agentq.eventlog.keys import Keys
from agentq.eventlog.registry import all_partitions
from agentq.schemas.words import STATES

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
    """Every agent's counts, event counters and live workers: the registry, the
    server's time, then one pipeline (per node on a cluster) of three reads per
    agent."""
    agents = await all_partitions(redis, keys)
    seconds, micros = await redis.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    state = ClusterState()
    if not agents:
        return state
    async with redis.pipeline(transaction=False) as pipe:
        for agent in agents:
            part = keys.partition(agent)
            pipe.hgetall(part.counts)
            pipe.hgetall(part.projection)
            pipe.zcount(part.workers, f"({now_ms}", "+inf")
        replies: list[Any] = await pipe.execute()
    cut = len(COUNTER_PREFIX)
    for i, agent in enumerate(agents):
        counts, proj, live = replies[3 * i : 3 * i + 3]
        state.counts[agent] = {name: int(n) for name, n in counts.items()}
        state.events[agent] = {name[cut:]: int(n) for name, n in proj.items()
                               if name.startswith(COUNTER_PREFIX)}
        state.workers[agent] = int(live)
    return state


class _RedisCollector(Collector):
    """The metrics read from Redis (and the breaker's), at each scrape. A scrape
    runs in the server's thread; the reads run on the process's event loop."""

    def __init__(self, redis: Redis, keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
        self.redis = redis
        self.keys = keys
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "agentq_redis_errors", "Redis calls of this process that failed (connection "
            "refused or lost, timeout, authentication)", value=BREAKER.errors)
        yield GaugeMetricFamily(
            "agentq_breaker_open", "1 while this process's circuit breaker refuses Redis "
            "calls (open or half-open), else 0", value=0 if BREAKER.state == "closed" else 1)
        try:
            state = asyncio.run_coroutine_threadsafe(
                read_state(self.redis, self.keys), self.loop).result(SCRAPE_TIMEOUT)
        except Exception as exc:
            # The process's own numbers are still served; the cluster's are absent.
            log.warning("metrics: could not read the counts from Redis", error=str(exc)
                        or type(exc).__name__)
            return
        jobs = GaugeMetricFamily("agentq_jobs", "Jobs per agent and state, now",
                                 labels=("agent", "state"))
        for agent, counts in state.counts.items():
            for state_name in STATES:
                jobs.add_metric((agent, state_name), counts.get(state_name, 0))
        yield jobs
        total = CounterMetricFamily(
            "agentq_jobs", "Events appended per agent and event type (as the projection "
            "applied them)", labels=("agent", "event"))
        for agent, events in state.events.items():
            for event_type, n in sorted(events.items()):
                total.add_metric((agent, event_type), n)
        yield total
        workers = GaugeMetricFamily("agentq_workers", "Live workers per agent",
                                    labels=("agent",))
        for agent, live in state.workers.items():
            workers.add_metric((agent,), live)
        yield workers


class Metrics:
    """This process's metrics: a registry with the histograms it observes and
    the collector of what Redis holds."""

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
        self.registry.register(_RedisCollector(redis, keys, loop))
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


def _text_only(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """The Prometheus text format (0.0.4) whatever the scraper accepts: SPEC's names
    give ``agentq_jobs`` (a gauge) and ``agentq_jobs_total`` (a counter), which
    that format carries and OpenMetrics (one family ``agentq_jobs`` for both)
    cannot."""

    def text(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ["HTTP_ACCEPT"] = "text/plain"
        return app(environ, start_response)

    return text


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

    httpd = make_server(host, port, _text_only(make_wsgi_app(metrics.registry)), Server,
                        handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="agentq-metrics", daemon=True)
    thread.start()
    _current = metrics
    return MetricsServer(host, httpd.server_address[1], metrics, httpd, thread)


__all__ = ["ClusterState", "Metrics", "MetricsServer", "current", "parse_address", "read_state",
           "serve"]
