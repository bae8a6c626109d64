"""The archiving pass: events go to the archive, then old jobs and old log entries
leave Redis (SPEC part two, "Retention and the archive").

A pass over one partition, under the partition's archive lock:

1. **Where the archive ends**: the manifest's last segment
   (``Archive.last``), and ``Partition.archive`` (a hash: ``last``, ``head``,
   ``seq``), which the pass writes after the manifest. When they disagree the
   manifest wins: ahead (a crash between the two writes), Redis is brought up
   to it, the jobs that ended in between included; behind (the archive lost a
   segment), Redis is brought back down to it, so nothing more is trimmed than
   the archive holds.
2. **What may be archived**: log entries every consumer group of the log
   (gates, projector, alerts, and any other) has delivered and had
   acknowledged, read in pages after the archive's end, in segments of at
   most ``segment_events`` events.
3. **Each segment** is appended to the archive (durable: the library writes
   the segment, then the manifest), then, in one transaction, the ended jobs
   of its terminal events go to ``Partition.ended`` and the archive's new end
   to ``Partition.archive``.
4. **Removal** (``retention.jobsSeconds`` > 0): ``expire.lua`` removes, a batch
   at a time, the jobs of ``ended`` that ended more than the retention ago and
   whose every event is archived; then they leave the global job indexes
   (``Partition.expired`` remembers them until then, across a crash). This
   follows each segment (Redis removes while the next segment is read and
   written) and once more at the pass's end.
5. **Trimming** (``jobsSeconds`` > 0): ``XTRIM MINID`` to the earliest of just
   after the archive's end, the retention's cutoff and just after the groups'
   safe point: never past what is archived.

Every step is safe to repeat, so a process killed anywhere loses nothing: an
event is archived once (the next pass starts after the manifest's end), trimmed
only once the manifest and Redis both hold it, and a job removed only once all
its events are archived. Times are the server's (Redis ``TIME``).

As a background consumer, an :class:`Archiver` serves the partitions its
process owns (:mod:`agentq.consumers.ownership`): a pass when it gains one, then
every :data:`PASS_SECONDS`. ``agentq archive run`` makes one pass over every
partition (:meth:`Archiver.archive_all`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import structlog
from redis.asyncio import Redis
from redis.exceptions import LockError, ResponseError

from agentq.consumers.alerts import ALERTS_GROUP
from agentq.consumers.doorbell import Ring
from agentq.consumers.gates import Gates
from agentq.consumers.ownership import Ownership, serving
from agentq.consumers.projector import Projector
from agentq.consumers.timetable import Timetable
from agentq.eventlog.archive import Archive, ArchivedLine, ArchiveError, Segment
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent, readable, with_payloads
from agentq.eventlog.scripts import Scripts, Survey, expired_jobs
from agentq.projections import global_index
from agentq.schemas.config import RetentionConfig

log = structlog.get_logger("agentq.archiver")

# A partition is archived this often (and when its process starts serving it).
PASS_SECONDS: Final = 60.0
# Events per archive segment, at most.
SEGMENT_EVENTS: Final = 10_000
# A pass writes at most this many segments of a partition, then lets the
# others have their turn and comes back at once.
SEGMENTS_PER_PASS: Final = 10
# The partition's archive lock lapses this long after its holder last renewed
# it (before each segment): a process killed mid-pass holds up others no longer.
LOCK_SECONDS: Final = 60.0
# The consumer groups whose reading every archived entry waits for, whether or
# not they exist yet (a group made later starts at the log's start).
GROUPS: Final = (Gates.group, Projector.group, ALERTS_GROUP)
# Heartbeats this long past their deadline leave the partition's workers set.
WORKER_FORGET_MS: Final = 60_000
_PAGE = 1_000
_EXPIRE_BATCH = 500
_TRIM_BATCH = 10_000
_ENDINGS = frozenset({"JobCompleted", "JobFailed", "JobCancelled", "JobRejected"})
_MAX_SEQ = 2**64 - 1


class EntryId(NamedTuple):
    """A stream entry id, ordered as Redis orders them (never as text)."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> EntryId:
        ms, _, seq = text.partition("-")
        return cls(int(ms), int(seq or 0))

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    def next(self) -> EntryId:
        """The first id after this one."""
        return EntryId(self.ms, self.seq + 1) if self.seq < _MAX_SEQ else EntryId(self.ms + 1, 0)

    def previous(self) -> EntryId:
        """The last id before this one (this one is not 0-0)."""
        return EntryId(self.ms, self.seq - 1) if self.seq else EntryId(self.ms - 1, _MAX_SEQ)


