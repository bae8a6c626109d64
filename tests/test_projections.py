"""The read side on a real Redis server: projections, list paging, activity.

- A hypothesis test drives random histories (dispatches over three agents by
  random callers, starts, completions, failed attempts, cancels, retries,
  drains, promotions) while the projector (group ``projector``), queries
  catching up, and re-applied batches update the views in between; at the end
  the live views equal the views the log implies (``eventlog.fold``) and the
  views ``projections.rebuild`` makes from the log (DESIGN rule 4).
- A projector process (``tests/projector_proc.py``) killed in the middle of a
  batch, then replaced: no index off by one, positions past every event.
- Paging over 45 jobs with a filter that removes most of them.
- ``list`` sees a job the moment its dispatch returns, with no projector.
- ``activity``: ``idle``/``working`` with a live worker process, ``offline``
  within ``workers.heartbeatTimeoutSeconds`` of a SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
from _indexes import index_members, index_size
from _procs import LineProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentq
from agentq.consumers.projector import Projector
from agentq.eventlog import fold
from agentq.eventlog.keys import Partition, index_of_key
from agentq.eventlog.reader import iter_partition, read_partition
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.projections import ticker
from agentq.projections.projection import Projection
from agentq.projections.rebuild import rebuild
from agentq.schemas.config import Config
from agentq.schemas.errors import AgentqError
from agentq.schemas.job import STATES

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PROJECTOR_PROC = TESTS / "projector_proc.py"
WORKER_PROC = TESTS / "worker_proc.py"
AGENTS = ("a", "b", "c")
CALLERS = ("main", "a", "b", "c", "x")  # "main" the system agent, "x" no agent at all
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
WORKER = "w1"
LEASE_MS = 600_000
NO_BACKOFF = Backoff(0, 0)
LATER = Backoff(3_600_000, 7_200_000)
EXAMPLES = int(os.environ.get("AGENTQ_PROJECTION_EXAMPLES", "20"))


# -- helpers -----------------------------------------------------------------


async def live_views(q: agentq.Client, part: Partition) -> dict[str, set[str]]:
    """Every non-empty index of the partition: key -> members."""
    keys = {index_of_key(k)
            async for k in q.redis.scan_iter(match=f"{part.base}:idx:*", count=1000)}
    out: dict[str, set[str]] = {}
    for key in sorted(keys):
        members = await index_members(q, key)
        if members:
            out[key] = members
    return out


async def derived(q: agentq.Client, part: Partition) -> dict[str, dict[str, Any]]:
    return fold.records_from([e async for e in iter_partition(q.redis, part)])


def expected_views(part: Partition, records: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """The indexes the log implies: by dispatcher, by state (whose union is every job)."""
    out: dict[str, set[str]] = {}
    for job_id, record in records.items():
        out.setdefault(part.index_by(record["spec"]["dispatchedBy"]), set()).add(job_id)
        out.setdefault(part.index_state(record["state"]), set()).add(job_id)
    return out


async def read_last(q: agentq.Client, part: Partition) -> tuple[str, int] | None:
    entries: Any = await q.redis.xrevrange(part.log, count=1)
    if not entries:
        return None
    event_id, fields = entries[0]
    return str(event_id), int(fields["at"])


async def assert_views_match_log(q: agentq.Client, parts: Sequence[Partition]) -> None:
    """Each partition's indexes are exactly what its log implies, and its
    position is the log's last event (with that event's time)."""
    for part in parts:
        records = await derived(q, part)
        live = await live_views(q, part)
        expected = expected_views(part, records)
        if live != expected:
            diff = []
            for key in sorted(set(live) | set(expected)):
                missing = sorted(expected.get(key, set()) - live.get(key, set()))
                extra = sorted(live.get(key, set()) - expected.get(key, set()))
                if missing or extra:
                    diff.append(f"{key.split(':', 2)[2]}: {len(missing)} missing "
                                f"{missing[:2]}, {len(extra)} extra {extra[:2]}")
            pytest.fail(f"views of agent {part.agent} differ from its log "
                        f"({len(records)} jobs): " + "; ".join(diff))
        # No count off by one: the size of each state index is the log's count.
        states = Counter(r["state"] for r in records.values())
        for state in STATES:
            assert await index_size(q, part.index_state(state)) == states.get(state, 0), state
        last = await read_last(q, part)
        proj = await q.redis.hgetall(part.projection)
        if last is None:
            assert proj == {}
        else:
            # The events of each type the projection applied (agentq_jobs_total).
            applied = Counter(f["type"] for _, f in await q.redis.xrange(part.log))
            assert proj == {"pos": last[0], "lastActivityAt": str(last[1]),
                            **{f"n:{t}": str(n) for t, n in applied.items()}}, part.agent


def newest_first(job_ids: Sequence[str]) -> list[str]:
    return sorted(job_ids, reverse=True)


# -- the hypothesis test: live views == views rebuilt from the log -----------

agents_st = st.sampled_from(AGENTS)
callers_st = st.sampled_from(CALLERS)
picks = st.integers(0, 10**6)

ops = st.one_of(
    st.tuples(st.just("dispatch"), callers_st, agents_st,
              st.sampled_from(("now", "now", "now", "later", "soon", "dep"))),
    st.tuples(st.just("batch"), callers_st, st.lists(agents_st, min_size=1, max_size=6)),
    st.tuples(st.just("start"), agents_st, st.integers(1, 4)),
    st.tuples(st.just("complete"), picks),
    st.tuples(st.just("fail"), picks, st.sampled_from(("none", "later")), st.integers(1, 3)),
    st.tuples(st.just("cancel"), picks, callers_st),
    st.tuples(st.just("retry"), picks),
    st.tuples(st.just("drain"), agents_st),
    st.tuples(st.just("promote"), agents_st),
    # The views are updated in between, by every path that updates them.
    st.tuples(st.just("project"),
              st.sampled_from(("group", "group", "catch_up", "list", "reapply", "recover")),
              agents_st, callers_st, st.integers(1, 8)),
)


class History:
    """One example: a fresh key prefix, a client, the jobs made so far."""

    def __init__(self, q: agentq.Client) -> None:
        self.q = q
        self.order: list[str] = []
        self.parties: dict[str, tuple[str, str]] = {}  # job id -> (dispatcher, target)
        self.projector = Projector(q.redis, q.redis, q.keys, consumer="hypothesis")
        self.projection = Projection(q.redis)

    def pick(self, n: int) -> str | None:
        return self.order[n % len(self.order)] if self.order else None

    def part_of(self, job_id: str) -> Partition:
        return self.q.partition(job_id.rsplit(".", 1)[-1])

    async def attempt(self, job_id: str) -> int:
        return int(await self.q.redis.hget(self.part_of(job_id).job(job_id), "attempt") or 0)

    async def run(self, op: tuple[Any, ...]) -> None:
        q, kind = self.q, op[0]
        if kind == "dispatch":
            _, caller, target, how = op
            fields: dict[str, Any] = {}
            if how == "later":
                fields["delay_seconds"] = 3600
            elif how == "soon":
                fields["delay_seconds"] = 0.001
            elif how == "dep":
                # Only a job the caller may view can be depended on (SPEC: dispatched
                # by it or targeting it; a system agent may depend on any).
                viewable = [j for j in self.order
                            if caller == "main" or caller in self.parties[j]]
                if viewable:
                    fields["depends_on"] = [viewable[-1]]
            view = await q.dispatch(target, f"task {len(self.order)}", caller=caller,
                                    max_attempts=2, **fields)
            self.order.append(view.job_id)
            self.parties[view.job_id] = (caller, target)
        elif kind == "batch":
            _, caller, targets = op
            views = await q.dispatch_many(
                [{"target": t, "task": f"batch task {i}", "maxAttempts": 1}
                 for i, t in enumerate(targets)], caller=caller)
            self.order += [v.job_id for v in views]
            self.parties.update((v.job_id, (caller, v.target)) for v in views)
        elif kind == "start":
            _, agent, want = op
            await q.scripts.start(q.partition(agent), WORKER, LEASE_MS, want)
        elif kind == "complete":
            job_id = self.pick(op[1])
            if job_id:
                await q.scripts.complete(self.part_of(job_id), WORKER,
                                         [(job_id, await self.attempt(job_id), b'"ok"')])
        elif kind == "fail":
            job_id = self.pick(op[1])
            if job_id:
                backoff = NO_BACKOFF if op[2] == "none" else LATER
                await q.scripts.fail(self.part_of(job_id), WORKER, job_id,
                                     await self.attempt(job_id), f"boom {op[3]}", backoff)
        elif kind == "cancel":
            job_id = self.pick(op[1])
            if job_id:
                with suppress(AgentqError):
                    await q.cancel(job_id, caller=op[2])
        elif kind == "retry":
            job_id = self.pick(op[1])
            if job_id:
                with suppress(AgentqError):
                    await q.retry(job_id)
        elif kind == "drain":
            await q.drain(op[1])
        elif kind == "promote":
            part = q.partition(op[1])
            due = [str(j) for j in await q.redis.zrange(part.delayed, 0, -1)]
            if due:
                await asyncio.sleep(0.002)
                await q.scripts.promote(part, "scheduler", due)
        elif kind == "project":
            _, how, agent, caller, n = op
            part = q.partition(agent)
            if how == "group":
                await self.projector.process_once(None)
            elif how == "recover":
                await self.projector.recover()
            elif how == "catch_up":
                await self.projection.catch_up([part])
            elif how == "list":
                await q.list(caller=caller, limit=n)
            else:  # apply the partition's last n events again: nothing changes
                before = await live_views(q, part), await q.redis.hgetall(part.projection)
                if before[1]:
                    events = await read_partition(q.redis, part)
                    pos = str(before[1]["pos"])
                    applied_upto = [e for e in events if _le(e.event_id, pos)]
                    again = await self.projection.apply(part, applied_upto[-n:])
                    assert again == 0
                    after = await live_views(q, part), await q.redis.hgetall(part.projection)
                    assert after == before


def _le(a: str, b: str) -> bool:
    am, as_ = a.split("-")
    bm, bs = b.split("-")
    return (int(am), int(as_)) <= (int(bm), int(bs))


async def _one_history(url: str, steps: list[tuple[Any, ...]]) -> None:
    prefix = f"hp{uuid.uuid4().hex[:10]}"
    config = Config.model_validate({"keyPrefix": prefix, "rateLimit": NO_RATE_LIMIT})
    async with agentq.connect(url, config) as q:
        try:
            for agent in AGENTS:
                await q.add_agent(agent)
                await ensure_work_groups(q.redis, q.partition(agent))
            history = History(q)
            for step in steps:
                await history.run(step)
            parts = [q.partition(a) for a in AGENTS]

            # The live views, brought up to the end of the logs as a query would.
            await Projection(q.redis).catch_up(parts)
            live = {p.agent: (await live_views(q, p), await q.redis.hgetall(p.projection))
                    for p in parts}
            await assert_views_match_log(q, parts)

            # What a query shows agrees with the log.
            everything = await q.list(caller="main", limit=100)
            if len(history.order) <= 100:
                assert [j.job_id for j in everything.jobs] == newest_first(history.order)
                assert everything.next_cursor is None
            for caller in ("a", "x"):
                records = {j: r for p in parts for j, r in (await derived(q, p)).items()}
                mine = [j for j, r in records.items()
                        if caller in (r["spec"]["dispatchedBy"], r["spec"]["target"])]
                seen = await q.list(caller=caller, limit=100)
                assert [j.job_id for j in seen.jobs] == newest_first(mine)[:100]
            activity = await q.activity(caller="main")
            for p in parts:
                states = Counter(r["state"] for r in (await derived(q, p)).values())
                entry = activity["agents"][p.agent]
                assert (entry["queued"], entry["delayed"], entry["active"],
                        entry["waitingDependencies"], entry["completed"], entry["failed"]) == (
                    states["queued"], states["delayed"], states["active"],
                    states["waiting_dependencies"], states["completed"], states["failed"])

            # Rebuilt from the log into the same keys: identical.
            await rebuild(q.redis, parts)
            rebuilt = {p.agent: (await live_views(q, p), await q.redis.hgetall(p.projection))
                       for p in parts}
            assert rebuilt == live
        finally:
            keys = [k async for k in q.redis.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await q.redis.delete(*keys[i : i + 500])


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(steps=st.lists(ops, min_size=1, max_size=40))
def test_live_views_equal_views_rebuilt_from_the_log(
    redis_url: str, steps: list[tuple[Any, ...]]
) -> None:
    with asyncio.Runner() as runner:
        runner.run(_one_history(redis_url, steps))


# -- a projector killed in the middle of a batch -------------------------------


class ProjectorProcess(LineProcess):
    """A projector subprocess; its stdout lines are collected as they come."""

    name = "projector process"
    poll_seconds = 0.005

    @property
    def applied(self) -> int:
        return self.count("APPLIED ")


@pytest.fixture
async def spawn_projector(
    redis_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[ProjectorProcess]]]:
    started: list[ProjectorProcess] = []

    async def start(config: Config, sleep_ms: int = 0,
                    claim_idle_ms: int = 300) -> ProjectorProcess:
        stderr_path = tmp_path / f"projector{len(started)}.stderr"
        env = {**os.environ, "PROJ_SLEEP_MS": str(sleep_ms),
               "PROJ_CLAIM_IDLE_MS": str(claim_idle_ms), "PROJ_BLOCK_SECONDS": "0.2"}
        config_json = config.model_dump_json(by_alias=True, exclude_none=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(PROJECTOR_PROC), redis_url, config_json, cwd=ROOT, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            )
        projector = ProjectorProcess(proc, stderr_path)
        started.append(projector)
        return projector

    yield start
    for projector in started:
        await projector.close()


async def _history(q: agentq.Client, jobs_per_agent: int) -> list[str]:
    """Dispatches to every agent by every caller, then starts, completions,
    failures and cancels: several events per job, none of them projected."""
    made: list[str] = []
    for round_ in range(jobs_per_agent // 10):
        for agent in AGENTS:
            views = await q.dispatch_many(
                [{"target": agent, "task": f"t{round_}.{i}", "maxAttempts": 1}
                 for i in range(10)], caller=CALLERS[round_ % len(CALLERS)])
            made += [v.job_id for v in views]
    for agent in AGENTS:
        part = q.partition(agent)
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, jobs_per_agent // 2)
        ids = [s.job_id for s in started]
        await q.scripts.complete(part, WORKER, [(j, 1, b"1") for j in ids[0::3]])
        for job_id in ids[1::3]:
            await q.scripts.fail(part, WORKER, job_id, 1, "boom", NO_BACKOFF)
    for job_id in made[-jobs_per_agent // 4:]:
        with suppress(AgentqError):
            await q.cancel(job_id, caller="main")
    return made


async def _group_state(q: agentq.Client, part: Partition) -> tuple[int, str]:
    """(entries pending in the projector group, its last delivered id)."""
    groups = {g["name"]: g for g in await q.redis.xinfo_groups(part.log)}
    group = groups["projector"]
    return int(group["pending"]), str(group["last-delivered-id"])


async def _settled(q: agentq.Client, parts: Sequence[Partition], timeout: float = 20) -> None:
    """Wait until, for every partition, the projection's position is the log's
    end and the projector group has nothing pending (without any query)."""
    deadline = time.monotonic() + timeout
    while True:
        state = []
        for part in parts:
            pos = await q.redis.hget(part.projection, "pos")
            end = (await read_last(q, part) or ("0-0", 0))[0]
            pending, delivered = await _group_state(q, part)
            state.append((part.agent, pos, end, pending, delivered))
        if all(pos == end == delivered and pending == 0 for _, pos, end, pending, delivered
               in state):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the projector did not settle: (agent, pos, end, pending, "
                        f"delivered) = {state}")
        await asyncio.sleep(0.05)


async def _kill_mid_batch(
    q: agentq.Client, spawn: Callable[..., Awaitable[ProjectorProcess]]
) -> ProjectorProcess:
    first = await spawn(q.config, sleep_ms=4)
    await first.ready()
    await first.wait_for(lambda: first.applied >= 60, "60 events applied")
    await first.kill()
    # Killed in the middle of a batch: some of it applied, none of it acknowledged.
    pending = [(await _group_state(q, q.partition(a)))[0] for a in AGENTS]
    assert sum(pending) > 0, pending
    applied_pos = [await q.redis.hget(q.partition(a).projection, "pos") for a in AGENTS]
    assert any(applied_pos), "the killed projector applied nothing"
    return first


async def test_projector_killed_mid_batch_resumes_after_claim(
    q: agentq.Client, spawn_projector: Callable[..., Awaitable[ProjectorProcess]],
) -> None:
    """Killed mid-batch; a new projector takes the dead one's entries over
    (after they have been idle for CLAIM_IDLE_MS) and finishes the job."""
    await _history(q, jobs_per_agent=100)
    parts = [q.partition(a) for a in AGENTS]
    await _kill_mid_batch(q, spawn_projector)
    await asyncio.sleep(0.5)  # past the new process's CLAIM_IDLE_MS (300 ms)
    second = await spawn_projector(q.config, claim_idle_ms=300)
    await second.ready()
    await _settled(q, parts)
    await assert_views_match_log(q, parts)


async def test_projector_killed_mid_batch_while_the_log_grows(
    q: agentq.Client, spawn_projector: Callable[..., Awaitable[ProjectorProcess]],
) -> None:
    """Killed mid-batch; jobs go on being dispatched and changing state, and a
    projector is back before the dead one's entries count as abandoned (in
    production CLAIM_IDLE_MS is 30 s, a restart takes a second). It reads the
    new events first and takes the old ones over later: every event must still
    reach the views."""
    await _history(q, jobs_per_agent=100)
    parts = [q.partition(a) for a in AGENTS]
    await _kill_mid_batch(q, spawn_projector)
    more = await _history(q, jobs_per_agent=20)
    second = await spawn_projector(q.config, claim_idle_ms=3000)
    await second.ready()
    await _settled(q, parts)
    assert more
    await assert_views_match_log(q, parts)


async def test_two_projector_processes_share_the_group(
    q: agentq.Client, spawn_projector: Callable[..., Awaitable[ProjectorProcess]],
) -> None:
    """Every worker and ``run`` process hosts a projector in the same group
    (SPEC: more processes share the load): two at once, each taking its own
    batches of one partition's log, must still give the views the log implies."""
    first = await spawn_projector(q.config, sleep_ms=2)
    second = await spawn_projector(q.config, sleep_ms=2)
    await first.ready()
    await second.ready()
    parts = [q.partition(a) for a in AGENTS]
    for _ in range(6):
        await _history(q, jobs_per_agent=30)
        await asyncio.sleep(0.05)
    await _settled(q, parts, timeout=40)
    assert first.applied and second.applied, (first.applied, second.applied)
    await assert_views_match_log(q, parts)


