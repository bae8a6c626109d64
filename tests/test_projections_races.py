"""The views against what can happen around them (issue 11 items 16 and 17).

- ``projections rebuild`` racing the projector and queries never drops a job
  from the views: ``project.lua`` itself refuses a batch that does not follow
  its position, and a rebuild builds into keys of its own and swaps them in.
- An event type this version does not know (written by a newer agentq during a
  rolling upgrade) is skipped by every reader, with one warning per type; the
  views, ``list``, ``history`` and ``audit verify`` keep working.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from _indexes import add_ids, index_members, index_size

import agentq
from agentq.consumers.projector import Projector
from agentq.eventlog import fold, reader
from agentq.eventlog.keys import Partition, index_of_key, rebuilding
from agentq.projections import projection as projection_module
from agentq.projections.audit import verify
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.job import STATES


async def listed(q: agentq.Client, part: Partition) -> set[str]:
    """Every job the views list: the union of the state indexes."""
    return {job for state in STATES for job in await index_members(q, part.index_state(state))}


async def view_keys(q: agentq.Client, part: Partition) -> dict[str, set[str]]:
    keys = {index_of_key(k)
            async for k in q.redis.scan_iter(match=f"{part.base}:idx:*", count=1000)}
    return {k: await index_members(q, k) for k in sorted(keys)}


# -- item 16: a rebuild never drops a job -----------------------------------------


async def test_a_batch_behind_a_gap_is_refused_by_the_script_itself(q: agentq.Client) -> None:
    """The projector checked that its batch follows the position; then a rebuild
    emptied the views. Applying the batch must not move the position past the
    events the rebuild has not applied yet."""
    part = q.partition("a")
    first = [await q.dispatch("a", f"first {i}", caller="b") for i in range(3)]
    projection = Projection(q.redis)
    await projection.catch_up([part])
    later = [await q.dispatch("a", f"later {i}", caller="b") for i in range(2)]
    batch = await reader.read_partition(q.redis, part, after=await q.redis.hget(
        part.projection, "pos"))
    assert [e.job_id for e in batch] == [v.job_id for v in later]
    await q.redis.delete(part.projection, *(await view_keys(q, part)))  # as a rebuild did
    assert await q.scripts.project(part, [
        (e.event_id, e.job_id, "queued", "", e.at, "b") for e in batch
    ]) == -1
    assert await listed(q, part) == set()
    await projection.apply(part, batch)  # refused, so it catches up from the position
    assert await listed(q, part) == {v.job_id for v in first + later}


async def test_a_catch_up_reading_ahead_starts_over_where_the_views_moved_back(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long catch-up reads its next page while it applies one. When the views
    move back under it (a rebuild swapped its views in), the page read ahead is
    dropped and it reads on from the views' position: no job is left out."""
    monkeypatch.setattr(projection_module, "_BATCH", 4)
    part = q.partition("a")
    jobs = [await q.dispatch("a", f"job {i}", caller="b") for i in range(30)]
    projection = Projection(q.redis)
    applying = Projection._project
    calls = 0

    async def moved_back_once(self: Projection, *args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:  # pages 1 and 2 applied, page 3 read ahead
            await q.redis.delete(part.projection, *(await view_keys(q, part)))
        return await applying(self, *args, **kwargs)

    monkeypatch.setattr(Projection, "_project", moved_back_once)
    assert await projection.catch_up([part]) == 30 + 8  # pages 1 and 2 applied twice
    assert await listed(q, part) == {v.job_id for v in jobs}
    assert await verify(q.redis, [part]) == []


async def test_rebuild_racing_the_projector_and_queries_drops_no_job(q: agentq.Client) -> None:
    """Rebuilds, the projector and queries catching up, all at once while jobs
    are dispatched; repeated so that a rebuild lands between a batch's check
    and its apply. Every job stays listed, in the state the log says."""
    part = q.partition("a")
    projector = Projector(q.redis, q.redis, q.keys, consumer="p1")
    dispatched: list[str] = []
    for _ in range(15):
        dispatching = asyncio.gather(*(q.dispatch("a", f"job {i}", caller="b")
                                       for i in range(20)))

        async def project() -> None:
            for _ in range(5):
                await projector.process_once(block_ms=None)
                await projector.flush_acks()

        async def query() -> None:
            for _ in range(5):
                await Projection(q.redis).catch_up([part])

        views, *_ = await asyncio.gather(dispatching, rebuild(q.redis, [part]), project(),
                                         query(), rebuild(q.redis, [part]))
        dispatched += [v.job_id for v in views]
        await Projection(q.redis).catch_up([part])
        assert await listed(q, part) == set(dispatched)
    assert await verify(q.redis, [part]) == []


async def test_rebuild_swaps_in_views_equal_to_the_live_ones(q: agentq.Client) -> None:
    part = q.partition("a")
    for i in range(5):
        await q.dispatch("a", f"job {i}", caller="b" if i % 2 else "c")
    cancelled = await q.dispatch("a", "stop", caller="b")
    await q.cancel(cancelled.job_id)
    await Projection(q.redis).catch_up([part])
    live = await view_keys(q, part)
    pos = await q.redis.hget(part.projection, "pos")
    # A stale index the log does not imply leaves with the swap.
    await add_ids(q, part.index_by("ghost"), ["j_nothing.a"])
    assert await rebuild(q.redis, [part]) == 7
    assert await view_keys(q, part) == live
    assert await q.redis.hget(part.projection, "pos") == pos
    staging = rebuilding(part)
    assert [k async for k in q.redis.scan_iter(match=f"{staging.base}:*")] == []


# -- item 17: an event type this version does not know ---------------------------


async def add_unknown_event(q: agentq.Client, part: Partition, job_id: str, kind: str) -> str:
    """An event as a newer agentq's script might append it (noting it on the record)."""
    before = await q.redis.hget(part.job(job_id), "events")
    event_id = str(await q.redis.xadd(part.log, {
        "type": kind, "jobId": job_id, "v": "1", "at": "1700000000000000",
        "actor": "future", "data": '{"warp":9}', "p": before,
    }))
    await q.redis.hset(part.job(job_id), "events", event_id)
    return event_id


async def test_unknown_event_types_are_skipped_with_one_warning_each(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One warning per type and process: types an earlier test met warn again here.
    monkeypatch.setattr(reader, "_warned", set())
    part = q.partition("a")
    before = await q.dispatch("a", "before", caller="b")
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            await add_unknown_event(q, part, before.job_id, "JobTeleported")
        await add_unknown_event(q, part, before.job_id, "JobDreamt")
        after = await q.dispatch("a", "after", caller="b")
        # A query catches up past them...
        page = await q.list(caller="main", agent="a")
        assert [v.job_id for v in page.jobs] == [after.job_id, before.job_id]
        # ...and so does the projector, acknowledging them, at start and after.
        projector = Projector(q.redis, q.redis, q.keys, consumer="p1")
        await projector.recover()
        assert await projector.process_once(block_ms=None) == 5
        await add_unknown_event(q, part, after.job_id, "JobTeleported")
        assert await projector.process_once(block_ms=None) == 1
        await projector.flush_acks()
        await projector.recover()
        groups = await q.redis.xinfo_groups(part.log)
        assert [g["pending"] for g in groups if g["name"] == "projector"] == [0]
        assert [e.type for e in await q.history(before.job_id)] == ["JobDispatched"]
        assert (await q.status(before.job_id)).state == "queued"
        assert await rebuild(q.redis, [part]) == 6
        assert await verify(q.redis, [part]) == []
        log = await reader.read_partition(q.redis, part)
        assert {j: r["state"] for j, r in fold.records_from(log).items()} == {
            before.job_id: "queued", after.job_id: "queued"}
    warned = sorted(entry["event_type"] for entry in logs
                    if entry["event"] == "skipping events of a type this version cannot read")
    assert warned == ["JobDreamt", "JobTeleported"]


async def test_a_dispatch_into_a_state_this_version_does_not_know_is_still_listed(
    q: agentq.Client,
) -> None:
    """A newer version's JobDispatched may start a job in a state this one has
    no index for: the job is in its dispatcher's index; no state index holds it
    (so a list of the agent's jobs, the union of the state indexes, leaves it out
    until a version that knows the state rebuilds the views)."""
    part = q.partition("a")
    known = await q.dispatch("a", "known", caller="b")
    (event_id,) = [e.event_id for e in await reader.read_partition(q.redis, part)]
    applied = await q.scripts.project(part, [
        (event_id, known.job_id, "on_hold", "", 1, "b")])
    assert applied == 1
    assert await index_members(q, part.index_by("b")) == {known.job_id}
    assert await listed(q, part) == set()
    for state in STATES:
        assert await index_size(q, part.index_state(state)) == 0
