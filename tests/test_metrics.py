"""Prometheus metrics (issue 16, item 1): `/metrics` scraped from a running
`agentq worker --metrics-port` process while jobs run, each metric checked
against the log."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import agentq
from agentq.consumers.metrics import parse_address
from agentq.schemas.events import STATE_AFTER

AGENT = "w"
ROOT = Path(__file__).resolve().parent.parent
# A job whose task is "hold" runs until the test creates the flag file; "bad" fails.
HANDLER = ('t=$(cat); if [ "$t" = bad ]; then echo broken >&2; exit 1; fi; '
           'if [ "$t" = hold ]; then while [ ! -e "$FLAG" ]; do sleep 0.02; done; fi; echo ok')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[Samples, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, content_type


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually(check: Callable[[], Awaitable[bool]], what: str,
                     timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"never: {what}")
        await asyncio.sleep(0.05)


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url


@pytest.fixture
async def served(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str, tmp_path: Path,
) -> AsyncIterator[tuple[agentq.Client, Worker, Path]]:
    q = await worker_client(jobs={"backoffBaseSeconds": 0, "maxAttempts": 2})
    flag = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=q.config.key_prefix, AGENTQ_REDIS_URL=redis_url,
               AGENTQ_JOBS__BACKOFF_BASE_SECONDS="0", FLAG=str(flag))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentq.cli", "worker", AGENT, "--exec", HANDLER,
        "--concurrency", "4", "--quiet", "--metrics-port", "127.0.0.1:0",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = ""
        while "metrics at " not in line:
            raw = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert raw, "the worker ended before serving metrics"
            line = raw.decode()
        found = re.search(r"metrics at (http://\S+)", line)
        assert found, line
        yield q, Worker(proc, found.group(1)), flag
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.communicate(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _log(q: agentq.Client, agent: str) -> list[dict[str, Any]]:
    """The partition's events, as (type, job, at µs, data)."""
    entries = await q.redis.xrange(q.partition(agent).log)
    return [{"type": f["type"], "job": f["jobId"], "at": int(f["at"]),
             "data": orjson.loads(f["data"])} for _, f in entries]


async def test_metrics_agree_with_the_log(
    served: tuple[agentq.Client, Worker, Path],
) -> None:
    q, worker, flag = served
    url = worker.url

    await q.add_agent("idle")
    # While a job runs: it is active, and the worker is live.
    held = await q.dispatch(AGENT, "hold")

    async def holding() -> bool:
        samples, _ = await asyncio.to_thread(scrape, url)
        return value(samples, "agentq_jobs", agent=AGENT, state="active") == 1 \
            and value(samples, "agentq_workers", agent=AGENT) == 1
    await eventually(holding, "the held job active and one live worker")
    samples, content_type = await asyncio.to_thread(scrape, url)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    waiting = await q.dispatch(AGENT, "after", depends_on=[held.job_id])
    assert value(samples, "agentq_breaker_open") == 0

    good = [await q.dispatch(AGENT, f"job {i}") for i in range(5)]
    bad = await q.dispatch(AGENT, "bad")  # fails twice: a retry, then dead-lettered
    flag.touch()
    for job in [held, waiting, *good, bad]:
        view, timed_out = await q.wait(job.job_id, timeout=20)
        assert not timed_out, view
    assert (await q.status(bad.job_id)).state == "failed"

    events = await _log(q, AGENT)
    by_type = Counter(e["type"] for e in events)
    final: dict[str, str] = {}
    for e in events:  # each job's state, as its events leave it
        rule = STATE_AFTER[e["type"]]
        if rule is not None:
            final[e["job"]] = e["data"]["state"] if rule == "data" else rule
    states = Counter(final.values())

    async def agree() -> bool:
        nonlocal samples
        samples, _ = await asyncio.to_thread(scrape, url)
        return all(value(samples, "agentq_jobs_total", agent=AGENT, event=kind) == n
                   for kind, n in by_type.items())
    await eventually(agree, f"agentq_jobs_total equal to the log's {dict(by_type)}")
    for kind in ("JobDispatched", "JobStarted", "JobCompleted", "JobAttemptFailed", "JobFailed",
                 "JobQueued"):
        assert by_type[kind] > 0, kind
    for state in ("queued", "active", "completed", "failed", "delayed", "waiting_dependencies"):
        assert value(samples, "agentq_jobs", agent=AGENT, state=state) == states[state], state
    assert states["completed"] == 7 and states["failed"] == 1
    # Every known agent, even one with nothing in it: zeros.
    assert ("agentq_jobs", (("agent", "idle"), ("state", "queued"))) in samples
    assert value(samples, "agentq_workers", agent="idle") == 0

    # Histograms: one observation per attempt started (wait) and per attempt
    # ended (run), per dependent released; their sums match the log's times.
    started = [e for e in events if e["type"] == "JobStarted"]
    ended = [e for e in events if e["type"] in ("JobCompleted", "JobAttemptFailed", "JobFailed")]
    assert value(samples, "agentq_job_wait_seconds_count", agent=AGENT) == len(started) == 9
    assert value(samples, "agentq_job_run_seconds_count", agent=AGENT) == len(ended) == 9
    queued_at: dict[str, int] = {}
    wait_sum = 0.0
    last_start: dict[str, int] = {}
    run_sum = 0.0
    for e in events:
        data = e["data"]
        if e["type"] == "JobQueued" or data.get("state") == "queued":
            queued_at[e["job"]] = e["at"]
        elif e["type"] == "JobStarted":
            wait_sum += (e["at"] - queued_at[e["job"]]) / 1e6
            last_start[e["job"]] = e["at"]
        elif e in ended:
            run_sum += (e["at"] - last_start[e["job"]]) / 1e6
    assert value(samples, "agentq_job_wait_seconds_sum", agent=AGENT) == \
        pytest.approx(wait_sum, abs=1e-4)
    # The worker's clock: from its start call's reply to the outcome's call.
    assert value(samples, "agentq_job_run_seconds_sum", agent=AGENT) == \
        pytest.approx(run_sum, abs=0.05 * len(ended))
    released = [e for e in events if e["type"] == "JobQueued"
                and e["data"].get("reason") == "released"]
    assert len(released) == 1
    held_end = next(e["at"] for e in events if e["type"] == "JobCompleted"
                    and e["job"] == held.job_id)
    assert value(samples, "agentq_dependency_release_seconds_count") == 1
    assert value(samples, "agentq_dependency_release_seconds_sum") == \
        pytest.approx((released[0]["at"] - held_end) / 1e6, abs=0.05)
    assert value(samples, "agentq_redis_errors_total") == 0
    assert value(samples, "agentq_breaker_open") == 0
    assert value(samples, "agentq_workers", agent=AGENT) == 1
    by_state = defaultdict(float)
    for (name, labels), n in samples.items():
        if name == "agentq_jobs" and dict(labels)["agent"] == AGENT:
            by_state[dict(labels)["state"]] = n
    assert sum(by_state.values()) == 8


