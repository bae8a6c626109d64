"""Reading the log: one job's history, a partition from a position, a merged replay.

The log holds a long task or result by reference (its SHA-256; the spec or
the record holds the payload: ``schemas.events.PAYLOAD_FIELDS``).
:func:`with_payloads` puts them back, and every read that hands events to
someone outside the process does so (``job_history``, ``iter_partition``,
``replay``); a consumer that needs no payload reads pages without
(``read_partition``), and ``RawEvent.stored`` refuses an event whose payload
was never looked up, so that none is printed or archived without it.
"""

from __future__ import annotations

import asyncio
import heapq
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import orjson
import structlog
from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.records import LONG_RESULT, with_kept_apart
from agentq.eventlog.scripts import Scripts
from agentq.schemas._base import micros_to_iso
from agentq.schemas.events import (
    CURRENT_VERSIONS,
    PAYLOAD_FIELDS,
    TIME_FIELDS,
    StoredEvent,
    digest_field,
    payload_digest,
    upcast,
)
from agentq.schemas.job import DependencyView, JobView, agent_of_job

log = structlog.get_logger("agentq.eventlog")


class RawEvent:
    """An event as stored: times in epoch microseconds.

    ``data`` is parsed (and upcast to the current version) when first read:
    consumers that follow every log look at the data of few events.
    """

    __slots__ = ("_data", "_raw", "actor", "agent", "at", "event_id", "job_id", "payloads_read",
                 "prev", "quiet", "type", "v")

    def __init__(
        self, event_id: str, agent: str, type: str, job_id: str, at: int, actor: str, v: int,
        data: dict[str, Any] | None = None, raw: str | None = None, quiet: bool = False,
        prev: str | None = None,
    ) -> None:
        self.event_id = event_id
        self.agent = agent
        self.type = type
        self.job_id = job_id
        self.at = at
        self.actor = actor
        self.v = v
        self._data = data
        self._raw = raw
        # Set on an ending written when no dependent was registered and no
        # announce asked for: a hint for the gates, not part of the history.
        self.quiet = quiet
        # The log's field `p`: the id of the job's event before this one ('' for
        # its first; a record written before the chain kept every id, and its
        # first chained event names them all). None when not read from the log
        # (the archive does not keep it).
        self.prev = prev
        # Set by with_payloads: any payload held by reference was looked up
        # (and put back, unless it was missing or differed from its digest).
        self.payloads_read = False

    def may_hold(self, text: str) -> bool:
        """False only when ``text`` is surely not in the event's data as stored: a
        test that spares parsing the data of events that cannot concern a reader."""
        return self._raw is None or text in self._raw

    def longer_than(self, size: int) -> bool:
        """False only when the data as stored is surely no longer than ``size``
        (characters of JSON): a test that spares serializing a short value to
        measure it. True when the data was given parsed."""
        return self._raw is None or len(self._raw) > size

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = upcast(self.type, self.v, orjson.loads(self._raw or "{}"))
        return self._data

    @classmethod
    def parse(cls, agent: str, event_id: str, fields: Mapping[str, str]) -> RawEvent:
        return cls(event_id, agent, fields["type"], fields["jobId"], int(fields["at"]),
                   fields["actor"], int(fields["v"]), raw=fields["data"],
                   quiet=fields.get("q") == "1", prev=fields.get("p"))

    @classmethod
    def of_history(cls, agent: str, event_id: str, fields: Sequence[str]) -> RawEvent:
        """An event as ``Scripts.history`` returns it: names and values, flat, each
        value at its place."""
        return cls(event_id, agent, fields[1], fields[3], int(fields[7]), fields[9],
                   int(fields[5]), raw=fields[11], quiet=len(fields) > 15 and fields[15] == "1",
                   prev=fields[13])

    def row(self) -> bytes:
        """The event (but its agent) as one line of JSON, as :meth:`of_row` reads it:
        its data as stored, or as given when it was given parsed (then upcast already)."""
        parsed = self._data if self._raw is None else None
        return orjson.dumps([self.event_id, self.type, self.job_id, self.at, self.actor, self.v,
                             self._raw, parsed, self.quiet, self.prev])

    @classmethod
    def of_row(cls, agent: str, row: bytes) -> RawEvent:
        event_id, kind, job_id, at, actor, v, raw, parsed, quiet, prev = orjson.loads(row)
        return cls(event_id, agent, kind, job_id, at, actor, v, data=parsed, raw=raw,
                   quiet=quiet, prev=prev)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawEvent) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.agent, self.event_id))

    def _key(self) -> tuple[Any, ...]:
        return (self.event_id, self.agent, self.type, self.job_id, self.at, self.actor, self.v,
                self.data)

    def __repr__(self) -> str:
        return f"RawEvent({self.agent} {self.event_id} {self.type} {self.job_id})"

    def reference(self) -> tuple[str, str] | None:
        """``(field, sha256)`` when the log holds this event's payload by reference
        and it was not put back; else None."""
        field = PAYLOAD_FIELDS.get(self.type)
        if field is None or self.v > CURRENT_VERSIONS[self.type]:
            return None
        name = digest_field(field)
        if self._data is None and f'"{name}":' not in (self._raw or ""):
            return None  # most events: no parse needed to tell
        digest = self.data.get(name)
        return (field, digest) if isinstance(digest, str) and field not in self.data else None

    def _put_back(self, field: str, value: Any) -> None:
        """The payload at the place its digest held in ``data``."""
        name = digest_field(field)
        self._data = {field if key == name else key: value if key == name else held
                      for key, held in self.data.items()}

    def stored(self) -> StoredEvent:
        """The event as ``history`` and ``replay`` print it (times as ISO-8601).

        Raises ValueError for an event whose payload the log holds by reference
        and nobody looked up (``with_payloads``): printed or archived, it would
        lose the payload."""
        return StoredEvent.of_log(self.event_id, self.type, self.job_id, self.agent,
                                  micros_to_iso(self.at) or "", self.actor, self.v,
                                  dict(self._printed_data()))

    def wire(self) -> dict[str, Any]:
        """``stored().wire()``, made without the model: what the archive writes for
        each event, at a fraction of the cost (a test holds the two together).
        Raises ValueError as ``stored`` does; ``data`` may be the event's own."""
        return self._wire_with(self._printed_data())

    def _wire_with(self, data: Any) -> dict[str, Any]:
        return {"eventId": self.event_id, "type": self.type, "jobId": self.job_id,
                "agent": self.agent, "at": micros_to_iso(self.at) or "", "actor": self.actor,
                "v": self.v, "data": data}

    def line(self) -> bytes:
        """``orjson.dumps(self.wire())``, the line the archive writes, made without
        parsing the data when it is printed as stored: no time in it, no payload
        held by reference, written by this version, and no escape (a script's
        cjson writes ``\\/`` where orjson writes ``/``), so that the stored text is
        what orjson would write again. The text is still parsed, to refuse what is
        no JSON object (a line no reader could read). Raises ValueError as
        ``stored`` does, and for such data."""
        raw = self._raw
        if (self._data is not None or raw is None or self.v != CURRENT_VERSIONS.get(self.type)
                or "\\" in raw or _PRINTED_OTHERWISE.search(raw)
                or not isinstance(orjson.loads(raw), dict)):
            return orjson.dumps(self.wire())
        head = orjson.dumps(self._wire_with(None))  # ...,"data":null}
        return b"%s%s}" % (head[:-5], raw.encode())

    def _printed_data(self) -> dict[str, Any]:
        """``data`` with its times as ISO-8601, once the payloads are known to be in it."""
        if not self.payloads_read and (held := self.reference()) is not None:
            raise ValueError(f"event {self.event_id} of job {self.job_id}: its {held[0]} is "
                             "held by reference; read it with reader.with_payloads first")
        data = self.data
        times = TIME_FIELDS.intersection(data)
        if times:
            data = dict(data)
            for name in times:
                if isinstance(data[name], int):
                    data[name] = micros_to_iso(data[name])
        return data


