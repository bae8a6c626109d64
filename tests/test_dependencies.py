"""Dependencies, end to end, on a real server with in-process workers.

Chains, diamonds and fan-ins; dependencies within one agent and across
agents; the view while waiting; failure cascades, ``ignore``, re-arming on
retry, delays, cancelled dependencies; the registration/completion race; and
``announce``. Every test ends by checking rule 1 over the whole deployment: a
rebuild of every state record from the log equals the live records.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

import agentq
from agentq.consumers.background import Background
from agentq.consumers.gates import Gates
from agentq.consumers.handlers import Job
from agentq.eventlog import fold, reader, registry
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas._base import iso_to_micros
from agentq.schemas.events import StoredEvent
from agentq.schemas.job import JobView

pytestmark = pytest.mark.both_backends  # whole flows: again on a local Redis Cluster (conftest)

Handler = Callable[[Job], Awaitable[Any]]
TESTER = "tester"


# -- helpers -------------------------------------------------------------------


@asynccontextmanager
async def running_workers(
    q: agentq.Client, handlers: Mapping[str, Handler], concurrency: int = 4
) -> AsyncIterator[None]:
    """One worker per agent; the first also hosts the background consumers."""
    runs = [
        q.worker(agent, handler, concurrency=concurrency, background=(i == 0))
        for i, (agent, handler) in enumerate(handlers.items())
    ]
    tasks = [asyncio.create_task(run.run()) for run in runs]
    try:
        yield
    finally:
        for run in runs:
            run.stop()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome


@asynccontextmanager
async def running_background(q: agentq.Client) -> AsyncIterator[None]:
    """The background consumers (gates, scheduler, reclaimer) without any worker."""
    stop = asyncio.Event()
    background = Background(q.redis, q.open_blocking, q.keys, q.config)
    task = asyncio.create_task(background.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.01)


async def gates_settled(q: agentq.Client) -> bool:
    """Has the ``gates`` group read and acknowledged every event of every log?"""
    for agent in await registry.all_partitions(q.redis, q.keys):
        log = q.partition(agent).log
        last = await q.redis.xrevrange(log, count=1)
        if not last:
            continue
        groups = await q.redis.xinfo_groups(log)
        gates = [g for g in groups if g["name"] == "gates"]
        if not gates or gates[0]["pending"] or gates[0]["last-delivered-id"] != last[0][0]:
            return False
    return True


async def settle(q: agentq.Client, timeout: float = 15) -> None:
    await until(lambda: gates_settled(q), timeout, "the gates to handle every event")


async def finished(q: agentq.Client, job_id: str, timeout: float = 20) -> JobView:
    view, timed_out = await q.wait(job_id, timeout=timeout)
    assert not timed_out, view
    return view


async def state_of(q: agentq.Client, job_id: str) -> str:
    return (await q.status(job_id)).state


async def reaches(q: agentq.Client, job_id: str, state: str, timeout: float = 15) -> None:
    async def check() -> bool:
        return await state_of(q, job_id) == state

    await until(check, timeout, f"{job_id} to be {state}")


def of_type(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.type == kind]


def micros(event: StoredEvent) -> int:
    return iso_to_micros(event.at)


async def start_and_complete(q: agentq.Client, job_id: str, result: Any) -> None:
    """Finish a queued job by hand (start + complete scripts), as a worker would."""
    part = q.partition(job_id.rsplit(".", 1)[1])
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, TESTER, 60_000, 1000)
    assert job_id in [s.job_id for s in started], (job_id, started)
    outcomes = await q.scripts.complete(
        part, TESTER, [(s.job_id, int(s.record["attempt"]), orjson.dumps(result))
                       for s in started]
    )
    assert outcomes == [None] * len(started)


async def assert_rebuild_equals_live(q: agentq.Client) -> None:
    """Rule 1 across every partition: fold.records_from(the log) == every live record,
    and each partition's counts match the rebuilt states."""
    agents = await registry.all_partitions(q.redis, q.keys)
    parts = [q.partition(agent) for agent in agents]
    events = [event async for event in reader.replay(q.redis, parts)]
    rebuilt = fold.records_from(events)
    live: dict[str, Any] = {}
    for part in parts:
        live.update((j, normalize(r)) for j, r in (await reader.all_records(q.redis, part)).items())
    if rebuilt != live:
        diffs = []
        for job_id in sorted(set(rebuilt) | set(live)):
            a, b = rebuilt.get(job_id, {}), live.get(job_id, {})
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    diffs.append(f"{job_id}.{name}: fold {a.get(name)!r} != live {b.get(name)!r}")
        pytest.fail("fold.records_from differs from the live records:\n" + "\n".join(diffs[:40]))
    for part in parts:
        counts = {s: int(n) for s, n in (await q.redis.hgetall(part.counts)).items() if int(n)}
        expected = Counter(r["state"] for j, r in rebuilt.items() if j.endswith(f".{part.agent}"))
        assert counts == dict(expected), (part.agent, counts, expected)


