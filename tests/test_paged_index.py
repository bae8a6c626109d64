"""Paged indexes (``_lib.lua``; ``keys.index_directory``): job ids kept as pages
of at most 128 under a directory read back exactly as one sorted set would,
forward and back from any bound, each page a listpack; emptied pages and
directories go; an index kept whole by a version before is read beside the
pages and moved into them as writers pass."""

from __future__ import annotations

import random
from typing import Any

import pytest
from _indexes import drop_index, index_members
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentq
from agentq.eventlog.keys import index_directory, index_page
from agentq.eventlog.scripts import ScriptCall, Scripts, ensure_work_groups
from agentq.projections import audit
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild

pytestmark = pytest.mark.both_backends

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def job_id(rng: random.Random) -> str:
    return "j_" + "".join(rng.choice(ALPHABET) for _ in range(26)) + ".a"


def page_cap(member: str) -> int:
    """How many ids of ``member``'s length a page holds: as many as a listpack of
    4,096 bytes does (each id its bytes, a byte of length, a byte back and two for
    the score; seven bytes of header and end), 128 at most. For ids under 60 bytes."""
    return min(128, (4096 - 7) // (len(member) + 4))


async def pages_of(q: agentq.Client, index: str) -> dict[str, list[str]]:
    """Each page's start and ids, as Redis holds them."""
    starts: list[str] = await q.redis.zrange(index_directory(index), 0, -1)
    return {start: await q.redis.zrange(index_page(index, start), 0, -1) for start in starts}


async def read_all(scripts: Scripts, index: str, *, forward: bool, size: int) -> list[str]:
    found: list[str] = []
    after = None
    while ids := await scripts.index_range(index, after, size, forward=forward):
        found += ids
        after = ids[-1]
    return found


async def check(q: agentq.Client, index: str, model: set[str]) -> None:
    scripts = q.scripts
    pages = await pages_of(q, index)
    starts = sorted(pages)
    for at, start in enumerate(starts):
        ids = pages[start]
        assert 0 < len(ids) <= page_cap(ids[0]) or start == "", (start, len(ids))
        later = starts[at + 1] if at + 1 < len(starts) else None
        assert all(start <= i and (later is None or i < later) for i in ids)
        if ids:
            encoding = await q.redis.object("encoding", index_page(index, start))
            assert encoding in ("listpack", "ziplist")  # compact (Redis 7 and 6)
    assert [i for start in starts for i in pages[start]] == sorted(model)
    assert await scripts.index_size(index) == len(model)
    assert await read_all(scripts, index, forward=True, size=50) == sorted(model)
    assert await read_all(scripts, index, forward=False, size=37) == sorted(model, reverse=True)


async def test_ids_in_any_order_read_back_in_order_from_full_listpack_pages(
        q: agentq.Client) -> None:
    rng = random.Random(7)
    index = q.keys.jobs_index("t")
    appended = sorted(job_id(rng) for _ in range(1000))
    assert await q.scripts.index_edit(index, appended, add=True) == 1000
    # Appended in id order: every page but the last is full, and full is as
    # many ids as a listpack of 4,096 bytes holds: jemalloc rounds an allocation
    # past 4,096 up to 5,120.
    pages = await pages_of(q, index)
    sizes = [len(ids) for ids in pages.values()]
    full = page_cap(appended[0])
    assert full < 128
    assert sizes[:-1] == [full] * (len(sizes) - 1)
    for start in list(pages)[:-1]:
        usage = await q.redis.memory_usage(index_page(index, start), samples=0)
        # The listpack, and the key with its name (longer on a cluster): not 5,120 and more.
        assert usage <= 4096 + 256, (start, usage)
    scattered = [job_id(rng) for _ in range(1500)]
    assert await q.scripts.index_edit(index, scattered + appended[:10], add=True) == 1500
    model = set(appended) | set(scattered)
    await check(q, index, model)
    # From a bound that is not an id of the index, both ways.
    bound = job_id(rng)
    after = await q.scripts.index_range(index, bound, 300, forward=True)
    assert after == sorted(i for i in model if i > bound)[:300]
    before = await q.scripts.index_range(index, bound, 300, forward=False)
    assert before == sorted((i for i in model if i < bound), reverse=True)[:300]
    asked = rng.sample(sorted(model), 100) + [job_id(rng) for _ in range(100)]
    assert await q.scripts.index_has(index, asked) == [i in model for i in asked]
    # Taken out in any order: the emptied pages leave, then the directory.
    gone = rng.sample(sorted(model), 2000)
    assert await q.scripts.index_edit(index, [*gone, job_id(rng)], add=False) == 2000
    model -= set(gone)
    await check(q, index, model)
    assert await q.scripts.index_edit(index, sorted(model), add=False) == len(model)
    assert [k async for k in q.redis.scan_iter(match=f"{index}*")] == []


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.booleans(), st.lists(st.integers(0, 600), max_size=300)),
                      max_size=12),
       order=st.randoms())
async def test_adds_and_removals_agree_with_a_set(q: agentq.Client,
                                                  steps: list[tuple[bool, list[int]]],
                                                  order: random.Random) -> None:
    index = q.keys.jobs_index("h")
    for key in [k async for k in q.redis.scan_iter(match=f"{index}*")]:
        await q.redis.delete(key)  # the example before's
    model: set[str] = set()
    for add, numbers in steps:
        ids = [f"j_{n:026d}.a" for n in numbers]
        if order.random() < 0.5:
            ids.sort()  # most batches come in order, which fills pages from the end
        # In the order given (Scripts.index_edit sorts them; the views' writer cannot).
        changed = await q.scripts.call_many(
            [ScriptCall("index_edit", [index], ["+" if add else "-", " ".join(ids)])])
        changed = changed[0]
        before = set(model)
        model = model | set(ids) if add else model - set(ids)
        assert changed == len(model ^ before)
        await check(q, index, model)