# -- paging -------------------------------------------------------------------


async def _paging_history(q: agentq.Client) -> list[str]:
    """45 jobs over three agents by five callers; a few end failed, some
    completed, one is cancelled. Returns the ids in dispatch order."""
    order: list[str] = []
    for i in range(45):
        view = await q.dispatch(AGENTS[i % 3], f"job {i}", caller=CALLERS[(i // 3) % 5],
                                max_attempts=1)
        order.append(view.job_id)
    for agent in AGENTS:
        part = q.partition(agent)
        await ensure_work_groups(q.redis, part)
        started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 15)
        ids = [s.job_id for s in started]
        for job_id in ids[2::5]:  # 3 per agent
            assert await q.scripts.fail(part, WORKER, job_id, 1, "boom", NO_BACKOFF) == "failed"
        await q.scripts.complete(part, WORKER, [(j, 1, b"1") for j in ids[0::4]])
    await q.cancel(order[10], caller="main")  # an active job of b
    return order


async def _pages(q: agentq.Client, limit: int, **query: Any) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        out = await q.list(limit=limit, cursor=cursor, **query)
        assert out.count == len(out.jobs)
        pages.append([j.job_id for j in out.jobs])
        cursor = out.next_cursor
        if cursor is None:
            return pages
        assert cursor == out.jobs[-1].job_id
        assert len(pages) < 100, "paging does not end"


@pytest.mark.both_backends
async def test_paging_with_a_filter_that_removes_most_jobs(q: agentq.Client) -> None:
    order = await _paging_history(q)
    assert order == sorted(order)  # newest first is greatest id first
    records = {}
    for agent in AGENTS:
        records.update(await derived(q, q.partition(agent)))
    assert len(records) == 45

    def expect(caller: str, agent: str | None = None, dispatched_by: str | None = None,
               states: Sequence[str] | None = None) -> list[str]:
        out = []
        for job_id in reversed(order):
            r = records[job_id]
            spec = r["spec"]
            if caller != "main" and caller not in (spec["dispatchedBy"], spec["target"]):
                continue
            if agent and spec["target"] != agent:
                continue
            if dispatched_by and spec["dispatchedBy"] != dispatched_by:
                continue
            if states and r["state"] not in states:
                continue
            out.append(job_id)
        return out

    cases: list[tuple[str, dict[str, Any]]] = [
        ("main", {"state": ["failed"]}),
        ("main", {"state": ["failed", "cancelled"]}),
        ("main", {"dispatched_by": "b", "state": ["completed"]}),
        ("main", {"agent": "c", "state": ["queued"]}),
        ("main", {}),
        ("a", {}),
        ("a", {"state": ["failed"]}),
        ("b", {"state": ["queued", "failed"]}),
        ("b", {"agent": "c"}),
        ("c", {"dispatched_by": "b"}),
        ("x", {}),
        ("x", {"state": ["active"]}),
        ("x", {"dispatched_by": "a"}),
    ]
    for caller, query in cases:
        wanted = expect(caller, query.get("agent"), query.get("dispatched_by"),
                        query.get("state"))
        if query:
            assert len(wanted) < 15, (caller, query, len(wanted))  # most jobs filtered out
        for limit in (1, 2, 3, 4, 7, 100):
            pages = await _pages(q, limit, caller=caller, **query)
            where = f"caller={caller} query={query} limit={limit}: pages={pages}"
            for page in pages[:-1]:
                assert len(page) == limit, where
            assert len(pages[-1]) <= limit, where
            assert pages[-1] or len(pages) == 1, f"an empty last page: {where}"
            flat = [j for page in pages for j in page]
            assert len(flat) == len(set(flat)), f"a job repeated: {where}"
            assert flat == wanted, where


@pytest.mark.both_backends
async def test_list_cursor_after_a_job_from_another_page_of_jobs(q: agentq.Client) -> None:
    """A cursor is a job id: the next page starts right after it, whatever
    jobs were dispatched since (they are newer, so they are not on it)."""
    order = await _paging_history(q)
    first = await q.list(caller="main", limit=10)
    for i in range(5):
        await q.dispatch("a", f"late {i}", caller="b")
    rest = await q.list(caller="main", limit=100, cursor=first.next_cursor)
    assert [j.job_id for j in first.jobs] + [j.job_id for j in rest.jobs] == list(reversed(order))


# -- never stale -----------------------------------------------------------------


@pytest.mark.both_backends
async def test_list_sees_a_job_the_moment_its_dispatch_returns(q: agentq.Client) -> None:
    """No projector runs anywhere: the query brings the views up to date."""
    part = q.partition("b")
    for i in range(20):
        view = await q.dispatch("b", f"job {i}", caller="a")
        seen = await q.list(caller="a", limit=1)
        assert [j.job_id for j in seen.jobs] == [view.job_id]
        assert seen.jobs[0].state == "queued"
        by_target = await q.list(caller="b", agent="b", state=["queued"], limit=1)
        assert [j.job_id for j in by_target.jobs] == [view.job_id]
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, WORKER, LEASE_MS, 1)
    (active,) = (await q.list(caller="a", state=["active"])).jobs
    assert active.job_id == started[0].job_id
    await q.scripts.complete(part, WORKER, [(active.job_id, 1, b'"done"')])
    (done,) = (await q.list(caller="main", state=["completed"])).jobs
    assert (done.job_id, done.result) == (active.job_id, "done")
    assert (await q.list(caller="a", state=["active"])).jobs == []
    activity = await q.activity(["b"], caller="main")
    assert activity["agents"]["b"]["completed"] == 1
    assert activity["agents"]["b"]["queued"] == 19
    assert activity["agents"]["b"]["lastActivityAt"] is not None


