"""``list``: jobs newest first, exact filters, cursor paging.

``list`` across agents reads the global job indexes (``global_index``): every
job, or one dispatcher's jobs, newest first, and the records of the jobs it
looks at, so that it costs what it returns, not the number of agents. The
index is written beside each dispatch, so it is never behind a dispatch that
returned; the records are the live state, so the filters are exact. Where
the global index cannot answer by itself cheaply (a state filter that few of
its jobs match), it falls back, from where it stopped, to the partitions'
own indexes, brought up to the end of their logs first (SPEC: views are never
stale when read), as is a list of one agent's jobs.
"""

from __future__ import annotations

import heapq
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog.keys import Keys, Partition, is_paged
from agentq.eventlog.reader import read_records
from agentq.eventlog.records import to_view
from agentq.eventlog.registry import all_partitions
from agentq.eventlog.scripts import ScriptCall, Scripts
from agentq.projections.activity import TASK_PREVIEW, activity
from agentq.projections.projection import Projection
from agentq.schemas.job import STATES, JobView, agent_of_job

# What the client reads from here besides list_jobs (activity has a module of its own).
__all__ = ["TASK_PREVIEW", "ListFilter", "activity", "list_jobs"]

_PAGE = 100
# A state-filtered list across agents first looks at this many of the newest
# ids of the global index (at least 4 x its limit); when they do not fill the
# page, it goes on through the global index while it expects to look at no
# more than _GLOBAL_BUDGET ids and _SIFT_PER_PARTITION per partition holding a
# match, else through those partitions' state indexes.
_FIRST_LOOK = 100
_GLOBAL_BUDGET = 2_000
_SIFT_PER_PARTITION = 4
# Most ids whose state is read in one round trip when a state filter sifts them.
_SIFT_MOST = 500
# A read of the ids two indexes both hold looks at no more than this many ids
# a call (a few milliseconds of Redis), then goes on at the next read.
_BOTH_LOOKS = 2_000


@dataclass(frozen=True)
class ListFilter:
    agent: str | None = None
    dispatched_by: str | None = None
    states: frozenset[str] | None = None

    def admits(self, view: JobView) -> bool:
        return (
            (self.agent is None or view.target == self.agent)
            and (self.dispatched_by is None or view.dispatched_by == self.dispatched_by)
            and (self.states is None or view.state in self.states)
        )


@dataclass(frozen=True)
class Source:
    """An index to read; with ``states``, only its members in those states."""

    key: str
    states: tuple[str, ...] = ()


@dataclass(frozen=True)
class Page:
    """What a query caller asked for beyond the filter."""

    caller: str
    system: bool
    limit: int
    with_session_key: bool

    def visible(self, view: JobView) -> bool:
        return self.system or self.caller in (view.target, view.dispatched_by)


class _Index:
    """One index's members, newest (greatest job id) first, below an upper bound,
    read a page at a time; first pages of many indexes go in one round trip.
    A paged index (``keys.index_directory``) is read by a script; with ``also``,
    only the ids that index holds too (``index_both.lua``: a dispatcher's index
    filtered by a state's, walked as the list goes)."""

    def __init__(self, key: str, cursor: str | None, first_page: int, *,
                 also: str | None = None) -> None:
        self.key, self.also = key, also
        self.after = cursor
        self.page = first_page
        self.members: list[str] = []  # the page read, oldest last; consumed from the front
        self.at = 0
        self.done = False

    def head(self) -> str | None:
        return self.members[self.at] if self.at < len(self.members) else None

    def ask(self) -> ScriptCall | Callable[[Any], object]:
        """The read of the next page, for ``Scripts.ask_many``: a script call for a
        paged index or with ``also``, else a command on a pipeline."""
        if self.also is not None:
            return Scripts.index_both_call(self.key, self.also, self.after, self.page,
                                           _BOTH_LOOKS)
        if is_paged(self.key):
            return Scripts.index_range_call(self.key, self.after, self.page, forward=False)
        key, upper, page = self.key, f"({self.after}" if self.after else "+", self.page
        return lambda pipe: pipe.zrevrangebylex(key, upper, "-", start=0, num=page)

    def took_reply(self, reply: Any) -> None:
        """What ``ask`` read."""
        if self.also is None and not is_paged(self.key):
            self.took(reply)
        elif self.also is None:
            self.took(Scripts.index_range_ids(reply, self.page, forward=False))
        elif reply == -1:  # kept whole by a version before: read the index, sifted
            self.also, self.members, self.at = None, [], 0
        else:
            kept, last, ended = reply
            self.members, self.at = list(kept), 0
            self.done = bool(ended)
            self.after = last or self.after
            self.page = _PAGE

    def took(self, members: list[str]) -> None:
        self.members, self.at = members, 0
        self.done = len(members) < self.page
        if members:
            self.after = members[-1]
        self.page = _PAGE


