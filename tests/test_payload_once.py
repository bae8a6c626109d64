"""Each payload once in Redis: a long task lives in the job's spec and a long
result in its record; the log's JobDispatched and JobCompleted carry their
SHA-256 in their place, and every read that hands events out puts them back,
byte for byte as the log used to carry them.

Short payloads (72 bytes of JSON or fewer) stay inline. Entries written before
(long payloads inline) read as they always did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from _backends import Backend

import agentq
from agentq.eventlog import fold, reader
from agentq.eventlog.keys import Partition
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import ensure_work_groups, task_reference
from agentq.projections import audit
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config
from agentq.schemas.events import PAYLOAD_INLINE_MAX, payload_digest

WORKER = "w1"
LEASE_MS = 600_000
LONG_TASK = "summarise: " + "é lorem ipsum " * 80  # 1 KB+, not ASCII
LONG_RESULT = {"answer": "x" * 1000, "n": [1, 2.5, None]}
SHORT_TASK = "short"


async def _entries(q: agentq.Client, part: Partition, job_id: str) -> dict[str, dict[str, Any]]:
    """The job's stream entries as stored, by type, each with its data parsed."""
    entries: Any = await q.redis.xrange(part.log)
    return {fields["type"]: {**fields, "data": orjson.loads(fields["data"])}
            for _, fields in entries if fields["jobId"] == job_id}


async def _complete(q: agentq.Client, part: Partition, job_id: str, result: Any) -> None:
    await ensure_work_groups(q.redis, part)
    (started,), _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
    assert started.job_id == job_id
    assert await q.scripts.complete(part, WORKER, [(job_id, 1, orjson.dumps(result))]) == [None]


def _printed(events: list[Any]) -> list[bytes]:
    return [orjson.dumps(event.wire()) for event in events]


def _inline(raw_data: str, field: str, payload_json: bytes) -> str:
    """A stored reference's data as the log carried it before: the payload inline."""
    digest = payload_digest(payload_json)
    reference = f'"{field}Sha256":"{digest}"'
    assert raw_data.count(reference) == 1
    return raw_data.replace(reference, f'"{field}":' + payload_json.decode())


@pytest.mark.both_backends  # pipelines across partitions: slots on a cluster
async def test_a_long_task_and_result_are_stored_once_and_read_as_before(
    q: agentq.Client,
) -> None:
    part = q.partition("a")
    job = await q.dispatch("a", LONG_TASK, caller="b", label="long", metadata={"k": "v"})
    await _complete(q, part, job.job_id, LONG_RESULT)
    task_json, result_json = orjson.dumps(LONG_TASK), orjson.dumps(LONG_RESULT)

    # Stored: the payloads once, in the spec and the result's own key (the record,
    # kept compact, holds none); digests in the log.
    stored = await _entries(q, part, job.job_id)
    dispatched, completed = stored["JobDispatched"]["data"], stored["JobCompleted"]["data"]
    assert "task" not in dispatched and dispatched["taskSha256"] == payload_digest(task_json)
    assert list(dispatched) == ["state", "target", "dispatchedBy", "taskSha256", "maxAttempts",
                                "label", "metadata"]
    assert completed == {"attempt": 1, "resultSha256": payload_digest(result_json)}
    spec: Any = await q.redis.get(part.spec(job.job_id))
    assert orjson.loads(spec)["task"] == LONG_TASK
    assert await q.redis.get(part.result(job.job_id)) == result_json.decode()
    assert await q.redis.hget(part.job(job.job_id), "result") is None
    assert await q.redis.object("encoding", part.job(job.job_id)) in ("listpack", "ziplist")

    # Read: byte for byte what the log's entries print as with the payloads inline.
    raw: Any = await q.redis.xrange(part.log)
    before = []
    for entry_id, fields in raw:
        if fields["jobId"] != job.job_id:
            continue
        if fields["type"] == "JobDispatched":
            fields = {**fields, "data": _inline(fields["data"], "task", task_json)}
        elif fields["type"] == "JobCompleted":
            fields = {**fields, "data": _inline(fields["data"], "result", result_json)}
        before.append(RawEvent.parse("a", entry_id, fields).stored())
    history = await q.history(job.job_id)
    assert _printed(history) == _printed(before)
    assert [e.type for e in history] == ["JobDispatched", "JobStarted", "JobCompleted"]
    assert history[0].data["task"] == LONG_TASK and history[2].data["result"] == LONG_RESULT

    replayed = [event.stored() async for event in q.replay(["a", "b"])]
    assert _printed([e for e in replayed if e.job_id == job.job_id]) == _printed(before)
    partition = [event.stored() async for event in reader.iter_partition(q.redis, part)]
    assert _printed(partition) == _printed(before)
    page = await reader.read_partition(q.redis, part, payloads=True)
    assert _printed([event.stored() for event in page]) == _printed(before)

    # What a user sees of the job itself never came from the log.
    view = await q.status(job.job_id)
    assert view.task == LONG_TASK and view.result == LONG_RESULT
    assert await audit.verify(q.redis, [q.partition(a) for a in ("a", "b", "c")]) == []