async def announcements(q: agentq.Client, agents: tuple[str, ...] = ("a", "b", "c")) -> list[
    StoredEvent
]:
    """Every announce job's JobDispatched event, in the given partitions."""
    found = []
    for agent in agents:
        for event in await reader.read_partition(q.redis, q.partition(agent), count=100_000,
                                                 payloads=True):
            if event.type == "JobDispatched" and (event.data.get("metadata") or {}).get(
                "announceFor"
            ):
                found.append(event.stored())
    return found


def dep_seen(job: Job) -> dict[str, tuple[str, Any, str | None]]:
    return {d: (v.state, v.result, v.error) for d, v in job.view.dependencies.items()}


# -- chains, diamonds, fan-ins ------------------------------------------------------


async def test_chain_of_50_across_two_agents_runs_in_order(q: agentq.Client) -> None:
    seen: dict[int, dict[str, tuple[str, Any, str | None]]] = {}
    order: list[int] = []

    async def handler(job: Job) -> str:
        n = int(job.task.split()[1])
        order.append(n)
        seen[n] = dep_seen(job)
        return f"r{n}"

    ids: list[str] = []
    for n in range(50):
        agent = "ab"[n % 2]
        view = await q.dispatch(agent, f"link {n}", caller="c", depends_on=ids[-1:])
        assert view.state == ("queued" if n == 0 else "waiting_dependencies")
        ids.append(view.job_id)

    async with running_workers(q, {"a": handler, "b": handler}):
        last = await finished(q, ids[-1])
    assert last.state == "completed" and last.result == "r49"
    assert order == list(range(50))
    assert seen[0] == {}
    for n in range(1, 50):
        assert seen[n] == {ids[n - 1]: ("completed", f"r{n - 1}", None)}, n
    # By the log's own times: each link starts only after its dependency completed.
    previous_completed = 0
    for n, job_id in enumerate(ids):
        events = await q.history(job_id)
        (started,) = of_type(events, "JobStarted")
        (completed,) = of_type(events, "JobCompleted")
        assert micros(started) >= previous_completed, n
        previous_completed = micros(completed)
        if n:
            (resolved,) = of_type(events, "DependencyResolved")
            assert resolved.data == {"dependencyId": ids[n - 1], "state": "completed",
                                     "result": f"r{n - 1}"}
            (queued,) = of_type(events, "JobQueued")
            assert queued.data == {"reason": "released"}
    await assert_rebuild_equals_live(q)


async def test_diamond_joins_both_results(q: agentq.Client) -> None:
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}

    async def handler(job: Job) -> Any:
        seen[job.task] = dep_seen(job)
        return {"from": job.task}

    top = await q.dispatch("a", "A", caller="c")
    left = await q.dispatch("b", "B", caller="c", depends_on=[top.job_id])
    right = await q.dispatch("c", "C", caller="a", depends_on=[top.job_id])
    bottom = await q.dispatch("a", "D", caller="c", depends_on=[left.job_id, right.job_id])
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        view = await finished(q, bottom.job_id)
    assert view.state == "completed"
    assert seen["B"] == {top.job_id: ("completed", {"from": "A"}, None)}
    assert seen["C"] == {top.job_id: ("completed", {"from": "A"}, None)}
    assert seen["D"] == {
        left.job_id: ("completed", {"from": "B"}, None),
        right.job_id: ("completed", {"from": "C"}, None),
    }
    assert {d: v.state for d, v in view.dependencies.items()} == {
        left.job_id: "completed", right.job_id: "completed"
    }
    events = await q.history(bottom.job_id)
    assert sorted(e.data["dependencyId"] for e in of_type(events, "DependencyResolved")) == sorted(
        [left.job_id, right.job_id]
    )
    assert len(of_type(events, "JobQueued")) == 1
    await assert_rebuild_equals_live(q)


