"""Approval requests: the sinks of ``approvals.sinks`` are told once per job that
waits for approval.

The notifier is the alerter (:class:`~agentq.consumers.alerts.Alerter`) on a
consumer group of its own, ``approvals``: it reads every partition log, and of
each ``JobDispatched`` whose state is ``pending_approval`` it builds one notice
(job id, target, dispatcher, label, and the task redacted and cut like an
alert's) and sends it to every sink, with the alerter's once-per-sink claims
(keyed by the dispatch event's id), so a redelivered event is not sent twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

from agentq.consumers.alerts import Alert, Alerter, WebhookPolicy
from agentq.consumers.doorbell import Ring
from agentq.consumers.ownership import Ownership
from agentq.consumers.redaction import ALERT_LIMIT, AlertContent, redact
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent, read_record
from agentq.eventlog.records import to_view
from agentq.schemas._base import micros_to_iso
from agentq.schemas.config import Config, DlqConfig

APPROVALS_GROUP: Final = "approvals"
APPROVAL_HEADER: Final = "agentq: job waits for approval"


@dataclass(frozen=True, slots=True)
class ApprovalContent(AlertContent):
    """What a notice of a job waiting for approval carries, redacted and cut."""

    label: str | None = None

    def text(self) -> str:
        lines = [
            APPROVAL_HEADER,
            f"Job: {self.job_id}",
            f"Agent: {self.agent}",
            f"Dispatched by: {self.dispatched_by or 'unknown'}",
            f"Label: {self.label or ''}",
            f"Task: {self.task if self.task is not None else '(unknown: the job record is gone)'}",
            f"Approve: agentq approve {self.job_id}   Reject: agentq reject {self.job_id}",
        ]
        return "\n".join(lines)

    def fields(self) -> dict[str, Any]:
        return {
            # The log sink's line takes its event, level and logger from here (it
            # spreads these fields last).
            "event": "job waits for approval",
            "level": "info",
            "logger": "agentq.approvals",
            "jobId": self.job_id,
            "agent": self.agent,
            "dispatchedBy": self.dispatched_by,
            "label": self.label,
            "task": self.task,
        }


@dataclass(frozen=True, slots=True)
class ApprovalNotice(Alert):
    """One notice; ``failed_at`` holds when the job was dispatched."""

    def fields(self) -> dict[str, Any]:
        return {**self.content.fields(), "eventId": self.event_id,
                "dispatchedAt": self.failed_at}


class ApprovalNotifier(Alerter):
    """Tells ``approvals.sinks`` of each job dispatched into ``pending_approval``."""

    group = APPROVALS_GROUP

    def hears(self, ring: Ring) -> bool:
        # Only a dispatch into pending_approval concerns it, and rings `a`; the rest
        # of the log is read with the next such ring, or when a survey finds it.
        return ring.approval

    def __init__(
        self, redis: Redis, blocking_redis: Redis, keys: Keys, config: Config, consumer: str,
        *, claim_idle_ms: int | None = None, webhook: WebhookPolicy | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        # The alerter's sinks are the dlq's; these are the approvals'.
        sinks = config.model_copy(update={"dlq": DlqConfig(sinks=config.approvals.sinks)})
        super().__init__(redis, blocking_redis, keys, sinks, consumer,
                         claim_idle_ms=claim_idle_ms, webhook=webhook, ownership=ownership)

    async def handle(self, events: list[RawEvent]) -> None:
        part = self.keys.partition(events[0].agent)
        for event in events:
            if event.type == "JobDispatched" and event.data.get("state") == "pending_approval":
                await self._alert(part, event)

    async def build_alert(self, part: Partition, event: RawEvent) -> Alert:
        record = await read_record(self.redis, part, event.job_id)
        at = micros_to_iso(event.at)
        label = None
        if record.get("spec"):
            view = to_view(event.job_id, record)
            task: str | None = view.task
            dispatched_by: str | None = view.dispatched_by
            label = view.label
        else:
            task = event.data.get("task")
            dispatched_by = event.data.get("dispatchedBy")
        content = ApprovalContent(
            job_id=event.job_id, agent=part.agent, dispatched_by=dispatched_by,
            attempts_used=0, max_attempts=None, error="",
            task=redact(task, ALERT_LIMIT) if task is not None else None,
            label=redact(label, ALERT_LIMIT) if label is not None else None,
        )
        return ApprovalNotice(event_id=event.event_id, reason="approval_required",
                              failed_at=at, content=content)


__all__ = ["APPROVALS_GROUP", "ApprovalNotifier"]