# Text that, in an event's stored data, means ``wire`` prints the data otherwise
# than stored: a time (printed as ISO-8601), a payload's digest (held by reference).
_PRINTED_OTHERWISE = re.compile("|".join(
    re.escape(f'"{name}":') for name in (
        *sorted(TIME_FIELDS),
        *(digest_field(field) for field in sorted(set(PAYLOAD_FIELDS.values())))))
)

_warned: set[tuple[str, int]] = set()


def readable(event: RawEvent) -> bool:
    """Whether this version can read ``event``: its type is known, at a version
    no newer than ours. A newer agentq may append types this one does not know
    (a rolling upgrade); readers skip them, with one warning per type and version."""
    current = CURRENT_VERSIONS.get(event.type)
    if current is not None and event.v <= current:
        return True
    if (event.type, event.v) not in _warned:
        _warned.add((event.type, event.v))
        log.warning("skipping events of a type this version cannot read",
                    event_type=event.type, version=event.v, event_id=event.event_id,
                    agent=event.agent)
    return False


async def with_payloads(
    redis: Redis, part: Partition, events: Sequence[RawEvent]
) -> Sequence[RawEvent]:
    """``events`` of ``part`` with every payload the log holds by reference put
    back from the job's spec (a task) or record (a result), as the event was
    written: one pipelined round trip, none when no event holds one. The events
    are changed in place and returned. A payload that is gone, or differs from
    its digest (or is not JSON), is not put back (the event keeps the digest)
    and is logged."""
    await _put_back(redis, [(part, events)])
    return events