async def test_fan_in_of_20(q: agentq.Client) -> None:
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}

    async def handler(job: Job) -> Any:
        seen[job.task] = dep_seen(job)
        return job.task.upper()

    sources = [await q.dispatch("abc"[i % 3], f"src{i}", caller="a") for i in range(20)]
    sink = await q.dispatch("a", "sink", caller="a", depends_on=[s.job_id for s in sources])
    assert sink.state == "waiting_dependencies"
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        view = await finished(q, sink.job_id)
    assert view.state == "completed"
    assert seen["sink"] == {s.job_id: ("completed", f"SRC{i}", None)
                            for i, s in enumerate(sources)}
    events = await q.history(sink.job_id)
    resolved = of_type(events, "DependencyResolved")
    assert sorted(e.data["dependencyId"] for e in resolved) == sorted(s.job_id for s in sources)
    (queued,) = of_type(events, "JobQueued")
    last_source_done = max([
        micros(of_type(await q.history(s.job_id), "JobCompleted")[0]) for s in sources
    ])
    assert micros(queued) >= last_source_done
    await assert_rebuild_equals_live(q)


async def test_dependencies_within_one_agent_and_across_agents(q: agentq.Client) -> None:
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}

    async def handler(job: Job) -> Any:
        seen[job.task] = dep_seen(job)
        return f"{job.task} done"

    # Dispatched before any process runs, and after: both must be released.
    dep_a = await q.dispatch("a", "dep-a", caller="b")
    same = await q.dispatch("a", "same", caller="b", depends_on=[dep_a.job_id])
    across = await q.dispatch("b", "across", caller="a", depends_on=[dep_a.job_id])
    async with running_workers(q, {"a": handler, "b": handler}):
        for job in (same, across):
            assert (await finished(q, job.job_id)).state == "completed"
        dep_b = await q.dispatch("b", "dep-b", caller="a")
        same_b = await q.dispatch("b", "same-b", caller="a", depends_on=[dep_b.job_id])
        across_b = await q.dispatch("a", "across-b", caller="a", depends_on=[dep_b.job_id])
        both = await q.dispatch("c", "both", caller="a",
                                depends_on=[dep_a.job_id, dep_b.job_id])
        for job in (same_b, across_b):
            assert (await finished(q, job.job_id)).state == "completed"
        # Nobody serves c: "both" is released to queued and stays there.
        await reaches(q, both.job_id, "queued")
    assert seen["same"] == seen["across"] == {dep_a.job_id: ("completed", "dep-a done", None)}
    assert seen["same-b"] == seen["across-b"] == {dep_b.job_id: ("completed", "dep-b done", None)}
    view = await q.status(both.job_id)
    assert not view.waiting_for_dependencies
    assert {d: (v.state, v.result) for d, v in view.dependencies.items()} == {
        dep_a.job_id: ("completed", "dep-a done"), dep_b.job_id: ("completed", "dep-b done")
    }
    # An already-completed dependency is resolved at registration, by the gate.
    events = await q.history(both.job_id)
    assert [e.actor for e in of_type(events, "DependencyResolved")] == ["system", "system"]
    await assert_rebuild_equals_live(q)


# -- waiting --------------------------------------------------------------------------


async def test_waiting_view_shows_each_dependency(q: agentq.Client) -> None:
    first = await q.dispatch("b", "first", caller="a")
    second = await q.dispatch("c", "second", caller="a")
    waiting = await q.dispatch("a", "joins", caller="a",
                               depends_on=[first.job_id, second.job_id])
    assert waiting.state == "waiting_dependencies"
    assert waiting.waiting_for_dependencies is True
    view = await q.status(waiting.job_id, caller="a")
    assert view.waiting_for_dependencies is True
    assert {d: (v.state, v.result) for d, v in view.dependencies.items()} == {
        first.job_id: ("queued", None), second.job_id: ("queued", None)
    }
    async with running_background(q):
        await start_and_complete(q, first.job_id, {"n": 1})

        async def first_resolved() -> bool:
            return bool(of_type(await q.history(waiting.job_id), "DependencyResolved"))

        await until(first_resolved, what="the first dependency to resolve")
        view = await q.status(waiting.job_id)
        assert view.state == "waiting_dependencies" and view.waiting_for_dependencies
        assert {d: (v.state, v.result) for d, v in view.dependencies.items()} == {
            first.job_id: ("completed", {"n": 1}), second.job_id: ("queued", None)
        }
        await start_and_complete(q, second.job_id, "two")
        await reaches(q, waiting.job_id, "queued")
    view = await q.status(waiting.job_id)
    assert view.waiting_for_dependencies is False
    assert {d: (v.state, v.result) for d, v in view.dependencies.items()} == {
        first.job_id: ("completed", {"n": 1}), second.job_id: ("completed", "two")
    }
    await assert_rebuild_equals_live(q)


# -- failures -------------------------------------------------------------------------


