"""Retention: the config, the archiving pass (archive, remove ended jobs, trim the
log), consumer groups across trimming, and a pass killed at random points.

Every test runs the real scripts on the real server, with an archive in a
temporary folder (the archive library's own tests cover S3)."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from _indexes import index_members
from _procs import LineProcess

import agentq
from agentq.cli import _run_command
from agentq.config import load_config, with_embedded_archive
from agentq.consumers.alerts import Alerter
from agentq.consumers.archiver import GROUPS, Archiver, EntryId, PassOutcome
from agentq.consumers.background import Background
from agentq.consumers.gates import Gates
from agentq.consumers.projector import Projector
from agentq.eventlog import fold
from agentq.eventlog.archive import Archive, ArchivedLine, Segment, open_archive
from agentq.eventlog.ids import new_job_id
from agentq.eventlog.reader import read_partition
from agentq.eventlog.scripts import Backoff, ensure_group, ensure_work_groups
from agentq.projections import audit, global_index
from agentq.projections import rebuild as rebuild_module
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config, RetentionConfig
from agentq.schemas.errors import InvalidInput
from agentq.schemas.job import STATES

ROOT = Path(__file__).resolve().parent.parent
ARCHIVER_PROC = Path(__file__).resolve().parent / "archiver_proc.py"
KEEP = RetentionConfig(jobs_seconds=0)  # archive, remove nothing
ONE_SECOND = RetentionConfig(jobs_seconds=1)


# -- helpers ---------------------------------------------------------------------


@pytest.fixture
def archive(q: agentq.Client, tmp_path: Path) -> Archive:
    return open_archive((tmp_path / "archive").as_uri(), q.keys.prefix)


def archiver(q: agentq.Client, archive: Archive, retention: RetentionConfig = KEEP,
             **kwargs: Any) -> Archiver:
    return Archiver(q.redis, q.redis, q.keys, archive, retention, **kwargs)



async def ended_jobs(q: agentq.Client, ended: str) -> list[str]:
    """The job ids of ``Partition.ended``, a list of '<end ms> <job id>', in order."""
    entries: list[str] = await q.redis.lrange(ended, 0, -1)  # type: ignore[misc]
    return [entry.split(" ")[1] for entry in entries]


async def start(q: agentq.Client, agent: str, n: int, **fields: Any) -> list[str]:
    """Dispatch ``n`` jobs to ``agent`` and start them (attempt 1)."""
    part = q.partition(agent)
    ids = [(await q.dispatch(agent, f"task {i}", max_attempts=1, **fields)).job_id
           for i in range(n)]
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, "w", 60_000, n)
    assert sorted(job.job_id for job in started) == sorted(ids)
    return ids


async def completed(q: agentq.Client, agent: str, n: int) -> list[str]:
    ids = await start(q, agent, n)
    part = q.partition(agent)
    replies = await q.scripts.complete(part, "w", [(i, 1, b'"done"') for i in ids])
    assert replies == [None] * n
    return ids


async def failed(q: agentq.Client, agent: str, n: int) -> list[str]:
    ids = await start(q, agent, n)
    for job_id in ids:
        assert await q.scripts.fail(q.partition(agent), "w", job_id, 1, "boom",
                                    Backoff(0, 0)) == "failed"
    return ids


async def groups_read(q: agentq.Client, agent: str, groups: Sequence[str] = GROUPS,
                      upto: int | None = None) -> None:
    """The consumer groups deliver (and have acknowledged) the log's entries, all
    of them or the first ``upto``."""
    log = q.partition(agent).log
    for group in groups:
        await ensure_group(q.redis, log, group)
        read: Any = await q.redis.xreadgroup(group, "t", {log: ">"}, count=upto or 100_000)
        if read:
            await q.redis.xack(log, group, *[entry_id for entry_id, _ in read[0][1]])


async def log_lines(q: agentq.Client, agent: str) -> list[tuple[str, bytes]]:
    """The partition's events as ``agentq replay`` prints them, by event id."""
    return [(event.event_id, orjson.dumps(event.stored().wire()))
            async for event in q.replay([agent])]


async def archived(archive: Archive, agent: str) -> list[dict[str, Any]]:
    return [event async for event in archive.read(agent)]


async def log_ids(q: agentq.Client, agent: str) -> list[str]:
    entries: Any = await q.redis.xrange(q.partition(agent).log)
    return [entry_id for entry_id, _ in entries]


def ids_increase(ids: Sequence[str]) -> bool:
    keys = [EntryId.parse(i) for i in ids]
    return all(a < b for a, b in itertools.pairwise(keys))


async def exists(q: agentq.Client, *keys: str) -> list[bool]:
    return [bool(await q.redis.exists(key)) for key in keys]


async def members(q: agentq.Client, key: str) -> set[str]:
    return await index_members(q, key)