async def test_a_port_in_use_is_a_usage_error(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str,
) -> None:
    import socket

    q = await worker_client()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
        env.update(AGENTQ_KEY_PREFIX=q.config.key_prefix, AGENTQ_REDIS_URL=redis_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentq.cli", "worker", AGENT, "--exec", "true",
            "--metrics-port", str(port), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2, err.decode()
    assert f"--metrics-port {port}: cannot listen there" in err.decode()
    assert "choose another port" in err.decode()


def test_metrics_address() -> None:
    assert parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0") == ("127.0.0.1", 0)  # any free port
    for bad in ("", "x", "70000", "host:", "-1"):
        with pytest.raises(ValueError, match="not \\[HOST:\\]PORT"):
            parse_address(bad)


def test_the_grafana_example_uses_only_agentq_metrics() -> None:
    """examples/grafana-dashboard.json: valid JSON, and every query names metrics
    that agentq serves (SPEC's names), so it cannot drift from them unseen."""
    import json

    served = {"agentq_jobs", "agentq_jobs_total", "agentq_workers", "agentq_job_run_seconds",
              "agentq_job_wait_seconds", "agentq_dependency_release_seconds",
              "agentq_redis_errors_total", "agentq_breaker_open"}
    dashboard = json.loads((ROOT / "examples" / "grafana-dashboard.json").read_text())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\bagentq_[a-z_]+", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used == served


async def test_the_dashboard_serves_metrics_too(
    worker_client: Callable[..., Awaitable[agentq.Client]], redis_url: str,
) -> None:
    q = await worker_client()
    await q.dispatch(AGENT, "queued, with no worker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(AGENTQ_KEY_PREFIX=q.config.key_prefix, AGENTQ_REDIS_URL=redis_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentq.cli", "dashboard", "--port", "0",
        "--metrics-port", "127.0.0.1:0", cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = ""
        while "metrics at " not in line:
            raw = await asyncio.wait_for(proc.stderr.readline(), 20)
            assert raw, "the dashboard ended before serving metrics"
            line = raw.decode()
        found = re.search(r"metrics at (http://\S+)", line)
        assert found, line
        samples, _ = await asyncio.to_thread(scrape, found.group(1))
        assert value(samples, "agentq_jobs", agent=AGENT, state="queued") == 1
        assert value(samples, "agentq_workers", agent=AGENT) == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.communicate(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.both_backends
async def test_the_cluster_families_on_every_node(q: agentq.Client) -> None:
    """What a scrape reads from Redis: one metrics.lua call per partition, agents
    a, b and c on three masters in the [cluster] variant."""
    from agentq.consumers.metrics import cluster_text, read_state
    from agentq.eventlog.scripts import Scripts
    from agentq.projections.projection import Projection

    await q.dispatch_many([{"target": t, "task": "x"} for t in ("a", "b", "b", "c")],
                          caller="main")
    await q.scripts.call_many([Scripts.heartbeat_call(q.partition("b"), "w1", 60_000)])
    await Projection(q.redis).catch_up([q.partition(a) for a in ("a", "b", "c")])
    state = await read_state(q.redis, q.keys)
    assert {a: state.counts[a].get("queued") for a in ("a", "b", "c")} == {"a": 1, "b": 2, "c": 1}
    assert {a: state.events[a] for a in ("a", "b", "c")} == {
        "a": {"JobDispatched": 1}, "b": {"JobDispatched": 2}, "c": {"JobDispatched": 1}}
    assert {a: state.workers[a] for a in ("a", "b", "c")} == {"a": 0, "b": 1, "c": 0}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(cluster_text(state)) for s in f.samples}
    assert value(samples, "agentq_jobs", agent="b", state="queued") == 2
    assert value(samples, "agentq_jobs_total", agent="c", event="JobDispatched") == 1
    assert value(samples, "agentq_workers", agent="b") == 1
