"""Cancelling a tree: the children index and the cascade, run by the gates.

A job dispatched from inside another (its ``parentJobId``) is added to the
parent's children, a set in the parent's partition (``adopt.lua``), when the
gates see the child's ``JobDispatched``. ``cancel --cascade`` marks the job in
the same script that cancels it (``Partition.cascaded``); when the gates see a
``JobCancelled`` with ``cascade``, they cancel each child in the child's own
partition (``cancel.lua`` with the parent: reason ``parent_cancelled``, and the
child is marked and cascades in turn when its own event is seen). A child that
has already ended is only marked, and its children are walked at once.

The race with a child being dispatched while its parent is cancelled: the
registration either comes first (the child is in the set the cascade reads,
after the cancel that marked the parent) or finds the mark and cancels the
child itself. Every step is idempotent: a redelivered event adds a child again
(a set) or cancels a job already cancelled (refused, nothing written).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

from agentq.eventlog.keys import Keys
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.scripts import Refusal, Scripts
from agentq.schemas.job import agent_of_job

ACTOR = "system"


class Family:
    """The children index and the cascading cancel, for the gates' batches."""

    def __init__(self, redis: Redis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts

    @staticmethod
    def concerns(event: RawEvent) -> bool:
        """Whether ``event`` is a child's dispatch or a cascading cancel."""
        if event.type == "JobDispatched":
            return bool(event.data.get("parentJobId"))
        return event.type == "JobCancelled" and bool(event.data.get("cascade"))

    async def handle(self, events: Sequence[RawEvent]) -> None:
        """The events of a batch (one partition's) that concern the family: every
        child's adoption in one round trip, then each cascading cancel."""
        adopted = []
        for event in events:
            if event.type == "JobDispatched" and self.concerns(event):
                parent = str(event.data["parentJobId"])
                if (parent_agent := agent_of_job(parent)) is not None:
                    adopted.append((event, parent, self.keys.partition(parent_agent)))
        if adopted:
            answers = await self.scripts.call_many([
                Scripts.adopt_call(part, parent, event.job_id)
                for event, parent, part in adopted])
            for (event, parent, _), answer in zip(adopted, answers, strict=True):
                if answer[0] == "cancel":
                    await self._cancel_child(event.agent, event.job_id, parent, ACTOR)
        for event in events:
            if event.type == "JobCancelled" and self.concerns(event):
                await self._cascade(event.job_id, event.agent, event.actor)

    async def _cancel_child(self, agent: str, child: str, parent: str, actor: str) -> bool:
        """Cancel ``child`` because ``parent`` was; True when it had already ended (it
        is then marked, and its own children are for the caller to walk)."""
        outcome = await self.scripts.cancel(self.keys.partition(agent), actor, child,
                                            is_system=True, parent_id=parent)
        return isinstance(outcome, Refusal) and outcome.code == "invalid_state"

    async def _cascade(self, job_id: str, agent: str, actor: str) -> None:
        """Cancel the children of ``job_id`` (cancelled with cascade, or ended and
        reached by a cascade); the children of those that had ended are walked here,
        the others cascade when their own ``JobCancelled`` is seen."""
        todo = [(job_id, agent)]
        while todo:
            parent, parent_agent = todo.pop()
            part = self.keys.partition(parent_agent)
            children: set[str] = await self.redis.smembers(  # type: ignore[assignment]
                part.children(parent))
            for child in sorted(children):
                child_agent = agent_of_job(child)
                if child_agent is None:
                    continue
                if await self._cancel_child(child_agent, child, parent, actor):
                    todo.append((child, child_agent))


__all__ = ["Family"]
