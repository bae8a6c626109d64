"""``audit verify``: re-derive every job from the log and compare it with the
state records, the per-state counts, the views and the global job indexes.
Each difference is named.

It streams: what it holds does not grow with the log or with the number of
jobs. The log (the archive's part first) is read a page at a time and folded
as it is read; a job is compared as soon as its record shows that the log has
no more of its events (the record's ``events`` field is the id of the job's
last event), which for an ended job is as soon as its ending is read. So what
is held is the jobs still running, plus a batch: one small derived record each
(a spec or result longer than a few hundred bytes kept as its digest), up to a
limit; past it (a backlog), a job's events are set aside on disk as they are
read and compared once the log is read (``projections/spill.py``).

A batch of compared jobs costs one pipeline: their records (``records.lua``)
and one membership read per index they belong in (``index_has.lua`` for a
paged index, ``ZMSCORE`` for a sorted set). It is sent when the batch is asked
for (``_ask``), and the batch is compared (``_judge``) once the next one is
asked for, so that Redis reads while the log is folded. What an index holds
beyond what the log implies is found by counting (its size against the jobs
compared), and only an index that holds more is read member by member to
name what it holds wrongly; likewise a state record with no events in the log
is found by counting record keys, and looked for only when the counts differ.
Payloads the log holds by reference are not read back: their SHA-256 in the
log is compared with the task and result the spec and record hold. Each event
must name the job's event before it in the log (its field ``p``), as ``history``
reads it back: an event taken out of a job's history is named by the one after it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import orjson
from redis.asyncio import Redis

from agentq.eventlog import fold, merged
from agentq.eventlog.archive import Archive, event_key
from agentq.eventlog.keys import Keys, Partition, index_of_key, is_paged
from agentq.eventlog.reader import RawEvent, readable
from agentq.eventlog.records import last_event_id, normalize
from agentq.eventlog.scripts import ScriptCall, Scripts
from agentq.projections.projection import Projection
from agentq.projections.scan import agent_of_key, glob_escape, scan_keys, view_keys
from agentq.projections.spill import Spill
from agentq.projections.ticker import Ticker
from agentq.schemas.errors import InvalidInput
from agentq.schemas.events import PAYLOAD_FIELDS, digest_field, payload_digest
from agentq.schemas.job import STATES, TERMINAL_STATES

_BATCH = 500
# At most this many jobs are held at once (a job that has only been dispatched
# as its event, about 500 bytes; one folded further, about a kilobyte); the
# events of a job dispatched while more run at that point of the log are set
# aside on disk (projections/spill.py) and compared once the log is read.
_HELD = 60_000
# A job set aside that ran on while the log was read is read again along its
# chain: this many events with other jobs' (most jobs have fewer), the rest
# this many at a time on their own.
_CHAIN_FIRST = 32
_CHAIN = 1000
_TASK, _RESULT = PAYLOAD_FIELDS["JobDispatched"], PAYLOAD_FIELDS["JobCompleted"]
_TASK_DIGEST, _RESULT_DIGEST = digest_field(_TASK), digest_field(_RESULT)
# A JSON value longer than this is kept as its digest while the log is folded.
_KEPT_WHOLE = 256


class Digest:
    """A long JSON value as its SHA-256: equal to any value with the same JSON
    (keys sorted), and shown by its start."""

    __slots__ = ("length", "sha", "start")

    def __init__(self, text: bytes) -> None:
        self.sha = hashlib.sha256(text).digest()
        self.length = len(text)
        self.start = text[:60].decode(errors="replace")

    @staticmethod
    def json(value: Any) -> bytes:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def of(cls, value: Any) -> Any:
        """``value`` itself when short, else its digest."""
        text = cls.json(value)
        return value if len(text) <= _KEPT_WHOLE else cls(text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Digest):
            return self.sha == other.sha
        return hashlib.sha256(self.json(other)).digest() == self.sha

    def __hash__(self) -> int:
        return hash(self.sha)

    def __repr__(self) -> str:
        return f"<{self.length} bytes of JSON: {self.start}... sha256 {self.sha.hex()[:16]}>"


@dataclass(frozen=True)
class Progress:
    """How far the audit of one partition is (``verify``'s ``progress``)."""

    agent: str
    events: int     # read so far (the archive's, then the log's)
    compared: int   # jobs compared so far
    set_aside: int  # events set aside so far, their jobs compared once the log is read
    log_read: bool  # the log is read: the jobs set aside are being compared


@dataclass
class _Asked:
    """Jobs to compare, as the log had them when asked for, with what Redis held."""

    expected: dict[str, dict[str, Any]]         # job id -> derived record
    records: list[dict[str, str]]               # in the order of ``expected``
    listed: dict[str, dict[str, float | None]]  # index key -> job id -> score (None: not there)


@dataclass
class _ReadBack:
    """A batch of jobs set aside, with what Redis holds for them (``_read_back``)."""

    batch: list[str]                            # job ids
    derived: list[dict[str, Any]]               # what each job's events fold to
    records: list[dict[str, str]]
    scores: dict[str, list[float | None]] | None  # None: to be read (a job was ahead)
    again: dict[int, list[RawEvent]]            # events read again (the job was ahead)


def _settled(derived: dict[str, Any]) -> bool:
    return derived["state"] in TERMINAL_STATES


def _applied(derived: dict[str, Any], event: RawEvent) -> dict[str, Any]:
    """``derived`` after ``event`` (not a job's first), a long result kept as its digest."""
    derived = fold.apply(derived, event)
    if event.type == "JobCompleted" and "result" in derived and event.longer_than(_KEPT_WHOLE):
        derived["result"] = Digest.of(derived["result"])  # else the result is short
    return derived


class _PartitionAudit:
    """One partition's audit: ``run`` folds its events and compares each job as it
    settles; ``problems`` names every difference."""

    def __init__(self, redis: Redis, part: Partition, archive: Archive | None,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.redis, self.part, self.archive = redis, part, archive
        self.progress, self.ticker = progress, Ticker()
        self.read = self.compared = 0
        self.scripts = Scripts(redis)
        self.keys = Keys(part.prefix)
        self.problems: list[str] = []
        # Not yet compared: folded, or (a job only dispatched so far) its
        # JobDispatched, folded when it is first needed (a backlog costs less).
        self.open: dict[str, dict[str, Any] | RawEvent] = {}
        self.dispatcher: dict[str, str] = {}        # of the open jobs
        self.due: dict[str, None] = {}              # open jobs to compare with the next batch
        self.states: Counter[str] = Counter()       # of the jobs compared that have a record
        self.by: Counter[str] = Counter()
        self.unlisted: Counter[str] = Counter()     # index key -> jobs missing from it
        self.with_record = 0
        # Jobs whose record differs from the log: what the log says, to name an
        # index that lists them by their record (held only when there is a difference).
        self.differing: dict[str, tuple[str, str]] = {}
        self.archived_to: tuple[int, int] = (0, 0)
        self.settled_to: tuple[int, int] = (0, 0)

    async def run(self, settled_to: str | None) -> None:
        """Fold and compare every job; ``settled_to``: the log's last id when the
        views were brought up to it (a job with a later event is compared last,
        after the views are brought up again)."""
        self.settled_to = event_key(settled_to) if settled_to else (0, 0)
        tail = await self.archive.last(self.part.agent) if self.archive is not None else None
        self.archived_to = event_key(tail.last) if tail is not None else (0, 0)
        with Spill(self.part.agent) as spilled:
            await self._fold_log(spilled)
            await self._compare_spilled(spilled)
            self._tell(spilled, log_read=True, now=True)

    def _tell(self, spilled: Spill, *, log_read: bool, now: bool = False) -> None:
        """Report how far the audit is, when due (``now``: in any case)."""
        if self.progress is not None and (now or self.ticker.due()):
            self.progress(Progress(self.part.agent, self.read, self.compared,
                                   spilled.events, log_read))

    async def _fold_log(self, spilled: Spill) -> None:
        """Fold the log, comparing each job as it settles; a job dispatched while
        ``_HELD`` jobs are held has its events set aside in ``spilled`` instead
        (with those of jobs compared already that the log still holds)."""
        open_, due = self.open, self.due
        # A batch's records and index entries are read while the log is read on,
        # and it is compared once the next batch is asked for (two asked at once,
        # compared in order).
        comparing: asyncio.Future[_Asked | None] | None = None
        try:
            async for event in merged.partition_events(self.redis, self.archive, self.part,
                                                       payloads=False):
                self.read += 1
                if self.read % 1000 == 0:
                    self._tell(spilled, log_read=False)
                job_id = event.job_id
                record = open_.get(job_id)
                if record is None:
                    if not readable(event):
                        continue  # a newer agentq's event
                    if event.type != "JobDispatched" or len(open_) >= _HELD:
                        spilled.add(event)  # a job not held, or compared and met again
                    elif event.longer_than(_KEPT_WHOLE):
                        open_[job_id] = self._dispatched(event)  # a long spec as its digest
                    else:
                        open_[job_id] = event  # a dispatch never settles a job
                    continue
                if isinstance(record, RawEvent):
                    record = self._dispatched(record)
                record = self._step(record, event)
                open_[job_id] = record
                if record["state"] in TERMINAL_STATES \
                        and event_key(event.event_id) <= self.settled_to:
                    due[job_id] = None
                    if len(due) >= _BATCH:
                        batch = list(due)
                        due.clear()
                        before, comparing = comparing, asyncio.ensure_future(self._ask(batch))
                        await asyncio.sleep(0)  # it sends its reads before the log is read on
                        if before is not None and (asked := await before) is not None:
                            self._judge(asked, last=False)
            if comparing is not None and (asked := await comparing) is not None:
                self._judge(asked, last=False)
        finally:
            if comparing is not None and not comparing.done():
                comparing.cancel()
        await Projection(self.redis).catch_up([self.part])
        ordered = sorted(open_)
        for start in range(0, len(ordered), _BATCH):
            await self._compare(ordered[start : start + _BATCH], last=True)

    async def _compare_spilled(self, spilled: Spill) -> None:
        """The jobs the fold set aside, job by job, a batch at a time: folded and
        compared. Events of a job with no JobDispatched among them are of jobs
        compared already."""
        dispatched = (events for events in spilled.jobs() if events[0].type == "JobDispatched")
        # Redis reads a batch's records and index entries while the next batch is
        # read back and folded and the one before is compared (two asked at once),
        # so that neither side waits for the other.
        asked: asyncio.Future[_ReadBack] | None = None
        try:
            while batch := list(islice(dispatched, _BATCH)):
                derived = [self._folded(events) for events in batch]
                before, asked = asked, asyncio.ensure_future(self._read_back(batch, derived))
                await asyncio.sleep(0)  # it sends its reads before the one before is compared
                if before is not None:
                    await self._compare_read_back(await before)
                self._tell(spilled, log_read=True)
            if asked is not None:
                await self._compare_read_back(await asked)
        finally:
            if asked is not None and not asked.done():
                asked.cancel()

    def _folded(self, events: list[RawEvent]) -> dict[str, Any]:
        """A job's derived record from its events (the first its JobDispatched)."""
        derived = self._dispatched(events[0])
        for event in events[1:]:
            derived = self._step(derived, event)
        return derived

    def _step(self, derived: dict[str, Any], event: RawEvent) -> dict[str, Any]:
        """``derived`` after ``event``; an event that names another as the job's
        event before it than the log holds is named (``history`` walks that chain)."""
        prev, before = event.prev, derived["events"]
        if prev is not None and prev != before and last_event_id(prev) != before:
            self._chain_broken(event, before)
        return _applied(derived, event)

    def _chain_broken(self, event: RawEvent, before: str) -> None:
        named = last_event_id(event.prev or "") or "no event"
        self.problems.append(
            f"{event.job_id}: its event {event.event_id} ({event.type}) names {named} as the "
            f"job's event before it, but the log's is {before} (history, which follows the "
            "chain, and replay differ)")

    async def _read_back(self, jobs: list[list[RawEvent]],
                         derived: list[dict[str, Any]]) -> _ReadBack:
        """What Redis holds for jobs set aside (their events, and what they fold
        to): their records and index entries, and the events of each job whose
        record names an event later than those set aside (it ran on while the log
        was read), read again along its chain."""
        batch = [events[0].job_id for events in jobs]
        # The index entries are asked for with the records: only a job ahead (rare)
        # changes what they should be, and then they are asked for again.
        records, scores = await self._records_and_scores(
            batch, self._wanted(dict(zip(batch, derived, strict=True))))
        ahead = [i for i, (events, record) in enumerate(zip(jobs, records, strict=True))
                 if record and _ahead(record, events[-1].event_id)]
        again = await self._chains([batch[i] for i in ahead], [records[i] for i in ahead]) \
            if ahead else []
        return _ReadBack(batch, derived, records, None if ahead else scores,
                         dict(zip(ahead, again, strict=True)))

    async def _compare_read_back(self, read: _ReadBack) -> None:
        """Compare jobs set aside with what :meth:`_read_back` found."""
        batch, derived = read.batch, read.derived
        for i, events in read.again.items():
            if events and events[0].type == "JobDispatched":
                derived[i] = self._folded(events)
            else:  # its dispatch was read from the log, but it cannot be read back
                self.problems.append(f"{batch[i]}: its chain of events in {self.part.log} "
                                     "breaks before its JobDispatched")
                del self.dispatcher[batch[i]]
                batch[i] = ""
        for job_id, record in zip(batch, derived, strict=True):
            if job_id:
                self.open[job_id] = record
        await self._compare([job_id for job_id in batch if job_id], last=True, records=[
            record for job_id, record in zip(batch, read.records, strict=True) if job_id],
            scores=read.scores)

    async def _chains(self, job_ids: list[str], records: list[dict[str, str]]
                      ) -> list[list[RawEvent]]:
        """Each job's events, oldest first, back along their chain from its record's
        latest; from the archive where the chain leaves the log."""
        ats = [record.get("events", "") for record in records]
        walked = iter(await self.scripts.histories(self.part, [at for at in ats if at],
                                                   _CHAIN_FIRST))
        found: list[list[RawEvent]] = []
        for job_id, at in zip(job_ids, ats, strict=True):
            entries: list[tuple[str, list[str]]] = []
            if at:
                entries, after = next(walked)
                while after:
                    more, after = await self.scripts.history(self.part, after, _CHAIN)
                    entries += more
            events = [event for event in (RawEvent.of_history(self.part.agent, entry_id, fields)
                                          for entry_id, fields in reversed(entries))
                      if readable(event)]
            if (not events or events[0].type != "JobDispatched") and self.archive is not None:
                events = await merged.job_events(self.redis, self.archive, self.part,
                                                 job_id) or []
            found.append(events)
        return found

    def _derived(self, job_id: str) -> dict[str, Any]:
        """An open job's derived record, folded from its JobDispatched if not yet."""
        held = self.open[job_id]
        if isinstance(held, RawEvent):
            held = self.open[job_id] = self._dispatched(held)
        return held

    def _dispatched(self, event: RawEvent) -> dict[str, Any]:
        """A job's derived record from its ``JobDispatched``; notes its dispatcher."""
        if event.prev:
            self._chain_broken(event, "none (it is the job's first)")
        record = fold.apply(None, event)
        spec = record["spec"]
        self.dispatcher[event.job_id] = str(spec.get("dispatchedBy"))
        if (digest := spec.pop(_TASK_DIGEST, None)) is not None:
            record[_TASK_DIGEST] = digest  # compared beside the spec: see _as_logged
        if event.longer_than(_KEPT_WHOLE):  # else the spec, a part of it, is short
            record["spec"] = Digest.of(spec)
        return record

    def _wanted(self, expected: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Per index key, the jobs that the log puts in it, of those ``expected``
        (job id -> derived record)."""
        part, keys = self.part, self.keys
        wanted: dict[str, list[str]] = defaultdict(list)
        for job_id, derived in expected.items():
            by = self.dispatcher[job_id]
            wanted[part.index_state(str(derived["state"]))].append(job_id)
            wanted[part.index_by(by)].append(job_id)
            wanted[keys.jobs_by(by)].append(job_id)
        wanted[keys.jobs_index()] = list(expected)
        return wanted

    async def _compare(self, job_ids: list[str], *, last: bool,
                       records: list[dict[str, str]] | None = None,
                       scores: dict[str, list[float | None]] | None = None) -> None:
        """Compare ``job_ids`` with what Redis holds for them (:meth:`_ask`, then
        :meth:`_judge`)."""
        asked = await self._ask(job_ids, records, scores)
        if asked is not None:
            self._judge(asked, last=last)

    async def _ask(self, job_ids: list[str], records: list[dict[str, str]] | None = None,
                   scores: dict[str, list[float | None]] | None = None) -> _Asked | None:
        """The open ones of ``job_ids`` as the log has them now, with their records
        and index entries (``scores``, as :meth:`_scores` reads them); each read
        here when not given (when given, every job is open). None: none is open."""
        for job_id in job_ids:
            self.due.pop(job_id, None)
        # A job may have been compared by the batch before (it ended again, and
        # that batch, compared as the log was read on, saw its end).
        expected = {job_id: self._derived(job_id) for job_id in job_ids if job_id in self.open}
        if not expected:
            return None
        wanted = self._wanted(expected)
        if records is None:
            read, held = await self._records_and_scores(list(expected), wanted)
        else:
            read, held = records, scores if scores is not None else await self._scores(wanted)
        return _Asked(expected, read, {key: dict(zip(ids, held[key], strict=True))
                                       for key, ids in wanted.items()})

    def _judge(self, asked: _Asked, *, last: bool) -> None:
        """Compare what :meth:`_ask` found. A job compared since it was asked for is
        passed over. Before the ``last`` pass, a job whose record names a later
        event than the log gave so far stays open (it has more events to come)."""
        part, keys, listed = self.part, self.keys, asked.listed
        for (job_id, derived), record in zip(asked.expected.items(), asked.records,
                                             strict=True):
            if job_id not in self.open:
                continue
            by = self.dispatcher[job_id]
            if not record and _settled(derived) \
                    and event_key(derived["events"]) <= self.archived_to:
                self._close(job_id)  # it ended and was archived: it left Redis
                continue
            if record and not last and last_event_id(record.get("events", "")) != derived["events"]:
                continue  # more of its events are still to be read
            if not record and not (last or _settled(derived)):
                continue
            self._close(job_id)
            state = str(derived["state"])
            self.with_record += bool(record)
            self.states[state] += 1
            self.by[by] += 1
            found = _record_problems(job_id, record, derived)
            if found:
                self.problems += found
                self.differing[job_id] = (state, by)
            for key, text in (
                (part.index_state(state), f"{state} by the log, but not listed as {state}"),
                (part.index_by(by), f"dispatched by {by} by the log, but not listed as "
                                    f"dispatched by {by}"),
                (keys.jobs_index(), "in the log but not in the global index of jobs "
                                    f"(agent {part.agent})"),
                (keys.jobs_by(by), f"dispatched by {by} by the log, but not in the "
                                   f"global index of jobs dispatched by {by}"),
            ):
                if listed[key][job_id] is None:
                    self.unlisted[key] += 1
                    self.problems.append(f"{job_id}: {text}")

    def _close(self, job_id: str) -> None:
        del self.open[job_id], self.dispatcher[job_id]
        self.compared += 1

    async def _scores(self, wanted: dict[str, list[str]]) -> dict[str, list[float | None]]:
        """Per index, each wanted id's score there (None: not listed; 0.0 for an
        id a paged index, ``keys.index_directory``, holds): all asked at once."""
        return _scores_of(wanted, await self.scripts.ask_many(_score_asks(wanted)))

    async def _records_and_scores(self, job_ids: list[str], wanted: dict[str, list[str]]
                                  ) -> tuple[list[dict[str, str]], dict[str, list[float | None]]]:
        """The records of ``job_ids`` and :meth:`_scores`, in one round trip: sent
        as soon as this is first run (no task in between), so that Redis reads
        them while the caller goes on working until it awaits them."""
        replies = await self.scripts.ask_many([Scripts.records_call(self.part, job_ids),
                                               *_score_asks(wanted)])
        return Scripts.records_of(replies[0]), _scores_of(wanted, replies[1:])

    async def check_totals(self, record_count: int | None, index_keys: Collection[str]) -> None:
        """What is only seen in totals: the per-state counts; each index holding
        more than the jobs compared (then read to name what it holds wrongly); state
        records that no event of the log names (``record_count`` of them were found;
        None: count them now)."""
        part = self.part
        counts: dict[str, str] = await self.redis.hgetall(part.counts)  # type: ignore[assignment]
        for state in STATES:
            if int(counts.get(state, 0)) != self.states.get(state, 0):
                self.problems.append(
                    f"agent {part.agent}: {counts.get(state, 0)} jobs counted {state}, "
                    f"{self.states.get(state, 0)} by the log")
        by_prefix = part.index_by("")
        dispatchers = {index_of_key(key)[len(by_prefix):] for key in index_keys
                       if key.startswith(by_prefix)}
        indexes: dict[str, tuple[str, str, int]] = {
            part.index_state(state): ("state", state, self.states[state]) for state in STATES}
        indexes |= {part.index_by(by): ("by", by, self.by[by])
                    for by in sorted(dispatchers | set(self.by))}
        sizes = await _sizes(self.scripts, list(indexes))
        for (key, (kind, value, compared)), size in zip(indexes.items(), sizes, strict=True):
            if size > compared - self.unlisted[key]:
                await self._name_extra(key, kind, value)
        if record_count is None:
            record_count = sum([1 async for _ in self.redis.scan_iter(
                match=glob_escape(part.job_prefix) + "*", count=1000)])
        if record_count != self.with_record:
            await self._name_unlogged()

    async def _name_extra(self, key: str, kind: str, value: str) -> None:
        """Name each job ``key`` lists (as of state or dispatcher ``value``) that the
        log does not put there."""
        async for page in _pages(self.redis, key):
            records = await self.scripts.records(self.part, page)
            for job_id, record in zip(page, records, strict=True):
                if job_id in self.differing:
                    state, by = self.differing[job_id]
                elif record:
                    live = normalize(record)
                    state, by = str(live["state"]), str(live["spec"].get("dispatchedBy"))
                else:
                    state, by = "nothing", "nobody"
                if kind == "state" and state != value:
                    self.problems.append(f"{job_id}: listed as {value}, but the log says {state}")
                elif kind == "by" and by != value:
                    self.problems.append(f"{job_id}: listed as dispatched by {value}, but the "
                                         f"log says {by}")

    async def _record_ids(self) -> set[str]:
        prefix = self.part.job_prefix
        return {key[len(prefix):] for key in
                await scan_keys(self.redis, glob_escape(prefix) + "*")}

    async def _name_unlogged(self) -> None:
        """Name each state record no event names: the counts differed (records made
        or removed while this ran differ too; this finds which, if any, have no
        events). Holds the partition's record ids: only when there is a difference."""
        ids = await self._record_ids()
        async for event in merged.partition_events(self.redis, self.archive, self.part,
                                                   payloads=False):
            ids.discard(event.job_id)
        self.problems += [f"{job_id}: has a state record but no events in {self.part.log}"
                          for job_id in sorted(ids)]


def _score_asks(wanted: dict[str, list[str]]) -> list[ScriptCall | Callable[[Any], object]]:
    """The reads of ``_scores``, for ``Scripts.ask_many``."""
    return [Scripts.index_has_call(key, ids) if is_paged(key) else _zmscore(key, ids)
            for key, ids in wanted.items()]


def _scores_of(wanted: dict[str, list[str]], replies: Sequence[Any]
               ) -> dict[str, list[float | None]]:
    """What the reads of ``_score_asks`` replied, per index key."""
    return {key: [0.0 if flag == "1" else None for flag in reply] if is_paged(key)
            else reply for key, reply in zip(wanted, replies, strict=True)}


def _zmscore(key: str, ids: list[str]) -> Callable[[Any], object]:
    return lambda pipe: pipe.zmscore(key, ids)


def _zcard(key: str) -> Callable[[Any], object]:
    return lambda pipe: pipe.zcard(key)


async def _sizes(scripts: Scripts, indexes: Sequence[str]) -> list[int]:
    """How many ids each index holds (sorted sets and paged indexes, at once)."""
    return [int(size) for size in await scripts.ask_many([
        ScriptCall("index_size", [key], []) if is_paged(key) else _zcard(key)
        for key in indexes])]


async def _pages(redis: Redis, key: str, size: int = _BATCH) -> AsyncIterator[list[str]]:
    """Members of an index (all scores 0, or paged), a page at a time, in id order."""
    scripts = Scripts(redis) if is_paged(key) else None
    low: str | None = None
    while True:
        if scripts is not None:
            page = await scripts.index_range(key, low, size, forward=True)
        else:
            page = await redis.zrangebylex(key, f"({low}" if low else "-", "+", 0, size)  # type: ignore[assignment]
        if page:
            yield page
        if len(page) < size:
            return
        low = page[-1]




def _ahead(record: dict[str, str], event_id: str) -> bool:
    """Whether ``record`` names a later event than ``event_id``. Only a record ahead
    of the log read is read again: one behind it (a later event the record does
    not name), or naming no event id at all, is a difference, named as it is."""
    try:
        return event_key(last_event_id(record.get("events", ""))) > event_key(event_id)
    except InvalidInput:
        return False


def _record_problems(job_id: str, record: dict[str, str], expected: dict[str, Any]) -> list[str]:
    if not record:
        return [f"{job_id}: has events but no state record"]
    live = _as_logged(record, normalize(record), expected)
    if live == expected:  # most are: one comparison, not one per field
        return []
    return [
        f"{job_id}: {field} is {live.get(field)!r} in the state record, "
        f"{expected.get(field)!r} by the log"
        for field in sorted(set(live) | set(expected))
        if live.get(field) != expected.get(field)
    ]


def _as_logged(
    record: dict[str, str], live: dict[str, Any], expected: dict[str, Any]
) -> dict[str, Any]:
    """The normalized live record with each payload the log holds by reference
    (``expected`` has its digest) replaced by its digest, taken as the writer
    took it: of the task's JSON, of the result's stored text."""
    spec = live.get("spec")
    if _TASK_DIGEST in expected and isinstance(spec, dict) and _TASK in spec:
        spec = dict(spec)
        live[_TASK_DIGEST] = payload_digest(orjson.dumps(spec.pop(_TASK)))
        live["spec"] = spec
    if _RESULT_DIGEST in expected and _RESULT in record:
        live[_RESULT_DIGEST] = payload_digest(record[_RESULT].encode())
        live.pop(_RESULT, None)
    return live


async def _log_ends(redis: Redis, parts: Sequence[Partition]) -> list[str | None]:
    """Each partition log's last event id (None for an empty log)."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.xrevrange(part.log, "+", "-", count=1)
        replies = await pipe.execute()
    return [reply[0][0] if reply else None for reply in replies]


async def _record_counts(redis: Redis, keys: Keys) -> Counter[str]:
    """Per agent, how many state records there are (one SCAN)."""
    found: Counter[str] = Counter()
    async for key in redis.scan_iter(match=glob_escape(keys.prefix) + ":{*}:job:*", count=1000):
        agent = agent_of_key(keys.prefix, key)
        if agent is not None and key.startswith(keys.partition(agent).job_prefix):
            found[agent] += 1
    return found


async def verify_partition(
    redis: Redis, part: Partition, record_count: int | None = None,
    index_keys: Collection[str] | None = None, archive: Archive | None = None,
    log_end: str | None = None, progress: Callable[[Progress], None] | None = None,
) -> list[str]:
    """Differences between what ``part``'s events imply (in the log, and in the
    ``archive`` once trimmed from it) and what Redis holds. ``record_count`` (of
    its state records), ``index_keys`` (its index keys) and ``log_end`` (its
    log's last id, read before those were counted) come from ``verify``'s one
    SCAN; else they are found here. ``progress`` is told how far it is now and
    then, and at the end."""
    if log_end is None:
        (log_end,) = await _log_ends(redis, [part])
    if index_keys is None:
        index_keys = (await view_keys(redis, Keys(part.prefix))).get(part.agent, set())
    await Projection(redis).catch_up([part])  # the views, up to log_end at least
    audit = _PartitionAudit(redis, part, archive, progress)
    await audit.run(log_end)
    await audit.check_totals(record_count, index_keys)
    return audit.problems


async def verify(redis: Redis, parts: Sequence[Partition], archive: Archive | None = None,
                 progress: Callable[[Progress], None] | None = None) -> list[str]:
    """Every difference found in ``parts``; empty when all agree with their events
    (in the log, and in the ``archive`` once trimmed from it). ``progress`` is told
    how far each partition's audit is now and then, and at its end."""
    if not parts:
        return []
    keys = Keys(parts[0].prefix)
    ends = await _log_ends(redis, parts)
    record_counts = await _record_counts(redis, keys)
    index_keys = await view_keys(redis, keys)
    problems: list[str] = []
    for part, end in zip(parts, ends, strict=True):
        problems += await verify_partition(
            redis, part, record_counts.get(part.agent, 0), index_keys.get(part.agent, set()),
            archive, end, progress)
    return problems