async def test_short_payloads_stay_inline(q: agentq.Client) -> None:
    part = q.partition("a")
    job = await q.dispatch("a", SHORT_TASK)
    await _complete(q, part, job.job_id, "ok")
    stored = await _entries(q, part, job.job_id)
    assert stored["JobDispatched"]["data"]["task"] == SHORT_TASK
    assert stored["JobCompleted"]["data"] == {"attempt": 1, "result": "ok"}
    # At the bound inline, one byte past it by reference.
    assert task_reference(orjson.dumps({"task": "t" * (PAYLOAD_INLINE_MAX - 2)})) == b""
    spec = orjson.dumps({"target": "a", "task": "t" * (PAYLOAD_INLINE_MAX - 1)})
    start, end, digest = task_reference(spec).split()
    assert spec[int(start):int(end)] == b'"task":' + orjson.dumps("t" * (PAYLOAD_INLINE_MAX - 1))
    assert digest.decode() == payload_digest(orjson.dumps("t" * (PAYLOAD_INLINE_MAX - 1)))


def test_a_spec_the_reference_cannot_be_cut_from_keeps_its_task() -> None:
    long = "t" * 200
    # "task" met first inside another field: the span found is not the task's.
    nested = orjson.dumps({"metadata": {"task": long}, "task": long})
    assert task_reference(nested) == b""
    # Not orjson's text: the task's JSON is not found as orjson writes it.
    spaced = ('{"target": "a", "task": "' + long + '"}').encode()
    assert task_reference(spaced) == b""
    assert task_reference(orjson.dumps({"target": "a", "task": long})) != b""


async def test_entries_written_before_read_as_they_always_did(q: agentq.Client) -> None:
    """A log entry with a long payload inline (as every entry was written before)
    needs no read to print, and folds as before."""
    fields = {"type": "JobCompleted", "jobId": "j_x.a", "v": "1", "at": "1700000000000000",
              "actor": WORKER, "data": orjson.dumps({"attempt": 1, "result": LONG_RESULT}).decode()}
    event = RawEvent.parse("a", "1-1", fields)
    assert event.reference() is None
    assert event.stored().data["result"] == LONG_RESULT
    # No payload to put back: with_payloads leaves the data alone (and marks the
    # event as having none left to look up).
    assert await reader.with_payloads(q.redis, q.partition("a"), [event]) == [event]
    assert event.payloads_read and event.data["result"] == LONG_RESULT
    record = fold.apply({"state": "active", "events": "0-1"}, event)
    assert record["result"] == LONG_RESULT and "resultSha256" not in record


async def test_an_event_read_without_its_payload_is_not_printed(q: agentq.Client) -> None:
    part = q.partition("a")
    job = await q.dispatch("a", LONG_TASK, caller="b")
    (event,) = await reader.read_partition(q.redis, part)
    assert event.reference() == ("task", payload_digest(orjson.dumps(LONG_TASK)))
    with pytest.raises(ValueError, match="with_payloads"):
        event.stored()
    # Consumers that need no payload read it as it is, with what they use.
    assert event.data["dispatchedBy"] == "b" and event.data["state"] == "queued"
    await reader.with_payloads(q.redis, part, [event])
    assert event.reference() is None and event.stored().data["task"] == LONG_TASK

    # A payload gone, or not the one the log pins, is not put back: the event
    # keeps its digest, and says so when printed.
    (changed,) = await reader.read_partition(q.redis, part)
    await q.redis.set(part.spec(job.job_id), orjson.dumps({"task": LONG_TASK + "!"}))
    await reader.with_payloads(q.redis, part, [changed])
    assert changed.payloads_read and "taskSha256" in changed.stored().data
    (gone,) = await reader.read_partition(q.redis, part)
    await q.redis.delete(part.spec(job.job_id))
    await reader.with_payloads(q.redis, part, [gone])
    assert "task" not in gone.stored().data