async def test_failure_cascades_three_levels(q: agentq.Client) -> None:
    ran: list[str] = []

    async def handler(job: Job) -> str:
        ran.append(job.task)
        if job.task == "root":
            raise RuntimeError("root broke")
        return "ok"

    root = await q.dispatch("a", "root", caller="c", max_attempts=1)
    levels = [root]
    for n, agent in enumerate(("b", "c", "a"), start=1):
        levels.append(await q.dispatch(agent, f"level{n}", caller="c",
                                       depends_on=[levels[-1].job_id]))
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        view = await finished(q, levels[-1].job_id)
    assert view.state == "failed"
    assert ran == ["root"]
    root_view = await q.status(root.job_id)
    assert root_view.state == "failed" and root_view.error == "root broke"
    for parent, child in itertools.pairwise(levels):
        child_view = await q.status(child.job_id)
        assert child_view.state == "failed"
        assert child_view.error == f"dependency {parent.job_id} failed"
        assert child_view.dependencies[parent.job_id].state == "failed"
        events = await q.history(child.job_id)
        (failed,) = of_type(events, "JobFailed")
        assert failed.data["reason"] == "dependency_failed"
        assert failed.data["dependencyId"] == parent.job_id
        assert of_type(events, "JobStarted") == []
        (resolved,) = of_type(events, "DependencyResolved")
        assert resolved.data["state"] == "failed"
        assert resolved.data["dependencyId"] == parent.job_id
    await assert_rebuild_equals_live(q)


async def test_ignore_runs_the_dependent_and_shows_the_failure(q: agentq.Client) -> None:
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}

    async def handler(job: Job) -> str:
        seen[job.task] = dep_seen(job)
        if job.task == "doomed":
            raise RuntimeError("doomed failed")
        return "carried on"

    doomed = await q.dispatch("b", "doomed", caller="a", max_attempts=1)
    tolerant = await q.dispatch("a", "tolerant", caller="b", depends_on=[doomed.job_id],
                                on_dependency_failure="ignore")
    strict = await q.dispatch("c", "strict", caller="b", depends_on=[doomed.job_id])
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        view = await finished(q, tolerant.job_id)
        assert (await finished(q, strict.job_id)).state == "failed"
    assert view.state == "completed" and view.result == "carried on"
    assert view.on_dependency_failure == "ignore"
    assert seen["tolerant"] == {doomed.job_id: ("failed", None, "doomed failed")}
    assert "strict" not in seen
    events = await q.history(tolerant.job_id)
    (resolved,) = of_type(events, "DependencyResolved")
    assert resolved.data == {"dependencyId": doomed.job_id, "state": "failed",
                             "error": "doomed failed"}
    await assert_rebuild_equals_live(q)


async def test_retrying_the_failed_root_rearms_what_it_failed(q: agentq.Client) -> None:
    go = asyncio.Event()

    async def handler(job: Job) -> str:
        if job.task == "root":
            if job.attempt == 1:
                raise RuntimeError("first try fails")
            await go.wait()
            return "root ok"
        if job.task == "self":
            raise RuntimeError("self fails on its own")
        return f"{job.task} ok"

    root = await q.dispatch("a", "root", caller="c", max_attempts=1)
    child = await q.dispatch("b", "child", caller="c", depends_on=[root.job_id])
    grandchild = await q.dispatch("c", "grandchild", caller="c", depends_on=[child.job_id])
    own = await q.dispatch("b", "self", caller="c", depends_on=[root.job_id],
                           on_dependency_failure="ignore", max_attempts=1)
    other = await q.dispatch("c", "other", caller="a", delay_seconds=3600)
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        await reaches(q, grandchild.job_id, "failed")
        await reaches(q, own.job_id, "failed")
        # "mixed" failed because of "other" (cancelled), never because of the root.
        await q.cancel(other.job_id)
        mixed = await q.dispatch("a", "mixed", caller="a",
                                 depends_on=[other.job_id, root.job_id])
        await reaches(q, mixed.job_id, "failed")
        await settle(q)
        assert (await q.status(mixed.job_id)).error == f"dependency {other.job_id} cancelled"

        await q.retry(root.job_id)
        await reaches(q, child.job_id, "waiting_dependencies")
        await reaches(q, grandchild.job_id, "waiting_dependencies")
        await settle(q)
        for job in (child, grandchild):
            view = await q.status(job.job_id)
            assert view.waiting_for_dependencies, view
            (retried,) = of_type(await q.history(job.job_id), "JobRetried")
            assert retried.data["state"] == "waiting_dependencies"
        assert (await q.status(own.job_id)).state == "failed"
        assert (await q.status(mixed.job_id)).state == "failed"
        go.set()
        assert (await finished(q, grandchild.job_id)).state == "completed"
    assert (await q.status(root.job_id)).result == "root ok"
    child_view = await q.status(child.job_id)
    assert child_view.state == "completed" and child_view.result == "child ok"
    assert child_view.dependencies[root.job_id].result == "root ok"
    own_view = await q.status(own.job_id)
    assert own_view.state == "failed" and own_view.error == "self fails on its own"
    assert of_type(await q.history(own.job_id), "JobRetried") == []
    assert of_type(await q.history(mixed.job_id), "JobRetried") == []
    child_events = [e.type for e in await q.history(child.job_id)]
    assert child_events == [
        "JobDispatched", "DependencyResolved", "JobFailed", "JobRetried", "DependencyResolved",
        "JobQueued", "JobStarted", "JobCompleted",
    ]
    await assert_rebuild_equals_live(q)