async def _read_pages(redis: Redis, indexes: Sequence[_Index]) -> None:
    """The next page of each of ``indexes``, all at once."""
    replies = await Scripts(redis).ask_many([index.ask() for index in indexes])
    for index, reply in zip(indexes, replies, strict=True):
        index.took_reply(reply)


@dataclass
class _Merged:
    views: list[JobView]
    next_cursor: str | None
    # Set when the budget ran out first: every id above it was looked at.
    stopped_at: str | None = None


class _Union:
    """The union of several indexes, newest first, without repeats. An index
    whose page ran out is read again only when the next id is wanted, all such
    indexes in one round trip."""

    def __init__(self, redis: Redis, indexes: Sequence[_Index]) -> None:
        self.redis = redis
        self.indexes = indexes
        self.heap: list[tuple[str, int]] = []  # (inverted job id, index): greatest id first
        self.pending = list(range(len(indexes)))  # to read before the next id
        self.last: str | None = None

    def more(self) -> bool:
        return bool(self.heap or self.pending)

    async def next(self) -> str | None:
        while True:
            # A read may come back empty without the index's end (index_both.lua
            # stops after so many looks): it is read again before any id is taken.
            while self.pending:
                await _read_pages(self.redis, [self.indexes[i] for i in self.pending])
                again = []
                for i in self.pending:
                    if (member := self.indexes[i].head()) is not None:
                        heapq.heappush(self.heap, (_invert(member), i))
                    elif not self.indexes[i].done:
                        again.append(i)
                self.pending = again
            if not self.heap:
                return None
            inverted, i = heapq.heappop(self.heap)
            index = self.indexes[i]
            index.at += 1
            if (member := index.head()) is not None:
                heapq.heappush(self.heap, (_invert(member), i))
            elif not index.done:
                self.pending.append(i)
            job_id = _invert(inverted)
            if job_id != self.last:  # ids come in order: a repeat comes right after
                self.last = job_id
                return job_id


async def _merge(
    redis: Redis, keys: Keys, index_keys: Sequence[str | tuple[str, str]], flt: ListFilter,
    page: Page, cursor: str | None, budget: int | None = None,
) -> _Merged:
    """Up to ``limit`` jobs of the union of ``index_keys`` (an index, or two whose
    ids both hold) that pass the filter and are visible to the caller, newest
    first, after ``cursor``. With ``budget``, stops once that many ids were
    looked at without filling the page."""
    limit = page.limit
    union = _Union(redis, [
        _Index(key, cursor, limit + 1) if isinstance(key, str)
        else _Index(key[0], cursor, limit + 1, also=key[1]) for key in index_keys])
    views: list[JobView] = []
    looked = 0
    batch_size = limit + 1
    while True:
        batch: list[str] = []
        want = batch_size if flt.states else limit + 1 - len(views)
        while len(batch) < want and (job_id := await union.next()) is not None:
            batch.append(job_id)
        if not batch:
            break
        looked += len(batch)
        for view in await _views(redis, keys, batch, flt, page.with_session_key):
            if flt.admits(view) and page.visible(view):
                if len(views) == limit:
                    return _Merged(views, views[-1].job_id)
                views.append(view)
        if not union.more():
            break
        if budget is not None and looked >= budget:
            return _Merged(views, None, stopped_at=batch[-1])
        batch_size = min(2 * batch_size, _SIFT_MOST)
    return _Merged(views, None)


def _invert(job_id: str) -> str:
    """A string that sorts in the opposite order (for a max-heap on job ids)."""
    return "".join(chr(0x10FFFF - ord(c)) for c in job_id)


