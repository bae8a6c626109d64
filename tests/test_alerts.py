"""Dead-letter alerts end to end, on the real server: sinks, restarts, sharing."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from redis.asyncio import Redis

import agentq
from agentq.consumers.alerts import ALERTS_GROUP, Alerter, WebhookPolicy
from agentq.consumers.presence import Presence
from agentq.consumers.redaction import REDACTED
from agentq.eventlog.connection import open_redis
from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config, DlqConfig

pytestmark = pytest.mark.both_backends  # whole flows: again on a local Redis Cluster (conftest)

ORIGIN = {
    "channel": "chan-ORIGIN-7f3a",
    "accountId": "acct-ORIGIN-91bc",
    "threadId": "thr-ORIGIN-x",
}
SESSION_KEY = "sess-SECRET-5d2e"
BLOB = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo" * 3


# -- helpers ---------------------------------------------------------------


def config_with(q: agentq.Client, *sinks: dict[str, str]) -> Config:
    return q.config.model_copy(update={"dlq": DlqConfig.model_validate({"sinks": list(sinks)})})


def sink_key(q: agentq.Client) -> str:
    # Under the test's prefix, so the fixture deletes it.
    return f"{q.keys.prefix}:dead-letters"


@pytest.fixture
async def blocking(q: agentq.Client) -> AsyncIterator[Redis]:
    assert q.target is not None
    client = open_redis(q.target, socket_timeout=None)
    yield client
    await client.aclose()


def make_alerter(
    q: agentq.Client, blocking: Redis, config: Config, consumer: str, **kwargs: Any
) -> Alerter:
    return Alerter(q.redis, blocking, q.keys, config, consumer, **kwargs)


async def start_jobs(
    q: agentq.Client, agent: str, n: int, task: str | None = None, **fields: Any
) -> tuple[Partition, list[str]]:
    """Dispatch ``n`` jobs to ``agent`` and start them (attempt 1)."""
    part = q.partition(agent)
    ids = [
        (await q.dispatch(agent, task or f"task {i} for {agent}", max_attempts=1, **fields)).job_id
        for i in range(n)
    ]
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, "w", 60_000, n)
    assert sorted(job.job_id for job in started) == sorted(ids)
    return part, ids


async def fail_jobs(q: agentq.Client, agent: str, n: int, **fields: Any) -> list[str]:
    """``n`` jobs of ``agent`` that end ``failed`` (one attempt each)."""
    part, ids = await start_jobs(q, agent, n, **fields)
    for job_id in ids:
        assert await q.scripts.fail(part, "w", job_id, 1, "boom", Backoff(0, 0)) == "failed"
    return ids


async def drain(alerter: Alerter) -> int:
    """Process until nothing is left; the number of entries handled."""
    total = 0
    while handled := await alerter.process_once(0):
        total += handled
    return total


async def stream_alerts(q: agentq.Client) -> list[dict[str, str]]:
    entries: Any = await q.redis.xrange(sink_key(q))
    return [fields for _, fields in entries]


async def pending(q: agentq.Client, agents: Sequence[str] = ("a", "b", "c")) -> int:
    total = 0
    for agent in agents:
        summary: Any = await q.redis.xpending(q.partition(agent).log, ALERTS_GROUP)
        total += int(summary["pending"])
    return total


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- a local webhook -------------------------------------------------------


@dataclass
class Webhook:
    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    failures_left: int = 0
    calls: int = 0
    delay: float = 0.0  # seconds before each answer


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(hook.delay)
            with lock:
                hook.calls += 1
                fail = hook.failures_left > 0
                if fail:
                    hook.failures_left -= 1
                else:
                    hook.bodies.append(json.loads(body))
            self.send_response(500 if fail else 200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook/secret-token"
    yield hook
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


FAST_WEBHOOK = WebhookPolicy(timeout=2.0, attempts=3, backoff=0.01)


# -- sinks -----------------------------------------------------------------


async def test_webhook_gets_one_redacted_alert(
    q: agentq.Client, blocking: Redis, webhook: Webhook
) -> None:
    config = config_with(q, {"type": "webhook", "url": webhook.url})
    task = f"render data:image/png;base64,{BLOB}== and token {BLOB} <!channel>"
    (job_id,) = await fail_jobs(
        q, "a", 1, task=task, origin=ORIGIN, session_key=SESSION_KEY, metadata={"m": "META-42"}
    )
    alerter = make_alerter(q, blocking, config, "one", webhook=FAST_WEBHOOK)

    assert await drain(alerter) > 0

    assert len(webhook.bodies) == 1
    body = webhook.bodies[0]
    assert body["text"].splitlines() == [
        "agentq: job failed",
        f"Job: {job_id}",
        "Agent: a",
        "Dispatched by: main",
        "Attempts: 1/1",
        "Error: boom",
        f"Task: render {REDACTED} and token {REDACTED} &lt;!channel&gt;",
    ]
    assert body["jobId"] == job_id
    assert body["reason"] == "attempts_exhausted"
    assert body["task"] == f"render {REDACTED} and token {REDACTED} <!channel>"
    raw = json.dumps(body)
    for secret in [*ORIGIN.values(), SESSION_KEY, "META-42", BLOB[:40]]:
        assert secret not in raw
    assert await pending(q) == 0


async def test_webhook_retried_until_it_answers(
    q: agentq.Client, blocking: Redis, webhook: Webhook
) -> None:
    webhook.failures_left = 2
    config = config_with(q, {"type": "webhook", "url": webhook.url})
    (job_id,) = await fail_jobs(q, "a", 1)
    await drain(make_alerter(q, blocking, config, "one", webhook=FAST_WEBHOOK))
    assert webhook.calls == 3
    assert [body["jobId"] for body in webhook.bodies] == [job_id]


async def test_dead_webhook_does_not_hold_back_other_sinks(
    q: agentq.Client, blocking: Redis
) -> None:
    config = config_with(
        q,
        {"type": "webhook", "url": f"http://127.0.0.1:{closed_port()}/hook"},
        {"type": "stream", "key": sink_key(q)},
    )
    ids = await fail_jobs(q, "a", 2)
    alerter = make_alerter(
        q, blocking, config, "one", webhook=WebhookPolicy(timeout=1.0, attempts=2, backoff=0.01)
    )
    await drain(alerter)
    assert sorted(a["jobId"] for a in await stream_alerts(q)) == sorted(ids)
    # Given up on, not left pending to be retried forever.
    assert await pending(q) == 0


async def test_log_sink_is_the_default(
    q: agentq.Client, blocking: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    assert [s.type for s in q.config.dlq.sinks] == ["log"]
    (job_id,) = await fail_jobs(q, "b", 1, origin=ORIGIN)
    await drain(make_alerter(q, blocking, q.config, "one"))
    lines = [
        json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")
    ]
    alerts = [line for line in lines if line.get("event") == "job failed"]
    assert [(a["jobId"], a["agent"], a["attemptsUsed"], a["maxAttempts"]) for a in alerts] == [
        (job_id, "b", 1, 1)
    ]
    assert "ORIGIN" not in json.dumps(alerts)


async def test_stream_sink_gets_exactly_one_alert_per_failed_job(
    q: agentq.Client, blocking: Redis
) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    ids = await fail_jobs(q, "a", 3) + await fail_jobs(q, "b", 2)
    alerter = make_alerter(q, blocking, config, "one")
    await drain(alerter)
    await drain(alerter)
    alerts = await stream_alerts(q)
    assert sorted(a["jobId"] for a in alerts) == sorted(ids)
    assert all(a["text"].startswith("agentq: job failed\n") for a in alerts)
    assert alerter.alerts_sent == 5
    # A new failure later is alerted too, once.
    (late,) = await fail_jobs(q, "c", 1)
    await drain(alerter)
    assert [a["jobId"] for a in await stream_alerts(q)].count(late) == 1
    assert len(await stream_alerts(q)) == 6


async def test_other_events_produce_nothing(q: agentq.Client, blocking: Redis) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    part, (done, cancelled) = await start_jobs(q, "a", 2)
    await q.scripts.complete(part, "w", [(done, 1, b'"fine"')])
    # An attempt failing with attempts left is not a dead letter.
    job = await q.dispatch("a", "try twice", max_attempts=2)
    await q.scripts.start(part, "w", 60_000, 1)
    assert await q.scripts.fail(part, "w", job.job_id, 1, "flaky", Backoff(0, 0)) == "queued"
    await q.cancel(cancelled)
    await q.cancel((await q.dispatch("b", "never runs")).job_id)

    handled = await drain(make_alerter(q, blocking, config, "one"))

    assert handled >= 10  # every event was read and acknowledged
    assert await stream_alerts(q) == []
    assert await pending(q) == 0


async def test_alert_after_a_retry_counts_the_failed_budget(
    q: agentq.Client, blocking: Redis
) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    part = q.partition("a")
    (job_id,) = await fail_jobs(q, "a", 1)
    await q.retry(job_id)
    await q.scripts.start(part, "w", 60_000, 1)
    assert await q.scripts.fail(part, "w", job_id, 2, "boom again", Backoff(0, 0)) == "failed"

    # Both failures are alerted after the retry, when the record shows the second budget.
    await drain(make_alerter(q, blocking, config, "one"))

    alerts = await stream_alerts(q)
    assert [(a["jobId"], a["attemptsUsed"], a["maxAttempts"], a["error"]) for a in alerts] == [
        (job_id, "1", "1", "boom"),
        (job_id, "1", "1", "boom again"),
    ]


async def test_alert_without_a_state_record(q: agentq.Client, blocking: Redis) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    (job_id,) = await fail_jobs(q, "a", 1)
    await q.redis.delete(q.partition("a").job(job_id))
    await drain(make_alerter(q, blocking, config, "one"))
    (alert,) = await stream_alerts(q)
    assert alert["jobId"] == job_id
    assert alert["task"] == ""
    assert "Task: (unknown" in alert["text"]


# -- exactly once across restarts and alerters ----------------------------


class CrashBeforeAck(Alerter):
    """Dies (raises) right after its first alert: sent, not acknowledged."""

    async def _alert(self, part: Partition, event: RawEvent) -> None:
        await super()._alert(part, event)
        raise RuntimeError("crash between sending and acknowledging")


async def test_restarts_send_each_alert_exactly_once(q: agentq.Client, blocking: Redis) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    ids = await fail_jobs(q, "a", 3)
    await drain(make_alerter(q, blocking, config, "x"))
    assert len(await stream_alerts(q)) == 3

    # "x" sends one alert of the next batch and dies before acknowledging anything.
    ids += await fail_jobs(q, "a", 2) + await fail_jobs(q, "b", 2)
    with pytest.raises(RuntimeError):
        await CrashBeforeAck(q.redis, blocking, q.keys, config, "x").process_once(0)
    assert len(await stream_alerts(q)) == 4
    assert await pending(q) > 0

    # Restarted under the same name, it finishes its own pending entries at once.
    await drain(make_alerter(q, blocking, config, "x"))
    assert Counter(a["jobId"] for a in await stream_alerts(q)) == Counter(ids)
    assert await pending(q) == 0

    # "x" dies again the same way; a different consumer claims what it left.
    ids += await fail_jobs(q, "c", 3)
    with pytest.raises(RuntimeError):
        await CrashBeforeAck(q.redis, blocking, q.keys, config, "x").process_once(0)
    assert await pending(q) > 0
    other = make_alerter(q, blocking, config, "y", claim_idle_ms=0)
    await drain(other)
    # And "x" back again finds nothing left to send.
    await drain(make_alerter(q, blocking, config, "x", claim_idle_ms=0))

    alerts = await stream_alerts(q)
    assert Counter(a["jobId"] for a in alerts) == Counter(ids)
    assert len(alerts) == len(ids) == 10
    assert await pending(q) == 0


async def test_two_alerters_share_the_work(q: agentq.Client, blocking: Redis) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    ids = await fail_jobs(q, "a", 8) + await fail_jobs(q, "b", 6)
    first = make_alerter(q, blocking, config, "one", batch=1)
    second = make_alerter(q, blocking, config, "two", batch=1)
    stop = asyncio.Event()
    runs = [asyncio.create_task(a.run(stop)) for a in (first, second)]
    try:

        async def all_sent() -> bool:
            return len(await stream_alerts(q)) >= len(ids)

        await eventually(all_sent)
        # While they block, new failures and a new partition are picked up.
        await q.add_agent("d")
        ids += await fail_jobs(q, "c", 3) + await fail_jobs(q, "d", 2)
        await eventually(all_sent)
        await asyncio.sleep(0.3)  # room for a duplicate to show up
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runs), timeout=5)

    alerts = await stream_alerts(q)
    assert Counter(a["jobId"] for a in alerts) == Counter(ids)
    assert first.alerts_sent + second.alerts_sent == len(ids)
    assert first.alerts_sent > 0 and second.alerts_sent > 0
    assert await pending(q, ("a", "b", "c", "d")) == 0


async def test_stop_ends_a_blocked_run_promptly(q: agentq.Client, blocking: Redis) -> None:
    alerter = make_alerter(q, blocking, q.config, "one")
    stop = asyncio.Event()
    run = asyncio.create_task(alerter.run(stop))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    stop.set()
    await asyncio.wait_for(run, timeout=5)
    assert time.monotonic() - started < 2


async def test_claimed_entries_deleted_from_the_log_are_acknowledged(
    q: agentq.Client, blocking: Redis
) -> None:
    config = config_with(q, {"type": "stream", "key": sink_key(q)})
    await drain(make_alerter(q, blocking, config, "x"))  # joins the group everywhere
    (job_id,) = await fail_jobs(q, "a", 1)
    log = q.partition("a").log
    # "x" reads the entries and dies; then one of them is deleted from the log
    # (as trimming would), which Redis 6.2 and 7 report differently when claimed.
    read: Any = await q.redis.xreadgroup(ALERTS_GROUP, "x", {log: ">"})
    first_id = read[0][1][0][0]
    await q.redis.xdel(log, first_id)
    await drain(make_alerter(q, blocking, config, "y", claim_idle_ms=0))
    assert [a["jobId"] for a in await stream_alerts(q)] == [job_id]
    assert await pending(q) == 0


# -- one alert per failure: the sending is claimed before it is sent ----------


async def test_a_slow_webhook_never_gets_an_alert_twice(
    q: agentq.Client, blocking: Redis, webhook: Webhook
) -> None:
    """While a live alerter sends slowly, its entries are neither taken from it
    (however idle) nor sent again by an alerter that is handed them."""
    webhook.delay = 0.4
    config = config_with(q, {"type": "webhook", "url": webhook.url})
    policy = WebhookPolicy(timeout=5.0, attempts=1, backoff=0.01)
    await drain(make_alerter(q, blocking, config, "slow", webhook=policy))  # joins the groups
    ids = await fail_jobs(q, "a", 3)
    await Presence(q.redis, q.keys, "slow", timeout_seconds=30).beat()  # a live process
    slow = make_alerter(q, blocking, config, "slow", webhook=policy)
    sending = asyncio.create_task(drain(slow))

    async def sending_started() -> bool:
        return webhook.calls >= 1

    await eventually(sending_started)

    other_blocking = open_redis(q.target, socket_timeout=None)  # type: ignore[arg-type]
    try:
        other = make_alerter(q, other_blocking, config, "other", webhook=policy,
                             claim_idle_ms=0)
        assert await other.recover() == 0  # a live process's entries are not taken
        # Handed the entries anyway (as when a process is wrongly judged dead):
        # the live alerter's claims hold.
        log = q.partition("a").log
        held: Any = await q.redis.xpending_range(log, ALERTS_GROUP, "-", "+", 10, "slow")
        await q.redis.xclaim(log, ALERTS_GROUP, "other", 0,
                             [h["message_id"] for h in held], justid=True)
        await drain(other)
        assert other.alerts_sent == 0
    finally:
        await other_blocking.aclose()
    await asyncio.wait_for(sending, 10)
    assert sorted(body["jobId"] for body in webhook.bodies) == sorted(ids)
    assert webhook.calls == 3


class LosesTheFirstRecord(Alerter):
    """Redis goes away between the first send and its record."""

    lost = 0

    async def _record(self, marker: str, sink_id: str, outcome: Any, event_id: str) -> None:
        if not self.lost:
            self.lost += 1
            raise ConnectionError("Redis went away")
        await super()._record(marker, sink_id, outcome, event_id)


async def test_an_outage_between_sending_and_recording_sends_nothing_twice(
    q: agentq.Client, blocking: Redis, webhook: Webhook
) -> None:
    config = config_with(q, {"type": "webhook", "url": webhook.url})
    ids = await fail_jobs(q, "a", 2)
    alerter = LosesTheFirstRecord(q.redis, blocking, q.keys, config, "x", webhook=FAST_WEBHOOK)
    with pytest.raises(ConnectionError):
        await drain(alerter)
    assert alerter.lost == 1 and webhook.calls == 1
    # Redis is back: the entry is still pending and handled again, without a resend.
    await alerter.recover()
    await drain(alerter)
    assert sorted(body["jobId"] for body in webhook.bodies) == sorted(ids)
    assert webhook.calls == 2
    assert await pending(q) == 0