async def test_retry_rearms_a_diamond_and_the_join_waits_for_both_sides(
    q: agentq.Client,
) -> None:
    """A failed root fails both sides of a diamond and so the join (by whichever
    side failed first). Retrying the root re-arms all of them; the join must wait
    for both sides again, not only for the side it recorded as its cause."""
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}
    slow_ids: set[str] = set()

    async def handler(job: Job) -> str:
        seen[job.task] = dep_seen(job)
        if job.task == "root" and job.attempt == 1:
            raise RuntimeError("root broke")
        if job.id in slow_ids:
            await asyncio.sleep(0.5)
        return f"{job.task} ok"

    root = await q.dispatch("a", "root", caller="c", max_attempts=1)
    left = await q.dispatch("b", "left", caller="c", depends_on=[root.job_id])
    right = await q.dispatch("c", "right", caller="a", depends_on=[root.job_id])
    join = await q.dispatch("a", "join", caller="c", depends_on=[left.job_id, right.job_id])
    async with running_workers(q, {"a": handler, "b": handler, "c": handler}):
        for job in (left, right, join):
            await reaches(q, job.job_id, "failed")
        await settle(q)
        # The side the join did not record as its cause finishes last this time.
        cause = await q.redis.hget(q.partition("a").job(join.job_id), "failedBy")
        assert cause in (left.job_id, right.job_id)
        other = right if cause == left.job_id else left
        slow_ids.add(other.job_id)
        await q.retry(root.job_id)
        await reaches(q, other.job_id, "completed")
        await reaches(q, join.job_id, "completed")
        view = await q.status(join.job_id)
    assert seen["join"] == {
        left.job_id: ("completed", "left ok", None),
        right.job_id: ("completed", "right ok", None),
    }
    (other_done,) = of_type(await q.history(other.job_id), "JobCompleted")
    (join_queued,) = of_type(await q.history(join.job_id), "JobQueued")
    assert micros(join_queued) >= micros(other_done)
    assert view.state == "completed"
    await assert_rebuild_equals_live(q)


async def test_delayed_dependent_waits_for_its_run_time_after_release(q: agentq.Client) -> None:
    async def handler(job: Job) -> str:
        return job.task

    dep = await q.dispatch("b", "dep", caller="a")
    later = await q.dispatch("a", "later", caller="b", depends_on=[dep.job_id],
                             delay_seconds=1.5)
    assert later.state == "waiting_dependencies"
    run_at_text = (await q.status(later.job_id)).run_at
    assert run_at_text is not None
    run_at = iso_to_micros(run_at_text)
    assert run_at - iso_to_micros(later.created_at) == 1_500_000
    async with running_workers(q, {"b": handler}):
        assert (await finished(q, dep.job_id)).state == "completed"
        await reaches(q, later.job_id, "delayed")
        view = await q.status(later.job_id)
        assert view.run_at == run_at_text
        await reaches(q, later.job_id, "queued", timeout=10)
    events = await q.history(later.job_id)
    assert [e.type for e in events] == [
        "JobDispatched", "DependencyResolved", "JobDelayed", "JobQueued"
    ]
    delayed, queued = events[2], events[3]
    assert delayed.data["reason"] == "released"
    assert iso_to_micros(delayed.data["runAt"]) == run_at
    assert micros(delayed) < run_at
    assert micros(queued) >= run_at
    await assert_rebuild_equals_live(q)


async def test_dispatch_view_of_a_delayed_dependent_shows_its_run_time(q: agentq.Client) -> None:
    """The view dispatch returns is the view status gives, runAt included."""
    dep = await q.dispatch("b", "dep", caller="a")
    later = await q.dispatch("a", "later", caller="b", depends_on=[dep.job_id],
                             delay_seconds=60)
    status = await q.status(later.job_id, caller="b")
    assert status.run_at is not None
    assert later.run_at == status.run_at