async def wait_past(q: agentq.Client, seconds: float) -> None:
    """Until the server's clock has moved ``seconds`` past now."""
    start_s, start_us = await q.redis.time()
    until = int(start_s) + int(start_us) / 1e6 + seconds
    while True:
        now_s, now_us = await q.redis.time()
        if int(now_s) + int(now_us) / 1e6 > until:
            return
        await asyncio.sleep(0.05)


# -- the config -------------------------------------------------------------------


def test_retention_config_defaults_and_checks() -> None:
    retention = Config().retention
    assert (retention.jobs_seconds, retention.idempotency_seconds, retention.archive) == (
        604_800, 86_400, None)
    for good in ("file:///var/agentq", "./archive", "/abs/archive", "s3://bucket/prefix",
                 "s3://bucket"):
        assert RetentionConfig(archive=good).archive == good
    for bad, words in (("http://x/y", "http:// is no archive"), ("s3://", "bucket"),
                       ("file://", "a path"), ("", "empty")):
        with pytest.raises(InvalidInput) as refused:
            load_config(None, environ={"AGENTQ_RETENTION__ARCHIVE": bad,
                                       "AGENTQ_REDIS_URL": "redis://x"})
        assert "retention.archive" in refused.value.message and words in refused.value.message
    with pytest.raises(InvalidInput, match=r"retention\.jobsSeconds"):
        load_config(None, environ={"AGENTQ_RETENTION__JOBS_SECONDS": "-1"})


def test_the_idempotency_window_has_one_value() -> None:
    """``jobs.idempotencyTtlSeconds`` is the older name: either sets both places
    (what dispatch reads and what the gates read); both, only when alike."""
    for data in ({"retention": {"idempotencySeconds": 60}},
                 {"jobs": {"idempotencyTtlSeconds": 60}},
                 {"jobs": {"idempotencyTtlSeconds": 60}, "retention": {"idempotencySeconds": 60}}):
        config = Config.model_validate(data)
        assert (config.jobs.idempotency_ttl_seconds, config.retention.idempotency_seconds) == (
            60, 60)
    with pytest.raises(InvalidInput) as refused:
        load_config(None, environ={"AGENTQ_JOBS__IDEMPOTENCY_TTL_SECONDS": "60",
                                   "AGENTQ_RETENTION__IDEMPOTENCY_SECONDS": "90"})
    assert "set only retention.idempotencySeconds" in refused.value.message


def test_the_embedded_server_archives_under_agentq_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"AGENTQ_HOME": str(home)}
    embedded = with_embedded_archive(load_config(None, environ=env), env)
    assert embedded.retention.archive == str(home / "archive")
    own = load_config(None, environ={**env, "AGENTQ_REDIS_URL": "redis://127.0.0.1:6379"})
    assert with_embedded_archive(own, env).retention.archive is None  # nothing leaves it
    chosen = load_config(None, environ={**env, "AGENTQ_RETENTION__ARCHIVE": "s3://b/p"})
    assert with_embedded_archive(chosen, env).retention.archive == "s3://b/p"
    assert load_config(None, environ=env).retention.archive is None  # loading stays pure


