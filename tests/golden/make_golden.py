"""Regenerate the golden event log and the records it must rebuild to.

    .venv/bin/python tests/golden/make_golden.py redis://127.0.0.1:6379
    .venv/bin/python tests/golden/make_golden.py redis://127.0.0.1:6379 --scenario approvals

Runs a scripted scenario against a live Redis server, under a fresh key prefix
(deleted afterwards), through the client and the Lua transitions: the scripts
write every event type they write today, in each of its variants. It then reads
the whole log back (``reader.replay``) and every job's live state record, and
refuses to write anything unless folding the log gives exactly those records:
``expected.json`` is what the scripts wrote, not what the fold computes.

Writes, next to this file:
- ``log.json``: the events, as the reader returns them in raw form
  (event_id, agent, type, job_id, at in µs, actor, v, data);
- ``expected.json``: the live state records, ``records.normalize`` form, by job id.
The ``approvals`` scenario (part two: approvals and cancelling a tree) writes
``approvals_log.json`` and ``approvals_expected.json`` the same way; the
tests read both pairs as one log.

The gate consumer (dependency resolution) does not run here: the scenario calls
the ``resolve`` and ``rearm`` scripts itself, as the gate would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson

import agentq
from agentq.eventlog import fold, reader
from agentq.eventlog.reader import RawEvent
from agentq.eventlog.records import normalize
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config

HERE = Path(__file__).resolve().parent
AGENTS = ("a", "b", "c")
LONG_LEASE_MS = 60_000
SETTLE_S = 0.01  # past a 1 ms lease or a 1 ms delay
NO_BACKOFF = Backoff(0, 0)
LONG_BACKOFF = Backoff(3_600_000, 7_200_000)

# (type, variant) pairs the log must hold; the variant is the data field that
# tells the kinds of one type apart (see ``variant``).
REQUIRED: frozenset[tuple[str, str]] = frozenset({
    ("JobDispatched", "queued"),
    ("JobDispatched", "delayed"),
    ("JobDispatched", "waiting_dependencies"),
    ("JobQueued", "due"),
    ("JobQueued", "released"),
    ("JobDelayed", "released"),
    ("JobStarted", ""),
    ("JobProgress", ""),
    ("JobCompleted", ""),
    ("JobAttemptFailed", "queued"),
    ("JobAttemptFailed", "delayed"),
    ("JobStalled", "queued"),
    ("JobStalled", "delayed"),
    ("JobFailed", "attempts_exhausted"),
    ("JobFailed", "lease_expired"),
    ("JobFailed", "dependency_failed"),
    ("JobRetried", "queued"),
    ("JobRetried", "waiting_dependencies"),
    ("JobCancelled", "cancel"),
    ("JobCancelled", "drain"),
    ("DependencyResolved", "completed"),
    ("DependencyResolved", "failed"),
})  # fmt: skip

REQUIRED_APPROVALS: frozenset[tuple[str, str]] = frozenset({
    ("JobDispatched", "pending_approval"),
    ("JobApproved", "queued"),
    ("JobApproved", "delayed"),
    ("JobApproved", "waiting_dependencies"),
    ("JobRejected", ""),
    ("JobCancelled", "parent_cancelled"),
    ("JobFailed", "dependency_failed"),
    ("DependencyResolved", "completed"),
    ("DependencyResolved", "cancelled"),
})  # fmt: skip


def variant(event_type: str, data: dict[str, Any]) -> str:
    """What tells kinds of one event type apart: a start state, a reason, a dependency's end."""
    if event_type in ("JobDispatched", "JobAttemptFailed", "JobStalled", "DependencyResolved",
                      "JobApproved"):
        return str(data["state"])
    if event_type == "JobRetried":
        return str(data.get("state", "queued"))
    if event_type in ("JobQueued", "JobDelayed", "JobFailed", "JobCancelled"):
        return str(data["reason"])
    return ""


