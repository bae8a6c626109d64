"""Rebuilding every view from the log.

A partition's views are built from its log into keys of their own (the
partition's keys under a rebuild prefix: same hash tag, same slot), then
swapped in over the live ones in one step. Until then the live views go on
answering and being updated; after it, they hold everything up to where the
rebuild read, with the position to match, and the next catch-up (a query or
the projector) applies what came after: no event is left out either way.

The global job indexes are staged likewise (in the global area's slot): each
dispatch the partitions' rebuilds read is added to the staged copy, which is
then merged into the live indexes, dropping members that have no job
(``global_index.merge_staging``); a job dispatched meanwhile stays listed.

Once the archive has trimmed a log, jobs still in Redis may have events (their
dispatch, or all of them) only in the archive: they are found by their state
records, before the logs are read, and staged too (``_seed_trimmed``). From the
read of a partition's log to the swap, its archive lock is held, so that no
archive pass trims past the position read to (``_archiving_held``).

The log is read in pages (``Projection.catch_up``), so memory does not grow
with the log. Which view keys exist (a stale index to delete, what a rebuild
that died midway left) is found by one SCAN for every partition: a SCAN
visits the whole key space whatever its pattern.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import LockError

from agentq.eventlog.archive import EventKey, event_key
from agentq.eventlog.ids import job_id_time_ms
from agentq.eventlog.keys import Keys, Partition, index_of_key, is_paged, rebuilding
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.records import last_event_id
from agentq.eventlog.scripts import Scripts
from agentq.projections import global_index
from agentq.projections.projection import Projection, dispatched
from agentq.projections.scan import agent_of_key, glob_escape, view_keys
from agentq.projections.ticker import Ticker
from agentq.schemas.errors import InvalidInput, Unavailable
from agentq.schemas.job import STATES

_SEED_BATCH = 500
# Records whose job id is dated after the log's first entry are checked by their
# createdAt this many at a time (one round trip).
_CHECK_BATCH = 1000
# A partition's archive lock, held by its rebuild, lapses this long after it was
# last renewed (a renewal every ``ticker.EVERY_S`` while the log is read).
_HOLD_SECONDS = 60.0


@dataclass
class _Staged:
    """A partition's views rebuilt into its staging keys, not yet swapped in."""

    applied: int                  # events applied
    dispatchers: set[str]         # whose index the rebuild made
    first: EventKey | None        # the first event read from the log (None: none)


class _Hold(Protocol):
    """Keeps a partition's archive lock: at most every ``ticker.EVERY_S``, or
    ``now``. Raises Unavailable when it lapsed."""

    async def __call__(self, *, now: bool = False) -> None: ...


@contextlib.asynccontextmanager
async def _archiving_held(redis: Redis, part: Partition) -> AsyncIterator[_Hold]:
    """Hold ``part``'s archive lock (the one an archive pass takes): no pass trims
    its log from the read to the swap, which would take events past the rebuild's
    position from the views. Waits for a pass under way to end."""
    lock = redis.lock(part.archive_lock, timeout=_HOLD_SECONDS, blocking=True,
                      blocking_timeout=2 * _HOLD_SECONDS, thread_local=False)
    if not await lock.acquire():
        raise Unavailable(f"agent {part.agent}: another process has held its archive lock "
                          f"for {2 * _HOLD_SECONDS:.0f} s; run the rebuild again")
    ticker = Ticker()

    async def hold(*, now: bool = False) -> None:
        if now or ticker.due():
            try:
                await lock.reacquire()
            except LockError as exc:
                raise Unavailable(
                    f"agent {part.agent}: the rebuild lost its hold on the archive lock (a "
                    f"pause of over {_HOLD_SECONDS:.0f} s); nothing was swapped in: run the "
                    "rebuild again") from exc

    try:
        yield hold
    finally:
        with contextlib.suppress(LockError):
            await lock.release()


async def _stage(
    redis: Redis, part: Partition, progress: Callable[[str, int], None] | None,
    hold: _Hold,
) -> _Staged:
    """Rebuild one partition's views from its log into its staging keys (which
    may hold seeds of ``_seed_trimmed`` already), keeping its archive lock with
    ``hold``. Its dispatches are staged for the global indexes. ``progress`` is
    told the events read so far now and then (``ticker``)."""
    staged = _Staged(0, set(), None)
    keys, scripts = Keys(part.prefix), Scripts(redis)
    ticker, read = Ticker(), 0

    async def stage(events: Sequence[RawEvent]) -> None:
        nonlocal read
        await hold()
        if read == 0 and events:
            staged.first = event_key(events[0].event_id)
        read += len(events)
        if progress is not None and ticker.due():
            progress(part.agent, read)
        jobs = dispatched(events)
        staged.dispatchers.update(dispatcher for _, dispatcher in jobs)
        await global_index.add(scripts, keys, jobs, stage=global_index.STAGE)

    staged.applied = await Projection(redis).catch_up([part], views=rebuilding(part),
                                                      observe=stage)
    return staged