async def test_cancelled_dependency_fails_the_dependent(q: agentq.Client) -> None:
    dep = await q.dispatch("c", "never runs", caller="a")
    waiting = await q.dispatch("a", "waits", caller="a", depends_on=[dep.job_id])
    tolerant = await q.dispatch("b", "tolerant", caller="a", depends_on=[dep.job_id],
                                on_dependency_failure="ignore")
    async with running_background(q):
        await q.cancel(dep.job_id, caller="a")
        await reaches(q, waiting.job_id, "failed")
        await reaches(q, tolerant.job_id, "queued")
    view = await q.status(waiting.job_id)
    assert view.error == f"dependency {dep.job_id} cancelled"
    assert view.dependencies[dep.job_id].state == "cancelled"
    (failed,) = of_type(await q.history(waiting.job_id), "JobFailed")
    assert failed.data["reason"] == "dependency_failed"
    assert failed.data["dependencyId"] == dep.job_id
    # A dependent dispatched after the cancellation fails at registration.
    late = await q.dispatch("b", "late", caller="a", depends_on=[dep.job_id])
    async with running_background(q):
        await reaches(q, late.job_id, "failed")
    assert (await q.status(late.job_id)).error == f"dependency {dep.job_id} cancelled"
    await assert_rebuild_equals_live(q)


async def dependents_sets(q: agentq.Client) -> list[str]:
    """Every dependents set left in any partition."""
    found = []
    for agent in await registry.all_partitions(q.redis, q.keys):
        pattern = q.partition(agent).dependents("*")
        found += [key async for key in q.redis.scan_iter(match=pattern, count=1000)]
    return sorted(found)


async def test_dependents_sets_leave_with_the_ending_that_resolves_them(q: agentq.Client) -> None:
    """Issue 11 item 21: a dependency's set of dependents is gone once its
    completion or cancellation has resolved them, and a registration after
    such an ending adds nothing. A failed dependency keeps its set: a retry
    re-arms the jobs it failed through it."""
    done = await q.dispatch("c", "completes", caller="a")
    dropped = await q.dispatch("c", "is cancelled", caller="a")
    broken = await q.dispatch("c", "fails", caller="a", max_attempts=1)
    waiting = [await q.dispatch("a", f"waits {i}", caller="a", depends_on=[d.job_id])
               for i, d in enumerate((done, dropped, broken))]
    async with running_background(q):
        await settle(q)
        assert len(await dependents_sets(q)) == 3
        await q.cancel(dropped.job_id, caller="a")
        part_c = q.partition("c")
        await ensure_work_groups(q.redis, part_c)
        started, _ = await q.scripts.start(part_c, TESTER, 60_000, 10)
        assert [s.job_id for s in started] == [done.job_id, broken.job_id]
        assert await q.scripts.complete(part_c, TESTER, [(done.job_id, 1, b'"ok"')]) == [None]
        assert await q.scripts.fail(part_c, TESTER, broken.job_id, 1, "no",
                                    Backoff(0, 0)) == "failed"
        await reaches(q, waiting[0].job_id, "queued")
        await reaches(q, waiting[1].job_id, "failed")
        await reaches(q, waiting[2].job_id, "failed")
        late = await q.dispatch("b", "late", caller="a", depends_on=[done.job_id])
        await reaches(q, late.job_id, "queued")
        await settle(q)
        assert await dependents_sets(q) == [part_c.dependents(broken.job_id)]
        await q.retry(broken.job_id)
        await reaches(q, waiting[2].job_id, "waiting_dependencies")
        await start_and_complete(q, broken.job_id, "fixed")
        await reaches(q, waiting[2].job_id, "queued")
        await settle(q)
        assert await dependents_sets(q) == []
    await assert_rebuild_equals_live(q)


# -- the race -----------------------------------------------------------------------


