"""Who may see which jobs: the one rule that status, history, wait, replay and
``dependsOn`` share. A system agent sees every job and its ``sessionKey``; any
other agent sees only the jobs it dispatched or that target it, without their
``sessionKey``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from agentq.eventlog.reader import RawEvent
from agentq.schemas.errors import Unauthorized

VIEW_DENIED = "Unauthorized: you can only view jobs you dispatched or that target you."
DEPEND_DENIED = "Unauthorized: you can only depend on jobs you dispatched or that target you."

# How many jobs' verdicts a replay remembers: its memory stays bounded however
# long the log is; a job forgotten is looked up again.
_REMEMBERED_JOBS = 65_536


def may_view(caller: str, spec: dict[str, Any]) -> bool:
    """Whether non-system agent ``caller`` may view the job whose spec is ``spec``."""
    return caller in (spec.get("dispatchedBy"), spec.get("target"))


def authorize_view(caller: str, system: bool, spec_json: str) -> None:
    """Raise Unauthorized unless ``caller`` may view the job with this spec."""
    if not system and not may_view(caller, orjson.loads(spec_json)):
        raise Unauthorized(VIEW_DENIED)


def without_session_key(event: RawEvent) -> RawEvent:
    """``event`` as a non-system agent sees it: its data without ``sessionKey``."""
    if "sessionKey" not in event.data:
        return event
    data = {k: v for k, v in event.data.items() if k != "sessionKey"}
    return RawEvent(event.event_id, event.agent, event.type, event.job_id, event.at,
                    event.actor, event.v, data=data, quiet=event.quiet)


SpecReader = Callable[[Sequence[str]], Awaitable[list[str | None]]]


class EventFilter:
    """Decides, event by event, what a replay shows a non-system caller.

    A job's verdict comes from its ``JobDispatched`` when the replay saw it (each
    partition is read in log order, so it comes first), else from the job's
    spec, read once through ``read_specs``; a job whose spec is gone is hidden.
    """

    def __init__(self, caller: str, read_specs: SpecReader) -> None:
        self.caller = caller
        self._read_specs = read_specs
        self._verdicts: dict[str, bool] = {}

    async def shown(self, event: RawEvent) -> RawEvent | None:
        """The event as the caller may see it, or None when it may not."""
        if not await self._may_view(event):
            return None
        return without_session_key(event)

    async def shown_many(self, events: Sequence[RawEvent]) -> list[RawEvent]:
        """:meth:`shown` of each of ``events``, in order, with the specs of the jobs
        it has to look up read in one round trip rather than one per job."""
        judged: set[str] = set()
        wanted: list[str] = []
        for event in events:
            job_id = event.job_id
            if event.agent == self.caller or job_id in self._verdicts or job_id in judged:
                continue
            judged.add(job_id)
            if event.type != "JobDispatched":
                wanted.append(job_id)
        if wanted:
            for job_id, spec in zip(wanted, await self._read_specs(wanted), strict=True):
                self._remember(job_id, spec is not None and may_view(self.caller,
                                                                     orjson.loads(spec)))
        out = []
        for event in events:
            if (seen := await self.shown(event)) is not None:
                out.append(seen)
        return out

    def _remember(self, job_id: str, verdict: bool) -> None:
        if len(self._verdicts) >= _REMEMBERED_JOBS:
            del self._verdicts[next(iter(self._verdicts))]  # the oldest
        self._verdicts[job_id] = verdict

    async def _may_view(self, event: RawEvent) -> bool:
        if event.agent == self.caller:
            return True  # the job targets the caller
        verdict = self._verdicts.get(event.job_id)
        if verdict is None:
            if event.type == "JobDispatched":
                verdict = event.data.get("dispatchedBy") == self.caller
            else:
                (spec,) = await self._read_specs([event.job_id])
                verdict = spec is not None and may_view(self.caller, orjson.loads(spec))
            self._remember(event.job_id, verdict)
        return verdict