def _parsed(text: str | None) -> EntryId | None:
    return EntryId.parse(text) if text else None


@dataclass(frozen=True, slots=True)
class Recorded:
    """Where Redis says the partition's archive ends (``Partition.archive``)."""

    last: EntryId | None = None
    head: str = ""
    seq: int = 0

    @classmethod
    def of(cls, fields: dict[str, str]) -> Recorded:
        return cls(_parsed(fields.get("last")), fields.get("head", ""),
                   int(fields.get("seq") or 0))

    @classmethod
    def of_segment(cls, segment: Segment | None) -> Recorded:
        if segment is None:
            return cls()
        return cls(EntryId.parse(segment.last), segment.sha256, segment.seq)


@dataclass
class PassOutcome:
    """What one pass over a partition did."""

    agent: str
    events: int = 0
    """Events archived."""
    segments: int = 0
    removed: int = 0
    """Jobs removed from Redis."""
    trimmed: int = 0
    """Log entries trimmed."""
    more: bool = False
    """Stopped after ``SEGMENTS_PER_PASS`` segments with more to archive."""
    busy: bool = False
    """Another process held the partition's archive lock: nothing was done."""
    held_back: str = ""
    """Why archiving stops short of the log's end, when something holds it there."""
    now_ms: int | None = None
    """The server's time at the pass's end (None when not read)."""
    archived_to: str = ""
    """The last archived event id ("" when nothing is archived)."""
    stuck: bool = False
    """The archive and Redis disagree (see ``held_back``): nothing was archived,
    removed or trimmed."""


@dataclass
class Totals:
    """Several passes summed, for ``agentq archive run``."""

    agents: int = 0
    events: int = 0
    segments: int = 0
    removed: int = 0
    trimmed: int = 0
    busy: list[str] = field(default_factory=list)
    """Agents another process held past the wait."""
    stuck: list[str] = field(default_factory=list)
    """Agents whose archive disagrees with Redis (see ``held_back``)."""
    held_back: dict[str, str] = field(default_factory=dict)
    """Why an agent's archiving stops short of what could be archived."""

    def add(self, outcome: PassOutcome) -> None:
        self.events += outcome.events
        self.segments += outcome.segments
        self.removed += outcome.removed
        self.trimmed += outcome.trimmed


# A segment as read from the log: its lines, the jobs that ended in it (job id ->
# end, ms), whether it is full, and why it stopped short ("" when it did not).
Read = tuple[list[ArchivedLine], dict[str, int], bool, str]


