"""Dependency gates that are killed in the middle of their work.

The gates run in ``tests/gate_proc.py`` subprocesses, slowed down so that a
SIGKILL lands while a batch of events is read but not yet acknowledged. Each
process beats in the process registry (with a short heartbeat timeout); a new
process (another consumer of the ``gates`` group) takes the dead consumer's
pending entries over once its heartbeat deadline has passed and handles them
again. Nothing may be lost (every
dependent is released, every announcement made) and nothing may happen twice
(one ``DependencyResolved`` per dependency, one release, one follow-up job per
ending).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from _procs import LineProcess

import agentq
from agentq.eventlog import fold, reader, registry
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config

ROOT = Path(__file__).resolve().parent.parent
GATE_PROC = Path(__file__).resolve().parent / "gate_proc.py"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
TESTER = "tester"
CLAIM_IDLE_MS = 300
HEARTBEAT_SECONDS = 1.0


# -- helpers ---------------------------------------------------------------------


class GateProcess(LineProcess):
    """A gate subprocess; its stdout lines are collected as they come."""

    name = "gate process"

    @property
    def handled(self) -> int:
        return self.count("HANDLED ")

    def handled_of(self, kinds: tuple[str, ...]) -> set[str]:
        """Events of these types handled so far, as ``<agent>/<event id>``."""
        return {line.split()[4] for line in self.lines
                if line.startswith("HANDLED ") and line.split()[2] in kinds}


@pytest.fixture
async def spawn(redis_url: str, tmp_path: Path) -> AsyncIterator[
    Callable[..., Awaitable[GateProcess]]
]:
    """Start gate subprocesses; each is stopped and reaped afterwards."""
    started: list[GateProcess] = []

    async def start(config: Config, sleep_ms: int = 0,
                    heartbeat: float = HEARTBEAT_SECONDS, **more: str) -> GateProcess:
        """``more``: further GATE_* settings (see tests/gate_proc.py)."""
        stderr_path = tmp_path / f"gate{len(started)}.stderr"
        env = {**os.environ, "GATE_SLEEP_MS": str(sleep_ms),
               "GATE_CLAIM_IDLE_MS": str(CLAIM_IDLE_MS), "GATE_BLOCK_SECONDS": "0.2",
               "GATE_HEARTBEAT_SECONDS": str(heartbeat),
               **{f"GATE_{name.upper()}": value for name, value in more.items()}}
        config_json = config.model_dump_json(by_alias=True, exclude_none=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(GATE_PROC), redis_url, config_json, cwd=ROOT, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            )
        gate = GateProcess(proc, stderr_path)
        started.append(gate)
        return gate

    yield start
    for gate in started:
        await gate.close()


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    config = make_config(rateLimit=NO_RATE_LIMIT, jobs={"maxAttempts": 1})
    async with agentq.connect(redis_url, config) as client:
        for agent in ("a", "b", "c"):
            await client.add_agent(agent)
        yield client


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


async def gates_pending(q: agentq.Client) -> dict[str, int]:
    """Entries delivered to a ``gates`` consumer and not acknowledged, per consumer."""
    pending: Counter[str] = Counter()
    for agent in await registry.all_partitions(q.redis, q.keys):
        log = q.partition(agent).log
        if not await q.redis.exists(log):
            continue
        groups = await q.redis.xinfo_groups(log)
        if not any(g["name"] == "gates" for g in groups):
            continue
        for consumer in await q.redis.xinfo_consumers(log, "gates"):
            pending[consumer["name"]] += int(consumer["pending"])
    return {name: n for name, n in pending.items() if n}


async def gates_settled(q: agentq.Client) -> bool:
    for agent in await registry.all_partitions(q.redis, q.keys):
        log = q.partition(agent).log
        last = await q.redis.xrevrange(log, count=1)
        if not last:
            continue
        gates = [g for g in await q.redis.xinfo_groups(log) if g["name"] == "gates"]
        if not gates or gates[0]["pending"] or gates[0]["last-delivered-id"] != last[0][0]:
            return False
    return True


async def states(q: agentq.Client, job_ids: list[str]) -> dict[str, str]:
    async with q.redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hget(q.partition(job_id.rsplit(".", 1)[1]).job(job_id), "state")
        replies = await pipe.execute()
    return dict(zip(job_ids, replies, strict=True))


async def start_all(q: agentq.Client, agent: str) -> dict[str, int]:
    """Start every ready job of ``agent`` by hand; job id -> attempt."""
    part = q.partition(agent)
    await ensure_work_groups(q.redis, part)
    started: dict[str, int] = {}
    while True:
        batch, _ = await q.scripts.start(part, TESTER, 600_000, 200)
        if not batch:
            return started
        started.update({s.job_id: int(s.record["attempt"]) for s in batch})


async def end_jobs(q: agentq.Client, agent: str, attempts: dict[str, int],
                   how: dict[str, str]) -> None:
    """End started jobs of ``agent``: ``how[job]`` is completed, failed or cancelled."""
    part = q.partition(agent)
    done = [(j, attempts[j], orjson.dumps(f"result of {j}")) for j in how if how[j] == "completed"]
    if done:
        assert await q.scripts.complete(part, TESTER, done) == [None] * len(done)
    for job_id, end in how.items():
        if end == "failed":
            assert await q.scripts.fail(part, TESTER, job_id, attempts[job_id], "it broke",
                                        Backoff(0, 0)) == "failed"
        elif end == "cancelled":
            await q.cancel(job_id)


async def assert_rebuild_equals_live(q: agentq.Client) -> None:
    parts = [q.partition(a) for a in await registry.all_partitions(q.redis, q.keys)]
    rebuilt = fold.records_from([event async for event in reader.replay(q.redis, parts)])
    live: dict[str, Any] = {}
    for part in parts:
        live.update((j, normalize(r)) for j, r in (await reader.all_records(q.redis, part)).items())
    assert rebuilt == live


TERMINAL = ("JobCompleted", "JobFailed", "JobCancelled")


async def kill_mid_work(spawn: Callable[..., Awaitable[GateProcess]], q: agentq.Client,
                        more: Callable[[], Awaitable[None]]) -> GateProcess:
    """Run a slow gate process, give it ``more`` work once it has started, SIGKILL
    it after it has handled a few terminal events of a batch it has not
    acknowledged yet, and start a fast one in its place; returns the new one
    once it has caught up."""
    slow = await spawn(q.config, sleep_ms=5)
    dead_name = await slow.ready()
    await slow.wait_for(lambda: slow.handled >= 1, "first event")
    await more()
    await slow.wait_for(lambda: len(slow.handled_of(TERMINAL)) >= 6, "terminal events")
    await slow.kill()
    pending = await gates_pending(q)
    assert pending.get(dead_name, 0) > 0, f"killed with nothing pending: {pending}"
    assert not await gates_settled(q)
    fresh = await spawn(q.config)
    assert await fresh.ready() != dead_name
    await until(lambda: gates_settled(q), what="the new gate process to catch up")
    assert dead_name not in await gates_pending(q)
    # The new process handled again endings the dead one had handled but not acknowledged.
    again = slow.handled_of(TERMINAL) & fresh.handled_of(TERMINAL)
    assert again, "the kill did not leave handled endings unacknowledged"
    return fresh


# -- tests -------------------------------------------------------------------------


async def test_killed_gate_loses_no_release_and_resolves_nothing_twice(
    q: agentq.Client, spawn: Callable[..., Awaitable[GateProcess]]
) -> None:
    n = 40
    deps = [(await q.dispatch("b", f"dep {i}", caller="a")).job_id for i in range(n)]
    ending = {dep: ("cancelled" if i % 5 == 0 else "completed") for i, dep in enumerate(deps)}
    # Level 1: each waits for one dependency, every fourth for two.
    level1: dict[str, list[str]] = {}
    for i in range(n):
        wanted = deps[i : i + 2] if i % 4 == 3 else [deps[i]]
        view = await q.dispatch("ac"[i % 2], f"l1 {i}", caller="b", depends_on=wanted)
        level1[view.job_id] = wanted
    doomed = [j for j, wanted in level1.items() if any(ending[d] == "cancelled" for d in wanted)]
    # Level 2: fails in cascade, through events the gates themselves append.
    level2: dict[str, list[str]] = {}
    for i, parent in enumerate(doomed):
        view = await q.dispatch("b", f"l2 {i}", caller="b", depends_on=[parent])
        level2[view.job_id] = [parent]

    attempts = await start_all(q, "b")
    first_half = {d: ending[d] for d in deps[: n // 2]}
    second_half = {d: ending[d] for d in deps[n // 2 :]}
    await end_jobs(q, "b", attempts, first_half)  # ended before any gate runs

    async def end_the_rest() -> None:
        await end_jobs(q, "b", attempts, second_half)  # ended while the gate works

    await kill_mid_work(spawn, q, more=end_the_rest)

    expected = {j: ("failed" if j in doomed else "queued") for j in level1}
    expected.update({j: "failed" for j in level2})
    assert await states(q, list(expected)) == expected
    for job_id, wanted in {**level1, **level2}.items():
        events = await reader.job_history(q.redis, q.partition(job_id.rsplit(".", 1)[1]),
                                          job_id)
        assert events is not None
        resolved = Counter(e.data["dependencyId"] for e in events
                           if e.type == "DependencyResolved")
        assert resolved == Counter(wanted), (job_id, resolved)
        kinds = Counter(e.type for e in events)
        assert kinds["JobQueued"] <= 1 and kinds["JobFailed"] <= 1, (job_id, kinds)
        assert kinds["JobQueued"] + kinds["JobFailed"] == 1, (job_id, kinds)
        if job_id in level2 or job_id in doomed:
            (failed,) = [e for e in events if e.type == "JobFailed"]
            assert failed.data["reason"] == "dependency_failed"
    await assert_rebuild_equals_live(q)


async def test_killed_gate_announces_each_ending_exactly_once(
    q: agentq.Client, spawn: Callable[..., Awaitable[GateProcess]]
) -> None:
    n = 45
    jobs: dict[str, str] = {}
    callers: dict[str, str] = {}
    for i in range(n):
        caller = ("a", "c", "ghost")[i % 3]  # ghost is no known agent: no announcement
        view = await q.dispatch("b", f"job {i}", caller=caller, announce=True)
        jobs[view.job_id] = ("completed", "completed", "failed", "cancelled")[i % 4]
        callers[view.job_id] = caller
    quiet = (await q.dispatch("b", "no announce", caller="a")).job_id
    attempts = await start_all(q, "b")
    ids = list(jobs)
    await end_jobs(q, "b", attempts, {j: jobs[j] for j in ids[: n // 2]})

    async def end_the_rest() -> None:
        await end_jobs(q, "b", attempts, {j: jobs[j] for j in ids[n // 2 :]} | {
            quiet: "completed"})

    fresh = await kill_mid_work(spawn, q, more=end_the_rest)

    # Retried after the restart: a failed job that ends again announces again.
    retried = [j for j in ids if jobs[j] == "failed" and callers[j] != "ghost"][:3]
    for job_id in retried:
        await q.retry(job_id)
    again = await start_all(q, "b")
    assert set(again) == set(retried)
    await end_jobs(q, "b", again, dict.fromkeys(retried, "completed"))
    await until(lambda: gates_settled(q), what="the gate to handle the retries")
    await fresh.close()

    announced: dict[str, list[str]] = {}
    for agent in ("a", "b", "c"):
        for event in await reader.read_partition(q.redis, q.partition(agent), count=100_000,
                                                 payloads=True):
            meta = event.data.get("metadata") or {}
            if event.type == "JobDispatched" and "announceFor" in meta:
                assert event.agent == event.data["target"] == callers[meta["announceFor"]]
                assert event.data["dispatchedBy"] == "b"
                prefix = f"Job {meta['announceFor']} {meta['outcome']}: "
                assert event.data["task"].startswith(prefix)
                announced.setdefault(meta["announceFor"], []).append(meta["outcome"])
    expected = {
        job_id: [end] + (["completed"] if job_id in retried else [])
        for job_id, end in jobs.items()
        if callers[job_id] != "ghost"
    }
    assert len(expected) == 30
    assert announced == expected
    await assert_rebuild_equals_live(q)