class Scenario:
    def __init__(self, q: agentq.Client) -> None:
        self.q = q

    async def dispatch(self, target: str, caller: str = "main", **fields: Any) -> str:
        view = await self.q.dispatch(target, f"golden task for {target}", caller=caller, **fields)
        return view.job_id

    async def start(self, agent: str, job_id: str, lease_ms: int = LONG_LEASE_MS) -> int:
        """Start the one job ready in ``agent``'s partition (it must be ``job_id``)."""
        started, _ = await self.q.scripts.start(self.q.partition(agent), f"w-{agent}", lease_ms, 1)
        assert [s.job_id for s in started] == [job_id], (started, job_id)
        return int(started[0].record["attempt"])

    async def complete(self, agent: str, job_id: str, attempt: int, result: Any) -> None:
        (refusal,) = await self.q.scripts.complete(
            self.q.partition(agent), f"w-{agent}", [(job_id, attempt, orjson.dumps(result))]
        )
        assert refusal is None, refusal

    async def fail(
        self, agent: str, job_id: str, attempt: int, error: str, backoff: Backoff, expect: str
    ) -> None:
        state = await self.q.scripts.fail(
            self.q.partition(agent), f"w-{agent}", job_id, attempt, error, backoff
        )
        assert state == expect, (state, expect)

    async def stall(self, agent: str, job_id: str, backoff: Backoff) -> None:
        await asyncio.sleep(SETTLE_S)
        reclaimed = await self.q.scripts.stall(
            self.q.partition(agent), "reclaimer", [job_id], backoff
        )
        assert reclaimed == [job_id], reclaimed

    async def state(self, agent: str, job_id: str) -> str:
        return str(await self.q.redis.hget(self.q.partition(agent).job(job_id), "state"))

    async def run(self) -> None:
        q = self.q
        a, b = q.partition("a"), q.partition("b")

        # A job that runs, reports progress and completes.
        done = await self.dispatch("a", caller="b", label="happy path", priority="high")
        attempt = await self.start("a", done)
        refusal = await q.scripts.progress(
            a, "w-a", done, attempt, orjson.dumps({"percent": 50, "message": "halfway"})
        )
        assert refusal is None, refusal
        await self.complete("a", done, attempt, {"answer": 42})

        # A delayed job that comes due, runs and completes.
        later = await self.dispatch("a", delaySeconds=0.001, priority="low")
        await asyncio.sleep(SETTLE_S)
        moved, _ = await q.scripts.promote(a, "scheduler", [later])
        assert moved == [later], moved
        await self.complete("a", later, await self.start("a", later), "plain text result")

        # Failed attempts: back to queued, exhausted, retried, then back to delayed.
        flaky = await self.dispatch("a", maxAttempts=2)
        await self.fail(
            "a", flaky, await self.start("a", flaky), "first error", NO_BACKOFF, "queued"
        )
        await self.fail(
            "a", flaky, await self.start("a", flaky), "second error", NO_BACKOFF, "failed"
        )
        await q.retry(flaky)
        await self.fail(
            "a", flaky, await self.start("a", flaky), "third error", LONG_BACKOFF, "delayed"
        )
        await q.cancel(flaky, caller="a")  # the target cancels it while it waits

        # Leases that expire: back to queued, then failed for good.
        lost = await self.dispatch("a", maxAttempts=2)
        await self.start("a", lost, lease_ms=1)
        await self.stall("a", lost, NO_BACKOFF)
        await self.start("a", lost, lease_ms=1)
        await self.stall("a", lost, NO_BACKOFF)
        assert await self.state("a", lost) == "failed"

        # An active job cancelled by its dispatcher.
        running = await self.dispatch("a", caller="c", metadata={"ticket": 7})
        await self.start("a", running)
        await q.cancel(running, caller="c")

        # Drained from c: a queued job and one sent back to delayed by an expired lease.
        slow = await self.dispatch("c", maxAttempts=3, timeoutSeconds=30)
        await self.start("c", slow, lease_ms=1)
        await self.stall("c", slow, LONG_BACKOFF)
        await self.dispatch("c", idempotencyKey="golden-once", project="golden")
        drained = await q.drain("c")
        assert drained.drained == 2, drained

        # Dependencies, resolved as the gate would: released to queued, released
        # to delayed (its own delay still ahead), failed by a failed dependency
        # and re-armed when that dependency is retried, and run anyway ("ignore").
        result = await q.redis.hget(a.job(done), "result")
        released = await self.dispatch("b", dependsOn=[done])
        outcome = await q.scripts.resolve(
            b, "gates", released, done, "completed", result or "", "", ignore_failure=False
        )
        assert outcome == "queued", outcome
        await self.complete("b", released, await self.start("b", released), None)

        held = await self.dispatch("b", dependsOn=[done], delaySeconds=3600)
        outcome = await q.scripts.resolve(
            b, "gates", held, done, "completed", result or "", "", ignore_failure=False
        )
        assert outcome == "delayed", outcome

        doomed = await self.dispatch("b", dependsOn=[lost, done], priority="low")
        outcome = await q.scripts.resolve(
            b, "gates", doomed, lost, "failed", "", "lease expired", ignore_failure=False
        )
        assert outcome == "failed", outcome
        assert await q.scripts.rearm(b, "gates", doomed, lost)
        await q.cancel(doomed)

        brave = await self.dispatch("b", dependsOn=[lost], onDependencyFailure="ignore")
        outcome = await q.scripts.resolve(
            b, "gates", brave, lost, "failed", "", "lease expired", ignore_failure=True
        )
        assert outcome == "queued", outcome


    async def run_approvals(self) -> None:
        """Approvals (to queued, delayed, waiting for dependencies; a dependency that
        fails while its dependent waits for approval), rejection, cancelling a pending
        job, and a cascading cancel, as the gates would carry it."""
        q = self.q
        a, b = q.partition("a"), q.partition("b")
        approved = await self.dispatch("a", caller="b", requiresApproval=True, label="approve me")
        await q.approve(approved, note="looks right")
        later = await self.dispatch("a", caller="b", requiresApproval=True, delaySeconds=3600)
        await q.approve(later)
        await q.reject(await self.dispatch("a", caller="b", requiresApproval=True),
                       reason="not now")
        await q.cancel(await self.dispatch("a", requiresApproval=True))

        dep = await self.dispatch("b")
        waits = await self.dispatch("a", requiresApproval=True, dependsOn=[dep])
        assert (await q.approve(waits)).state == "waiting_dependencies"
        attempt = await self.start("b", dep)
        await self.complete("b", dep, attempt, "dep done")
        outcome = await q.scripts.resolve(a, "gates", waits, dep, "completed", '"dep done"', "",
                                          ignore_failure=False)
        assert outcome == "queued", outcome

        gone = await self.dispatch("b")
        held = await self.dispatch("a", requiresApproval=True, dependsOn=[gone])
        await q.cancel(gone)
        outcome = await q.scripts.resolve(a, "gates", held, gone, "cancelled", "", "",
                                          ignore_failure=False)
        assert outcome == "resolved", outcome
        assert (await q.approve(held)).state == "failed"

        root = await self.dispatch("b", caller="a")
        kid = await self.dispatch("a", caller="b", parentJobId=root)
        await q.cancel(root, cascade=True)
        assert await q.scripts.adopt(b, root, kid) == "cancel"
        assert await q.scripts.cancel(a, "main", kid, is_system=True, parent_id=root) == "queued"