# -- activity with real worker processes -------------------------------------------


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def ready(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while not any(x.startswith("READY ") for x in self.lines):
            if time.monotonic() > deadline or self.proc.returncode is not None:
                err = self.stderr_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"worker: no READY; stdout={self.lines!r} stderr={err}")
            await asyncio.sleep(0.01)
        return next(x for x in self.lines if x.startswith("READY ")).split(" ", 1)[1]

    async def close(self) -> None:
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=5)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def spawn_worker(
    redis_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[WorkerProcess]]]:
    started: list[WorkerProcess] = []

    async def start(config: Config, agent: str, handler: str) -> WorkerProcess:
        stderr_path = tmp_path / f"worker{len(started)}.stderr"
        config_json = config.model_dump_json(by_alias=True, exclude_none=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(WORKER_PROC), redis_url, config_json, agent, "python",
                handler, "1", cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=err,
            )
        worker = WorkerProcess(proc, stderr_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.close()


async def _poll(check: Callable[[], Awaitable[bool]], what: str, timeout: float) -> float:
    """Poll ``check`` every 20 ms; the seconds it took to hold."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > timeout:
            pytest.fail(f"not {what} within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - began


@pytest.mark.both_backends
async def test_activity_idle_working_and_offline_after_sigkill(
    redis_url: str, make_config: Callable[..., Config],
    spawn_worker: Callable[..., Awaitable[WorkerProcess]],
) -> None:
    heartbeat = 1.5
    config = make_config(rateLimit=NO_RATE_LIMIT,
                         workers={"heartbeatTimeoutSeconds": heartbeat})
    async with agentq.connect(redis_url, config) as q:
        for agent in AGENTS:
            await q.add_agent(agent)

        async def entry(agent: str = "a") -> dict[str, Any]:
            out: dict[str, Any] = (await q.activity(caller="main"))["agents"][agent]
            return out

        before = await entry()
        assert (before["status"], before["workers"], before["currentJobs"]) == ("offline", 0, [])

        worker = await spawn_worker(config, "a", "worker_proc:sleep_long")
        await worker.ready()
        idle = await entry()
        assert (idle["status"], idle["workers"], idle["active"]) == ("idle", 1, 0)

        task = "analyse " + "the quarterly figures and write a long summary " * 5
        assert len(task) > 80
        view = await q.dispatch("a", task, caller="b", label="figures")

        async def working() -> bool:
            return bool((await entry())["status"] == "working")

        await _poll(working, "working", 15)
        busy = await entry()
        assert busy["workers"] == 1 and busy["active"] == 1
        assert busy["currentJobs"] == [{"jobId": view.job_id, "label": "figures",
                                        "task": task[:80]}]
        assert len(busy["currentJobs"][0]["task"]) == 80
        assert busy["lastActivityAt"] is not None
        summary = (await q.activity(caller="main"))["summary"]
        assert (summary["working"], summary["offline"], summary["active"]) == (1, 2, 1)

        # Other agents are still offline; b is idle as soon as a worker serves it.
        other = await spawn_worker(config, "b", "worker_proc:sleep_long")
        await other.ready()
        assert (await entry("b"))["status"] == "idle"
        assert (await entry("c"))["status"] == "offline"

        worker.proc.kill()
        killed = time.monotonic()
        assert await asyncio.wait_for(worker.proc.wait(), 5) == -signal.SIGKILL

        async def offline() -> bool:
            return bool((await entry())["status"] == "offline")

        await _poll(offline, "offline", heartbeat + 2)
        took = time.monotonic() - killed
        assert took <= heartbeat + 0.3, f"offline only {took:.2f} s after the kill"
        gone = await entry()
        # Offline whatever is active: the job still holds its lease.
        assert (gone["workers"], gone["active"]) == (0, 1)
        assert [j["jobId"] for j in gone["currentJobs"]] == [view.job_id]
        assert (await entry("b"))["status"] == "idle"


@pytest.mark.both_backends
async def test_activity_worker_stopping_cleanly_goes_offline_at_once(
    redis_url: str, make_config: Callable[..., Config],
    spawn_worker: Callable[..., Awaitable[WorkerProcess]],
) -> None:
    config = make_config(rateLimit=NO_RATE_LIMIT, workers={"heartbeatTimeoutSeconds": 30})
    async with agentq.connect(redis_url, config) as q:
        await q.add_agent("a")
        worker = await spawn_worker(config, "a", "worker_proc:sleep_briefly")
        await worker.ready()
        assert (await q.activity(["a"], caller="main"))["agents"]["a"]["status"] == "idle"
        await worker.close()
        out = (await q.activity(["a"], caller="main"))["agents"]["a"]
        assert (out["status"], out["workers"]) == ("offline", 0)


async def test_rebuild_tells_how_far_it_is(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild tells each partition's events read as it goes (``ticker.EVERY_S``
    0: each page), then the events applied."""
    monkeypatch.setattr(ticker, "EVERY_S", 0)
    await q.dispatch_many([{"target": "a", "task": f"t {i}"} for i in range(2500)])
    await q.dispatch("b", "one")
    told: list[tuple[str, int]] = []
    applied = await rebuild(q.redis, [q.partition("a"), q.partition("b")],
                            lambda agent, n: told.append((agent, n)))
    assert applied == 2501
    on_a = [n for agent, n in told if agent == "a"]
    assert len(on_a) >= 3 and on_a == sorted(on_a) and on_a[-1] == 2500
    assert told[-1] == ("b", 1)
    assert [agent for agent, _ in told] == sorted(agent for agent, _ in told)