async def _put_back(
    redis: Redis, pages: Sequence[tuple[Partition, Sequence[RawEvent]]]
) -> None:
    """:func:`with_payloads` for pages of several partitions, in one round trip."""
    wanted = []
    for part, events in pages:
        for event in events:
            if (held := event.reference()) is not None:
                wanted.append((part, event, held))
            else:
                event.payloads_read = True  # none to look up
    if not wanted:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for part, event, (field, _) in wanted:
            if event.type == "JobDispatched":
                pipe.get(part.spec(event.job_id))
            else:  # a long result is in a key of its own; one before, in the record
                pipe.get(part.result(event.job_id))
                pipe.hget(part.job(event.job_id), field)
        replies = iter(await pipe.execute())
    texts = [next(replies) if event.type == "JobDispatched" else _first(next(replies),
                                                                         next(replies))
             for _, event, _ in wanted]
    for (_, event, (field, digest)), text in zip(wanted, texts, strict=True):
        event.payloads_read = True
        found = _payload(event.type, field, text)
        if found is not None and payload_digest(found[0]) == digest:
            event._put_back(field, found[1])
        else:
            log.warning("a payload the log holds by reference is missing or differs from its "
                        "digest: the event keeps the digest", event_id=event.event_id,
                        job_id=event.job_id, agent=event.agent, field=field,
                        missing=found is None)


def _first(own: str | None, kept: str | None) -> str | None:
    return own if own is not None else kept


def _payload(event_type: str, field: str, text: str | None) -> tuple[bytes, Any] | None:
    """A payload's JSON (as its digest was taken) and value, from the spec (a
    task) or the record's field (a result); None when there is none."""
    if text is None:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if event_type != "JobDispatched":
        return text.encode(), value
    if not isinstance(value, dict) or field not in value:
        return None
    return orjson.dumps(value[field]), value[field]


async def read_records(
    redis: Redis, jobs: Sequence[tuple[Partition, str]]
) -> list[dict[str, str]]:
    """Jobs' state records, each with its ``spec`` and its ``result`` (when long,
    each kept in a key of its own), in one round trip (two when a record is
    marked ``longResult``); ``{}`` for a job that does not exist."""
    async with redis.pipeline(transaction=False) as pipe:
        for part, job_id in jobs:
            pipe.hgetall(part.job(job_id))
            pipe.get(part.spec(job_id))
        replies: list[Any] = await pipe.execute()
    records: list[dict[str, str]] = replies[0::2]
    # A long result is read only for the records that say they have one (one more
    # round trip then; none for most lists).
    results = await _long_results(redis, jobs, [LONG_RESULT in r for r in records])
    return [with_kept_apart(record, spec, result)
            for record, spec, result in zip(records, replies[1::2], results, strict=True)]


async def _long_results(
    redis: Redis, jobs: Sequence[tuple[Partition, str]], marked: Sequence[bool]
) -> list[str | None]:
    """The result kept apart of each of ``jobs`` that is ``marked`` (None for the
    others), in one round trip, none when no job is marked."""
    if not any(marked):
        return [None] * len(jobs)
    async with redis.pipeline(transaction=False) as pipe:
        for (part, job_id), long in zip(jobs, marked, strict=True):
            if long:
                pipe.get(part.result(job_id))
        found = iter(await pipe.execute())
    return [next(found) if long else None for long in marked]