async def test_dependent_dispatched_as_its_dependency_completes_is_never_left_waiting(
    q: agentq.Client,
) -> None:
    rounds = 500
    part_b = q.partition("b")
    await ensure_work_groups(q.redis, part_b)
    deps = await q.dispatch_many(
        [{"target": "b", "task": f"dep {i}"} for i in range(rounds)], caller="c"
    )
    started: dict[str, int] = {}
    while len(started) < rounds:
        batch, _ = await q.scripts.start(part_b, TESTER, 600_000, 200)
        assert batch
        started.update({s.job_id: int(s.record["attempt"]) for s in batch})
    rng = random.Random(7)
    dependents: list[str] = []
    async with running_background(q):

        async def one(i: int) -> None:
            dep_id = deps[i].job_id
            target = "a" if i % 2 else "b"  # across agents and within one
            dispatch = q.dispatch(target, f"after {i}", caller="c", depends_on=[dep_id])
            complete = q.scripts.complete(part_b, TESTER, [(dep_id, started[dep_id], b'"d"')])
            if rng.random() < 0.5:
                view, outcome = await asyncio.gather(dispatch, complete)
            else:
                outcome, view = await asyncio.gather(complete, dispatch)
            assert outcome == [None]
            dependents.append(view.job_id)

        for start in range(0, rounds, 10):  # ten races at a time
            await asyncio.gather(*(one(i) for i in range(start, min(start + 10, rounds))))
        await settle(q, timeout=30)

    states = Counter([await state_of(q, job_id) for job_id in dependents])
    assert states == {"queued": rounds}
    assert await dependents_sets(q) == []
    for job_id in dependents[::25]:
        events = await q.history(job_id)
        assert len(of_type(events, "DependencyResolved")) == 1
        assert len(of_type(events, "JobQueued")) == 1
    await assert_rebuild_equals_live(q)


# -- announce -------------------------------------------------------------------------


async def test_announce_one_follow_up_per_ending(q: agentq.Client) -> None:
    async def handler(job: Job) -> str:
        if job.task == "flaky" and job.attempt == 1:
            raise RuntimeError("flaky broke")
        return f"did {job.task}"

    done = await q.dispatch("b", "work", caller="a", announce=True)
    flaky = await q.dispatch("b", "flaky", caller="a", announce=True, max_attempts=1)
    cancelled = await q.dispatch("c", "never", caller="a", announce=True)
    unknown = await q.dispatch("b", "from a stranger", caller="ghost", announce=True)
    quiet = await q.dispatch("b", "no announce", caller="a")
    cascaded = await q.dispatch("b", "after the cancelled one", caller="a", announce=True,
                                depends_on=[cancelled.job_id])
    async with running_workers(q, {"b": handler}):
        assert (await finished(q, done.job_id)).state == "completed"
        assert (await finished(q, flaky.job_id)).state == "failed"
        assert (await finished(q, unknown.job_id)).state == "completed"
        assert (await finished(q, quiet.job_id)).state == "completed"
        await q.cancel(cancelled.job_id, caller="a")
        assert (await finished(q, cascaded.job_id)).state == "failed"
        await settle(q)
        await q.retry(flaky.job_id)
        assert (await finished(q, flaky.job_id)).state == "completed"
        await settle(q)

    found = await announcements(q)
    by_job: dict[str, list[StoredEvent]] = {}
    for event in found:
        by_job.setdefault(event.data["metadata"]["announceFor"], []).append(event)
    assert set(by_job) == {done.job_id, flaky.job_id, cancelled.job_id, cascaded.job_id}
    (cascade_ann,) = by_job[cascaded.job_id]
    assert cascade_ann.data["task"] == (
        f"Job {cascaded.job_id} failed: dependency {cancelled.job_id} cancelled"
    )
    assert cascade_ann.data["metadata"] == {"announceFor": cascaded.job_id, "outcome": "failed"}
    assert len(by_job[done.job_id]) == 1
    assert len(by_job[cancelled.job_id]) == 1
    assert [e.data["metadata"]["outcome"] for e in by_job[flaky.job_id]] == ["failed", "completed"]
    for event in found:
        target = event.data["metadata"]["announceFor"].rsplit(".", 1)[1]
        view = await q.status(event.job_id)
        assert view.target == "a" and event.agent == "a"
        assert view.dispatched_by == target
        assert event.actor == "system"
        assert view.state == "queued"  # nobody serves a: it waits for a's worker
    (ann,) = by_job[done.job_id]
    assert ann.data["task"] == f"Job {done.job_id} completed: did work"
    assert ann.data["metadata"] == {"announceFor": done.job_id, "outcome": "completed"}
    failed_ann, completed_ann = by_job[flaky.job_id]
    assert failed_ann.data["task"] == f"Job {flaky.job_id} failed: flaky broke"
    assert completed_ann.data["task"] == f"Job {flaky.job_id} completed: did flaky"
    (cancel_ann,) = by_job[cancelled.job_id]
    assert cancel_ann.data["task"].startswith(f"Job {cancelled.job_id} cancelled: ")
    assert "a" in cancel_ann.data["task"].split(": ", 1)[1]
    assert cancel_ann.data["metadata"] == {"announceFor": cancelled.job_id,
                                           "outcome": "cancelled"}
    await assert_rebuild_equals_live(q)