async def _views(
    redis: Redis, keys: Keys, job_ids: Sequence[str], flt: ListFilter, with_session_key: bool
) -> list[JobView]:
    """The views of the jobs of ``job_ids`` that exist (an index may name a job
    that was never made), newest first. With a state filter, only the records
    of jobs in those states are read in full."""
    jobs = [(keys.partition(agent), job_id) for job_id in job_ids
            if (agent := agent_of_job(job_id)) is not None]
    if flt.states and jobs:
        async with redis.pipeline(transaction=False) as pipe:
            for part, job_id in jobs:
                pipe.hget(part.job(job_id), "state")
            states: list[str | None] = await pipe.execute()
        jobs = [job for job, state in zip(jobs, states, strict=True) if state in flt.states]
    if not jobs:
        return []
    records = await read_records(redis, jobs)
    return [
        to_view(job_id, record, with_session_key=with_session_key)
        for (_, job_id), record in zip(jobs, records, strict=True)
        if record
    ]


# -- list across agents: the global indexes ------------------------------------------


class _Partitions:
    """Every partition, read from the registry the first time it is needed (a
    list across agents that the global indexes answer needs none of them)."""

    def __init__(self, redis: Redis, keys: Keys, known: Sequence[Partition] | None) -> None:
        self.redis = redis
        self.keys = keys
        self.known = list(known) if known is not None else None

    async def all(self) -> list[Partition]:
        if self.known is None:
            agents = await all_partitions(self.redis, self.keys)
            self.known = [self.keys.partition(agent) for agent in agents]
        return self.known


def _global_plan(keys: Keys, flt: ListFilter, page: Page) -> tuple[str, list[Source]] | None:
    """The global index to read and the caller's own partition's sources to read
    with it; None when the partitions' indexes answer better."""
    if page.system:
        return (keys.jobs_by(flt.dispatched_by) if flt.dispatched_by else keys.jobs_index(), [])
    if flt.dispatched_by not in (None, page.caller):
        return None  # another's jobs that target the caller: only its own partition
    own: list[Source] = []
    if flt.dispatched_by is None:
        # Jobs the caller dispatched (global) and jobs that target it (its partition).
        own = _sources(keys.partition(page.caller), flt, page.caller, system=True)
    return keys.jobs_by(page.caller), own


async def _list_global(
    redis: Redis, keys: Keys, parts: _Partitions, flt: ListFilter, page: Page,
    cursor: str | None, plan: tuple[str, list[Source]],
) -> tuple[list[JobView], str | None]:
    index, own = plan
    await _ensure_built(redis, keys, parts)
    if own:
        await Projection(redis).catch_up([keys.partition(page.caller)])
    index_keys = [index] + [s.key for s in own]
    if not flt.states:
        merged = await _merge(redis, keys, index_keys, flt, page, cursor)
        return merged.views, merged.next_cursor
    # A state filter: a first look at the newest jobs answers when many match.
    merged = await _merge(redis, keys, index_keys, flt, page, cursor,
                          budget=max(4 * (page.limit + 1), _FIRST_LOOK))
    if merged.stopped_at is None:
        return merged.views, merged.next_cursor
    # Few match: the per-state counts (kept by the transition scripts, so
    # current) say which partitions hold matches and about how many of the
    # index's jobs would have to be looked at; the cheaper way goes on from
    # where the first look stopped (for one job only when the page is full: is
    # there a next page?).
    need = page.limit - len(merged.views)
    rest = Page(page.caller, page.system, max(need, 1), page.with_session_key)
    wanted = [part for part in await parts.all()
              if _sources(part, flt, page.caller, page.system)]
    counts = await _counts(redis, wanted)
    matching = [sum(c.get(state, 0) for state in flt.states) for c in counts]
    holding = [part for part, n in zip(wanted, matching, strict=True) if n > 0]
    more: list[JobView] = []
    next_cursor = None
    if holding:
        total = sum(sum(c.values()) for c in counts)
        to_look_at = rest.limit * total / sum(matching)
        if to_look_at <= min(_GLOBAL_BUDGET, _SIFT_PER_PARTITION * len(holding)):
            went_on = await _merge(redis, keys, index_keys, flt, rest, merged.stopped_at)
            more, next_cursor = went_on.views, went_on.next_cursor
        else:
            more, next_cursor = await _list_partitions(redis, holding, flt, rest,
                                                       merged.stopped_at, pruned=True)
    if need == 0:
        return merged.views, merged.views[-1].job_id if more else None
    return merged.views + more, next_cursor


