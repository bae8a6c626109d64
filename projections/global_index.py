"""The global job indexes: every job, and each dispatcher's jobs, across partitions.

``list`` without an ``agent`` filter reads these paged indexes of the global
area (``Keys.jobs_index``, ``Keys.jobs_by``; job ids in id order, at most 128
to a page and fewer when longer: ``keys.index_directory``) instead of every
partition's indexes, so that its cost follows the jobs it returns, not the
number of agents. They are indexes, never the truth (the partitions are):

- **Written before the dispatch**: the client sends the index call ahead of
  the dispatch scripts on the same connection, in the same round trip (on a
  cluster, where the global slot lives on another node, it waits for the
  index's reply first, one more round trip). A job that exists is therefore
  listed, and nothing needs to add it again later: a crash between the two
  leaves at most an index member without a job.
- **A member without a job is harmless**: readers read each job's record and
  skip ids that have none. A refused dispatch or an idempotent repeat takes its
  ids out again at once; a crash can leave one behind, which a rebuild removes.
- **What only a failover can lose** (the index's node failing over to a replica
  that missed the write, while the job's node kept the job; the index call is
  not confirmed with ``WAIT``) is found by `audit verify` and restored by a
  rebuild.
- **Rebuilt from the partitions** by ``projections rebuild`` (staged in the
  global slot, then merged in, dropping members that have no job).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis

from agentq.eventlog.ids import job_id_time_ms
from agentq.eventlog.keys import Keys, index_of_key
from agentq.eventlog.scripts import NewJob, Refusal, ScriptCall, Scripts
from agentq.projections.scan import glob_escape, scan_keys
from agentq.schemas.job import agent_of_job

# A member older than this (by its id's time) with no job is a stray that a
# rebuild removes; a younger one may be a dispatch still on its way.
STRAY_AGE_MS = 60_000
_PAGE = 1000


async def add(scripts: Scripts, keys: Keys, jobs: Iterable[tuple[str, str]],
              stage: str = "") -> None:
    """Add ``(job id, dispatcher)`` pairs to the global indexes (a rebuild's copy
    with ``stage``). One script call; idempotent."""
    jobs = list(jobs)
    if jobs:
        await scripts.call_many([Scripts.index_call(keys, jobs, stage)])


async def remove(scripts: Scripts, keys: Keys, jobs: Sequence[tuple[str, str]]) -> None:
    """Take ``(job id, dispatcher)`` pairs out of the global indexes (one script
    call: one argument per dispatcher, not one per job)."""
    if jobs:
        await scripts.call_many([Scripts.unindex_call(keys, jobs)])


async def dispatch_indexed(
    scripts: Scripts, keys: Keys, calls: Sequence[ScriptCall], jobs: Sequence[NewJob]
) -> list[Any]:
    """Run dispatch ``calls`` (as ``Scripts.call_many``; one per partition, each
    with its jobs in ``jobs``' order) after the jobs' addition to the global
    indexes (see the module's docstring); the dispatch scripts' replies. A job
    that exists is listed. Jobs a partition refused, and the new ids of idempotent
    repeats, are taken out again."""
    index = Scripts.index_call(keys, [(job.job_id, job.caller) for job in jobs])
    if scripts.on_cluster:
        # The global slot is on another node: the index is written (acknowledged)
        # before the dispatches are sent.
        await scripts.call_many([index])
        replies = await scripts.call_many(calls)
    else:
        # One connection runs the calls in the order sent: the index first.
        replies = (await scripts.call_many([index, *calls]))[1:]
    if any(reply[0] != "ok" or "existing" in reply for reply in replies):
        strays = _strays(replies, jobs)
        if strays:
            with contextlib.suppress(Exception):  # one left behind is skipped by readers
                await remove(scripts, keys, strays)
    return replies


def _strays(replies: Sequence[Any], jobs: Sequence[NewJob]) -> list[tuple[str, str]]:
    """The jobs of ``jobs`` that the dispatch replies say were not made."""
    by_target: dict[str | None, list[NewJob]] = defaultdict(list)
    for job in jobs:
        by_target[agent_of_job(job.job_id)].append(job)
    batches = list(by_target.values())
    if len(batches) != len(replies):
        return []  # not one batch per call: leave any stray to a rebuild
    strays: list[tuple[str, str]] = []
    for batch, reply in zip(batches, replies, strict=True):
        outcome = Scripts.dispatch_outcome(reply)
        if isinstance(outcome, Refusal):
            strays += [(job.job_id, job.caller) for job in batch]
            continue
        for job, (_, state, _) in zip(batch, outcome.jobs, strict=False):
            if state == "existing":
                strays.append((job.job_id, job.caller))
    return strays


# -- rebuilding ------------------------------------------------------------------


STAGE = "rebuild"


async def clear_staging(redis: Redis, keys: Keys) -> None:
    """Delete a rebuild's staged global indexes (one that died midway left them)."""
    staged = await scan_keys(redis, glob_escape(keys.jobs_index(STAGE)) + "*")
    for at in range(0, len(staged), _PAGE):
        async with redis.pipeline(transaction=False) as pipe:
            for key in staged[at : at + _PAGE]:
                pipe.delete(key)
            await pipe.execute()


async def _indexes(redis: Redis, keys: Keys, stage: str = "") -> set[str]:
    """The global indexes that have keys (pages, or one kept whole before)."""
    found = {index_of_key(key) for key in
             await scan_keys(redis, glob_escape(keys.jobs_by("", stage)) + "*")}
    return found | {keys.jobs_index(stage)}


async def merge_staging(redis: Redis, keys: Keys, agents: Iterable[str]) -> int:
    """Merge the staged indexes (every job of the rebuilt ``agents``' partitions)
    into the live ones, and take out members of those partitions that have no
    job and are older than ``STRAY_AGE_MS`` (by their id's time against the
    server's clock): the live indexes keep what was dispatched meanwhile.
    Returns the strays removed."""
    scripts = Scripts(redis)
    rebuilt = set(agents)
    seconds, micros = await redis.time()
    old_before_ms = int(seconds) * 1000 + int(micros) // 1000 - STRAY_AGE_MS
    live_indexes = await _indexes(redis, keys)
    staged_prefix = keys.jobs_by("", STAGE)
    live_indexes |= {keys.jobs_by(index[len(staged_prefix):])
                     for index in await _indexes(redis, keys, STAGE)
                     if index.startswith(staged_prefix)}
    removed = 0
    for live in sorted(live_indexes):
        staged = keys.jobs_index(STAGE) + live[len(keys.jobs_index()):]
        removed += await _drop_strays(redis, scripts, keys, live, staged, rebuilt,
                                      old_before_ms)
        after: str | None = None
        while ids := await scripts.index_range(staged, after, _PAGE, forward=True):
            await scripts.index_edit(live, ids, add=True)
            after = ids[-1]
    await clear_staging(redis, keys)
    return removed


async def _drop_strays(
    redis: Redis, scripts: Scripts, keys: Keys, live: str, staged: str, rebuilt: set[str],
    old_before_ms: int,
) -> int:
    """Remove from ``live`` the members of ``rebuilt`` partitions that are not in
    ``staged``, have no record, and are old enough not to be in flight."""
    strays: list[str] = []
    after: str | None = None
    while ids := await scripts.index_range(live, after, _PAGE, forward=True):
        after = ids[-1]
        suspects: list[tuple[str, str]] = []
        for job_id, held in zip(ids, await scripts.index_has(staged, ids), strict=True):
            if held:
                continue
            agent, made_ms = agent_of_job(job_id), job_id_time_ms(job_id)
            if agent is None or made_ms is None:
                strays.append(job_id)  # no job id at all
            elif agent in rebuilt and made_ms < old_before_ms:
                suspects.append((job_id, agent))
        if suspects:
            async with redis.pipeline(transaction=False) as pipe:
                for job_id, agent in suspects:
                    pipe.exists(keys.partition(agent).job(job_id))
                found: list[int] = await pipe.execute()
            strays += [job_id for (job_id, _), exists in zip(suspects, found, strict=True)
                       if not exists]
    removed = 0
    for start in range(0, len(strays), _PAGE):
        removed += await scripts.index_edit(live, strays[start : start + _PAGE], add=False)
    return removed
