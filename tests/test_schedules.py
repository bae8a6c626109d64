"""Schedules (issue 15, item 6): cron expressions with time zones, managed by
system agents through the CLI and the client, ticked by the background
processes: one job per tick whatever the number of processes, one catch-up
job for ticks missed while none ran."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from test_cli import Cli, cli_on_a_fresh_prefix
from test_doorbell import spawn_background, until

import agentq
from agentq.consumers.scheduler import Scheduler
from agentq.consumers.schedules import Ticks
from agentq.eventlog.schedules import next_tick_ms
from agentq.schemas.config import Config
from agentq.schemas.job import JobView
from agentq.tools import TOOLS

__all__ = ["spawn_background"]  # the fixture, from test_doorbell

NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
EVERY_SECOND = "* * * * * *"


def ms(iso: str) -> int:
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def utc_ms(*args: int) -> int:
    return round(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


async def server_ms(q: agentq.Client) -> int:
    return (await q.scripts.schedule_due(q.partition("a"), 0)).now_ms


async def scheduled_jobs(q: agentq.Client, name: str) -> list[JobView]:
    page = await q.list(agent="a", limit=100)
    return [j for j in page.jobs if (j.metadata or {}).get("schedule") == name]


# -- cron arithmetic -------------------------------------------------------------


def test_ticks_follow_the_zones_clock_and_come_strictly_after() -> None:
    paris = ZoneInfo("Europe/Paris")
    # 09:00 in Paris is 08:00 UTC in winter, 07:00 UTC in summer.
    assert next_tick_ms("0 9 * * *", paris, utc_ms(2026, 3, 28, 12)) == utc_ms(2026, 3, 29, 7)
    assert next_tick_ms("0 9 * * *", paris, utc_ms(2026, 3, 27, 12)) == utc_ms(2026, 3, 28, 8)
    # 02:30 does not exist on the day clocks go forward: it fires at 03:00, as cron does.
    assert next_tick_ms("30 2 * * *", paris, utc_ms(2026, 3, 28, 12)) == utc_ms(2026, 3, 29, 1)
    # Six fields: seconds first. A start on a tick gives the next one, never itself.
    start = utc_ms(2026, 1, 1, 0, 0, 10)
    assert next_tick_ms("*/10 * * * * *", ZoneInfo("UTC"), start) == start + 10_000
    assert next_tick_ms("*/10 * * * * *", ZoneInfo("UTC"), start - 1) == start


# -- the CLI -----------------------------------------------------------------------


@pytest.fixture
def cli(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    return cli_on_a_fresh_prefix(redis_url, make_config)


def test_the_cli_adds_lists_pauses_resumes_and_removes(cli: Cli) -> None:
    added = cli.json("schedule", "add", "nightly", "--cron", "0 2 * * *", "--tz",
                     "Europe/Paris", "a", "write the nightly report", "--priority", "low",
                     "--meta", "team=ops")
    assert added["state"] == "active" and added["timezone"] == "Europe/Paris"
    assert datetime.fromisoformat(added["nextTick"].replace("Z", "+00:00")).astimezone(
        ZoneInfo("Europe/Paris")).strftime("%H:%M:%S") == "02:00:00"
    assert added["spec"]["priority"] == "low" and added["spec"]["metadata"] == {"team": "ops"}

    listed = cli.json("schedule", "list")
    assert listed["count"] == 1
    assert [(s["name"], s["target"], s["cron"]) for s in listed["schedules"]] == [
        ("nightly", "a", "0 2 * * *")]

    paused = cli.json("schedule", "pause", "nightly")
    assert paused["state"] == "paused" and paused["nextTick"] is None
    again = cli("schedule", "pause", "nightly", "--json")
    assert again.returncode == 5, again.stderr
    assert json.loads(again.stdout)["error"]["code"] == "invalid_state"
    resumed = cli.json("schedule", "resume", "nightly")
    assert resumed["state"] == "active" and resumed["nextTick"] == added["nextTick"]

    # Only system agents manage schedules: agent a is not one.
    refused = cli("schedule", "add", "mine", "--cron", "@hourly", "b", "t", "--as", "a")
    assert refused.returncode == 4
    assert "Unauthorized: schedule add requires a system agent." in refused.stderr
    assert cli("schedule", "list", "--as", "a").returncode == 4

    bad = cli("schedule", "add", "typo", "--cron", "0 25 * * *", "a", "t")
    assert bad.returncode == 2 and "--cron" in bad.stderr and "0 25 * * *" in bad.stderr

    assert cli.ok("schedule", "remove", "nightly").stdout.strip() == "Schedule nightly removed"
    gone = cli("schedule", "remove", "nightly")
    assert gone.returncode == 3 and "Schedule nightly not found" in gone.stderr
    types = [e["type"] for e in cli.json("schedule", "history", "nightly", "--agent", "a")]
    assert types == ["ScheduleAdded", "SchedulePaused", "ScheduleResumed", "ScheduleRemoved"]
    assert cli.json("schedule", "list") == {"schedules": [], "count": 0}


# -- the client's refusals -----------------------------------------------------------


@pytest.mark.both_backends
async def test_each_mistake_is_refused_with_its_code_and_nothing_written(
    q: agentq.Client,
) -> None:
    await q.schedule_add("daily", "a", "t", cron="@daily")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"cron": "* * *"}, "invalid_input", "Invalid cron expression '* * *'"),
        ({"cron": "0 0 30 2 *"}, "invalid_input", "it never fires"),
        ({"tz": "Mars/Olympus"}, "invalid_input", "Unknown time zone 'Mars/Olympus'"),
        ({"target": "nobody"}, "unknown_agent", "Unknown target agent: nobody"),
        ({"name": "daily"}, "invalid_state", "Schedule daily already exists (target a)"),
        ({"name": "Bad Name"}, "invalid_input", "Invalid schedule name 'Bad Name'"),
        ({"depends_on": ["j_x.a"]}, "invalid_input", "cannot have dependsOn"),
        ({"caller": "b"}, "unauthorized", "requires a system agent"),
    ]
    for change, code, text in cases:
        given: dict[str, Any] = {"name": "other", "target": "b", "cron": "@hourly", **change}
        with pytest.raises(agentq.AgentqError) as caught:
            await q.schedule_add(given.pop("name"), given.pop("target"), "t", **given)
        assert (caught.value.code, text in caught.value.message) == (code, True), change
    for call in (q.schedule_pause, q.schedule_resume, q.schedule_remove):
        with pytest.raises(agentq.NotFound, match="Schedule missing not found"):
            await call("missing")
    with pytest.raises(agentq.InvalidState, match="not paused"):
        await q.schedule_resume("daily")
    assert [s.name for s in await q.schedule_list()] == ["daily"]
    # The operator's: no tool (so no MCP client) reaches them.
    assert not [name for name in TOOLS if "schedule" in name]


# -- ticking -------------------------------------------------------------------------


@pytest.mark.both_backends
async def test_two_schedulers_serving_the_same_partition_dispatch_each_tick_once(
    q: agentq.Client,
) -> None:
    """Without ownership both look at every partition: the idempotency key and the
    move that only follows the tick it dispatched keep it to one job a tick."""
    await q.schedule_add("beat", "a", "tick", cron=EVERY_SECOND)
    stop = asyncio.Event()
    runs = [asyncio.create_task(Scheduler(q.redis, q.open_blocking(), q.keys).run(stop))
            for _ in range(2)]
    try:
        await until(lambda: _count(q, "beat", 3), timeout=10, what="3 ticks")
    finally:
        stop.set()
        await asyncio.gather(*runs)
    jobs = await scheduled_jobs(q, "beat")
    ticks = sorted(ms(j.metadata["scheduledFor"]) for j in jobs)  # type: ignore[index]
    assert ticks == list(range(ticks[0], ticks[-1] + 1, 1000))  # one each, none skipped
    assert {j.idempotency_key for j in jobs} == {
        f"schedule:beat:{j.metadata['scheduledFor']}" for j in jobs}  # type: ignore[index]
    assert {j.dispatched_by for j in jobs} == {"main"}


async def _count(q: agentq.Client, name: str, at_least: int) -> bool:
    return len(await scheduled_jobs(q, name)) >= at_least


async def test_a_tick_the_queue_depth_cap_refuses_is_skipped_and_recorded(
    redis_url: str, make_config: Callable[..., Config],
) -> None:
    config = make_config(rateLimit={"dispatchesPerMinute": 0, "maxQueueDepth": 1})
    async with agentq.connect(redis_url, config) as q:
        await q.add_agent("a")
        await q.schedule_add("full", "a", "tick", cron=EVERY_SECOND)
        stop = asyncio.Event()
        scheduler = Scheduler(q.redis, q.open_blocking(), q.keys,
                              ticks=Ticks(q.redis, q.keys, max_queue_depth=1))
        run = asyncio.create_task(scheduler.run(stop))

        async def refused() -> bool:
            return (await q.schedule_list())[0].last_refusal == "queue_full"

        try:
            await until(refused, timeout=10, what="a refused tick")
        finally:
            stop.set()
            await run
        assert len(await scheduled_jobs(q, "full")) == 1
        (view,) = await q.schedule_list()
        assert view.state == "active" and view.last_job_id is None


async def test_three_processes_one_job_per_tick_and_one_for_the_ticks_missed(
    redis_url: str, make_config: Callable[..., Config], spawn_background: Callable[..., Any],
) -> None:
    config = make_config(rateLimit=NO_RATE_LIMIT, workers={"heartbeatTimeoutSeconds": 3})
    async with agentq.connect(redis_url, config) as q:
        await q.add_agent("a")
        added = await q.schedule_add("pulse", "a", "tick", cron=EVERY_SECOND)
        first = ms(added.next_tick or "")

        # No process runs: three ticks pass unseen.
        async def missed() -> bool:
            return await server_ms(q) >= first + 2_200

        await until(missed, timeout=10, what="ticks to pass")
        back = await server_ms(q)
        processes = [await spawn_background(redis_url, config, BG_QUIET="1") for _ in range(3)]
        await asyncio.gather(*(p.ready() for p in processes))
        await until(lambda: _count(q, "pulse", 4), timeout=20, what="4 jobs")
        for process in processes:
            await process.close()

        jobs = await scheduled_jobs(q, "pulse")
        ticks = [ms(j.metadata["scheduledFor"]) for j in jobs]  # type: ignore[index]
        assert len(ticks) == len(set(ticks)), "a tick was dispatched twice"
        caught_up = [j for j, tick in zip(jobs, ticks, strict=True) if tick < back]
        assert len(caught_up) == 1, "the missed ticks made one job"
        assert caught_up[0].metadata == {"schedule": "pulse", "catchUp": True,
                                         "scheduledFor": added.next_tick}
        after = sorted(t for t in ticks if t >= back)
        assert after == list(range(after[0], after[-1] + 1, 1000))
        assert not any("catchUp" in (j.metadata or {}) for j in jobs if j is not caught_up[0])