async def test_audit_names_a_payload_that_differs_from_the_log(q: agentq.Client) -> None:
    parts = [q.partition(a) for a in ("a", "b", "c")]
    pa = q.partition("a")
    job = await q.dispatch("a", LONG_TASK, caller="b")
    await _complete(q, pa, job.job_id, LONG_RESULT)
    assert await audit.verify(q.redis, parts) == []

    result_key, spec_key = pa.result(job.job_id), pa.spec(job.job_id)
    spec: Any = await q.redis.get(spec_key)
    await q.redis.set(result_key, orjson.dumps({**LONG_RESULT, "n": []}))
    (problem,) = await audit.verify(q.redis, parts)
    assert problem.startswith(f"{job.job_id}: resultSha256 is ") and "by the log" in problem

    # A result written into the record beside the one kept apart is read too.
    await q.redis.set(result_key, orjson.dumps(LONG_RESULT))
    await q.redis.hset(pa.job(job.job_id), "result", orjson.dumps({**LONG_RESULT, "n": []}))
    (problem,) = await audit.verify(q.redis, parts)
    assert problem.startswith(f"{job.job_id}: resultSha256 is ") and "by the log" in problem
    await q.redis.hdel(pa.job(job.job_id), "result")

    await q.redis.set(spec_key, spec.replace("lorem", "LOREM", 1))
    (problem,) = await audit.verify(q.redis, parts)
    assert problem.startswith(f"{job.job_id}: taskSha256 is ") and "by the log" in problem

    # A field beside the task is compared as before.
    await q.redis.set(spec_key, spec.replace('"dispatchedBy":"b"', '"dispatchedBy":"c"'))
    (problem,) = await audit.verify(q.redis, parts)
    assert problem.startswith(f"{job.job_id}: spec is ")
    await q.redis.set(spec_key, spec)
    assert await audit.verify(q.redis, parts) == []


@pytest.mark.both_backends  # pipelines across partitions: slots on a cluster
async def test_rebuild_and_fold_across_partitions(q: agentq.Client) -> None:
    """projections rebuild, and the records folded from a replay (payloads put
    back) equal the live ones, with long and short payloads in three partitions."""
    parts = [q.partition(a) for a in ("a", "b", "c")]
    for part in parts:
        long = await q.dispatch(part.agent, LONG_TASK + part.agent)
        await _complete(q, part, long.job_id, {**LONG_RESULT, "agent": part.agent})
        await q.dispatch(part.agent, SHORT_TASK)
    await rebuild(q.redis, parts)
    assert await audit.verify(q.redis, parts) == []
    events = [event async for event in reader.replay(q.redis, parts, batch=2)]
    assert all(event.reference() is None for event in events)
    folded = fold.records_from(events)
    for part in parts:
        for job_id, record in (await reader.all_records(q.redis, part)).items():
            assert folded[job_id] == normalize(record)


async def test_worker_dependents_and_wait_see_the_payloads(
    worker_client: Callable[..., Any],
) -> None:
    q = await worker_client()
    dep = await q.dispatch("w", LONG_TASK)
    after = await q.dispatch("w", "then", depends_on=[dep.job_id])
    seen: dict[str, Any] = {}

    async def handler(job: Any) -> Any:
        seen[job.id] = (job.task, job.view.dependencies)
        return LONG_RESULT if job.id == dep.job_id else "done"

    runner = q.worker("w", handler, concurrency=2)
    running = asyncio.create_task(runner.run())
    try:
        view, timed_out = await q.wait(after.job_id, timeout=30)
    finally:
        runner.stop()
        await running
    assert not timed_out and view.state == "completed"
    assert seen[dep.job_id][0] == LONG_TASK
    assert seen[after.job_id][1][dep.job_id].result == LONG_RESULT
    assert (await q.status(dep.job_id)).result == LONG_RESULT
    assert [e.data.get("result") for e in await q.history(dep.job_id)][-1] == LONG_RESULT


async def test_wait_on_a_running_job_sees_its_long_result(
    worker_client: Callable[..., Any],
) -> None:
    q = await worker_client()
    job = await q.dispatch("w", LONG_TASK)
    release = asyncio.Event()

    async def handler(job: Any) -> Any:
        await release.wait()
        return LONG_RESULT

    runner = q.worker("w", handler)
    running = asyncio.create_task(runner.run())
    try:
        waiting = asyncio.create_task(q.wait(job.job_id, timeout=30))
        while (await q.status(job.job_id)).state != "active":
            await asyncio.sleep(0.02)
        release.set()
        view, timed_out = await waiting
    finally:
        runner.stop()
        await running
    assert not timed_out and view.result == LONG_RESULT


async def test_on_both_backends(backend: Backend, make_config: Callable[..., Config]) -> None:
    """dispatch.lua and complete.lua write the reference on fakeredis's Lua too."""
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 0})
    async with backend.connect(config) as q:
        await q.add_agent("a")
        part = q.partition("a")
        job = await q.dispatch("a", LONG_TASK)
        await _complete(q, part, job.job_id, LONG_RESULT)
        stored = await _entries(q, part, job.job_id)
        assert "taskSha256" in stored["JobDispatched"]["data"]
        assert "resultSha256" in stored["JobCompleted"]["data"]
        history = await q.history(job.job_id)
        assert history[0].data["task"] == LONG_TASK
        assert history[-1].data["result"] == LONG_RESULT
