"""Reads across the archive boundary: ``status``, ``history``, ``wait``,
``replay`` (with its filters and ``--job``) and ``queue_history`` answer the
same for a job whose events are live, archived, or split between the two.

The archiving pass runs for real (real scripts on the real server, an archive
in a temporary folder) with a one-second retention, so that the jobs that ended
leave Redis and the log is trimmed under a job still running."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import agentq
from agentq.cli import _run_command
from agentq.consumers.archiver import GROUPS, Archiver
from agentq.consumers.gates import Gates
from agentq.eventlog import reader
from agentq.eventlog.scripts import Backoff, ensure_group, ensure_work_groups
from agentq.projections.audit import verify
from agentq.projections.projection import Projection
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config, RetentionConfig
from agentq.schemas.errors import InvalidState, NotFound, Unauthorized

AGENT = "a"
ANSWER = {"answer": 42, "why": "long enough to be held by reference in the log " * 3}


@pytest.fixture
async def aq(redis_url: str, make_config: Callable[..., Config], tmp_path: Path
             ) -> AsyncIterator[agentq.Client]:
    """A client whose config archives under a temporary folder, keeping ended jobs
    one second."""
    archive = (tmp_path / "archive").as_uri()
    config = make_config(rateLimit={"dispatchesPerMinute": 0},
                         retention={"jobsSeconds": 1, "archive": archive})
    async with agentq.connect(redis_url, config) as q:
        await q.add_agent(AGENT)
        await q.add_agent("b")
        yield q


async def archive_pass(q: agentq.Client) -> None:
    """One pass over every partition, once every consumer group the pass waits
    for has read and acknowledged the logs (as the background consumers would)."""
    # The projector is ahead of trimming: the pass waits for its group.
    await Projection(q.redis).catch_up([q.partition(agent) for agent in (AGENT, "b")])
    for agent in (AGENT, "b"):
        log = q.partition(agent).log
        for group in GROUPS:
            await ensure_group(q.redis, log, group)
            read: Any = await q.redis.xreadgroup(group, "t", {log: ">"}, count=10_000)
            if read:
                await q.redis.xack(log, group, *[entry_id for entry_id, _ in read[0][1]])
    archive = q._deployment.archive
    assert archive is not None
    archiver = Archiver(q.redis, q.redis, q.keys, archive, RetentionConfig(jobs_seconds=1))
    await archiver.archive_all([AGENT, "b"])


async def everything(q: agentq.Client, job_ids: list[str]) -> dict[str, Any]:
    """What every read answers, for comparison before and after the pass."""
    seen: dict[str, Any] = {}
    for job_id in job_ids:
        seen[f"status {job_id}"] = (await q.status(job_id)).wire()
        seen[f"history {job_id}"] = [e.wire() for e in await q.history(job_id)]
        if (await q.status(job_id)).dispatched_by == "b":  # b may see those alone
            seen[f"history as b {job_id}"] = [
                e.wire() for e in await q.history(job_id, caller="b")]
    seen["replay"] = [e.stored().wire() async for e in q.replay()]
    seen["replay a"] = [e.stored().wire() async for e in q.replay([AGENT])]
    since = iso_to_micros(seen["replay"][len(seen["replay"]) // 2]["at"])
    seen["replay since"] = [e.stored().wire() async for e in q.replay(since_us=since)]
    seen["replay until"] = [e.stored().wire() async for e in q.replay(until_us=since)]
    return seen


async def test_every_read_answers_the_same_once_jobs_left_redis(aq: agentq.Client) -> None:
    q = aq
    part = q.partition(AGENT)
    # A job still queued, dispatched first: its JobDispatched is trimmed, it stays.
    # Long payloads: the log holds them by reference (each payload once in Redis).
    waiting = await q.dispatch(AGENT, "stays queued " * 20, caller="b", delay_seconds=3600)
    done = await q.dispatch(AGENT, "completes", caller="b", max_attempts=1)
    failing = await q.dispatch(AGENT, "fails", max_attempts=1)
    await ensure_work_groups(q.redis, part)
    await q.scripts.promote_due(part, "system", 10)
    started, _ = await q.scripts.start(part, "w", 60_000, 2)
    assert {job.job_id for job in started} == {done.job_id, failing.job_id}
    await q.scripts.complete(part, "w", [(done.job_id, 1, orjson.dumps(ANSWER))])
    assert await q.scripts.fail(part, "w", failing.job_id, 1, "boom", Backoff(0, 0)) == "failed"
    other = await q.dispatch("b", "in another partition", caller="b")
    # A job whose dependency (ended, so it is released) leaves Redis before it.
    dependent = await q.dispatch("b", "after done", caller="b", depends_on=[done.job_id],
                                 delay_seconds=3600)
    ids = [waiting.job_id, done.job_id, failing.job_id, other.job_id, dependent.job_id]
    before = await everything(q, ids)

    await asyncio.sleep(1.1)  # past the retention of the two that ended
    await archive_pass(q)

    # They left Redis; the waiting job's first events left the log.
    assert not await q.redis.exists(part.job(done.job_id), part.job(failing.job_id))
    assert await q.redis.exists(part.job(waiting.job_id))
    entries: Any = await q.redis.xrange(part.log)
    assert waiting.job_id not in {fields["jobId"] for _, fields in entries}

    assert await everything(q, ids) == before
    # The audit folds archived and live events: it agrees, and still sees a lie.
    parts = [q.partition(agent) for agent in (AGENT, "b")]
    problems = await verify(q.redis, parts, q.archive)
    assert problems == [], '\n'.join(problems)
    await q.redis.hset(part.job(waiting.job_id), "maxAttempts", "9")
    assert [p for p in await verify(q.redis, parts, q.archive) if waiting.job_id in p]
    await q.redis.hset(part.job(waiting.job_id), "maxAttempts", "3")
    dependency = (await q.status(dependent.job_id)).dependencies[done.job_id]
    assert (dependency.state, dependency.result) == ("completed", ANSWER)
    view, timed_out = await q.wait(done.job_id, timeout=5)
    assert not timed_out and view.wire() == before[f"status {done.job_id}"]
    with pytest.raises(NotFound):
        await q.status(f"{done.job_id[:-5]}zzzzz")

    # A job that left Redis is never not_found: cancel and retry refuse it as a job
    # in its archived state (a stranger is refused as for a live job).
    with pytest.raises(InvalidState) as refused:
        await q.retry(failing.job_id)
    assert refused.value.state == "failed" and "left Redis" in str(refused.value)
    with pytest.raises(InvalidState) as refused:
        await q.cancel(done.job_id, caller="b")
    assert refused.value.state == "completed"
    with pytest.raises(Unauthorized):
        await q.cancel(done.job_id, caller="stranger")
    with pytest.raises(NotFound):
        await q.cancel(f"{done.job_id[:-5]}zzzzz")


async def test_replay_of_one_job_reads_only_that_job(
    aq: agentq.Client, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = aq
    part = q.partition(AGENT)
    jobs = [await q.dispatch(AGENT, f"job {i}", max_attempts=1) for i in range(3)]
    await ensure_work_groups(q.redis, part)
    await q.scripts.start(part, "w", 60_000, 3)
    await q.scripts.complete(part, "w", [(j.job_id, 1, b'"ok"') for j in jobs])
    await asyncio.sleep(1.1)
    await archive_pass(q)
    wanted = jobs[1].job_id
    for name, value in {"AGENTQ_REDIS__URL": redis_url, "AGENTQ_KEY_PREFIX": q.keys.prefix,
                        "AGENTQ_RETENTION__ARCHIVE": q.config.retention.archive or ""}.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(_run_command, ["replay", "--job", wanted], out, err)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0, err.getvalue()
    assert [line["type"] for line in lines] == ["JobDispatched", "JobStarted", "JobCompleted"]
    assert {line["jobId"] for line in lines} == {wanted}
    assert lines == [e.wire() for e in await q.history(wanted)]


def test_the_embedded_server_archives_under_agentq_home_and_a_users_redis_keeps_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTQ_HOME", str(tmp_path))
    embedded = agentq.Client(None, Config())
    assert embedded.config.retention.archive == str(tmp_path / "archive")
    assert agentq.Client("redis://127.0.0.1:6379", Config()).config.retention.archive is None
    named = Config.model_validate({"redis": {"url": "redis://127.0.0.1:6379"}})
    assert agentq.Client(None, named).config.retention.archive is None


async def cli(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
              ) -> tuple[int, str, str]:
    """``agentq ARGS`` (in a thread: it runs its own event loop) with ``env`` set."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(_run_command, args, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_audit_verify_archive_names_an_edited_segment(
    aq: agentq.Client, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = aq
    part = q.partition(AGENT)
    for round_ in range(2):  # two segments: a chain of two links
        jobs = [await q.dispatch(AGENT, f"job {round_}.{i}", max_attempts=1) for i in range(2)]
        await ensure_work_groups(q.redis, part)
        await q.scripts.start(part, "w", 60_000, 2)
        await q.scripts.complete(part, "w", [(j.job_id, 1, b'"ok"') for j in jobs])
        await archive_pass(q)
    env = {"AGENTQ_REDIS__URL": redis_url, "AGENTQ_KEY_PREFIX": q.keys.prefix,
           "AGENTQ_RETENTION__ARCHIVE": q.config.retention.archive or ""}
    code, out, err = await cli(["audit", "verify", "--archive"], env, monkeypatch)
    assert code == 0, out
    # How far the check of the chains is, on standard error: at the end at least.
    assert f"{AGENT}: 2 of 2 archive segments checked" in err.splitlines(), err
    archive = q._deployment.archive
    assert archive is not None
    first = (await archive.segments(AGENT))[0]
    path = Path(archive.url.removeprefix("file://")) / AGENT / first.name
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)  # one segment's bytes changed
    code, out, _ = await cli(["audit", "verify", "--archive"], env, monkeypatch)
    assert code == 1
    assert first.name in out and AGENT in out
    monkeypatch.delenv("AGENTQ_RETENTION__ARCHIVE")
    code, _, err = await cli(["audit", "verify", "--archive"],
                             {"AGENTQ_REDIS__URL": redis_url}, monkeypatch)
    assert code == 2 and "retention.archive is not set" in err


async def test_a_dependency_that_left_redis_is_found_in_the_archive(aq: agentq.Client) -> None:
    """Dispatching with ``dependsOn`` a job removed from Redis is admitted (its spec
    comes from the archive) and the gates resolve it as it ended: completed, so
    the dependent is queued, with the dependency's result in its view."""
    q = aq
    part = q.partition(AGENT)
    done = await q.dispatch(AGENT, "done long ago", max_attempts=1)
    await ensure_work_groups(q.redis, part)
    await q.scripts.start(part, "w", 60_000, 1)
    await q.scripts.complete(part, "w", [(done.job_id, 1, b'{"n": 7}')])
    await asyncio.sleep(1.1)
    await archive_pass(q)
    assert not await q.redis.exists(part.job(done.job_id))
    later = await q.dispatch("b", "needs it", depends_on=[done.job_id])
    assert later.state == "waiting_dependencies"
    gates = Gates(q.redis, q.redis, q.keys, "g", archive=q._deployment.archive)
    await gates.handle(await reader.read_partition(q.redis, q.partition("b")))
    view = await q.status(later.job_id)
    assert view.state == "queued"
    assert view.dependencies[done.job_id].result == {"n": 7}