async def test_an_index_kept_whole_before_is_read_beside_its_pages_and_moved_into_them(
        q: agentq.Client) -> None:
    rng = random.Random(3)
    index = q.keys.jobs_index()
    old = sorted(job_id(rng) for _ in range(450))
    await q.redis.zadd(index, dict.fromkeys(old, 0))  # as a version before kept it
    new = [job_id(rng) for _ in range(40)]
    await q.scripts.call_many([Scripts.index_call(q.keys, [(i, "main") for i in new])])
    # Each add moved 200 of the whole index's ids into pages; the rest are read beside.
    assert await q.redis.zcard(index) == 250
    model = set(old) | set(new)
    assert await q.scripts.index_size(index) == len(model)
    assert await read_all(q.scripts, index, forward=False, size=60) == sorted(model, reverse=True)
    assert await read_all(q.scripts, index, forward=True, size=1000) == sorted(model)
    assert all(await q.scripts.index_has(index, sorted(model)))
    # Taken out of both.
    assert await q.scripts.index_edit(index, old[:300], add=False) == 300
    model -= set(old[:300])
    assert await read_all(q.scripts, index, forward=True, size=70) == sorted(model)
    for _ in range(2):
        await q.scripts.call_many([Scripts.index_call(q.keys, [(job_id(rng), "main")])])
    assert not await q.redis.exists(index)  # every id moved into pages


async def test_ids_out_of_order_past_the_last_pages_start_go_to_their_own_pages(
        q: agentq.Client) -> None:
    """A run added at once to the last page (its first id is past the page's
    start) holding ids below that start: they move to the pages they belong in."""
    index = q.keys.jobs_index("o")
    ids = [f"j_{n:026d}.a" for n in range(0, 600, 2)]
    await q.scripts.index_edit(index, ids, add=True)
    assert len(await pages_of(q, index)) == 3
    late = [f"j_{n:026d}.a" for n in (599, 11, 597, 5, 300)]
    (added,) = await q.scripts.call_many(
        [ScriptCall("index_edit", [index], ["+", " ".join(late)])])  # not sorted
    assert added == 4  # 300 was held
    await check(q, index, set(ids) | set(late))


async def listing(q: agentq.Client, **query: Any) -> list[str]:
    """Every job a list shows, a page at a time."""
    found: list[str] = []
    cursor = None
    while True:
        page = await q.list(caller="main", limit=100, cursor=cursor, **query)
        found += [j.job_id for j in page.jobs]
        if (cursor := page.next_cursor) is None:
            return found


async def test_a_partitions_views_kept_whole_before_keep_listing_and_auditing_as_they_move(
        q: agentq.Client) -> None:
    """A partition whose dispatcher and terminal-state indexes a version before kept
    as single sorted sets: lists and the audit read them beside the pages, the
    projector's batches move them into pages, and a rebuild's swap drops them."""
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    jobs = [(await q.dispatch("a", f"job {i}", caller="b")).job_id for i in range(300)]
    while started := (await q.scripts.start(part, "w", 60_000, 100))[0]:
        await q.scripts.complete(part, "w", [(s.job_id, 1, b"1") for s in started])
    await Projection(q.redis).catch_up([part])
    listed = await listing(q, agent="a")
    assert sorted(listed) == sorted(jobs)
    # As a version before kept them: whole sorted sets, no pages.
    for index in (part.index_by("b"), part.index_state("completed")):
        ids = await index_members(q, index)
        await drop_index(q, index)
        await q.redis.zadd(index, dict.fromkeys(ids, 0))
        assert not await q.redis.exists(index_directory(index))
    assert await listing(q, agent="a") == listed
    assert await listing(q, agent="a", dispatched_by="b", state=["completed"]) == listed
    assert await audit.verify(q.redis, [part]) == []
    # New jobs go into pages; each batch the projector applies moves 200 old ids.
    newer = [(await q.dispatch("a", f"more {i}", caller="b")).job_id for i in range(2)]
    await Projection(q.redis).catch_up([part])
    assert await q.redis.zcard(part.index_by("b")) == 100
    assert await audit.verify(q.redis, [part]) == []
    assert set(await listing(q, agent="a")) == set(jobs) | set(newer)
    # A rebuild's swap leaves pages only.
    await rebuild(q.redis, [part])
    assert not await q.redis.exists(part.index_by("b"), part.index_state("completed"))
    assert await index_members(q, part.index_by("b")) == set(jobs) | set(newer)
    assert await audit.verify(q.redis, [part]) == []


async def test_ask_many_answers_script_calls_and_plain_commands_in_their_order(
        q: agentq.Client) -> None:
    """The audit and list read an index kept whole and a paged one side by side:
    each reply comes back at its ask's place, whichever form it took."""
    rng = random.Random(7)
    ids = sorted({job_id(rng) for _ in range(300)})
    paged = q.keys.jobs_index()
    await q.scripts.index_edit(paged, ids, add=True)
    whole = f"{q.keys.prefix}:test:whole"
    await q.redis.zadd(whole, {i: 0 for i in ids[:5]})
    try:
        replies = await q.scripts.ask_many([
            lambda pipe: pipe.zcard(whole),
            ScriptCall("index_size", [paged], []),
            lambda pipe: pipe.zmscore(whole, [ids[0], ids[6]]),
            Scripts.index_has_call(paged, [ids[6], "j_none.a"]),
        ])
        assert replies == [5, 300, [0.0, None], "10"]  # index_has: a flag per id
        assert await q.scripts.ask_many([]) == []
    finally:
        await drop_index(q, paged)
        await q.redis.delete(whole)
