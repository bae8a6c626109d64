"""Dead-letter alerts: one alert per ``JobFailed`` event, to every configured sink.

The alerter is a :class:`~agentq.consumers.logconsumer.LogConsumer` of the
group ``alerts`` on every partition log: it shares the log consumers' way of
finishing its own pending entries and taking over those of dead processes.
Each ``JobFailed`` entry becomes one alert, built from the event and the job's
state record, redacted (:mod:`agentq.consumers.redaction`) and sent to each
sink (log, webhook, stream); every other entry is acknowledged and ignored.

One alert per failure and sink, across slow sinks, crashes, outages and
several alerters: before sending, an alerter claims the sending in the
failure's marker hash (``HSETNX`` of ``claimed <consumer> <incarnation>``);
after it, it records the outcome there. An entry handed to another alerter
(its first one was judged dead) is sent only when the claim's owner is dead
(the process registry) or absent; a claim of a live process is left to it. A
claim of this very alerter whose send went through but could not be recorded
(Redis went away in between) is recorded, not sent again. Only a process that
dies between claiming and sending leaves its alert to be sent again by the
one taking over (at least once rather than lost).
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
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentq.consumers.logconsumer import LogConsumer
from agentq.consumers.ownership import Ownership
from agentq.consumers.redaction import AlertContent
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.processes import Census
from agentq.eventlog.reader import RawEvent, job_history, read_record
from agentq.eventlog.records import to_view
from agentq.schemas._base import micros_to_iso
from agentq.schemas.config import Config, LogSink, StreamSink, WebhookSink

log = structlog.get_logger("agentq.alerts")

ALERTS_GROUP: Final = "alerts"

# The marker only has to outlive a redelivery: a restart, or a takeover. A day
# also covers a consumer that comes back the next morning.
_MARKER_TTL_SECONDS: Final = 86_400
_CLAIMED: Final = "claimed "

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


def _failure_of(event: RawEvent) -> _Failure:
    try:
        data: Mapping[str, Any] = event.data
    except (ValueError, KeyError, TypeError):
        # A version this code cannot upcast: an alert with what can be read
        # beats losing it or leaving it pending forever.
        data = {}
    attempt = data.get("attempt")
    return _Failure(
        job_id=event.job_id,
        attempt=attempt if isinstance(attempt, int) else 0,
        error=str(data.get("error", "")),
        reason=str(data.get("reason", "")),
        at=event.at,
    )


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Notices(Protocol):
    """A kind of notice the alerter sends besides dead-letter alerts (approval
    requests: ``consumers/approvals.py``), with the same once-per-sink claims."""

    @property
    def sinks(self) -> Sequence[Sink]: ...

    def concerns(self, event: RawEvent) -> bool:
        """Whether ``event`` is one to send a notice of."""
        ...

    async def build(self, part: Partition, event: RawEvent) -> Alert:
        """The notice of ``event`` (of ``part``)."""
        ...


class Alerter(LogConsumer):
    """Sends one alert per ``JobFailed`` event of every partition, and one notice
    per event a kind of ``notices`` concerns, as ``consumer`` of the group
    ``alerts``: one group reads the logs for every notice to people.

    ``redis`` serves ordinary calls; ``blocking_redis`` must have no socket
    timeout (run without an ownership, it carries the doorbell). Several alerters, under
    different consumer names, share the work; a restarted one should keep its
    name (its process's) so that it finishes its own pending entries at once.
    """

    group = ALERTS_GROUP
    # Alerts can wait a moment: reading in bigger batches keeps this consumer
    # off a busy worker's back.
    coalesce_seconds = 0.05
    hears_quiet = False  # acts on failures and retries, which are loud

    def __init__(
        self,
        redis: Redis,
        blocking_redis: Redis,
        keys: Keys,
        config: Config,
        consumer: str,
        *,
        batch: int = 100,
        claim_idle_ms: int | None = None,
        webhook: WebhookPolicy | None = None,
        ownership: Ownership | None = None,
        notices: Sequence[Notices] = (),
    ) -> None:
        super().__init__(redis, blocking_redis, keys, consumer, claim_idle_ms=claim_idle_ms,
                         ownership=ownership)
        self.batch = batch
        self.sinks: Sequence[Sink] = sinks_from_config(redis, config, webhook)
        self.notices = list(notices)
        self.alerts_sent = 0
        """Alerts this alerter built and sent (to at least one sink)."""
        # This alerter's claims, told apart from an earlier process of the same name.
        self._claim = f"{_CLAIMED}{self.consumer} {uuid.uuid4().hex[:12]}"
        # Sends that went through and are not yet recorded: (event id, sink) -> outcome.
        self._unrecorded: dict[tuple[str, str], Outcome] = {}

    async def handle(self, events: list[RawEvent]) -> None:
        """Alert on the ``JobFailed`` events of a batch (one partition's), and send
        the notices of the events the other kinds concern."""
        part = self.keys.partition(events[0].agent)
        for event in events:
            if event.type == "JobFailed":
                await self._alert(part, event)
                continue
            for kind in self.notices:
                if kind.concerns(event):
                    await self._alert(part, event, kind)

    async def _alert(self, part: Partition, event: RawEvent, kind: Notices | None = None
                     ) -> None:
        """Send ``event``'s alert (``kind``: its notice of that kind) to each sink
        not yet sent to."""
        marker = part.alerted(event.event_id)
        sinks = self.sinks if kind is None else kind.sinks
        todo = await self._claim_sending(marker, event.event_id, sinks)
        if not todo:
            return
        alert = await (self.build_alert(part, event) if kind is None
                       else kind.build(part, event))
        results = await asyncio.gather(
            *(self._deliver(sink, alert, marker) for sink in todo), return_exceptions=True
        )
        # Every sink has had its try before a failure is raised: one sink's Redis
        # error must not keep the others from sending.
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.alerts_sent += 1

    async def _claim_sending(self, marker: str, event_id: str, sinks: Sequence[Sink]
                             ) -> list[Sink]:
        """Claim the sending of this event's alert to each of ``sinks``; returns the
        sinks this alerter is to send to (the rest were sent, or are being sent by a
        live one)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for sink in sinks:
                pipe.hsetnx(marker, sink.sink_id, self._claim)
            pipe.expire(marker, _MARKER_TTL_SECONDS)
            pipe.hgetall(marker)
            *_, claims = await pipe.execute()
        todo: list[Sink] = []
        census: Census | None = None
        for sink in sinks:
            claim: str = claims.get(sink.sink_id, "")
            if claim == self._claim:
                outcome = self._unrecorded.get((event_id, sink.sink_id))
                if outcome is None:
                    todo.append(sink)
                else:  # sent, but the outcome could not be recorded then
                    await self._record(marker, sink.sink_id, outcome, event_id)
                continue
            if not claim.startswith(_CLAIMED):
                continue  # sent, or given up on
            owner = claim[len(_CLAIMED):].partition(" ")[0]
            if owner != self.consumer:
                census = census or await self.processes.census()
                if owner in census.deadlines and owner not in census.dead():
                    continue  # a live alerter is sending it
            # Its claimer is gone (or was this process before a restart): take over.
            await self.redis.hset(marker, sink.sink_id, self._claim)
            todo.append(sink)
        return todo

    async def _deliver(self, sink: Sink, alert: Alert, marker: str) -> None:
        outcome = await sink.send(alert)
        self._unrecorded[(alert.event_id, sink.sink_id)] = outcome
        await self._record(marker, sink.sink_id, outcome, alert.event_id)

    async def _record(self, marker: str, sink_id: str, outcome: Outcome, event_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(marker, sink_id, outcome)
            pipe.expire(marker, _MARKER_TTL_SECONDS)
            await pipe.execute()
        self._unrecorded.pop((event_id, sink_id), None)

    async def build_alert(self, part: Partition, event: RawEvent) -> Alert:
        """The alert for the ``JobFailed`` event of ``part``, from the event and
        the job's state record (which may be gone: then the task and dispatcher
        are unknown)."""
        event_id = event.event_id
        failure = _failure_of(event)
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
            history = await job_history(self.redis, part, failure.job_id,
                                          payloads=False) or []
        except ValueError:  # an event this code cannot read: count across budgets
            history = []
        for event in history:
            if _id_key(event.event_id) >= _id_key(event_id):
                break
            if event.type == "JobRetried":
                budget_from = int(event.data.get("attempt", 0))
        return max(0, failure.attempt - budget_from)