async def read_specs(redis: Redis, jobs: Sequence[tuple[Partition, str]]) -> list[str | None]:
    """Jobs' specs (JSON) in one round trip; None for a job that does not exist. A
    job dispatched before specs had a key of their own keeps its spec in its record."""
    async with redis.pipeline(transaction=False) as pipe:
        for part, job_id in jobs:
            pipe.get(part.spec(job_id))
            pipe.hget(part.job(job_id), "spec")
        replies: list[Any] = await pipe.execute()
    return [own if own is not None else kept
            for own, kept in zip(replies[0::2], replies[1::2], strict=True)]


async def read_record(redis: Redis, part: Partition, job_id: str) -> dict[str, str]:
    """One job's state record with its ``spec``; ``{}`` when the job does not exist."""
    (record,) = await read_records(redis, [(part, job_id)])
    return record


async def all_records(redis: Redis, part: Partition) -> dict[str, dict[str, str]]:
    """Every state record of the partition (each with its spec), by job id."""
    ids = [key[len(part.job_prefix):]
           async for key in redis.scan_iter(match=f"{part.job_prefix}*", count=1000)]
    found: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        records = await read_records(redis, [(part, job_id) for job_id in chunk])
        found.update((job_id, r) for job_id, r in zip(chunk, records, strict=True) if r)
    return found


# Events read per history call: a longer history takes several calls, so that
# none holds the server for long.
_HISTORY_CHUNK = 2000


async def job_history(
    redis: Redis, part: Partition, job_id: str, *, payloads: bool = True
) -> list[RawEvent] | None:
    """A job's events, oldest first; None when the job does not exist. Read back
    from its latest event (the record's ``events`` field) along the chain each
    event keeps to the one before (see ``_lib.lua``'s ``aq_event``); with
    ``payloads``, the task and result put back (:func:`with_payloads`)."""
    at: str | None = await redis.hget(part.job(job_id), "events")  # type: ignore[assignment]
    if at is None:
        return None
    scripts = Scripts(redis)
    newest_first: list[tuple[str, list[str]]] = []
    while at:
        entries, at = await scripts.history(part, at, _HISTORY_CHUNK)
        newest_first += entries
    events = (RawEvent.of_history(part.agent, entry_id, fields)
              for entry_id, fields in reversed(newest_first))
    history = [event for event in events if readable(event)]
    if payloads:
        await with_payloads(redis, part, history)
    return history


async def _between(
    events: AsyncIterator[RawEvent], since_us: int | None, until_us: int | None
) -> AsyncIterator[RawEvent]:
    async for event in events:
        if (since_us is None or event.at >= since_us) and (until_us is None or event.at < until_us):
            yield event


async def dependency_views(
    redis: Redis, keys: Keys, depends_on: Sequence[str]
) -> dict[str, DependencyView]:
    """Each dependency's state, its result once completed, and its error."""
    agents = [agent_of_job(dep) for dep in depends_on]
    async with redis.pipeline(transaction=False) as pipe:
        for dep, agent in zip(depends_on, agents, strict=True):
            job_key = keys.partition(agent).job(dep) if agent else "-"
            pipe.hmget(job_key, "state", "result", "error", LONG_RESULT)
        replies: list[Any] = await pipe.execute()
    # (A dependency without an agent has no record, so no mark: its key is never read.)
    jobs = [(keys.partition(agent or "-"), dep) for dep, agent in zip(depends_on, agents,
                                                                    strict=True)]
    kept = await _long_results(redis, jobs, [reply[3] is not None for reply in replies])
    return {dep: dependency_view(state, result if result is not None else apart, error)
            for dep, (state, result, error, _), apart in zip(depends_on, replies, kept,
                                                              strict=True)}


def dependency_view(state: str | None, result: str | None, error: str | None
                    ) -> DependencyView:
    """A dependency as a dependent's view shows it, from its record's ``state``,
    ``result`` (JSON; shown once completed) and ``error``; no state is "unknown"."""
    return DependencyView(
        state=state or "unknown",
        result=orjson.loads(result) if result is not None and state == "completed" else None,
        error=error,
    )


async def with_dependencies(redis: Redis, keys: Keys, view: JobView) -> JobView:
    """``view`` with its ``dependencies`` filled in (unchanged when it has none)."""
    if not view.depends_on:
        return view
    return view.model_copy(
        update={"dependencies": await dependency_views(redis, keys, view.depends_on)}
    )


