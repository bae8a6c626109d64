"""The async client every front door stands on: tools, CLI, workers, benchmarks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from agentq import _access as access
from agentq._admission import (
    allowed,
    parse_model,
)
from agentq._deployment import Deployment
from agentq._dispatching import Dispatcher, Remembered
from agentq._scheduling import Scheduling
from agentq.config import load_config, with_embedded_archive
from agentq.eventlog import fold, merged, reader, registry
from agentq.eventlog.connection import RedisTarget
from agentq.eventlog.keys import Partition
from agentq.eventlog.records import denormalize, normalize, to_view
from agentq.eventlog.scripts import Backoff, Refusal, Scripts
from agentq.eventlog.tokens import TokenStore
from agentq.projections import queries
from agentq.projections.queries import ListFilter
from agentq.schemas.config import Config
from agentq.schemas.errors import (
    AgentqError,
    InvalidInput,
    InvalidState,
    NotFound,
    Unauthorized,
    UnknownAgent,
)
from agentq.schemas.events import StoredEvent, StoredScheduleEvent
from agentq.schemas.job import TERMINAL_STATES, JobView, agent_of_job, check_agent_id
from agentq.schemas.schedule import ScheduleView
from agentq.schemas.tools import DispatchInput, DrainOutput, ListInput, ListOutput

if TYPE_CHECKING:  # workers are imported when one is made: `agentq mcp` and the tools need none
    from agentq._runner import Runner, WorkerSpec
    from agentq.consumers.handlers import Job
    from agentq.eventlog.archive import Archive

_DRAIN_CHUNK = 500
_REPLAY_RUN = 500


class Client:
    """A connection to one agentq deployment (one Redis, one key prefix).

    Use as ``async with agentq.connect(...) as q``. Every method raises
    :class:`AgentqError` subclasses for refusals; ``caller`` None acts as the
    operator (the first system agent).
    """

    def __init__(self, url: str | None = None, config: Config | str | Path | None = None) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        if url is None:  # the embedded server, unless the config names a Redis
            self.config = with_embedded_archive(self.config)
        # What this client, its dispatcher and its workers share, given to each.
        self._deployment = Deployment(url, self.config)
        self.keys = self._deployment.keys
        self._dispatcher = Dispatcher(self._deployment, self.status)
        self._scheduling = Scheduling(self._deployment)
        self._blocking: Redis | None = None

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> Client:
        await self._deployment.open()
        return self

    async def aclose(self) -> None:
        await self._deployment.aclose()
        self._blocking = None

    async def __aenter__(self) -> Client:
        return await self.open()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def redis(self) -> Redis:
        return self._deployment.redis

    @property
    def scripts(self) -> Scripts:
        return self._deployment.scripts

    @property
    def target(self) -> RedisTarget | None:
        """Where the client is connected; None until it is open."""
        return self._deployment.target

    @property
    def remembered(self) -> Remembered:
        """The jobs this client dispatched in the last few seconds, as dispatched."""
        return self._dispatcher.remembered

    def caller_or_operator(self, caller: str | None) -> str:
        """The agent a call acts for: ``caller`` when it is an agent id (else
        InvalidInput; an empty one is no way to act as the operator), or the
        operator when None."""
        return self.config.operator if caller is None else check_agent_id(caller, "caller")

    def partition(self, agent: str) -> Partition:
        return self.keys.partition(agent)

    @property
    def tokens(self) -> TokenStore:
        """The bearer tokens of MCP over HTTP and the dashboard (``eventlog/tokens.py``);
        who may manage them is the caller's to check (system agents only)."""
        return TokenStore(self.redis, self.keys)

    # -- agents ------------------------------------------------------------

    async def add_agent(self, agent: str, allow: Sequence[str] = ("*",)) -> None:
        """Make ``agent`` known, so that jobs may be dispatched to it."""
        await self._deployment.add_agent(agent, allow)

    async def remove_agent(self, agent: str) -> bool:
        return await self._deployment.remove_agent(agent)

    async def agents(self) -> dict[str, list[str]]:
        """Known agents and who each may dispatch to."""
        return await self._deployment.agents()

    async def repair_agents(self) -> tuple[list[str], list[str]]:
        """List again every agent whose partition says it is known and the registry's
        index misses (a registration cut short), and stop listing agents that are
        not known; returns both lists. Scans every node: a repair, not a read."""
        return await self._deployment.repair_agents()

    async def dispatch_targets(self, caller: str | None = None) -> list[str]:
        """The known agents ``caller`` may dispatch to (its ``allowAgents``), sorted."""
        allow = await self._deployment.allow_list(self.caller_or_operator(caller))
        return sorted(agent for agent in await self.agents() if allowed(allow, agent))

    # -- dispatch ----------------------------------------------------------

    async def dispatch(self, target: str, task: str, *, caller: str | None = None,
                       **fields: Any) -> JobView:
        """Dispatch one job (SPEC's queue_dispatch); ``fields`` are its optional inputs."""
        raw = {"target": target, "task": task, **fields}
        (view,) = await self.dispatch_many([raw], caller=caller)
        return view

    async def dispatch_many(
        self, items: Sequence[DispatchInput | dict[str, Any]], *, caller: str | None = None
    ) -> list[JobView]:
        """Dispatch a batch: one script call per target partition, all in one round trip.

        Within a partition the batch is all or nothing. When one partition
        refuses, the error is raised; jobs of other partitions in the same
        batch have been dispatched (they are on the error's ``dispatched``).
        """
        return await self._dispatcher.dispatch_many(items, self.caller_or_operator(caller))

    # -- reads -------------------------------------------------------------

    async def _record(self, job_id: str) -> tuple[Partition, dict[str, str]]:
        """The job's partition and state record; a job that has left Redis has
        the record its archived events fold into."""
        agent = agent_of_job(job_id)
        if agent:
            part = self.partition(agent)
            record = await self._deployment.call(reader.read_record(self.redis, part, job_id))
            if not record:
                record = await self._deployment.call(
                    merged.archived_record(self._deployment.archive, part, job_id))
            if record:
                return part, record
        raise NotFound(f"Job {job_id} not found", job_id=job_id)

    async def _not_in_redis(self, job_id: str, caller: str, done: str) -> AgentqError:
        """What to raise when a script found no record of ``job_id`` to be ``done``: a job
        the archive holds has ended and left Redis (invalid_state, in its archived
        state; unauthorized for a caller who may not see it), any other is not_found."""
        try:
            _, record = await self._record(job_id)
        except NotFound as missing:
            return missing
        self._authorize_view(caller, record, job_id)
        state = record.get("state", "")
        return InvalidState(
            f"Job {job_id} is {state} and has left Redis (archived after "
            f"retention.jobsSeconds): it can no longer be {done}; dispatch it again "
            "if it is still wanted", job_id=job_id, state=state)

    def _authorize_view(self, caller: str, record: dict[str, str], job_id: str) -> None:
        access.authorize_view(caller, self.config.is_system(caller), record["spec"])

    async def status(self, job_id: str, *, caller: str | None = None) -> JobView:
        """The job's view (SPEC's queue_status)."""
        who = self.caller_or_operator(caller)
        _, record = await self._record(job_id)
        return await self._view(job_id, record, who)

    async def _view(self, job_id: str, record: dict[str, str], who: str) -> JobView:
        """The view of a job's record for caller ``who``, after checking they may see it."""
        self._authorize_view(who, record, job_id)
        view = to_view(job_id, record, with_session_key=self.config.is_system(who))
        full: JobView = await self._deployment.call(
            merged.with_dependencies(self.redis, self._deployment.archive, self.keys, view))
        return full

    async def activity(
        self, agents: Sequence[str] | None = None, *, caller: str | None = None
    ) -> dict[str, Any]:
        """Per agent: worker presence, counts per state, current jobs (SPEC's queue_activity)."""
        who = self.caller_or_operator(caller)
        for i, agent in enumerate(agents or ()):
            check_agent_id(agent, f"agents.{i}")
        known = sorted(await self.agents())
        wanted = list(agents) if agents else known
        # An agent nobody knows is refused: an empty row would read as merely "offline".
        listed = set(known)
        unknown = [agent for agent in wanted if agent not in listed]
        if unknown:
            raise UnknownAgent(unknown[0])
        if not self.config.is_system(who):
            allow = await self._deployment.allow_list(who)
            wanted = [a for a in wanted if a == who or allowed(allow, a)]
        result: dict[str, Any] = await self._deployment.call(
            queries.activity(self.redis, self.keys, wanted))
        return result

    async def history(self, job_id: str, *, caller: str | None = None) -> list[StoredEvent]:
        """The job's events, oldest first. ``sessionKey`` (in ``JobDispatched``) is
        shown to system agents only, as in the job view."""
        who = self.caller_or_operator(caller)
        part, record = await self._record(job_id)
        self._authorize_view(who, record, job_id)
        events = await self._deployment.call(
            merged.job_events(self.redis, self._deployment.archive, part, job_id)) or []
        if not self.config.is_system(who):
            events = [access.without_session_key(event) for event in events]
        return [event.stored() for event in events]

    async def wait(
        self, job_id: str, *, timeout: float = 60, caller: str | None = None
    ) -> tuple[JobView, bool]:
        """Block until the job is terminal; (its view, whether the wait timed out).

        Reads the job's record once, then follows its events in the partition
        log, folding them into the record: no polling, and no read after the end.
        """
        deadline = time.monotonic() + timeout
        who = self.caller_or_operator(caller)
        # A job this client just dispatched: its record is known without a read.
        record = self.remembered.record(job_id, forget=True)
        if record is None:
            _, record = await self._record(job_id)
        view = await self._view(job_id, record, who)
        if view.state in TERMINAL_STATES:
            return view, False
        part = self.partition(view.target)
        state = normalize(record)
        # The record names its events: the job's next one comes after its last.
        position = record["events"].rsplit(" ", 1)[-1]
        while (remaining := deadline - time.monotonic()) > 0:
            events, position = await self._deployment.call(
                self._events_after(part, job_id, position, remaining))
            for event in events:
                state = fold.apply(state, event)
            if events and state["state"] in TERMINAL_STATES:
                return await self._view(job_id, denormalize(state), who), False
        return await self._view(job_id, denormalize(state), who), True

    async def _events_after(
        self, part: Partition, job_id: str, position: str, seconds: float
    ) -> tuple[list[reader.RawEvent], str]:
        """The job's events after ``position`` in its log, waiting up to ``seconds``
        for the log to move; and the position read up to."""
        if self._blocking is None:
            self._blocking = self._deployment.open_blocking()
        blocking, block = self._blocking, max(1, int(seconds * 1000))
        try:
            reply: Any = await blocking.xread({part.log: position}, block=block, count=100)
        except RedisConnectionError:
            # Held across a server restart, the connection is closed by now; a
            # read is safe to make again, on a new one.
            reply = await blocking.xread({part.log: position}, block=block, count=100)
        events = []
        for entry_id, fields in reply[0][1] if reply else []:
            position = entry_id
            if fields.get("jobId") == job_id:
                events.append(reader.RawEvent.parse(part.agent, entry_id, fields))
        # A long result is held by reference in the log: put it back before folding.
        return list(await reader.with_payloads(self.redis, part, events)), position

    # -- workers -----------------------------------------------------------

    @property
    def backoff(self) -> Backoff:
        return Backoff.of(self.config.jobs)

    def open_blocking(self) -> Redis:
        """A new connection for blocking reads (no socket timeout); closed with the client."""
        return self._deployment.open_blocking()

    def worker(
        self, agent: str, handler: Callable[[Job], Any], *, concurrency: int | None = None,
        background: bool = True,
    ) -> Runner:
        """A worker running ``agent``'s jobs with ``handler`` (sync or async, called
        with a :class:`consumers.handlers.Job`); ``await .run()`` until ``.stop()``.
        With ``background`` it also hosts the background consumers (scheduler,
        stall recovery, dependency gates, projector, alerts)."""
        from agentq._runner import Runner, WorkerSpec

        return Runner(self._deployment, [WorkerSpec(agent, handler, concurrency)], background)

    def runner(self, workers: Sequence[WorkerSpec], *, background: bool = True) -> Runner:
        """Several workers, and the background consumers, in this process."""
        from agentq._runner import Runner

        return Runner(self._deployment, workers, background)

    @property
    def archive(self) -> Archive | None:
        """Where events go before they leave Redis (``retention.archive``); None
        when nothing leaves Redis."""
        return self._deployment.archive

    async def verify_archive(
        self, progress: Callable[[str, int, int], None] | None = None
    ) -> list[str]:
        """The archive's problems, each naming the partition and the segment: a
        segment edited, removed, reordered or added, or a partition's hash chain not
        ending where Redis recorded its head (``audit verify --archive``); [] when
        intact. InvalidInput when no archive is configured. ``progress`` is told
        after each segment: the agent, its segments checked, and of how many."""
        archive = self._deployment.archive
        if archive is None:
            raise InvalidInput(
                "retention.archive is not set: there is no archive to verify; set it to "
                "file://PATH or s3://BUCKET/PREFIX (AGENTQ_RETENTION__ARCHIVE)",
                path="retention.archive")
        agents = await self._deployment.call(registry.all_partitions(self.redis, self.keys))
        async with self.redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                pipe.hget(self.partition(agent).archive, "head")
            recorded: list[str | None] = await self._deployment.call(pipe.execute())
        heads = {agent: head for agent, head in zip(agents, recorded, strict=True) if head}
        return await archive.verify(heads=heads, progress=progress)

    async def replay(
        self, agents: Sequence[str] | None = None, *, since_us: int | None = None,
        until_us: int | None = None, caller: str | None = None,
    ) -> AsyncIterator[reader.RawEvent]:
        """Stored events: each agent's log in order, logs merged by event time. A
        non-system caller gets only the events of jobs it may view, without
        ``sessionKey``."""
        who = self.caller_or_operator(caller)
        for i, agent in enumerate(agents or ()):
            check_agent_id(agent, f"agents.{i}")
        names = list(agents) if agents else await self._deployment.call(
            registry.all_partitions(self.redis, self.keys))
        parts = [self.partition(a) for a in names]
        events = merged.replay(self.redis, self._deployment.archive, parts, since_us=since_us,
                               until_us=until_us)
        if self.config.is_system(who):
            async for event in events:
                yield event
            return
        # Judged a run at a time, so that the specs it looks up are read together.
        shown = access.EventFilter(who, self._deployment.specs)
        run: list[reader.RawEvent] = []
        async for event in events:
            run.append(event)
            if len(run) == _REPLAY_RUN:
                for seen in await shown.shown_many(run):
                    yield seen
                run = []
        for seen in await shown.shown_many(run):
            yield seen

    # -- operator commands -------------------------------------------------

    def _require_system(self, caller: str, command: str) -> None:
        if not self.config.is_system(caller):
            raise Unauthorized(f"Unauthorized: {command} requires a system agent.")

    async def cancel(self, job_id: str, *, caller: str | None = None,
                     cascade: bool = False) -> JobView:
        """Cancel a job that is not terminal; returns its view. With ``cascade``, every
        job dispatched from inside it (``parentJobId``, at any depth) that has not
        ended is cancelled too, by the gates, each with reason parent_cancelled."""
        who = self.caller_or_operator(caller)
        agent = agent_of_job(job_id)
        if agent is None:
            raise NotFound(f"Job {job_id} not found", job_id=job_id)
        outcome = await self._deployment.call(
            self.scripts.cancel(self.partition(agent), who, job_id,
                                is_system=self.config.is_system(who), cascade=cascade)
        )
        if isinstance(outcome, Refusal):
            if outcome.code == "not_found":
                raise await self._not_in_redis(job_id, who, "cancelled")
            if outcome.code == "unauthorized":
                raise Unauthorized(
                    "Unauthorized: you can only cancel jobs you dispatched or that target you."
                )
            state = outcome.details[0]
            raise InvalidState(f"Job {job_id} is {state}: only a job that has not ended "
                               "can be cancelled", job_id=job_id, state=state)
        return await self.status(job_id, caller=who)

    async def approve(self, job_id: str, *, caller: str | None = None,
                      note: str | None = None) -> JobView:
        """Approve a job pending approval (``auth.approvers`` only): it goes on to
        queued, delayed or waiting for its dependencies; returns its view."""
        return await self._decide("approve", job_id, caller, note)

    async def reject(self, job_id: str, *, caller: str | None = None,
                     reason: str | None = None) -> JobView:
        """Reject a job pending approval (``auth.approvers`` only): it is cancelled;
        returns its view."""
        return await self._decide("reject", job_id, caller, reason)

    async def _decide(self, command: str, job_id: str, caller: str | None,
                      text: str | None) -> JobView:
        who = self.caller_or_operator(caller)
        agent = agent_of_job(job_id)
        if agent is None:
            raise NotFound(f"Job {job_id} not found", job_id=job_id)
        part, allowed = self.partition(agent), self.config.is_approver(who)
        decide = self.scripts.approve if command == "approve" else self.scripts.reject
        outcome = await self._deployment.call(decide(part, who, job_id, text, allowed=allowed))
        if isinstance(outcome, Refusal):
            if outcome.code == "not_found":
                raise NotFound(f"Job {job_id} not found", job_id=job_id)
            if outcome.code == "unauthorized":
                raise Unauthorized(f"Unauthorized: {command} requires an approver "
                                   "(auth.approvers; by default the system agents).")
            state = outcome.details[0]
            raise InvalidState(f"Job {job_id} is {state}, not pending_approval: only a job "
                               f"pending approval can be {command}d", job_id=job_id,
                               state=state)
        # An approver sees the job it decided on, whoever dispatched it.
        _, record = await self._record(job_id)
        view = to_view(job_id, record, with_session_key=self.config.is_system(who))
        full: JobView = await self._deployment.call(
            merged.with_dependencies(self.redis, self._deployment.archive, self.keys, view))
        return full

    async def retry(self, job_id: str, *, caller: str | None = None) -> JobView:
        """Re-queue a failed job with a fresh budget of attempts (system agents only)."""
        who = self.caller_or_operator(caller)
        self._require_system(who, "retry")
        agent = agent_of_job(job_id)
        if agent is None:
            raise NotFound(f"Job {job_id} not found", job_id=job_id)
        refusal = await self._deployment.call(
            self.scripts.retry(self.partition(agent), who, job_id))
        if refusal is not None:
            if refusal.code == "not_found":
                raise await self._not_in_redis(job_id, who, "retried")
            state = refusal.details[0]
            raise InvalidState(f"Job {job_id} is {state}, not failed: only a failed job "
                               "can be retried", job_id=job_id, state=state)
        return await self.status(job_id, caller=who)

    async def drain(self, agent: str, *, caller: str | None = None) -> DrainOutput:
        """Cancel every queued and delayed job of ``agent`` (system agents only)."""
        who = self.caller_or_operator(caller)
        self._require_system(who, "drain")
        part = self.partition(check_agent_id(agent, "agent"))
        known = await self._deployment.call(self.redis.exists(part.meta))
        if not known:
            raise UnknownAgent(agent)
        candidates: list[tuple[str, str]] = [
            (job_id, "")
            for job_id in await self._deployment.call(self.redis.zrange(part.delayed, 0, -1))
        ]
        for stream in part.ready_streams:
            code = stream[-1]
            after = "-"
            while True:
                start = after if after == "-" else f"({after}"
                entries = await self._deployment.call(
                    self.redis.xrange(stream, start, "+", count=1000))
                candidates += [(fields["j"], f"{code} {eid}") for eid, fields in entries]
                if len(entries) < 1000:
                    break
                after = entries[-1][0]
        drained: list[str] = []
        for i in range(0, len(candidates), _DRAIN_CHUNK):
            chunk = candidates[i : i + _DRAIN_CHUNK]
            drained += await self._deployment.call(self.scripts.drain(part, who, chunk))
        return DrainOutput(agent=agent, drained=len(drained), job_ids=drained)


    # -- schedules (the operator's: system agents only) --------------------

    async def schedule_add(
        self, name: str, target: str, task: str, *, cron: str, tz: str = "UTC",
        caller: str | None = None, **fields: Any,
    ) -> ScheduleView:
        """Add schedule ``name``: at each tick of ``cron`` in zone ``tz`` (IANA), one job
        for ``target`` to run ``task``; ``fields`` are queue_dispatch's other inputs
        (not ``dependsOn``, ``delaySeconds``, ``idempotencyKey``, ``parentJobId``)."""
        who = self.caller_or_operator(caller)
        return await self._scheduling.add(who, name, target, task, cron, tz, fields)

    async def schedule_remove(self, name: str, *, caller: str | None = None) -> None:
        await self._scheduling.change(self.caller_or_operator(caller), name, "remove")

    async def schedule_pause(self, name: str, *, caller: str | None = None) -> ScheduleView:
        """Pause schedule ``name``: its ticks pass without a job until resumed."""
        view = await self._scheduling.change(self.caller_or_operator(caller), name, "pause")
        assert view is not None
        return view

    async def schedule_resume(self, name: str, *, caller: str | None = None) -> ScheduleView:
        """Resume schedule ``name`` from its next tick (missed ones are not dispatched)."""
        view = await self._scheduling.change(self.caller_or_operator(caller), name, "resume")
        assert view is not None
        return view

    async def schedule_list(self, *, caller: str | None = None) -> list[ScheduleView]:
        """Every schedule, by name."""
        return await self._scheduling.listing(self.caller_or_operator(caller))

    async def schedule_history(
        self, name: str, *, target: str | None = None, caller: str | None = None
    ) -> list[StoredScheduleEvent]:
        """Schedule ``name``'s events, oldest first (``target`` finds a removed one's)."""
        return await self._scheduling.history(self.caller_or_operator(caller), name, target)

    # Last in the class: a method named `list` would shadow the builtin in the
    # annotations of every method after it.
    async def list(
        self,
        *,
        caller: str | None = None,
        agent: str | None = None,
        dispatched_by: str | None = None,
        state: Sequence[str] | str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> ListOutput:
        """Jobs newest first, filtered exactly (SPEC's queue_list); ``task`` cut to 80
        characters. Non-system callers see only jobs they dispatched or that target them."""
        who = self.caller_or_operator(caller)
        states = [state] if isinstance(state, str) else state
        query = parse_model(ListInput, {
            "agent": agent, "dispatchedBy": dispatched_by, "state": states,
            "limit": limit, "cursor": cursor,
        })
        if query.cursor is not None and agent_of_job(query.cursor) is None:
            raise InvalidInput(f"Invalid cursor {query.cursor!r}: pass the nextCursor of a page",
                               path="cursor")
        system = self.config.is_system(who)
        # Without an agent, every partition: looked up only if the global indexes
        # cannot answer alone.
        parts = [self.partition(query.agent)] if query.agent else None
        flt = ListFilter(query.agent, query.dispatched_by,
                         frozenset(query.state) if query.state else None)
        views, next_cursor = await self._deployment.call(queries.list_jobs(
            self.redis, parts, flt, keys=self.keys, caller=who, system=system,
            limit=query.limit, cursor=query.cursor, with_session_key=system,
        ))
        cut = [v.model_copy(update={"task": v.task[:queries.TASK_PREVIEW]}) for v in views]
        return ListOutput(jobs=cut, count=len(cut), next_cursor=next_cursor)

def connect(url: str | None = None, config: Config | str | Path | None = None) -> Client:
    """A client for ``url`` (None: the configured Redis, else the embedded one).

    Use it as an async context manager; ``config`` is a Config or a file path.
    """
    return Client(url, config)