# Per client, the key prefixes whose global job indexes are known to be built.
_built: weakref.WeakKeyDictionary[Redis, set[str]] = weakref.WeakKeyDictionary()


async def _ensure_built(redis: Redis, keys: Keys, parts: _Partitions) -> None:
    """Build the global job indexes from the partitions first, the one time they
    were never built (a deployment made by a version without them); asked of
    Redis once per client."""
    known = _built.setdefault(redis, set())
    if keys.prefix in known:
        return
    if not await redis.exists(keys.jobs_built):
        # Once per deployment made before the global indexes: loaded only then, so
        # that `agentq mcp` and the CLI's reads do not import the rebuild.
        from agentq.projections.rebuild import build_global_index

        await build_global_index(redis, keys, await parts.all())
    known.add(keys.prefix)


async def _counts(redis: Redis, parts: Sequence[Partition]) -> list[dict[str, int]]:
    """Each partition's jobs per state, as the transition scripts keep them (one
    round trip; one command per partition)."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in parts:
            pipe.hgetall(part.counts)
        replies: list[dict[str, str]] = await pipe.execute()
    return [{state: int(n) for state, n in counts.items()} for counts in replies]


# -- the partitions' own indexes ------------------------------------------------------


def _sources(part: Partition, flt: ListFilter, caller: str, system: bool) -> list[Source]:
    """The indexes of one partition whose union holds every job the query may show."""
    states = tuple(sorted(flt.states)) if flt.states else ()
    if not system and part.agent != caller:
        # Outside its own partition a caller sees only what it dispatched.
        if flt.dispatched_by not in (None, caller):
            return []
        return [Source(part.index_by(caller), states)]
    if flt.dispatched_by:
        return [Source(part.index_by(flt.dispatched_by), states)]
    # Every job is in exactly one state index: their union is every job.
    return [Source(part.index_state(s)) for s in states or STATES]


async def _list_partitions(
    redis: Redis, parts: Sequence[Partition], flt: ListFilter, page: Page, cursor: str | None,
    *, pruned: bool = False,
) -> tuple[list[JobView], str | None]:
    """The list read from the partitions' indexes, each brought up to the end of
    its log first; only partitions that can hold a match are read (``pruned``:
    ``parts`` are those already)."""
    if not parts:
        return [], None
    keys = Keys(parts[0].prefix)
    wanted = [part for part in parts if _sources(part, flt, page.caller, page.system)]
    if flt.states and len(wanted) > 1 and not pruned:
        # Only partitions with a job in one of the states now (by the counts).
        counts = await _counts(redis, wanted)
        wanted = [part for part, c in zip(wanted, counts, strict=True)
                  if any(c.get(state, 0) > 0 for state in flt.states)]
    await Projection(redis).catch_up(wanted)
    # A dispatcher's index filtered by state is read with each state's index,
    # the ids both hold (index_both.lua): a filter matching few jobs does not
    # read every job of the dispatcher.
    reads: list[str | tuple[str, str]] = []
    for part in wanted:
        for source in _sources(part, flt, page.caller, page.system):
            if source.states:
                reads += [(source.key, part.index_state(state)) for state in source.states]
            else:
                reads.append(source.key)
    merged = await _merge(redis, keys, reads, flt, page, cursor)
    return merged.views, merged.next_cursor


async def list_jobs(
    redis: Redis,
    parts: Sequence[Partition] | None,
    flt: ListFilter,
    *,
    caller: str,
    system: bool,
    limit: int,
    cursor: str | None,
    with_session_key: bool,
    keys: Keys | None = None,
) -> tuple[list[JobView], str | None]:
    """Up to ``limit`` jobs passing the filter and visible to the caller, newest
    first, after ``cursor`` (a job id); and the cursor of the next page or None.
    ``parts``: the partitions to list (one, with an ``agent`` filter); None, with
    ``keys``, for every partition (read from the registry only when needed)."""
    page = Page(caller, system, limit, with_session_key)
    if keys is None:
        if not parts:
            return [], None
        keys = Keys(parts[0].prefix)
    everywhere = _Partitions(redis, keys, parts)
    if flt.agent is None:
        plan = _global_plan(keys, flt, page)
        if plan is not None:
            return await _list_global(redis, keys, everywhere, flt, page, cursor, plan)
    return await _list_partitions(redis, await everywhere.all(), flt, page, cursor)
