"""Commands that read the views and the log: list, activity, replay."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import orjson

from agentq import _render as render
from agentq.cli._base import EXIT_OK, Commands, Run, agent_id, flags_named, tool_input
from agentq.schemas.errors import InvalidInput, NotFound, Unauthorized
from agentq.schemas.words import STATES, agent_of_job

if TYPE_CHECKING:
    from agentq.client import Client
    from agentq.schemas.events import StoredEvent

_LIST_FLAGS = {"agent": "--agent", "dispatched_by": "--dispatched-by", "state": "--state",
               "limit": "--limit", "cursor": "--cursor"}


def add_list(commands: Commands) -> None:
    p = commands.add(
        "list",
        summary="list jobs, newest first (queue_list)",
        description=(
            "Jobs newest first, filtered exactly by target, dispatcher and state, a page at\n"
            "a time. Pass the printed cursor to --cursor for the next page. Agents other\n"
            "than system agents see only jobs they dispatched or that target them.\n"
            "With --json, {jobs, count, nextCursor}."
        ),
        examples=["agentq list --state failed", "agentq list --agent researcher --limit 50",
                  "agentq list --as planner --json | jq '.jobs[].jobId'"],
        handler=_list,
    )
    p.add_argument("--agent", metavar="A", help="only jobs targeting A")
    p.add_argument("--dispatched-by", metavar="A", help="only jobs dispatched by A")
    p.add_argument("--state", metavar="S", action="append", choices=STATES,
                   help="only jobs in state S (repeat for several)")
    p.add_argument("--limit", metavar="N", type=int, default=20, help="jobs per page (1-100)")
    p.add_argument("--cursor", metavar="C", help="the nextCursor of the previous page")


async def _list(run: Run) -> int:
    from agentq.schemas.tools import ListInput

    args = run.args
    wanted = tool_input(run, ListInput, {
        "agent": args.agent, "dispatched_by": args.dispatched_by, "state": args.state,
        "limit": args.limit, "cursor": args.cursor}, _LIST_FLAGS)
    async with run.connect() as q:
        with flags_named(run, _LIST_FLAGS):
            page = await q.list(caller=run.caller, agent=wanted.agent,
                                dispatched_by=wanted.dispatched_by, state=wanted.state,
                                limit=wanted.limit, cursor=wanted.cursor)
    text = render.jobs_table(page.jobs, width=run.width) if page.jobs else "No jobs."
    if page.next_cursor:
        text += f"\nmore: agentq list ... --cursor {page.next_cursor}"
    run.emit(page.wire(), text)
    return EXIT_OK


def add_activity(commands: Commands) -> None:
    p = commands.add(
        "activity",
        summary="what each agent is doing (queue_activity)",
        description=(
            "Per agent: offline (no live worker), idle or working; live workers; jobs per\n"
            "state; the jobs running now. With --json, {agents, summary}."
        ),
        examples=["agentq activity", "agentq activity researcher writer --json"],
        handler=_activity,
    )
    p.add_argument("agents", metavar="AGENT", nargs="*", type=agent_id,
                   help="only these agents")


async def _activity(run: Run) -> int:
    async with run.connect() as q:
        activity = await q.activity(run.args.agents or None, caller=run.caller)
    text = (render.activity_table(activity, width=run.width) if activity["agents"]
            else "No agents are known yet.")
    run.emit(activity, text)
    return EXIT_OK


def add_replay(commands: Commands) -> None:
    p = commands.add(
        "replay",
        summary="stream stored events as JSON lines",
        description=(
            "Every stored event as one JSON line, each agent's log in order and the logs\n"
            "merged by event time. --since is inclusive, --until exclusive (ISO-8601).\n"
            "With --as, only the events of jobs that agent may view, without sessionKey\n"
            "(system agents see everything).\n"
            "Progress goes to standard error when it is a terminal."
        ),
        examples=["agentq replay > audit.jsonl",
                  "agentq replay --agent researcher --since 2026-11-24T00:00:00Z",
                  "agentq replay --job j_01J..."],
        handler=_replay,
    )
    p.add_argument("--agent", metavar="A", action="append", help="only A's log (repeatable)")
    p.add_argument("--job", metavar="J", help="only this job's events")
    p.add_argument("--since", metavar="T", help="from this time (inclusive)")
    p.add_argument("--until", metavar="T", help="before this time (exclusive)")


def _time(text: str | None, flag: str) -> int | None:
    from agentq.schemas._base import iso_to_micros

    if text is None:
        return None
    try:
        return iso_to_micros(text)
    except ValueError as exc:
        raise InvalidInput(f"{flag}: not an ISO-8601 time: {text!r}", path=flag) from exc


async def _replay(run: Run) -> int:
    args = run.args
    since, until = _time(args.since, "--since"), _time(args.until, "--until")
    agents: list[str] | None = args.agent
    if args.job:
        owner = agent_of_job(args.job)
        if owner is None:
            raise InvalidInput(f"--job: not a job id: {args.job!r}", path="--job")
        agents = [owner]
    progress = sys.stderr.isatty() and not run.json
    count = 0
    async with run.connect() as q:
        async for event in _events(q, run, agents, since, until):
            run.out.write(orjson.dumps(event.wire()).decode() + "\n")
            count += 1
            if progress and count % 1000 == 0:
                print(f"\r{count} events", end="", file=run.err, flush=True)
    if progress:
        print(f"\r{count} events", file=run.err)
    return EXIT_OK


async def _events(q: Client, run: Run, agents: list[str] | None, since: int | None,
                  until: int | None) -> AsyncIterator[StoredEvent]:
    """What ``replay`` prints: with ``--job``, that job's events alone (read
    along its chain and from the archive, not the agent's whole log; nothing
    for a job the caller may not view or that does not exist, as before)."""
    from agentq.schemas._base import iso_to_micros

    if not run.args.job:
        async for event in q.replay(agents, since_us=since, until_us=until, caller=run.caller):
            yield event.stored()
        return
    try:
        events = await q.history(run.args.job, caller=run.caller)
    except (NotFound, Unauthorized):
        return
    for stored in events:
        at = iso_to_micros(stored.at)
        if (since is None or at >= since) and (until is None or at < until):
            yield stored