async def generate(
    url: str, scenario: str = ""
) -> tuple[list[RawEvent], dict[str, dict[str, Any]]]:
    """Run the scenario under a fresh prefix; the log and every live record."""
    prefix = f"golden{uuid.uuid4().hex[:8]}"
    config = Config.model_validate(
        {"keyPrefix": prefix, "rateLimit": {"dispatchesPerMinute": 0, "maxQueueDepth": 0}}
    )
    async with agentq.connect(url, config) as q:
        try:
            for agent in AGENTS:
                await q.add_agent(agent)
                await ensure_work_groups(q.redis, q.partition(agent))
            if scenario == "approvals":
                await Scenario(q).run_approvals()
            else:
                await Scenario(q).run()
            parts = [q.partition(agent) for agent in AGENTS]
            events = [event async for event in reader.replay(q.redis, parts)]
            records: dict[str, dict[str, Any]] = {}
            for event in events:
                if event.job_id not in records:
                    raw = await reader.read_record(
                        q.redis, q.partition(event.agent), event.job_id)
                    records[event.job_id] = normalize(raw)
        finally:
            keys = [k async for k in q.redis.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await q.redis.delete(*keys[i : i + 500])
    return events, records


def raw_form(event: RawEvent) -> dict[str, Any]:
    """An event as the reader returns it, in raw form (times in µs, data upcast)."""
    return {
        "event_id": event.event_id,
        "agent": event.agent,
        "type": event.type,
        "job_id": event.job_id,
        "at": event.at,
        "actor": event.actor,
        "v": event.v,
        "data": event.data,
    }


def check(events: list[RawEvent], records: dict[str, dict[str, Any]],
          required: frozenset[tuple[str, str]] = REQUIRED) -> list[str]:
    """Why these cannot be the golden files (empty when they can)."""
    problems = []
    rebuilt = fold.records_from(events)
    for job_id in sorted(set(rebuilt) | set(records)):
        got, want = rebuilt.get(job_id, {}), records.get(job_id, {})
        for name in sorted(set(got) | set(want)):
            if got.get(name) != want.get(name):
                problems.append(f"{job_id}.{name}: fold {got.get(name)!r}, live {want.get(name)!r}")
    covered = {(e.type, variant(e.type, e.data)) for e in events}
    problems += [f"no {t} ({v or 'any'}) in the log" for t, v in sorted(required - covered)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a Redis URL, e.g. redis://127.0.0.1:6379")
    parser.add_argument("--out", type=Path, default=HERE, help="directory to write to")
    parser.add_argument("--scenario", choices=("", "approvals"), default="",
                        help="approvals: part two's approvals and cancelling a tree")
    args = parser.parse_args(argv)
    events, records = asyncio.run(generate(args.url, args.scenario))
    required = REQUIRED_APPROVALS if args.scenario else REQUIRED
    problems = check(events, records, required)
    if problems:
        print(
            "not written: the fold of the log differs from what the scripts wrote, "
            "or the log misses a kind of event:",
            file=sys.stderr,
        )
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    log = [raw_form(event) for event in events]
    stem = f"{args.scenario}_" if args.scenario else ""
    (args.out / f"{stem}log.json").write_text(json.dumps(log, indent=1) + "\n")
    (args.out / f"{stem}expected.json").write_text(
        json.dumps(records, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(log)} events of {len(records)} jobs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
