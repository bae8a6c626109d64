"""Dead-letter alerts: one alert per ``JobFailed`` event, to every configured sink.

The alerter is a member of the consumer group ``alerts`` on every partition
log. Each ``JobFailed`` entry becomes one alert, built from the event and the
job's state record, redacted (:mod:`agentq.consumers.redaction`) and sent to each sink
(log, webhook, stream); then the entry is acknowledged. Every other entry is
acknowledged and ignored.

Exactly once, across crashes and several alerters: the group hands each entry
to one consumer; a consumer starts by finishing its own pending entries and
claims entries left idle by dead consumers. A crash between sending and
acknowledging would send again on redelivery, so each sink that has been
served is recorded in a short-lived marker hash per event, written before the
acknowledgement; a redelivered entry is sent only to the sinks not in it.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from agentq.consumers.redaction import AlertContent
from agentq.consumers.waiting import sleep_unless_stopped, until_stopped
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent, job_history, read_record
from agentq.eventlog.records import to_view
from agentq.eventlog.registry import all_partitions
from agentq.eventlog.scripts import ensure_group
from agentq.schemas._base import micros_to_iso
from agentq.schemas.config import Config, LogSink, StreamSink, WebhookSink

log = structlog.get_logger("agentq.alerts")

ALERTS_GROUP: Final = "alerts"

_BLOCK_MS: Final = 5_000
# How often pending entries are looked at again: claimed from dead consumers,
# and our own retried after an error.
_RECOVER_SECONDS: Final = 30.0
# Far above the longest an alert can take (the webhook's attempts are bounded),
# so a live but slow alerter never has its entry claimed from under it.
_CLAIM_IDLE_MS: Final = 60_000
# The marker only has to outlive a redelivery: a restart, or a claim after
# _CLAIM_IDLE_MS. A day also covers a consumer that comes back the next morning.
_MARKER_TTL_SECONDS: Final = 86_400

Outcome = Literal["sent", "gave_up"]


@dataclass(frozen=True, slots=True)
class Alert:
    """One dead-letter alert: the redacted content plus the failure it reports."""

    event_id: str
    reason: str
    failed_at: str | None
    content: AlertContent

    @property
    def text(self) -> str:
        return self.content.text()

    def fields(self) -> dict[str, Any]:
        """The alert as camelCase JSON fields (without the text)."""
        return {
            **self.content.fields(),
            "reason": self.reason,
            "eventId": self.event_id,
            "failedAt": self.failed_at,
        }


class Sink(Protocol):
    """Where alerts go. ``sink_id`` is stable across restarts for the same config."""

    @property
    def sink_id(self) -> str: ...

    async def send(self, alert: Alert) -> Outcome:
        """Deliver ``alert``; "gave_up" when the sink's own bounded retries did not
        get it through (logged). Raises only for Redis failures worth a redelivery."""
        ...


class LogAlertSink:
    """A JSON line on standard error of this process."""

    sink_id = "log"

    async def send(self, alert: Alert) -> Outcome:
        line = {
            "event": "job failed",
            "level": "error",
            "logger": "agentq.alerts",
            "timestamp": micros_to_iso(time.time_ns() // 1000),
            **alert.fields(),
        }
        # Plain JSON rather than structlog: the line must be JSON on stderr
        # whatever the application configured structlog to render.
        sys.stderr.write(orjson.dumps(line).decode() + "\n")
        sys.stderr.flush()
        return "sent"


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """How hard a webhook is tried: ``attempts`` POSTs of ``timeout`` seconds
    each, ``backoff`` seconds before the second, doubling after."""

    timeout: float = 5.0
    attempts: int = 3
    backoff: float = 0.5


class _Permanent(Exception):
    """An answer that trying again will not change."""


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions: a task saying <!channel> must not ping anyone.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _post(url: str, body: bytes, timeout: float) -> None:
    request = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", "User-Agent": "agentq-alerts"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise _Permanent(f"HTTP {exc.code}") from exc
        raise


class WebhookAlertSink:
    """A POST of the alert as JSON: a Slack-compatible ``text`` plus its fields."""

    def __init__(self, url: str, policy: WebhookPolicy) -> None:
        self.url = url
        self.policy = policy
        parsed = urllib.parse.urlsplit(url)
        # The URL is often a secret (Slack's are): only its host is ever logged or stored.
        self.where = f"{parsed.scheme}://{parsed.hostname or ''}"
        self.sink_id = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:16]
        self._scheme_ok = parsed.scheme in ("http", "https")

    async def send(self, alert: Alert) -> Outcome:
        if not self._scheme_ok:
            # urllib would also open file:// and ftp:// URLs; a webhook is HTTP.
            log.error(
                "alert webhook is not http(s)", webhook=self.where, job_id=alert.content.job_id
            )
            return "gave_up"
        body = orjson.dumps({"text": _slack_escape(alert.text), **alert.fields()})
        delay = self.policy.backoff
        for attempt in range(1, self.policy.attempts + 1):
            try:
                await asyncio.to_thread(_post, self.url, body, self.policy.timeout)
                return "sent"
            except _Permanent as exc:
                log.error(
                    "alert webhook refused the alert",
                    webhook=self.where,
                    job_id=alert.content.job_id,
                    error=str(exc),
                )
                return "gave_up"
            # URLError, HTTPError and timeouts are OSErrors; a garbled answer is an HTTPException.
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if attempt == self.policy.attempts:
                    log.error(
                        "alert webhook failed, giving up",
                        webhook=self.where,
                        job_id=alert.content.job_id,
                        attempts=attempt,
                        error=str(exc),
                    )
                    return "gave_up"
                log.warning(
                    "alert webhook failed, retrying",
                    webhook=self.where,
                    job_id=alert.content.job_id,
                    attempt=attempt,
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                delay *= 2
        return "gave_up"


class StreamAlertSink:
    """An entry on a Redis stream whose key is used as configured (no prefix)."""

    def __init__(self, redis: Redis, key: str) -> None:
        self.redis = redis
        self.key = key
        self.sink_id = f"stream:{key}"

    async def send(self, alert: Alert) -> Outcome:
        entry = {"text": alert.text}
        entry.update({k: "" if v is None else str(v) for k, v in alert.fields().items()})
        try:
            await self.redis.xadd(self.key, entry)  # type: ignore[arg-type]
        except ResponseError as exc:
            # WRONGTYPE and the like: a configuration mistake, not worth redelivering for.
            log.error(
                "alert stream refused the alert",
                stream=self.key,
                job_id=alert.content.job_id,
                error=str(exc),
            )
            return "gave_up"
        return "sent"


def sinks_from_config(
    redis: Redis, config: Config, policy: WebhookPolicy | None = None
) -> list[Sink]:
    """The sinks of ``config.dlq`` (``[log]`` when the section is absent)."""
    sinks: list[Sink] = []
    for sink in config.dlq.sinks:
        if isinstance(sink, LogSink):
            sinks.append(LogAlertSink())
        elif isinstance(sink, WebhookSink):
            sinks.append(WebhookAlertSink(sink.url, policy or WebhookPolicy()))
        elif isinstance(sink, StreamSink):
            sinks.append(StreamAlertSink(redis, sink.key))
    return sinks


@dataclass(frozen=True, slots=True)
class _Failure:
    job_id: str
    attempt: int
    error: str
    reason: str
    at: int | None


def _parse_failure(part: Partition, event_id: str, fields: Mapping[str, str]) -> _Failure:
    try:
        event = RawEvent.parse(part.agent, event_id, fields)
        data: Mapping[str, Any] = event.data
        at: int | None = event.at
    except (ValueError, KeyError, TypeError):
        # A version this code cannot upcast: an alert with what can be read
        # beats losing it or leaving it pending forever.
        try:
            loaded = orjson.loads(fields.get("data", "{}"))
        except orjson.JSONDecodeError:
            loaded = {}
        data = loaded if isinstance(loaded, dict) else {}
        at = int(fields["at"]) if fields.get("at", "").isdigit() else None
    attempt = data.get("attempt")
    return _Failure(
        job_id=fields.get("jobId", "?"),
        attempt=attempt if isinstance(attempt, int) else 0,
        error=str(data.get("error", "")),
        reason=str(data.get("reason", "")),
        at=at,
    )


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Alerter:
    """Sends one alert per ``JobFailed`` event of every partition, as ``consumer``
    of the group ``alerts``.

    ``redis`` serves ordinary calls; ``blocking_redis`` must have no socket
    timeout (it carries ``XREADGROUP ... BLOCK``). Several alerters, under
    different consumer names, share the work; a restarted one should keep its
    name so that it finishes its own pending entries at once rather than after
    ``claim_idle_ms``.
    """

    def __init__(
        self,
        redis: Redis,
        blocking_redis: Redis,
        keys: Keys,
        config: Config,
        consumer: str,
        *,
        block_ms: int = _BLOCK_MS,
        batch: int = 100,
        claim_idle_ms: int = _CLAIM_IDLE_MS,
        recover_seconds: float = _RECOVER_SECONDS,
        webhook: WebhookPolicy | None = None,
    ) -> None:
        self.redis = redis
        self.blocking_redis = blocking_redis
        self.keys = keys
        self.consumer = consumer
        self.block_ms = block_ms
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.recover_seconds = recover_seconds
        self.sinks = sinks_from_config(redis, config, webhook)
        self.coalesce_seconds = 0.05
        self.alerts_sent = 0
        """Alerts this alerter built and sent (to at least one sink)."""
        self._parts: dict[str, Partition] = {}  # log key -> partition, group ensured
        self._to_recover: set[str] = set()  # log keys whose pending entries are due a look
        self._recovered_at = 0.0

    # -- running -----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Send alerts until ``stop`` is set. Redis failures are logged and retried
        with backoff; they never end the loop."""
        delay = 0.0
        while not stop.is_set():
            try:
                if await self._step(self.block_ms, stop) and self.coalesce_seconds:
                    # Alerts can wait a moment: reading in bigger batches keeps
                    # this consumer off a busy worker's back.
                    await sleep_unless_stopped(self.coalesce_seconds, stop)
                delay = 0.0
            except (RedisError, OSError) as exc:
                if "NOGROUP" in str(exc):
                    # A log or its group was deleted under us: join again on the next step.
                    self._parts.clear()
                delay = min(max(delay * 2, 0.5), 30.0)
                log.warning("alerts: redis unavailable", error=str(exc), retry_in=delay)
                await sleep_unless_stopped(delay, stop)
            except Exception:
                # A bug must not silence every later alert of the process: log it
                # loudly and go on; the entry stays pending and is tried again.
                delay = min(max(delay * 2, 0.5), 30.0)
                log.exception("alerts: unexpected error", retry_in=delay)
                await sleep_unless_stopped(delay, stop)

    async def process_once(self, block_ms: int = 0) -> int:
        """Handle what is available: new partitions, pending entries when due, then
        new entries (waiting up to ``block_ms`` for some; 0 does not wait).
        Returns the number of log entries acknowledged."""
        return await self._step(block_ms, None)

    async def _step(self, block_ms: int, stop: asyncio.Event | None) -> int:
        await self._discover()
        if time.monotonic() - self._recovered_at >= self.recover_seconds:
            self._recovered_at = time.monotonic()
            self._to_recover.update(self._parts)
        handled = 0
        # One partition at a time, forgotten only once done: after an error the
        # rest is picked up by the next step rather than the next timer.
        for log_key in sorted(self._to_recover):
            handled += await self._recover(self._parts[log_key])
            self._to_recover.discard(log_key)
        if not self._parts:
            # No partition yet: nothing to block on; look at the registry again soon.
            if block_ms > 0:
                await self._wait(asyncio.sleep(block_ms / 1000), stop)
            return handled
        reply = await self._wait(self._read_new(block_ms), stop)
        for log_key, entries in reply or []:
            handled += await self._handle(self._parts[log_key], entries)
        return handled

    @staticmethod
    async def _wait(awaitable: Any, stop: asyncio.Event | None) -> Any:
        # Only waits are raced with stop: stopping mid-send would leave work to redo.
        if stop is None:
            return await awaitable
        waiter = asyncio.ensure_future(awaitable)
        if await until_stopped(waiter, stop):
            return waiter.result()
        return None

    async def _discover(self) -> None:
        """Join the group on partitions not seen before, and look at their pending
        entries: on a start, those are what this consumer left unfinished."""
        for agent in await all_partitions(self.redis, self.keys):
            part = self.keys.partition(agent)
            if part.log not in self._parts:
                await ensure_group(self.redis, part.log, ALERTS_GROUP)
                self._parts[part.log] = part
                self._to_recover.add(part.log)

    async def _read_new(self, block_ms: int) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
        reply: Any = await self.blocking_redis.xreadgroup(
            ALERTS_GROUP,
            self.consumer,
            dict.fromkeys(self._parts, ">"),
            count=self.batch,
            # BLOCK 0 would wait forever; no BLOCK returns at once.
            block=block_ms if block_ms > 0 else None,
        )
        if isinstance(reply, dict):  # RESP3
            return [(key, entries[0] if entries else []) for key, entries in reply.items()]
        return [(key, entries) for key, entries in reply or []]

    # -- pending entries ---------------------------------------------------

    async def _recover(self, part: Partition) -> int:
        """Claim ``part``'s entries idle past ``claim_idle_ms``, then handle every
        entry pending to this consumer. Returns the entries acknowledged."""
        cursor = "0-0"
        while True:
            # Only the cursor is used: entries are read below from our own pending
            # list, which also shows entries deleted from the stream (Redis 6.2
            # replies nil for them here, and has no third reply element).
            reply: Any = await self.redis.xautoclaim(
                part.log, ALERTS_GROUP, self.consumer, self.claim_idle_ms, cursor, count=self.batch
            )
            cursor = str(reply[0])
            if cursor == "0-0":
                break
        handled = 0
        after = "0"
        while True:
            pending: Any = await self.redis.xreadgroup(
                ALERTS_GROUP, self.consumer, {part.log: after}, count=self.batch
            )
            entries = pending[0][1] if pending else []
            if not entries:
                return handled
            handled += await self._handle(part, entries)
            after = entries[-1][0]

    # -- one batch ---------------------------------------------------------

    async def _handle(
        self, part: Partition, entries: Sequence[tuple[str | None, Mapping[str, str] | None]]
    ) -> int:
        """Alert on the ``JobFailed`` entries, acknowledge all; returns how many."""
        to_ack: list[str] = []
        acked = 0
        for entry_id, fields in entries:
            if entry_id is None:
                continue
            to_ack.append(entry_id)
            # Fields are empty for an entry deleted from the stream: nothing to report.
            if fields and fields.get("type") == "JobFailed":
                await self._alert(part, entry_id, fields)
                # Acknowledge right after sending, with the ignored entries before it.
                acked += await self._ack(part, to_ack)
                to_ack = []
        if to_ack:
            acked += await self._ack(part, to_ack)
        return acked

    async def _ack(self, part: Partition, entry_ids: Sequence[str]) -> int:
        await self.redis.xack(part.log, ALERTS_GROUP, *entry_ids)
        return len(entry_ids)

    async def _alert(self, part: Partition, event_id: str, fields: Mapping[str, str]) -> None:
        marker = part.alerted(event_id)
        served: list[str] = await self.redis.hkeys(marker)  # type: ignore[assignment]
        todo = [sink for sink in self.sinks if sink.sink_id not in served]
        if not todo:
            return
        alert = await self.build_alert(part, event_id, fields)
        results = await asyncio.gather(
            *(self._deliver(sink, alert, marker) for sink in todo), return_exceptions=True
        )
        # Every sink has had its try before a failure is raised: one sink's Redis
        # error must not keep the others from sending.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.alerts_sent += 1

    async def _deliver(self, sink: Sink, alert: Alert, marker: str) -> None:
        outcome = await sink.send(alert)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(marker, sink.sink_id, outcome)
            pipe.expire(marker, _MARKER_TTL_SECONDS)
            await pipe.execute()

    async def build_alert(self, part: Partition, event_id: str, fields: Mapping[str, str]) -> Alert:
        """The alert for the ``JobFailed`` entry ``event_id`` of ``part``, from the
        event and the job's state record (which may be gone: then the task and
        dispatcher are unknown)."""
        failure = _parse_failure(part, event_id, fields)
        record = await read_record(self.redis, part, failure.job_id)
        view = None
        if record.get("spec"):
            try:
                view = to_view(failure.job_id, record)
            except (ValueError, KeyError):
                # A record this code cannot read: alert with what the event says.
                log.warning("alerts: unreadable job record", job_id=failure.job_id)
        if view is not None:
            used = await self._attempts_used(part, event_id, failure, record)
            content = AlertContent.of_job(view, attempts_used=used, error=failure.error)
        else:
            content = AlertContent.build(
                job_id=failure.job_id,
                agent=part.agent,
                dispatched_by=None,
                attempts_used=failure.attempt,
                max_attempts=None,
                error=failure.error,
                task=None,
            )
        return Alert(
            event_id=event_id,
            reason=failure.reason,
            failed_at=micros_to_iso(failure.at),
            content=content,
        )

    async def _attempts_used(
        self, part: Partition, event_id: str, failure: _Failure, record: Mapping[str, str]
    ) -> int:
        """Attempts of the failed budget: ``attempt`` counts across retries, and a
        retry starts a new budget at the attempt it was made at."""
        budget_from = int(record.get("budgetFrom", "0"))
        if failure.attempt > budget_from or failure.attempt == 0:
            # No retry since this failure: the record's budget is the failed one.
            return failure.attempt - min(budget_from, failure.attempt)
        # Retried since: the failed budget began at the last retry before this event.
        budget_from = 0
        try:
            history = await job_history(self.redis, part, failure.job_id) or []
        except ValueError:  # an event this code cannot read: count across budgets
            history = []
        for event in history:
            if _id_key(event.event_id) >= _id_key(event_id):
                break
            if event.type == "JobRetried":
                budget_from = int(event.data.get("attempt", 0))
        return max(0, failure.attempt - budget_from)