async def _swap(redis: Redis, part: Partition, existing: Collection[str],
                dispatchers: Collection[str]) -> None:
    """Swap a partition's staged views in. ``existing``: its index keys
    (``view_keys``); ``dispatchers``: those whose index was staged."""
    staging = rebuilding(part)
    # The state indexes and the position are always replaced (emptied when the
    # rebuild made none); any other live index the rebuild did not make goes
    # (the index of every job a version before kept, idx:all, among them).
    built = [*(staging.index_state(s) for s in STATES), staging.projection,
             *(staging.index_by(d) for d in sorted(dispatchers))]
    live_of = {key: part.base + key[len(staging.base):] for key in built}
    live = set(live_of.values())
    stale = sorted({index_of_key(key) for key in existing
                    if key.startswith(part.base + ":idx:")} - live)
    await Scripts(redis).swap(list(live_of.items()), stale)


async def _heads(redis: Redis, parts: Sequence[Partition]
                 ) -> dict[str, tuple[bool, EventKey | None]]:
    """Per agent, whether its partition has archived (so its log may have been
    trimmed) and its log's first entry (None: the log is empty)."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.hget(part.archive, "last")
            pipe.xrange(part.log, count=1)
        replies = await pipe.execute()
    return {part.agent: (bool(last), event_key(head[0][0]) if head else None)
            for part, last, head in zip(parts, replies[0::2], replies[1::2], strict=True)}


async def _seed_trimmed(redis: Redis, keys: Keys, firsts: dict[str, EventKey | None],
                        hold: _Hold | None = None) -> dict[str, set[str]]:
    """List in the staging views the jobs still in Redis whose dispatch has left
    the log (archived, then trimmed: a job delayed, waiting or running for longer
    than ``jobsSeconds``, or one that ended within it but was made before): the
    log alone does not list them. ``firsts``: per agent whose partition is looked
    at, its log's first entry (None: the log is empty). Each job is listed by its
    dispatcher, and by its state when none of its events is left in the log (no
    event since: its record's state is the log's); one with events left gets its
    state from them. One SCAN of the records for all; a record is read when its
    job id's time (the dispatching host's clock) is not after its log's first
    entry, or else its ``createdAt`` (the server's clock) is not
    (``_dispatched_before``). ``hold``: an archive lock kept meanwhile.
    Returns, per agent, the dispatchers listed."""
    seeded: dict[str, set[str]] = defaultdict(set)
    if not firsts:
        return seeded
    parts = {agent: keys.partition(agent) for agent in firsts}
    batches: dict[str, list[str]] = defaultdict(list)
    later: dict[str, list[str]] = defaultdict(list)

    async def add(agent: str, job_ids: list[str]) -> None:
        batches[agent] += job_ids
        if len(batches[agent]) >= _SEED_BATCH:
            seeded[agent] |= await _seed(redis, keys, parts[agent], firsts[agent],
                                         batches.pop(agent))

    async for key in redis.scan_iter(match=glob_escape(keys.prefix) + ":{*}:job:*", count=1000):
        if hold is not None:
            await hold()
        agent = agent_of_key(keys.prefix, key)
        if agent not in firsts or not key.startswith(parts[agent].job_prefix):
            continue
        job_id = key[len(parts[agent].job_prefix):]
        made_ms, first = job_id_time_ms(job_id), firsts[agent]
        if first is not None and made_ms is not None and made_ms > first[0]:
            # Made after the log's first entry by its dispatching host's clock,
            # which may run fast: the record's createdAt (the server's) decides.
            later[agent].append(job_id)
            if len(later[agent]) >= _CHECK_BATCH:
                await add(agent, await _dispatched_before(redis, parts[agent], first,
                                                          later.pop(agent)))
            continue
        await add(agent, [job_id])
    for agent, job_ids in later.items():
        await add(agent, await _dispatched_before(redis, parts[agent], firsts[agent], job_ids))
    for agent, batch in batches.items():
        seeded[agent] |= await _seed(redis, keys, parts[agent], firsts[agent], batch)
    return seeded


async def _dispatched_before(redis: Redis, part: Partition, first: EventKey | None,
                             job_ids: list[str]) -> list[str]:
    """Those of ``job_ids`` whose record says they were dispatched (``createdAt``, the
    server's clock) no later than the millisecond of ``first``, ``part``'s log's
    first entry (``created.lua``, one call). A job gone meanwhile is left out;
    one whose ``createdAt`` is no number is kept (``_seed`` reads it whole)."""
    if first is None:
        return job_ids
    return await Scripts(redis).created_by(part, first[0], job_ids)


async def _seed(redis: Redis, keys: Keys, part: Partition, first: EventKey | None,
                job_ids: list[str]) -> set[str]:
    """``_seed_trimmed`` for a batch of ``part``'s jobs; their dispatchers."""
    staging = rebuilding(part)
    by: list[tuple[str, str]] = []
    in_state: dict[str, list[str]] = defaultdict(list)
    scripts = Scripts(redis)
    for job_id, record in zip(job_ids, await scripts.records(part, job_ids), strict=True):
        if not record or "spec" not in record:
            continue  # gone meanwhile
        if (dispatcher := _dispatcher(record["spec"])) is not None:
            by.append((job_id, dispatcher))
        last = last_event_id(record.get("events", ""))
        with contextlib.suppress(InvalidInput):  # no event id: the log's events list it
            if first is None or event_key(last) < first:
                in_state[record.get("state", "")].append(job_id)
    of_dispatcher: dict[str, list[str]] = defaultdict(list)
    for job_id, dispatcher in by:
        of_dispatcher[dispatcher].append(job_id)
    seeds = [(staging.index_by(dispatcher), ids) for dispatcher, ids in of_dispatcher.items()]
    seeds += [(staging.index_state(state), ids) for state, ids in in_state.items()
              if state in STATES]
    await scripts.ask_many([Scripts.index_edit_call(index, ids, add=True) if is_paged(index)
                            else _zadd(index, ids) for index, ids in seeds])
    await global_index.add(scripts, keys, by, stage=global_index.STAGE)
    return set(of_dispatcher)


def _zadd(index: str, ids: list[str]) -> Callable[[Any], object]:
    return lambda pipe: pipe.zadd(index, dict.fromkeys(ids, 0))


def _dispatcher(spec: str) -> str | None:
    """Who dispatched the job of ``spec`` (its stored text); None when it does not
    say (a spec that is not a JSON object: the job stays listed by its state)."""
    try:
        by = orjson.loads(spec).get("dispatchedBy")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return by if isinstance(by, str) and by else None


async def rebuild(
    redis: Redis, parts: Sequence[Partition], progress: Callable[[str, int], None] | None = None
) -> int:
    """Rebuild the views of ``parts`` from their logs, and the global job indexes
    for their jobs; returns events applied. Queries go on answering from the
    live views while it runs. ``progress`` is told each partition's events
    applied when it is done, and how far it is now and then before."""
    if not parts:
        return 0
    keys = Keys(parts[0].prefix)
    existing = await view_keys(redis, keys)
    await global_index.clear_staging(redis, keys)
    for part in parts:
        staging = rebuilding(part)
        leftovers = [key for key in existing.get(part.agent, ())
                     if key.startswith(staging.base + ":")]
        await redis.delete(staging.projection, *leftovers)  # of a rebuild that died midway
    heads = await _heads(redis, parts)
    seeded = await _seed_trimmed(redis, keys, {
        agent: first for agent, (archived, first) in heads.items() if archived})
    total = 0
    for part in parts:
        async with _archiving_held(redis, part) as hold:
            staged = await _stage(redis, part, progress, hold)
            dispatchers = staged.dispatchers | seeded.get(part.agent, set())
            head = heads[part.agent][1]
            if head is not None and (staged.first is None or staged.first > head):
                # An archive pass trimmed the log after its head was looked at,
                # before it was held: the jobs whose dispatch left it meanwhile are
                # seeded now.
                again = await _seed_trimmed(redis, keys, {part.agent: staged.first}, hold)
                dispatchers |= again[part.agent]
            await hold(now=True)
            await _swap(redis, part, existing.get(part.agent, set()), dispatchers)
        total += staged.applied
        if progress:
            progress(part.agent, staged.applied)
    await global_index.merge_staging(redis, keys, [part.agent for part in parts])
    await redis.set(keys.jobs_built, "1")
    return total


async def build_global_index(redis: Redis, keys: Keys, parts: Sequence[Partition]) -> None:
    """Fill the global job indexes from the partitions' views (brought up to the
    end of their logs first) and mark them built: what a deployment made by a
    version without them needs once. Adding twice changes nothing."""
    existing = await view_keys(redis, keys)
    scripts = Scripts(redis)
    # A catch-up adds what it applies to the global indexes, as the projector does.
    await Projection(redis).catch_up(parts)
    for part in parts:
        by_prefix = part.index_by("")
        sources = sorted({(index, index[len(by_prefix):]) for index in
                          map(index_of_key, existing.get(part.agent, ()))
                          if index.startswith(by_prefix)})
        for key, dispatcher in sources:
            after: str | None = None
            while page := await scripts.index_range(key, after, 1000, forward=True):
                # Every job has one dispatcher: the union of these is every job.
                await global_index.add(scripts, keys, [(job_id, dispatcher) for job_id in page])
                after = page[-1]
    await redis.set(keys.jobs_built, "1")