async def test_announce_is_handled_once_when_events_are_redelivered(q: agentq.Client) -> None:
    """The gates handle the same terminal events again (a second consumer reading
    the group from its start): no second follow-up job, no second resolution."""
    dep = await q.dispatch("b", "dep", caller="a", announce=True)
    waiting = await q.dispatch("c", "waits", caller="a", depends_on=[dep.job_id])
    gates = Gates(q.redis, q.open_blocking(), q.keys, consumer="first")
    await start_and_complete(q, dep.job_id, "fine")
    while await gates.process_once(50):
        pass
    assert await state_of(q, waiting.job_id) == "queued"
    assert len(await announcements(q)) == 1
    # Redeliver everything: handle each partition's whole log again.
    for agent in ("a", "b", "c"):
        log = await reader.read_partition(q.redis, q.partition(agent), count=100_000)
        if log:
            await gates.handle(log)
    assert len(await announcements(q)) == 1
    events = await q.history(waiting.job_id)
    assert len(of_type(events, "DependencyResolved")) == 1
    assert len(of_type(events, "JobQueued")) == 1
    await assert_rebuild_equals_live(q)


async def test_completions_nobody_waits_on_are_marked_and_gates_skip_them(
    q: agentq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The complete script marks a JobCompleted "quiet" when, as it is written,
    the job has no registered dependent and no announce: the gates then need not
    look it up. A dependent registered after the completion is resolved by its
    registration; one registered before makes the completion not quiet."""
    lone = await q.dispatch("a", "lone", caller="b")
    waited = await q.dispatch("a", "waited on", caller="b")
    loud = await q.dispatch("a", "announce", caller="b", announce=True)
    dependent = await q.dispatch("b", "after", caller="b", depends_on=[waited.job_id])
    looked_up: list[list[str]] = []
    endings = q.scripts.endings

    async def counting(part: Any, job_ids: list[str]) -> Any:
        looked_up.append(list(job_ids))
        return await endings(part, job_ids)

    async with running_background(q):
        await settle(q)  # the dependent is registered with what it waits for
        monkeypatch.setattr("agentq.eventlog.scripts.Scripts.endings",
                            lambda self, part, ids: counting(part, ids))
        await start_and_complete(q, lone.job_id, "done")  # all three of a's jobs
        await reaches(q, dependent.job_id, "queued")
        late = await q.dispatch("b", "late", caller="b", depends_on=[lone.job_id])
        await reaches(q, late.job_id, "queued")
        await settle(q)
    marks = {e.job_id: e.quiet for e in await reader.read_partition(q.redis, q.partition("a"))
             if e.type == "JobCompleted"}
    assert marks == {lone.job_id: True, waited.job_id: False, loud.job_id: False}
    assert sorted(j for batch in looked_up for j in batch) == sorted([waited.job_id, loud.job_id])
    assert len(await announcements(q)) == 1


async def test_a_long_result_reaches_dependents_registered_before_and_after_it_ended(
    q: agentq.Client,
) -> None:
    """A result held by reference lives in a key of its own: the dependent
    waiting when it ended (the gates read the ending) and one dispatched after
    (registered against a completed dependency) both get it whole, as does the
    dependents' view of their dependency."""
    long_result = {"answer": "x" * 500}
    seen: dict[str, dict[str, tuple[str, Any, str | None]]] = {}

    async def handler(job: Job) -> Any:
        seen[job.task] = dep_seen(job)
        return long_result if job.task == "root" else "ok"

    root = await q.dispatch("a", "root", caller="c")
    early = await q.dispatch("b", "early", caller="c", depends_on=[root.job_id])
    async with running_background(q):
        await settle(q)  # early is registered with root, which has not run yet
    assert await q.redis.smembers(q.partition("a").dependents(root.job_id)) == {early.job_id}
    async with running_workers(q, {"a": handler, "b": handler}):
        await finished(q, early.job_id)
        late = await q.dispatch("b", "late", caller="c", depends_on=[root.job_id])
        await finished(q, late.job_id)
    part = q.partition("a")
    assert await q.redis.hget(part.job(root.job_id), "result") is None  # kept apart
    assert (await q.status(root.job_id)).result == long_result
    for name, job_id in (("early", early.job_id), ("late", late.job_id)):
        assert seen[name] == {root.job_id: ("completed", long_result, None)}, name
        view = await q.status(job_id)
        assert view.dependencies[root.job_id].result == long_result, name
        (resolved,) = of_type(await q.history(job_id), "DependencyResolved")
        assert resolved.data["result"] == long_result, name
