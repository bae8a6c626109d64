"""Reads that do not care where an event lives: in the archive, in the
partition log, or split between the two.

The archiving pass copies a partition's events to the archive in log order and
only then trims them from the log and removes the keys of jobs that ended long
enough ago (:mod:`agentq.consumers.archiver`). So, for any partition, the
archive holds a prefix of its events (up to its last segment's last id) and
the log holds a suffix; the two may overlap (archived, not trimmed yet), and a
reader takes each event once, by its id: from the archive up to its end, from
the log after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog import fold, reader
from agentq.eventlog.archive import Archive, event_key
from agentq.eventlog.keys import Keys, Partition
from agentq.eventlog.reader import RawEvent, readable
from agentq.eventlog.records import denormalize
from agentq.schemas._base import iso_to_micros
from agentq.schemas.events import TIME_FIELDS
from agentq.schemas.job import JobView, agent_of_job


def event_of(agent: str, stored: Mapping[str, Any]) -> RawEvent:
    """An archived event (as ``replay`` printed it) as the log's reader returns it:
    times back in epoch microseconds. Its data was upcast when printed, so it is
    taken as it is."""
    data = dict(stored["data"])
    for name in TIME_FIELDS.intersection(data):
        if isinstance(data[name], str):
            data[name] = iso_to_micros(data[name])
    return RawEvent(stored["eventId"], agent, stored["type"], stored["jobId"],
                    iso_to_micros(stored["at"]), stored["actor"], int(stored["v"]), data=data)


async def archived_events(archive: Archive | None, part: Partition, job_id: str
                          ) -> list[RawEvent]:
    """One job's archived events, oldest first ([] without an archive)."""
    if archive is None:
        return []
    return [event_of(part.agent, stored)
            for stored in await archive.job_events(part.agent, job_id)]


async def job_events(redis: Redis, archive: Archive | None, part: Partition, job_id: str
                     ) -> list[RawEvent] | None:
    """A job's events, oldest first, wherever they are; None when neither the log
    nor the archive knows the job. The log is read back along the job's chain
    (``reader.job_history``); when that does not reach the job's dispatch, the
    rest was trimmed, and comes from the archive."""
    live = await reader.job_history(redis, part, job_id)
    if live and live[0].type == "JobDispatched":
        return live
    archived = [event for event in await archived_events(archive, part, job_id)
                if readable(event)]
    if not live:
        return archived or live
    first = event_key(live[0].event_id)
    return [event for event in archived if event_key(event.event_id) < first] + live


async def archived_record(archive: Archive | None, part: Partition, job_id: str
                          ) -> dict[str, str]:
    """The state record of a job that has left Redis, folded from its archived
    events, in the raw form the scripts store; {} when the archive does not hold it."""
    events = await archived_events(archive, part, job_id)
    if not events:
        return {}
    return denormalize(fold.records_from(events)[job_id])


async def partition_events(
    redis: Redis, archive: Archive | None, part: Partition, *, after: str | None = None,
    batch: int = 1000, payloads: bool = True,
) -> AsyncIterator[RawEvent]:
    """Every event of a partition after event id ``after`` (exclusive), in log
    order, read a page (or a segment) at a time: the archive's up to its end,
    then the log's after that. Archived events hold their payloads; the log's
    get theirs back unless ``payloads`` is False (see ``reader.with_payloads``)."""
    end: str | None = None
    if archive is not None:
        last = await archive.last(part.agent)
        if last is not None and (after is None or event_key(after) < event_key(last.last)):
            async for stored in archive.read(part.agent, after=after):
                yield event_of(part.agent, stored)
        if last is not None:
            end = last.last
    start = max((i for i in (after, end) if i is not None), key=event_key, default="-")
    async for event in reader.iter_partition(redis, part, after=start, batch=batch,
                                             payloads=payloads):
        yield event



async def replay(
    redis: Redis, archive: Archive | None, parts: Sequence[Partition], *,
    since_us: int | None = None, until_us: int | None = None, batch: int = 1000,
) -> AsyncIterator[RawEvent]:
    """Every event of ``parts``, wherever it is: each partition in log order,
    partitions merged by event time; ``since_us`` (inclusive) / ``until_us``
    (exclusive) bound ``at``. Without an archive, the live logs alone (read a
    page at a time, every first page in one round trip: ``reader.replay``)."""
    if archive is None:
        async for event in reader.replay(redis, parts, batch, since_us, until_us):
            yield event
        return
    # Entry ids carry the server's time in ms, as ``at`` does in µs: they bound the reads.
    after = f"{since_us // 1000 - 1}-{2**64 - 1}" if since_us else None
    until_ms = until_us // 1000 + 1 if until_us else None
    page = max(10, min(batch, reader.REPLAY_HELD // max(1, len(parts))))

    async def bounded(part: Partition) -> AsyncIterator[RawEvent]:
        async for event in partition_events(redis, archive, part, after=after, batch=page):
            if until_ms is not None and event_key(event.event_id)[0] >= until_ms:
                return
            if (since_us is None or event.at >= since_us) and (
                    until_us is None or event.at < until_us):
                yield event

    async for event in reader.merged_by_time([bounded(part) for part in parts]):
        yield event


async def with_dependencies(redis: Redis, archive: Archive | None, keys: Keys, view: JobView
                            ) -> JobView:
    """``view`` with its ``dependencies`` filled in (unchanged when it has none); a
    dependency that has left Redis is read from the archive."""
    if not view.depends_on:
        return view
    found = await reader.dependency_views(redis, keys, view.depends_on)
    for dep, seen in found.items():
        agent = agent_of_job(dep)
        if seen.state == "unknown" and agent is not None:
            record = await archived_record(archive, keys.partition(agent), dep)
            if record:
                found[dep] = reader.dependency_view(record["state"], record.get("result"),
                                                    record.get("error"))
    return view.model_copy(update={"dependencies": found})