async def read_partition(
    redis: Redis, part: Partition, after: str = "-", count: int = 1000, *,
    payloads: bool = False,
) -> list[RawEvent]:
    """Up to ``count`` events of a partition after position ``after`` (exclusive; "-" = start),
    as consumers read them: a payload held by reference stays so, unless ``payloads``."""
    start = "-" if after == "-" else f"({after}"
    entries: list[tuple[str, dict[str, str]]] = await redis.xrange(  # type: ignore[assignment]
        part.log, start, "+", count=count
    )
    events = [RawEvent.parse(part.agent, entry_id, fields) for entry_id, fields in entries]
    if payloads:
        await with_payloads(redis, part, events)
    return events


async def iter_partition(
    redis: Redis, part: Partition, after: str = "-", batch: int = 1000, until_ms: int | None = None,
    *, payloads: bool = True,
) -> AsyncIterator[RawEvent]:
    """Every event of a partition after ``after``, in log order, read in batches;
    with ``until_ms``, only entries whose id time is before it. Payloads are put
    back a batch at a time (:func:`with_payloads`), unless ``payloads`` is False.
    The next batch is asked for before this one is handed out, so that Redis
    reads it while the caller works."""
    following: asyncio.Future[list[RawEvent]] | None = None
    try:
        events = await read_partition(redis, part, after, batch, payloads=payloads)
        while True:
            if len(events) == batch:
                following = asyncio.ensure_future(read_partition(
                    redis, part, events[-1].event_id, batch, payloads=payloads))
            for event in events:
                if until_ms is not None and int(event.event_id.split("-")[0]) >= until_ms:
                    return
                yield event
            if following is None:
                return
            events, following = await following, None
    finally:
        if following is not None:
            following.cancel()


# About how many events a replay holds at once, over all partitions: each
# partition's page is this divided among them (at least 10, at most ``batch``),
# so that memory does not grow with the number of partitions.
REPLAY_HELD = 100_000


async def _pages_from(
    redis: Redis, part: Partition, events: list[RawEvent], batch: int, until_ms: int | None,
) -> AsyncIterator[RawEvent]:
    """A partition's events from an already read first page of ``batch`` events
    on, with their payloads."""
    while True:
        for event in events:
            if until_ms is not None and int(event.event_id.split("-")[0]) >= until_ms:
                return
            yield event
        if len(events) < batch:
            return
        events = await read_partition(redis, part, events[-1].event_id, batch, payloads=True)


async def replay(
    redis: Redis, parts: Sequence[Partition], batch: int = 1000,
    since_us: int | None = None, until_us: int | None = None,
) -> AsyncIterator[RawEvent]:
    """Every event of ``parts``: each partition in log order, partitions merged by
    event time; with ``since_us`` (inclusive) / ``until_us`` (exclusive) bounds on
    ``at``. Each log is read a page at a time, every first page in one round trip
    (and their payloads in one more)."""
    # Entry ids carry the server's time in ms, as ``at`` does in µs: they bound the reads.
    after = f"{since_us // 1000 - 1}-{2**64 - 1}" if since_us else "-"
    until_ms = until_us // 1000 + 1 if until_us else None
    page = max(10, min(batch, REPLAY_HELD // max(1, len(parts))))
    async with redis.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.xrange(part.log, "-" if after == "-" else f"({after}", "+", count=page)
        replies: list[Any] = await pipe.execute() if parts else []
    firsts = [[RawEvent.parse(part.agent, entry_id, fields) for entry_id, fields in reply]
              for part, reply in zip(parts, replies, strict=True)]
    await _put_back(redis, list(zip(parts, firsts, strict=True)))
    iterators = [
        _between(_pages_from(redis, part, first, page, until_ms), since_us, until_us)
        for part, first in zip(parts, firsts, strict=True)
    ]
    async for event in merged_by_time(iterators):
        yield event


async def merged_by_time(iterators: Sequence[AsyncIterator[RawEvent]]) -> AsyncIterator[RawEvent]:
    """Partitions' events, each iterator in log order, merged by event time (then
    agent); events this version cannot read are left out."""
    heap: list[tuple[int, str, int, RawEvent]] = []
    for index, iterator in enumerate(iterators):
        first = await anext(iterator, None)
        if first is not None:
            heap.append((first.at, first.agent, index, first))
    heapq.heapify(heap)
    while heap:
        _, _, index, event = heapq.heappop(heap)
        if readable(event):
            yield event
        following = await anext(iterators[index], None)
        if following is not None:
            heapq.heappush(heap, (following.at, following.agent, index, following))