def cli(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
        ) -> tuple[int, str, str]:
    """``agentq ARGS`` in this process, with exactly ``env``'s AGENTQ_ variables."""
    for name in list(os.environ):
        if name.startswith("AGENTQ_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    code = _run_command(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_config_validate_notes_what_leaves_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "agentq.toml"
    conf.write_text('[redis]\nurl = "redis://127.0.0.1:6379"\n')
    code, out, err = cli(["config", "validate", str(conf)], {}, monkeypatch)
    assert (code, out.strip()) == (0, f"{conf}: valid")
    assert "retention.archive is not set: nothing ever leaves Redis" in err
    conf.write_text('[retention]\narchive = "s3://b/p"\njobsSeconds = 0\n'
                    '[redis]\nurl = "redis://127.0.0.1:6379"\n')
    code, _, err = cli(["config", "validate", str(conf)], {}, monkeypatch)
    assert code == 0 and "nothing is removed from Redis" in err
    conf.write_text("keyPrefix = 'x'\n")
    code, _, err = cli(["config", "validate", str(conf)], {"AGENTQ_HOME": str(tmp_path)},
                       monkeypatch)
    assert code == 0 and f"archived under {tmp_path / 'archive'}" in err


# -- the safe point -----------------------------------------------------------------


async def test_the_safe_point_waits_for_every_group(q: agentq.Client, archive: Archive) -> None:
    arch = archiver(q, archive)
    part = q.partition("a")
    assert await arch.safe_point(part) == (None, "")  # no log yet
    await completed(q, "a", 3)  # 9 events
    ids = await log_ids(q, "a")
    await groups_read(q, "a", groups=("gates", "projector"))
    point, why = await arch.safe_point(part)
    assert point is None and "consumer group alerts" in why
    await groups_read(q, "a", groups=("alerts",), upto=4)
    assert await arch.safe_point(part) == (EntryId.parse(ids[3]), "")
    # An entry delivered and not acknowledged holds the point before it.
    await q.redis.xgroup_setid(part.log, "gates", ids[1])
    await q.redis.xreadgroup("gates", "x", {part.log: ">"}, count=1)  # ids[2], pending
    point, _ = await arch.safe_point(part)
    assert point is not None and EntryId.parse(ids[1]) <= point < EntryId.parse(ids[2])
    # Another group on the log counts too.
    await ensure_group(q.redis, part.log, "someone")
    assert await arch.safe_point(part) == (None, "")


# -- archiving ----------------------------------------------------------------------


async def test_a_pass_archives_what_every_group_handled(
    q: agentq.Client, archive: Archive
) -> None:
    await completed(q, "a", 4)
    await failed(q, "a", 2)
    expected = await log_lines(q, "a")
    await groups_read(q, "a", upto=5)
    arch = archiver(q, archive, segment_events=3)
    outcome = await arch.archive_partition(q.partition("a"))
    assert (outcome.events, outcome.segments, outcome.removed, outcome.trimmed) == (5, 2, 0, 0)
    assert [e["eventId"] for e in await archived(archive, "a")] == [i for i, _ in expected[:5]]

    await groups_read(q, "a")
    outcome = await arch.archive_partition(q.partition("a"))
    assert outcome.events == len(expected) - 5 and outcome.archived_to == expected[-1][0]
    events = await archived(archive, "a")
    assert events == [orjson.loads(line) for _, line in expected]  # as replay prints them
    assert ids_increase([e["eventId"] for e in events])
    # Redis knows where the archive ends, and which jobs ended; nothing left Redis.
    segments = await archive.segments("a")
    assert await q.redis.hgetall(q.partition("a").archive) == {
        "last": segments[-1].last, "head": segments[-1].sha256, "seq": str(segments[-1].seq)}
    assert len(await ended_jobs(q, q.partition("a").ended)) == 6
    assert await log_ids(q, "a") == [i for i, _ in expected]
    again = await arch.archive_partition(q.partition("a"))
    assert (again.events, again.segments) == (0, 0)  # nothing twice


async def test_ended_jobs_leave_redis_once_the_retention_passed(
    q: agentq.Client, archive: Archive
) -> None:
    part = q.partition("a")
    done = await completed(q, "a", 3)
    lost = await failed(q, "a", 1)
    waiting = (await q.dispatch("a", "waits", depends_on=[done[0]])).job_id
    await q.cancel(waiting)
    await q.redis.sadd(part.dependents(lost[0]), "j_someone.b")  # kept for a retry
    await q.redis.sadd(part.deps(lost[0]), "j_other.b")
    running = await start(q, "a", 1)
    await Projection(q.redis).catch_up([part])
    expected = await log_lines(q, "a")
    gone = [*done, *lost, waiting]
    assert all(await exists(q, *(part.job(j) for j in gone)))
    await groups_read(q, "a")
    await wait_past(q, 1.0)
    late = await completed(q, "a", 1)  # ended within the retention: stays
    await groups_read(q, "a")
    await Projection(q.redis).catch_up([part])

    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.removed == len(gone)
    for job_id in gone:
        assert await exists(q, part.job(job_id), part.spec(job_id), part.deps(job_id),
                            part.dependents(job_id)) == [False] * 4
    for job_id in [*running, *late]:
        assert await exists(q, part.job(job_id), part.spec(job_id)) == [True, True]
    live = set(running + late)
    assert {j for s in STATES for j in await members(q, part.index_state(s))} == live
    assert await members(q, part.index_state("completed")) == set(late)
    assert await members(q, part.index_state("failed")) == set()
    assert await members(q, part.index_state("cancelled")) == set()
    assert await members(q, part.index_by(q.config.operator)) == live
    assert await members(q, q.keys.jobs_index()) & set(gone) == set()
    assert await members(q, q.keys.jobs_by(q.config.operator)) & set(gone) == set()
    counts = await q.redis.hgetall(part.counts)
    assert {s: int(n) for s, n in counts.items() if int(n)} == {"active": 1, "completed": 1}
    assert await ended_jobs(q, part.ended) == late
    assert await q.redis.exists(part.expired) == 0
    # The log keeps the entries after the cutoff; the archive holds every event once.
    events = await archived(archive, "a")
    assert [e["eventId"] for e in events] == [i for i, _ in expected] + [
        e for e in await log_ids(q, "a") if EntryId.parse(e) > EntryId.parse(expected[-1][0])]
    remaining = await log_ids(q, "a")
    assert outcome.trimmed == len(events) - len(remaining)
    removed_events = {i for i, line in expected if orjson.loads(line)["jobId"] in gone}
    assert removed_events.isdisjoint(remaining)
    assert await q.status(running[0]) is not None


async def test_nothing_leaves_redis_with_jobs_seconds_zero(
    q: agentq.Client, archive: Archive
) -> None:
    ids = await completed(q, "a", 2)
    await groups_read(q, "a")
    await wait_past(q, 0.01)
    outcome = await archiver(q, archive, KEEP).archive_partition(q.partition("a"))
    assert (outcome.events, outcome.removed, outcome.trimmed) == (6, 0, 0)
    assert all(await exists(q, *(q.partition("a").job(i) for i in ids)))


async def test_a_job_retried_after_it_was_archived_is_kept_whole(
    q: agentq.Client, archive: Archive
) -> None:
    part = q.partition("a")
    (job_id,) = await failed(q, "a", 1)
    arch = archiver(q, archive, ONE_SECOND)
    await groups_read(q, "a")
    await arch.archive_partition(part)
    assert await ended_jobs(q, part.ended) == [job_id]
    await q.retry(job_id)
    await wait_past(q, 1.0)
    await groups_read(q, "a")
    outcome = await arch.archive_partition(part)
    assert outcome.removed == 0 and len(await ended_jobs(q, part.ended)) == 0
    assert (await q.status(job_id)).state == "queued"
    (restarted,), _ = await q.scripts.start(part, "w", 60_000, 1)
    assert restarted.job_id == job_id
    assert await q.scripts.complete(part, "w", [(job_id, 2, b'"ok"')]) == [None]
    await groups_read(q, "a")
    await arch.archive_partition(part)
    assert await ended_jobs(q, part.ended) == [job_id]
    types = [e["type"] for e in await archived(archive, "a")]
    assert types == ["JobDispatched", "JobStarted", "JobFailed", "JobRetried", "JobStarted",
                     "JobCompleted"]



async def test_a_job_ended_twice_before_removal_is_removed_and_counted_once(
    q: agentq.Client, archive: Archive
) -> None:
    """Failed, archived, retried, completed and archived again, all before the
    cutoff: ``ended`` lists it twice, and it leaves Redis once (the counts do not
    go below zero)."""
    part = q.partition("a")
    (job_id,) = await failed(q, "a", 1)
    arch = archiver(q, archive, ONE_SECOND)
    await groups_read(q, "a")
    await arch.archive_partition(part)
    await q.retry(job_id)
    await q.scripts.start(part, "w", 60_000, 1)
    assert await q.scripts.complete(part, "w", [(job_id, 2, b'"ok"')]) == [None]
    await groups_read(q, "a")
    await archiver(q, archive, KEEP).archive_partition(part)
    assert await ended_jobs(q, part.ended) == [job_id, job_id]
    await wait_past(q, 1.0)
    outcome = await arch.archive_partition(part)
    assert outcome.removed == 1 and not await q.redis.exists(part.job(job_id), part.ended)
    counts = await q.redis.hgetall(part.counts)
    assert {state: int(n) for state, n in counts.items() if int(n)} == {}


async def test_bookkeeping_written_by_a_version_before_is_read(
    q: agentq.Client, archive: Archive
) -> None:
    """``ended`` as the sorted set a version before kept (job id -> end ms) becomes
    the list on the next pass, and an ``expired`` field of one job (job id ->
    dispatcher) still takes that job out of the global indexes."""
    part = q.partition("a")
    ids = await completed(q, "a", 3)
    await groups_read(q, "a")
    await archiver(q, archive, KEEP).archive_partition(part)
    entries: list[str] = await q.redis.lrange(part.ended, 0, -1)  # type: ignore[misc]
    await q.redis.delete(part.ended)
    await q.redis.zadd(part.ended, {e.split(" ")[1]: int(e.split(" ")[0]) for e in entries})
    gone = new_job_id("a")
    await global_index.add(q.scripts, q.keys, [(gone, "someone")])
    await q.redis.hset(part.expired, gone, "someone")
    await wait_past(q, 1.0)
    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.removed == 3
    assert await exists(q, *(part.job(i) for i in ids)) == [False] * 3
    assert not await q.redis.exists(part.ended, part.expired)
    assert await members(q, q.keys.jobs_by("someone")) == set()
    assert await members(q, q.keys.jobs_index()) & {gone, *ids} == set()


class DiesAfterAppending:
    """The archive, for a process that dies right after a segment is durable
    (before Redis records it)."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def __getattr__(self, name: str) -> Any:
        return getattr(self.archive, name)

    async def append(self, agent: str, lines: Sequence[ArchivedLine]) -> Segment:
        await self.archive.append(agent, lines)
        raise SystemExit("killed")


async def test_a_pass_after_a_crash_between_archive_and_redis_catches_up(
    q: agentq.Client, archive: Archive
) -> None:
    part = q.partition("a")
    ids = await completed(q, "a", 2)
    await groups_read(q, "a")
    dying = archiver(q, DiesAfterAppending(archive), ONE_SECOND)  # type: ignore[arg-type]
    with pytest.raises(SystemExit):
        await dying.archive_partition(part)
    assert await q.redis.exists(part.archive, part.ended) == 0
    await wait_past(q, 1.0)
    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.events == 0 and outcome.removed == 2
    assert len(await archived(archive, "a")) == 6  # once each
    assert await exists(q, *(part.job(i) for i in ids)) == [False, False]
    assert (await q.redis.hgetall(part.archive))["last"] == (await archive.last("a")).last  # type: ignore[union-attr]


async def test_an_archive_that_disagrees_with_redis_stops_its_partition(
    q: agentq.Client, archive: Archive
) -> None:
    part = q.partition("a")
    await completed(q, "a", 2)
    await groups_read(q, "a")
    arch = archiver(q, archive, ONE_SECOND)
    await arch.archive_partition(part)
    head = await q.redis.hget(part.archive, "head")
    await q.redis.hset(part.archive, "head", "0" * 64)  # the archive was edited
    await completed(q, "a", 1)
    await groups_read(q, "a")
    await wait_past(q, 1.0)
    before = await log_ids(q, "a")
    outcome = await arch.archive_partition(part)
    assert outcome.stuck and "audit verify --archive" in outcome.held_back
    assert (outcome.events, outcome.removed, outcome.trimmed) == (0, 0, 0)
    assert await log_ids(q, "a") == before
    # Redis ahead of the archive (a segment lost) stops it too.
    await q.redis.hset(part.archive, mapping={"head": head or "", "seq": "9"})
    assert (await arch.archive_partition(part)).stuck


async def test_an_event_of_a_newer_agentq_holds_archiving_before_it(
    q: agentq.Client, archive: Archive
) -> None:
    part = q.partition("a")
    await completed(q, "a", 1)
    newer = await q.redis.xadd(part.log, {"type": "JobTeleported", "jobId": "j_x.a", "v": "1",
                                          "at": "1", "actor": "x", "data": "{}", "p": ""})
    await completed(q, "a", 1)
    await groups_read(q, "a")
    outcome = await archiver(q, archive, KEEP).archive_partition(part)
    assert outcome.events == 3 and "JobTeleported" in outcome.held_back
    assert (await archive.last("a")).last < newer  # type: ignore[union-attr]


async def test_one_pass_at_a_time_per_partition(q: agentq.Client, archive: Archive) -> None:
    await completed(q, "a", 1)
    await groups_read(q, "a")
    lock = q.redis.lock(q.partition("a").archive_lock, timeout=5)
    assert await lock.acquire(blocking=False)
    try:
        outcome = await archiver(q, archive).archive_partition(q.partition("a"))
        assert outcome.busy and outcome.events == 0
    finally:
        await lock.release()
    assert (await archiver(q, archive).archive_partition(q.partition("a"))).events == 3


# -- consumer groups across trimming ---------------------------------------------------


async def test_consumers_carry_on_when_their_pending_entries_are_trimmed(
    q: agentq.Client
) -> None:
    """A consumer died holding entries; the log is trimmed under them (by hand:
    the archiving pass never does). Those entries read back as nil and are
    acknowledged; every consumer goes on with what comes next."""
    part = q.partition("a")
    sink = f"{q.keys.prefix}:dead-letters"
    config = Config.model_validate({**q.config.wire(),
                                    "dlq": {"sinks": [{"type": "stream", "key": sink}]}})
    consumers = [Gates(q.redis, q.redis, q.keys, "y", claim_idle_ms=0),
                 Projector(q.redis, q.redis, q.keys, "y"),
                 Alerter(q.redis, q.redis, q.keys, config, "y", claim_idle_ms=0)]
    for consumer in consumers:
        consumer.claim_idle_ms = 0
    await failed(q, "a", 2)
    for group in GROUPS:  # "x" reads everything and dies
        await ensure_group(q.redis, part.log, group)
        await q.redis.xreadgroup(group, "x", {part.log: ">"})
    last = (await log_ids(q, "a"))[-1]
    await q.redis.xtrim(part.log, minid=str(EntryId.parse(last).next()), approximate=False)
    assert await q.redis.xlen(part.log) == 0
    (after,) = await failed(q, "a", 1)
    for consumer in consumers:
        while await consumer.process_once(0):
            pass
    for group in GROUPS:
        summary: Any = await q.redis.xpending(part.log, group)
        assert summary["pending"] == 0, group
    alerts: Any = await q.redis.xrange(sink)
    assert [fields["jobId"] for _, fields in alerts] == [after]  # the trimmed ones are gone
    assert await members(q, part.index_state("failed")) == {after}


# -- the background and the command line -----------------------------------------------


async def test_the_background_archives_when_an_archive_is_configured(
    q: agentq.Client, tmp_path: Path
) -> None:
    url = (tmp_path / "bg").as_uri()
    config = Config.model_validate({**q.config.wire(), "retention": {"archive": url}})
    assert "archiver" not in Background(q.redis, q.open_blocking, q.keys, q.config).loops
    background = Background(q.redis, q.open_blocking, q.keys, config)
    assert background.archiver is not None
    background.archiver.pass_ms = 50
    await completed(q, "b", 2)
    stop = asyncio.Event()
    task = asyncio.create_task(background.run(stop))
    store = open_archive(url, q.keys.prefix)
    try:
        deadline = time.monotonic() + 20
        while len(await archived(store, "b")) < 6:
            assert time.monotonic() < deadline and not task.done(), "not archived in time"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [e["type"] for e in await archived(store, "b")][:3] == [
        "JobDispatched", "JobDispatched", "JobStarted"]


async def test_archive_run_archives_every_partition(
    q: agentq.Client, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await completed(q, "a", 2)
    await completed(q, "b", 1)
    for agent in ("a", "b", "c"):
        await groups_read(q, agent)
    env = {"AGENTQ_KEY_PREFIX": q.keys.prefix, "AGENTQ_REDIS_URL": redis_url}
    code, out, err = await asyncio.to_thread(cli, ["archive", "run"], env, monkeypatch)
    assert code == 2 and "retention.archive is not set" in err
    env["AGENTQ_RETENTION__ARCHIVE"] = (tmp_path / "cli").as_uri()
    code, out, err = await asyncio.to_thread(cli, ["archive", "run", "--as", "a"], env,
                                             monkeypatch)
    assert code == 4
    code, out, err = await asyncio.to_thread(cli, ["archive", "run", "--json"], env,
                                             monkeypatch)
    assert code == 0, err
    body = orjson.loads(out)
    assert (body["events"], body["removed"], body["busy"], body["heldBack"]) == (9, 0, [], {})
    code, out, err = await asyncio.to_thread(cli, ["archive", "run"], env, monkeypatch)
    assert code == 0 and out.startswith("Archived 0 events of 3 agents") and "a: 0 events" in err


# -- killed at random points --------------------------------------------------------------


class ArchiverProcess(LineProcess):
    name = "archiver process"


@pytest.mark.parametrize("store", ["file", "s3"])
async def test_an_archiver_killed_at_random_points_loses_and_repeats_nothing(
    q: agentq.Client, redis_url: str, tmp_path: Path, store: str,
    request: pytest.FixtureRequest,
) -> None:
    """SIGKILL an archiving process several times at random points: while it
    writes segments (some kills between a segment and Redis's record of it), and
    once the archive is written, while jobs are removed and the log trimmed. After
    each kill nothing is gone from the log that the archive lacks; once a pass
    finishes, every event is archived exactly once, in order, and the jobs
    removed are exactly those that had ended before the cutoff."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    part = q.partition("a")
    done = await completed(q, "a", 30)
    gone = await failed(q, "a", 10)
    running = await start(q, "a", 3)
    await groups_read(q, "a")
    copy = await log_lines(q, "a")
    copied = await read_partition(q.redis, part, count=10_000)
    all_ids = [entry_id for entry_id, _ in copy]
    await wait_past(q, 1.0)
    # On S3 a segment is made durable by the PUT that writes it (no rename).
    url = (tmp_path / "crash").as_uri() if store == "file" \
        else str(request.getfixturevalue("s3_bucket"))
    archive = open_archive(url, q.keys.prefix)
    config = Config.model_validate({**q.config.wire(),
                                    "retention": {"archive": url, "jobsSeconds": 1}})
    config_json = config.model_dump_json(by_alias=True, exclude_none=True)
    env = {**os.environ, "ARCH_SEGMENT_EVENTS": "4", "ARCH_SLEEP_MS": "20",
           "ARCH_LOCK_SECONDS": "0.3"}

    def killed_while_archiving(proc: ArchiverProcess) -> Callable[[], bool]:
        target = proc.count("SEGMENT") + rng.randrange(1, 6)
        return lambda: proc.count("SEGMENT") >= target or proc.count("PASS") > 0

    def killed_while_removing(proc: ArchiverProcess) -> Callable[[], bool]:
        return lambda: proc.count("EXPIRED") > 0 or proc.count("PASS") > 0

    kills = 0
    for when in (killed_while_archiving,) * 3 + (killed_while_removing,) * 2:
        err = tmp_path / f"archiver{kills}.stderr"
        with err.open("wb") as stderr:
            proc = ArchiverProcess(await asyncio.create_subprocess_exec(
                sys.executable, str(ARCHIVER_PROC), redis_url, config_json, "a", cwd=ROOT,
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=stderr), err)
        try:
            await proc.ready()
            await proc.wait_for(when(proc), "the point to kill it at")
            await asyncio.sleep(rng.random() * 0.02)
            if proc.proc.returncode is None:
                await proc.kill()
                kills += 1
        finally:
            await proc.close()
        # Nothing the archive lacks has left the log.
        trimmed = set(all_ids) - set(await log_ids(q, "a"))
        assert trimmed <= {e["eventId"] for e in await archived(archive, "a")}, f"seed {seed}"
    assert kills >= 3, f"seed {seed}"

    finisher = Archiver(q.redis, q.redis, q.keys, archive, config.retention, segment_events=4,
                        lock_seconds=0.3, segments_per_pass=1000)
    outcome: PassOutcome = await finisher.archive_partition(part, wait=True)
    assert not outcome.busy and not outcome.stuck, f"seed {seed}: {outcome}"
    events = await archived(archive, "a")
    assert [e["eventId"] for e in events] == all_ids, f"seed {seed}"
    assert events == [orjson.loads(line) for _, line in copy], f"seed {seed}"
    remaining = await log_ids(q, "a")
    assert remaining == all_ids[len(all_ids) - len(remaining):], f"seed {seed}"
    ends = fold.records_from(copied)
    assert outcome.now_ms is not None
    for job_id in [*done, *gone]:
        assert ends[job_id]["finishedAt"] // 1000 < outcome.now_ms - 1000
        assert not await q.redis.exists(part.job(job_id)), f"seed {seed}: {job_id} stayed"
    for job_id in running:
        assert await q.redis.exists(part.job(job_id)), f"seed {seed}"
    assert len(await ended_jobs(q, part.ended)) == 0 and not await q.redis.exists(part.expired)
    assert await members(q, q.keys.jobs_index()) == set(running), f"seed {seed}"
    head = await q.redis.hget(part.archive, "head")
    assert await archive.verify("a", {"a": head or ""}) == [], f"seed {seed}"


def test_entry_ids_order_as_redis_does() -> None:
    assert sorted(map(EntryId.parse, ["10-2", "9-30", "10-10"])) == [
        EntryId(9, 30), EntryId(10, 2), EntryId(10, 10)]
    assert str(EntryId.parse("5-0").previous()) == f"4-{2**64 - 1}"
    assert EntryId.parse("5-0").previous().next() == EntryId(5, 0)


def ulid_of(value: int) -> str:
    """The 128-bit ``value`` as a ULID's 26 characters (Crockford's base32)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(value >> (5 * i)) & 31] for i in reversed(range(26)))


async def delayed_and_waited(q: agentq.Client) -> tuple[str, str]:
    """Two jobs of agent a dispatched by b, then a second later: one delayed for an
    hour, one that has run since (started and completed); the views and every
    group have read the log."""
    part = q.partition("a")
    delayed = (await q.dispatch("a", "later", delay_seconds=3600, caller="b")).job_id
    waited = (await q.dispatch("a", "waits", caller="b")).job_id
    await groups_read(q, "a")
    await wait_past(q, 1.0)
    await ensure_work_groups(q.redis, part)
    (started,), _ = await q.scripts.start(part, "w", 60_000, 1)
    assert started.job_id == waited
    assert await q.scripts.complete(part, "w", [(waited, 1, b'"done"')]) == [None]
    await Projection(q.redis).catch_up([part])
    await groups_read(q, "a")
    return delayed, waited


@pytest.mark.both_backends
async def test_a_rebuild_after_the_log_was_trimmed_keeps_every_job_in_redis_listed(
    q: agentq.Client, archive: Archive, redis_url: str
) -> None:
    """The log keeps only the retention's last events: a job delayed for an hour
    (every event of it trimmed) and one that waited before it ran (its dispatch
    trimmed, its start and end still in the log) are still in Redis. A rebuild
    reads the log alone; both must stay listed, by state and by dispatcher."""
    part = q.partition("a")
    delayed, waited = await delayed_and_waited(q)
    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.trimmed == 2 and outcome.removed == 0  # the two dispatches
    assert [e.type for e in await read_partition(q.redis, part)] == [
        "JobStarted", "JobCompleted"]
    listed = {s: await members(q, part.index_state(s)) for s in ("delayed", "completed")}
    assert listed == {"delayed": {delayed}, "completed": {waited}}

    await rebuild(q.redis, [part])

    assert {s: await members(q, part.index_state(s)) for s in ("delayed", "completed")} \
        == listed
    assert {j for s in STATES for j in await members(q, part.index_state(s))} \
        == {delayed, waited}
    assert await members(q, part.index_by("b")) == {delayed, waited}
    assert await members(q, q.keys.jobs_by("b")) == {delayed, waited}
    page = await q.list(caller="b", agent="a")
    assert {j.job_id for j in page.jobs} == {delayed, waited}
    assert await audit.verify(q.redis, [part], archive) == []


@pytest.mark.both_backends
async def test_a_rebuild_lists_trimmed_jobs_whose_dispatching_clock_ran_fast(
    q: agentq.Client, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job id's time is its dispatching host's clock: one an hour fast makes ids
    later than every entry the log keeps. Their dispatch trimmed, a rebuild still
    lists both jobs: what dates a dispatch is the server's clock (``createdAt``)."""
    part = q.partition("a")
    hour_fast = (int(time.time() * 1000) + 3_600_000) << 80

    def made_an_hour_ahead(target: str) -> str:
        return new_job_id(target)[:2] + ulid_of(hour_fast + random.getrandbits(64)) \
            + "." + target

    monkeypatch.setattr(agentq._admission, "new_job_id", made_an_hour_ahead)
    delayed, waited = await delayed_and_waited(q)
    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.trimmed == 2  # the two dispatches

    await rebuild(q.redis, [part])

    assert await members(q, part.index_by("b")) == {delayed, waited}
    assert await members(q, part.index_state("delayed")) == {delayed}
    assert await members(q, q.keys.jobs_by("b")) == {delayed, waited}
    assert await audit.verify(q.redis, [part], archive) == []


async def test_a_rebuild_lists_the_jobs_whose_dispatch_is_trimmed_while_it_runs(
    q: agentq.Client, archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partition's first archive pass trims the log after the rebuild looked at
    where the logs start and before it holds the partition to read it: the jobs
    whose dispatch left the log meanwhile are listed all the same."""
    part = q.partition("a")
    delayed, waited = await delayed_and_waited(q)
    assert not await q.redis.exists(part.archive)  # never archived: nothing to seed
    seed = rebuild_module._seed_trimmed
    passes: list[PassOutcome] = []

    async def trimmed_after(*args: Any) -> dict[str, set[str]]:
        seeded = await seed(*args)
        if not passes:
            passes.append(await archiver(q, archive, ONE_SECOND).archive_partition(part))
        return seeded

    monkeypatch.setattr(rebuild_module, "_seed_trimmed", trimmed_after)
    await rebuild(q.redis, [part])
    assert passes[0].trimmed == 2
    assert await members(q, part.index_state("delayed")) == {delayed}
    assert await members(q, part.index_state("completed")) == {waited}
    assert await members(q, part.index_by("b")) == {delayed, waited}
    assert await audit.verify(q.redis, [part], archive) == []


@pytest.mark.both_backends
async def test_no_archive_pass_trims_a_partition_while_it_is_rebuilt(
    q: agentq.Client, archive: Archive, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the read of a partition's log to the swap of its views, the rebuild holds
    the partition's archive lock: a pass then finds it busy and trims nothing (the
    events it would trim past the rebuild's position would reach no view). The
    pass after the rebuild archives and trims as ever."""
    part = q.partition("a")
    delayed, waited = await delayed_and_waited(q)
    catch_up = Projection.catch_up
    passes: list[PassOutcome] = []

    async def archiving_meanwhile(self: Projection, parts: Sequence[Any], *args: Any,
                                  **kwargs: Any) -> int:
        if kwargs.get("views") is not None and not passes:
            passes.append(await archiver(q, archive, ONE_SECOND).archive_partition(part))
        return await catch_up(self, parts, *args, **kwargs)

    monkeypatch.setattr(Projection, "catch_up", archiving_meanwhile)
    await rebuild(q.redis, [part])
    assert passes[0].busy and passes[0].trimmed == 0
    assert len(await log_ids(q, "a")) == 4
    after = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert not after.busy and after.trimmed == 2
    assert await members(q, part.index_by("b")) == {delayed, waited}
    assert await audit.verify(q.redis, [part], archive) == []


async def test_a_rebuild_lists_a_trimmed_job_whose_spec_is_garbled_by_its_state(
    q: agentq.Client, archive: Archive
) -> None:
    """A spec that is no JSON object (changed behind agentq's back) does not stop a
    rebuild: its job, all of whose events left the log, stays listed by its state."""
    part = q.partition("a")
    delayed, waited = await delayed_and_waited(q)
    outcome = await archiver(q, archive, ONE_SECOND).archive_partition(part)
    assert outcome.trimmed == 2
    await q.redis.set(part.spec(delayed), "not json")
    await rebuild(q.redis, [part])
    assert await members(q, part.index_state("delayed")) == {delayed}
    assert await members(q, part.index_by("b")) == {waited}
