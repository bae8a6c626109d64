"""Approval requests: the sinks of ``approvals.sinks`` are told once per job that
waits for approval.

The alerter (:class:`~agentq.consumers.alerts.Alerter`, group ``alerts``) sends
them as one more kind of notice: the group that reads every log for dead
letters reads it for these too (a group of their own would read and
acknowledge every event once more). Of each ``JobDispatched`` whose state is
``pending_approval`` it builds one notice (job id, target, dispatcher, label,
and the task redacted and cut like an alert's) and sends it to every sink,
with the alerter's once-per-sink claims (keyed by the dispatch event's id), so
a redelivered event is not sent twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

from agentq.consumers.alerts import Alert, Sink, WebhookPolicy, sinks_from_config
from agentq.consumers.redaction import ALERT_LIMIT, AlertContent, redact
from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent, read_record
from agentq.eventlog.records import to_view
from agentq.schemas._base import micros_to_iso
from agentq.schemas.config import Config, DlqConfig

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


class ApprovalNotices:
    """The alerter's notices of jobs dispatched into ``pending_approval``, to the
    sinks of ``approvals.sinks``."""

    def __init__(self, redis: Redis, config: Config,
                 webhook: WebhookPolicy | None = None) -> None:
        self.redis = redis
        # The shapes of dlq.sinks, built the same way.
        approvals = config.model_copy(update={"dlq": DlqConfig(sinks=config.approvals.sinks)})
        self.sinks: Sequence[Sink] = sinks_from_config(redis, approvals, webhook)

    @staticmethod
    def concerns(event: RawEvent) -> bool:
        # Most dispatches are not held: their data is not parsed to find it out.
        return (event.type == "JobDispatched" and event.may_hold("pending_approval")
                and event.data.get("state") == "pending_approval")

    async def build(self, part: Partition, event: RawEvent) -> Alert:
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


__all__ = ["ApprovalNotices"]
