"""``agentq schedule``: recurring jobs on cron expressions (the operator's)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agentq.cli._base import (
    EXIT_OK,
    Commands,
    Run,
    agent_id,
    flags_named,
    json_object,
    meta_pair,
)

if TYPE_CHECKING:  # the parser alone needs none of them (tests/test_startup.py)
    from agentq.schemas.schedule import ScheduleView

_ONLY_SYSTEM = "Schedules are the operator's: only system agents (auth.systemAgents) manage them."
# Which flag or argument names each input, for the errors a user reads.
_FLAGS = {
    "name": "NAME", "cron": "--cron", "tz": "--tz", "target": "TARGET", "task": "TASK",
    "maxAttempts": "--max-attempts", "timeoutSeconds": "--timeout", "label": "--label",
    "project": "--project", "model": "--model", "thinking": "--thinking",
    "metadata": "--meta", "sessionKey": "--session-key", "origin": "--origin",
}
_EXIT_CODES = (
    "exit codes: 0 done; 2 invalid input (a bad cron expression, an unknown time zone, a\n"
    "bad name); 3 unknown target agent or schedule; 4 not a system agent; 5 the name is\n"
    "taken, or the schedule is already paused (pause) or not paused (resume); 6 Redis\n"
    "unavailable."
)


def add_schedule(commands: Commands) -> None:
    group = commands.group(
        "schedule",
        summary="recurring jobs on cron expressions",
        description=(
            "Schedules dispatch one job at each tick of a cron expression, in a time zone.\n"
            "Every worker and run process ticks them, sharing the work: each tick is\n"
            "dispatched exactly once (idempotency key schedule:NAME:TICK), and a tick\n"
            "missed while no process ran is dispatched once when one comes back.\n"
            + _ONLY_SYSTEM
        ),
        examples=[
            "agentq schedule add nightly-report --cron '0 2 * * *' --tz Europe/Paris "
            "researcher 'write the nightly report'",
            "agentq schedule list",
            "agentq schedule pause nightly-report",
            "agentq schedule resume nightly-report",
            "agentq schedule remove nightly-report",
        ],
    )
    p = group.add(
        "add",
        summary="add a schedule",
        description=(
            "At each tick of --cron in --tz (default UTC), dispatch TASK to TARGET as the\n"
            "caller would. EXPR: five fields (minute hour day-of-month month day-of-week),\n"
            "six with seconds first ('*/10 * * * * *'), or @hourly, @daily, @weekly,\n"
            "@monthly, @yearly. Each job's metadata carries {schedule, scheduledFor} and\n"
            "catchUp: true for the one job of ticks missed while no process ran.\n"
            "With --json, the schedule.\n\n" + _EXIT_CODES
        ),
        examples=[
            "agentq schedule add standup --cron '0 9 * * 1-5' --tz America/New_York "
            "planner 'prepare the standup notes'",
            "agentq schedule add poll --cron '*/30 * * * * *' watcher 'check the feed' "
            "--priority low --max-attempts 1",
        ],
        handler=_add,
    )
    p.add_argument("name", metavar="NAME",
                   help="the schedule's name, unique: ^[a-z0-9][a-z0-9_.-]{0,63}$")
    p.add_argument("--cron", metavar="EXPR", required=True, help="when it fires (see above)")
    p.add_argument("--tz", metavar="ZONE", default="UTC",
                   help="the IANA time zone the cron expression is read in (default: UTC)")
    p.add_argument("target", metavar="TARGET", type=agent_id, help="the agent that runs the jobs")
    p.add_argument("task", metavar="TASK", help="what each job does")
    p.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                   help="order within the agent's queue (default: normal)")
    p.add_argument("--max-attempts", metavar="N", type=int,
                   help="attempts before a job fails (1-20; default from config)")
    p.add_argument("--timeout", metavar="S", type=float,
                   help="seconds an attempt may run (0 = no limit; default from config)")
    p.add_argument("--label", metavar="L", help="a short name for people")
    p.add_argument("--project", metavar="P", help="the project the jobs belong to")
    p.add_argument("--model", metavar="M", help="the model the handler should use")
    p.add_argument("--thinking", metavar="T", help="the thinking level the handler should use")
    p.add_argument("--announce", action="store_true",
                   help="when a job ends, dispatch its outcome back to the dispatcher")
    p.add_argument("--session-key", metavar="K", help="the dispatcher's session (opaque)")
    p.add_argument("--origin", metavar="JSON", type=json_object,
                   help="the dispatcher's channel as a JSON object")
    p.add_argument("--meta", metavar="KEY=VALUE", type=meta_pair, action="append", default=[],
                   help="a metadata entry of every job (repeatable)")

    group.add(
        "list", summary="list every schedule",
        description=("Every schedule: name, state, cron and zone, next and last tick, target,\n"
                     "task. With --json, {schedules: [...], count}.\n\n" + _EXIT_CODES),
        examples=["agentq schedule list", "agentq schedule list --json | jq '.schedules[].name'"],
        handler=_list,
    )
    for name, summary, text in (
        ("remove", "remove a schedule", "Remove NAME: it dispatches nothing more. Jobs it\n"
         "dispatched stay. With --json, {name, removed}."),
        ("pause", "pause a schedule", "Pause NAME: its ticks pass without a job until it is\n"
         "resumed. With --json, the schedule."),
        ("resume", "resume a paused schedule", "Resume NAME from its next tick; ticks passed\n"
         "while it was paused are not dispatched. With --json, the schedule."),
        ("history", "list a schedule's events", "The events of NAME, oldest first: added,\n"
         "paused, resumed, removed, with who and when. With --json, the list of events\n"
         "{eventId, type, schedule, agent, at, actor, v, data}. --agent finds a removed\n"
         "schedule's events."),
    ):
        sub = group.add(name, summary=summary, description=f"{text}\n\n{_EXIT_CODES}",
                        examples=[f"agentq schedule {name} nightly-report"],
                        handler=_HANDLERS[name])
        sub.add_argument("name", metavar="NAME", help="a schedule's name")
        if name == "history":
            sub.add_argument("--agent", metavar="A", type=agent_id,
                             help="the schedule's target (for a removed schedule)")


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {"priority": args.priority}
    if args.announce:
        fields["announce"] = True
    optional = {
        "max_attempts": args.max_attempts, "timeout_seconds": args.timeout,
        "label": args.label, "project": args.project, "model": args.model,
        "thinking": args.thinking, "session_key": args.session_key, "origin": args.origin,
        "metadata": dict(args.meta) or None,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


async def _add(run: Run) -> int:
    args = run.args
    caller = run.caller
    with _named(run):
        async with run.connect() as q:
            view = await q.schedule_add(args.name, args.target, args.task, cron=args.cron,
                                        tz=args.tz, caller=caller, **_fields(args))
    run.emit(view.wire(), f"Schedule {view.name} added: {view.cron} ({view.timezone}) "
                          f"dispatches to {view.target}; next tick {view.next_tick}")
    return EXIT_OK


async def _list(run: Run) -> int:
    from agentq import _render as render

    caller = run.caller
    async with run.connect() as q:
        views = await q.schedule_list(caller=caller)
    rows = [(v.name, v.state, f"{v.cron} ({v.timezone})", v.next_tick or "-",
             _last(v), v.target, v.task) for v in views]
    text = (render.table(("NAME", "STATE", "CRON", "NEXT TICK", "LAST", "TARGET", "TASK"),
                         rows, width=run.width) if views
            else "No schedules. Add one with: agentq schedule add NAME --cron EXPR TARGET TASK")
    run.emit({"schedules": [v.wire() for v in views], "count": len(views)}, text)
    return EXIT_OK


def _last(view: ScheduleView) -> str:
    if view.last_tick is None:
        return "-"
    return f"{view.last_tick} {view.last_job_id or 'refused: ' + str(view.last_refusal)}"


async def _remove(run: Run) -> int:
    caller = run.caller
    with _named(run):
        async with run.connect() as q:
            await q.schedule_remove(run.args.name, caller=caller)
    run.emit({"name": run.args.name, "removed": True}, f"Schedule {run.args.name} removed")
    return EXIT_OK


async def _pause(run: Run) -> int:
    caller = run.caller
    with _named(run):
        async with run.connect() as q:
            view = await q.schedule_pause(run.args.name, caller=caller)
    run.emit(view.wire(), f"Schedule {view.name} paused")
    return EXIT_OK


async def _resume(run: Run) -> int:
    caller = run.caller
    with _named(run):
        async with run.connect() as q:
            view = await q.schedule_resume(run.args.name, caller=caller)
    run.emit(view.wire(), f"Schedule {view.name} resumed; next tick {view.next_tick}")
    return EXIT_OK


async def _history(run: Run) -> int:
    from agentq import _render as render

    caller = run.caller
    with _named(run):
        async with run.connect() as q:
            events = await q.schedule_history(run.args.name, target=run.args.agent,
                                              caller=caller)
    rows = [(e.at, e.type, e.actor, render.compact(e.data) if e.data else "") for e in events]
    run.emit([e.wire() for e in events],
             render.table(("AT", "EVENT", "ACTOR", "DATA"), rows, width=run.width))
    return EXIT_OK


def _named(run: Run) -> Any:
    """Report an invalid name, cron or zone as a usage error naming the flag (exit 2)."""
    return flags_named(run, _FLAGS)


_HANDLERS = {"remove": _remove, "pause": _pause, "resume": _resume, "history": _history}