class Archiver:
    """Archives the partitions its process serves (see the module's docstring)."""

    groups: tuple[str, ...] = ()

    def __init__(self, redis: Redis, blocking: Redis, keys: Keys, archive: Archive,
                 retention: RetentionConfig, *, ownership: Ownership | None = None,
                 pass_seconds: float = PASS_SECONDS, segment_events: int = SEGMENT_EVENTS,
                 segments_per_pass: int = SEGMENTS_PER_PASS,
                 lock_seconds: float = LOCK_SECONDS, groups: Sequence[str] = GROUPS) -> None:
        """``ownership``: the partitions to serve; without one, a run serves every
        partition, with ``blocking`` carrying its doorbell."""
        self.redis = redis
        self.blocking = blocking
        self.keys = keys
        self.archive = archive
        self.retention_ms = retention.jobs_seconds * 1000
        self.ownership = ownership
        self.pass_ms = int(pass_seconds * 1000)
        self.segment_events = segment_events
        self.segments_per_pass = segments_per_pass
        self.lock_seconds = lock_seconds
        self.required_groups = tuple(groups)
        self.scripts = Scripts(redis)
        self.timetable = Timetable()
        # Held during a pass, so that dropping a partition waits for it.
        self._passing = asyncio.Lock()

    # -- told by the ownership -------------------------------------------------

    def surveyed(self, agent: str, survey: Survey, *, gained: bool, tidy: bool) -> None:
        if gained:
            self.timetable.now(agent)
        else:  # a partition not yet planned gets its pass within PASS_SECONDS
            self.timetable.earlier(agent, survey.now_ms + self.pass_ms)

    def rang(self, ring: Ring) -> None:
        """New events wait for the next pass."""

    async def dropped(self, agents: Collection[str]) -> None:
        for agent in agents:
            self.timetable.forget(agent)
        async with self._passing:  # a pass under way ends first
            pass

    # -- serving ----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        async with serving(self, self.ownership, self.redis, self.blocking, self.keys,
                           stop) as own:
            while not stop.is_set():
                await self.timetable.act_on_due(own.serves, self._pass)
                await self.timetable.wait(stop)

    async def _pass(self, agent: str) -> tuple[int | None, int]:
        """One pass over ``agent``'s partition, as the timetable asks: when to come
        back (the server's ms) and the server's time now."""
        async with self._passing:
            try:
                outcome = await self.archive_partition(self.keys.partition(agent))
            except ArchiveError as exc:  # the store is away: try again next time
                log.warning("archiving failed; trying again later", agent=agent,
                            error=str(exc))
                outcome = PassOutcome(agent)
            except LockError:  # the lock lapsed mid-pass: another process goes on
                outcome = PassOutcome(agent, busy=True)
        now_ms = outcome.now_ms if outcome.now_ms is not None else await self._server_ms()
        if outcome.more:
            return now_ms, now_ms
        if outcome.busy:
            return now_ms + int(self.lock_seconds * 1000), now_ms
        return now_ms + self.pass_ms, now_ms

    async def _server_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def archive_all(
        self, agents: Sequence[str], progress: Callable[[PassOutcome], None] | None = None,
    ) -> Totals:
        """Pass over every partition of ``agents`` to the end (each waiting for its
        lock up to twice the lock's lapse); returns the totals."""
        totals = Totals(agents=len(agents))
        for agent in agents:
            part = self.keys.partition(agent)
            while True:
                outcome = await self.archive_partition(part, wait=True)
                totals.add(outcome)
                if progress is not None:
                    progress(outcome)
                if not outcome.more:
                    break
            if outcome.busy:
                totals.busy.append(agent)
            if outcome.stuck:
                totals.stuck.append(agent)
            if outcome.held_back:
                totals.held_back[agent] = outcome.held_back
        return totals

    # -- one pass -----------------------------------------------------------------

    async def archive_partition(self, part: Partition, *, wait: bool = False) -> PassOutcome:
        """One pass over ``part`` (see the module's docstring). ``wait``: wait for
        another process's pass to end (else return at once, ``busy``)."""
        outcome = PassOutcome(part.agent)
        lock = self.redis.lock(part.archive_lock, timeout=self.lock_seconds, blocking=wait,
                               blocking_timeout=2 * self.lock_seconds if wait else None,
                               thread_local=False)
        if not await lock.acquire():
            outcome.busy = True
            return outcome
        try:
            bound, outcome.held_back = await self.safe_point(part)
            recorded = Recorded.of(await self.redis.hgetall(part.archive))  # type: ignore[arg-type]
            if bound is not None and await self._new_entries(part, recorded.last, bound):
                recorded = await self._archive(part, lock, bound, recorded, outcome)
            outcome.archived_to = str(recorded.last) if recorded.last else ""
            if self.retention_ms > 0 and recorded.last is not None and not outcome.stuck:
                await lock.reacquire()
                await self._expire(part, recorded.last, outcome)
                await self._trim(part, recorded.last, bound, outcome)
        finally:
            with suppress(LockError):
                await lock.release()
        return outcome

    async def safe_point(self, part: Partition) -> tuple[EntryId | None, str]:
        """The last log entry every consumer group has delivered and had
        acknowledged (None: no entry is), and, when a group the pass waits for
        does not exist yet, which ("" otherwise).

        Read as the groups stand, the groups first, then their pending entries:
        both only move forward, so an answer read across a change is an
        earlier point, never a later one."""
        try:
            found: list[dict[str, Any]] = await self.redis.xinfo_groups(part.log)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None, ""
            raise
        groups = {str(g["name"]): g for g in found}
        for name in self.required_groups:
            if name not in groups:
                return None, f"consumer group {name} has not read {part.log} yet"
        names = sorted(groups)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.xpending(part.log, name)
            pending: list[dict[str, Any]] = await pipe.execute()
        point: EntryId | None = None
        for name, summary in zip(names, pending, strict=True):
            reach = EntryId.parse(str(groups[name]["last-delivered-id"]))
            if int(summary["pending"]) > 0:
                reach = min(reach, EntryId.parse(str(summary["min"])).previous())
            if point is None or reach < point:
                point = reach
        if point is None or point == EntryId(0, 0):
            return None, ""
        return point, ""

    async def _new_entries(self, part: Partition, after: EntryId | None, bound: EntryId) -> bool:
        """Whether the log has entries after ``after`` up to ``bound``."""
        start = f"({after}" if after else "-"
        return bool(await self.redis.xrange(part.log, start, str(bound), count=1))

    async def _archive(self, part: Partition, lock: Any, bound: EntryId, recorded: Recorded,
                       outcome: PassOutcome) -> Recorded:
        """Archive ``part``'s entries after the archive's end up to ``bound``;
        returns where the archive ends then."""
        recorded, problem = await self._agree(part, recorded)
        if problem:
            log.error("archive and Redis disagree; not archiving the partition", agent=part.agent,
                      problem=problem)
            outcome.held_back = problem
            outcome.stuck = True
            return recorded
        # The next segment is read while the archive writes this one (reading
        # changes nothing, so reading ahead is safe whatever happens next), and
        # the jobs a segment let go are removed while the next one is written
        # (a removal takes only jobs archived already; one at a time).
        reading: asyncio.Task[Read] | None = asyncio.create_task(
            self._segment(part, recorded.last, bound))
        expiring: asyncio.Task[None] | None = None
        try:
            while reading is not None:
                lines, ended, full, blocked = await reading
                reading = None
                if blocked:
                    outcome.held_back = blocked
                if not lines:
                    break
                room = outcome.segments + 1 < self.segments_per_pass
                if full and room:
                    reading = asyncio.create_task(
                        self._segment(part, EntryId.parse(lines[-1].event_id), bound))
                await lock.reacquire()  # LockNotOwnedError when it lapsed: nothing written
                segment = await self.archive.append(part.agent, lines)
                recorded = Recorded.of_segment(segment)
                await self._record(part, recorded, ended)
                if self.retention_ms > 0 and recorded.last is not None:
                    if expiring is not None:
                        await expiring
                    await lock.reacquire()  # the lock covers each step, not the pass
                    expiring = asyncio.create_task(self._expire(part, recorded.last, outcome))
                outcome.events += len(lines)
                outcome.segments += 1
                outcome.more = full and not room
            if expiring is not None:
                await expiring
        finally:
            for task in (reading, expiring):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        return recorded

    async def _segment(self, part: Partition, after: EntryId | None, bound: EntryId) -> Read:
        """The next segment's lines (after ``after``, up to ``bound``), the jobs that
        ended in it (job id -> end, ms), whether it is full, and, when an event
        this version cannot read stopped it, why."""
        lines: list[ArchivedLine] = []
        ended: dict[str, int] = {}
        # Each page is asked for before the one before it is turned into lines.
        want = min(_PAGE, self.segment_events)
        reading: asyncio.Future[list[tuple[str, dict[str, str]]]] | None = asyncio.ensure_future(
            self._page(part, f"({after}" if after else "-", bound, want))
        try:
            while reading is not None:
                entries = await reading
                reading = None
                full_page = len(entries) == want
                wanted = len(lines) + len(entries)
                if full_page and wanted < self.segment_events:
                    want = min(_PAGE, self.segment_events - wanted)
                    reading = asyncio.ensure_future(
                        self._page(part, f"({entries[-1][0]}", bound, want))
                # The log holds long tasks and results by reference: put them back
                # (one round trip a page) before the events are archived.
                events = await with_payloads(self.redis, part, [
                    RawEvent.parse(part.agent, entry_id, fields) for entry_id, fields in entries])
                for event in events:
                    entry_id = event.event_id
                    if not readable(event):
                        # A newer agentq's event: archived by a version that reads it,
                        # never skipped (what follows waits too, to keep the order).
                        return lines, ended, False, (
                            f"event {entry_id} ({event.type} v{event.v}) is of a newer agentq")
                    lines.append(ArchivedLine(entry_id, event.job_id, event.line(), made=True))
                    if event.type in _ENDINGS:
                        ended[event.job_id] = EntryId.parse(entry_id).ms
                if not full_page:
                    return lines, ended, False, ""
        finally:
            if reading is not None:
                reading.cancel()
        return lines, ended, True, ""

    async def _page(self, part: Partition, start: str, bound: EntryId, count: int
                    ) -> list[tuple[str, dict[str, str]]]:
        """Up to ``count`` log entries from ``start`` up to ``bound``."""
        entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
            part.log, start, str(bound), count=count)
        return entries

    async def _record(self, part: Partition, recorded: Recorded, ended: dict[str, int]) -> None:
        """Write the archive's end to Redis with the jobs that ended in what was just
        archived, in one step (a crash before it is repaired from the manifest)."""
        last = str(recorded.last) if recorded.last is not None else ""
        await self.scripts.record(part, ended, (last, recorded.head, recorded.seq))

    async def _agree(self, part: Partition, recorded: Recorded) -> tuple[Recorded, str]:
        """Make Redis's record of the archive's end agree with the manifest, which
        wins when the manifest is ahead (a crash between the two writes); returns
        that end, and a problem ("" for none) when they disagree in a way no crash
        explains (a segment edited, removed or lost): then nothing is archived or
        trimmed until an operator looks (``agentq audit verify --archive``)."""
        manifest = Recorded.of_segment(await self.archive.last(part.agent))
        if manifest == recorded:
            return recorded, ""
        if manifest.last is None or (recorded.last is not None
                                     and manifest.last <= recorded.last):
            return recorded, (
                f"the archive of {part.agent} ends at segment {manifest.seq} "
                f"({manifest.last or 'nothing'}, sha256 {manifest.head[:12] or '-'}) but Redis "
                f"recorded segment {recorded.seq} ({recorded.last}, sha256 "
                f"{recorded.head[:12]}); run agentq audit verify --archive")
        if recorded.last is not None:
            ours = next((s for s in await self.archive.segments(part.agent)
                         if s.seq == recorded.seq), None)
            if ours is None or ours.sha256 != recorded.head or ours.last != str(recorded.last):
                return recorded, (
                    f"the archive of {part.agent} no longer holds segment {recorded.seq} as "
                    f"Redis recorded it (sha256 {recorded.head[:12]}); run agentq audit "
                    "verify --archive")
        # A crash between the manifest and Redis: record the jobs that ended in what
        # was archived meanwhile (still in the log: trimming stops at Redis's
        # record), then the end.
        start = f"({recorded.last}" if recorded.last else "-"
        while True:
            entries: list[tuple[str, dict[str, str]]] = await self.redis.xrange(  # type: ignore[assignment]
                part.log, start, str(manifest.last), count=_PAGE)
            ended = {fields["jobId"]: EntryId.parse(entry_id).ms
                     for entry_id, fields in entries if fields.get("type") in _ENDINGS}
            if ended:
                await self.scripts.record(part, ended)
            if len(entries) < _PAGE:
                break
            start = f"({entries[-1][0]}"
        await self._record(part, manifest, {})
        return manifest, ""

    async def _expire(self, part: Partition, archived: EntryId, outcome: PassOutcome) -> None:
        """Remove the jobs that ended more than the retention ago, a batch at a time,
        and take them out of the global job indexes."""
        left: dict[str, str] = await self.redis.hgetall(part.expired)  # type: ignore[assignment]
        if left:  # removed by a pass that died before the global indexes
            await self._unindex(part, [job for field, value in left.items()
                                       for job in expired_jobs(field, value)], list(left))
        while True:
            expired = await self.scripts.expire(part, self.retention_ms, _EXPIRE_BATCH,
                                                str(archived), WORKER_FORGET_MS)
            outcome.now_ms = expired.now_ms
            if expired.jobs:
                await self._unindex(part, expired.jobs, [expired.batch])
                outcome.removed += len(expired.jobs)
            if not expired.again:
                return

    async def _unindex(self, part: Partition, jobs: Sequence[tuple[str, str]],
                       fields: Sequence[str]) -> None:
        """Take ``jobs`` out of the global indexes, then their ``fields`` out of
        ``part.expired``."""
        await global_index.remove(self.scripts, self.keys, jobs)
        await self.redis.hdel(part.expired, *fields)

    async def _trim(self, part: Partition, archived: EntryId, bound: EntryId | None,
                    outcome: PassOutcome) -> None:
        """Trim the log up to the earliest of just after the archive's end, the
        retention's cutoff and just after the groups' safe point."""
        if bound is None or outcome.now_ms is None:
            return
        cutoff = EntryId(outcome.now_ms - self.retention_ms, 0)
        minid = str(min(archived.next(), cutoff, bound.next()))
        # Whole nodes of the stream at a time, a bounded number of entries per
        # call (a first pass may trim millions), then exactly up to the id.
        while trimmed := int(await self.redis.xtrim(part.log, minid=minid, approximate=True,
                                                    limit=_TRIM_BATCH)):
            outcome.trimmed += trimmed
        outcome.trimmed += int(await self.redis.xtrim(part.log, minid=minid, approximate=False))
