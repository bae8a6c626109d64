"""Commands on jobs: dispatch, status, history, wait, cancel, approve, reject, retry,
drain."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from agentq import _render as render
from agentq.cli._base import (
    _PROGRESS_EVERY,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TIMEOUT,
    PROG,
    Commands,
    Run,
    json_object,
    meta_pair,
    seconds_between,
    tool_input,
)
from agentq.schemas.errors import InvalidInput

if TYPE_CHECKING:  # the parser alone needs none of them (tests/test_startup.py)
    from agentq.client import Client
    from agentq.schemas.job import JobView

# Which flag or argument sets each field of queue_dispatch's input, so that a bad
# value is reported under the name the user typed.
_DISPATCH_FLAGS = {
    "target": "TARGET", "task": "TASK", "delay_seconds": "--delay",
    "max_attempts": "--max-attempts", "timeout_seconds": "--timeout",
    "idempotency_key": "--idempotency-key", "label": "--label", "project": "--project",
    "model": "--model", "thinking": "--thinking", "session_key": "--session-key",
    "origin": "--origin", "metadata": "--meta", "depends_on": "--depends-on",
    "parent_job_id": "AGENTQ_JOB_ID",
}


def add_dispatch(commands: Commands) -> None:
    p = commands.add(
        "dispatch",
        summary="dispatch a task to an agent (queue_dispatch)",
        description=(
            "Create a job for TARGET to run TASK. The job starts queued, delayed (--delay)\n"
            "or waiting for its dependencies (--depends-on). When $AGENTQ_JOB_ID is set\n"
            "(inside a running job) the new job records it as its parent.\n"
            "Prints the job id and state; with --json, the job view."
        ),
        examples=[
            'agentq dispatch researcher "summarise https://example.com/report"',
            "cat brief.md | agentq dispatch writer -",
            "agentq dispatch writer \"draft the post\" --depends-on j_01J... --priority high",
            "agentq dispatch researcher \"check later\" --delay 3600 --meta ticket=OPS-12",
        ],
        handler=_dispatch,
    )
    p.add_argument("target", metavar="TARGET", help="the agent that runs the job")
    p.add_argument("task", metavar="TASK", help="what to do; - reads it from standard input")
    p.add_argument("--depends-on", metavar="ID", action="append", default=[],
                   help="a job that must end first (repeatable, at most 20)")
    p.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                   help="order within the agent's queue (default: normal)")
    p.add_argument("--delay", metavar="S", type=float, help="seconds to wait before queueing")
    p.add_argument("--max-attempts", metavar="N", type=int,
                   help="attempts before the job fails (1-20; default from config)")
    p.add_argument("--timeout", metavar="S", type=float,
                   help="seconds an attempt may run (0 = no limit; default from config)")
    p.add_argument("--idempotency-key", metavar="K",
                   help="dispatching again with the same key returns the first job")
    p.add_argument("--label", metavar="L", help="a short name for people")
    p.add_argument("--project", metavar="P", help="the project the job belongs to")
    p.add_argument("--model", metavar="M", help="the model the handler should use")
    p.add_argument("--thinking", metavar="T", help="the thinking level the handler should use")
    p.add_argument("--on-dependency-failure", choices=("fail", "ignore"), default="fail",
                   help="fail this job when a dependency fails, or run it anyway (default: fail)")
    p.add_argument("--announce", action="store_true",
                   help="when the job ends, dispatch its outcome back to the dispatcher")
    p.add_argument("--requires-approval", action="store_true", default=None,
                   help="the job waits in pending_approval until an approver approves it "
                   "(default: agents.<target>.requiresApproval)")
    p.add_argument("--session-key", metavar="K", help="the dispatcher's session (opaque)")
    p.add_argument("--origin", metavar="JSON", type=json_object,
                   help="the dispatcher's channel as a JSON object")
    p.add_argument("--meta", metavar="KEY=VALUE", type=meta_pair, action="append", default=[],
                   help="a metadata entry, its value a string (repeatable; the last one wins)")


def _read_task(run: Run) -> str:
    task: str = run.args.task
    if task != "-":
        return task
    return sys.stdin.read().rstrip("\r\n")


async def _dispatch(run: Run) -> int:
    from agentq.schemas.tools import DispatchInput

    args = run.args
    fields: dict[str, Any] = {
        "target": args.target,
        "depends_on": args.depends_on,
        "priority": args.priority,
        "on_dependency_failure": args.on_dependency_failure,
        "announce": args.announce,
    }
    optional = {
        "delay_seconds": args.delay,
        "max_attempts": args.max_attempts,
        "timeout_seconds": args.timeout,
        "idempotency_key": args.idempotency_key,
        "label": args.label,
        "project": args.project,
        "model": args.model,
        "thinking": args.thinking,
        "session_key": args.session_key,
        "origin": args.origin,
        "metadata": dict(args.meta) or None,
        "parent_job_id": run.environ.get("AGENTQ_JOB_ID") or None,
        "requires_approval": args.requires_approval,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    fields["task"] = _read_task(run)
    inp = tool_input(run, DispatchInput, fields, _DISPATCH_FLAGS)
    caller = run.caller
    async with run.connect() as q:
        (view,) = await q.dispatch_many([inp], caller=caller)
    run.emit(view.wire(), _dispatched(view))
    return EXIT_OK


def _dispatched(view: JobView) -> str:
    text = f"Job {view.job_id} dispatched to agent {view.target}: {view.state}"
    if view.state == "delayed" and view.run_at:
        text += f" until {render.time_and_age(view.run_at)}"
    elif view.state == "waiting_dependencies":
        count = len(view.depends_on)
        text += f" (on {count} job{'s' if count != 1 else ''})"
    return text


def _job_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB", help="a job id (j_...), as dispatch printed it")


def add_status(commands: Commands) -> None:
    p = commands.add(
        "status",
        summary="show one job (queue_status)",
        description="Show where a job stands: state, attempts, progress, result or error, times.",
        examples=["agentq status j_01J...", "agentq status j_01J... --json | jq .result"],
        handler=_status,
    )
    _job_argument(p)


async def _status(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        view = await q.status(run.args.job, caller=caller)
        budget_from = 0 if run.json else await _budget_from(q, view, caller)
    run.emit(view.wire(), render.job_block(view, budget_from=budget_from))
    return EXIT_OK


async def _budget_from(q: Client, view: JobView, caller: str | None) -> int:
    """The attempt count when the job's current budget began: a retry gives a failed
    job a fresh budget of maxAttempts while ``attempt`` keeps counting (SPEC)."""
    if not view.attempt:
        return 0
    retried = [e for e in await q.history(view.job_id, caller=caller) if e.type == "JobRetried"]
    return int(retried[-1].data["attempt"]) if retried else 0


def add_history(commands: Commands) -> None:
    p = commands.add(
        "history",
        summary="list a job's events, oldest first (queue_history)",
        description=(
            "Every event of the job's log, oldest first: when, what, who caused it.\n"
            "With --json, the list of stored events {eventId, type, jobId, agent, at, actor,\n"
            "v, data}."
        ),
        examples=["agentq history j_01J...", "agentq history j_01J... --json | jq '.[].type'"],
        handler=_history,
    )
    _job_argument(p)


async def _history(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        events = await q.history(run.args.job, caller=caller)
    run.emit([event.wire() for event in events], render.events_table(events, width=run.width))
    return EXIT_OK


def add_wait(commands: Commands) -> None:
    p = commands.add(
        "wait",
        summary="block until a job ends (queue_wait)",
        description=(
            "Block until the job is completed, failed or cancelled, showing its progress on\n"
            "standard error, then print it. Exit 0 when completed, 1 when failed or\n"
            "cancelled, 124 when --timeout passes first, 3 when the job does not exist.\n"
            "With --json, the job view as it stands then, with timedOut."
        ),
        examples=[
            "agentq wait j_01J...",
            "agentq wait j_01J... --timeout 300 --json | jq .result",
        ],
        handler=_wait,
    )
    _job_argument(p)
    p.add_argument("--timeout", metavar="S", type=seconds_between(1, 600), default=60.0,
                   help="give up after S seconds (1-600, as queue_wait; default: 60)")


async def _wait(run: Run) -> int:
    job_id: str = run.args.job
    timeout: float = run.args.timeout
    caller = run.caller
    deadline = time.monotonic() + timeout
    shown = ""
    budget_from: int | None = None
    async with run.connect() as q:
        # With a human watching, wake up now and then to show progress.
        step = timeout if run.json else 0.0
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            view, timed_out = await q.wait(job_id, timeout=min(step, left), caller=caller)
            if not timed_out or time.monotonic() >= deadline:
                break
            if budget_from is None and view.attempt:
                budget_from = await _budget_from(q, view, caller)
            line = render.job_line(view, budget_from=budget_from or 0)
            if line != shown:
                run.note(line)
                shown = line
            step = _PROGRESS_EVERY
        if not run.json:
            budget_from = await _budget_from(q, view, caller)
    run.emit({**view.wire(), "timedOut": timed_out},
             render.job_block(view, budget_from=budget_from or 0))
    if timed_out:
        if not run.json:
            print(f"{PROG}: timed out after {timeout:g}s waiting for job {job_id}; "
                  f"it is {view.state}", file=run.err)
        return EXIT_TIMEOUT
    return EXIT_OK if view.state == "completed" else EXIT_FAILED


def add_cancel(commands: Commands) -> None:
    p = commands.add(
        "cancel",
        summary="cancel a job that has not ended",
        description=(
            "Cancel a job that is pending approval, waiting, delayed, queued or active (an\n"
            "active job's worker is told and kills its handler). Allowed to its dispatcher,\n"
            "its target and system agents. With --cascade, every job dispatched from inside\n"
            "it (at any depth) that has not ended is cancelled too, in the background.\n"
            "With --json, the job view."
        ),
        examples=["agentq cancel j_01J...", "agentq --as planner cancel j_01J...",
                  "agentq cancel j_01J... --cascade"],
        handler=_cancel,
    )
    _job_argument(p)
    p.add_argument("--cascade", action="store_true",
                   help="also cancel every job dispatched from inside it, at any depth")


async def _cancel(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        view = await q.cancel(run.args.job, caller=caller, cascade=run.args.cascade)
    run.emit(view.wire(), f"Job {view.job_id} cancelled"
             + (" (and the jobs dispatched from inside it)" if run.args.cascade else ""))
    return EXIT_OK


def add_approve(commands: Commands) -> None:
    p = commands.add(
        "approve",
        summary="approve a job pending approval (approvers only)",
        description=(
            "Let a job that waits in pending_approval go on: it is queued, or waits for its\n"
            "dependencies or its delay. Allowed to auth.approvers (default: the system\n"
            "agents). A job in another state is refused (exit 5). With --json, the job view."
        ),
        examples=["agentq approve j_01J...", 'agentq approve j_01J... --note "looks right"'],
        handler=_approve,
    )
    _job_argument(p)
    p.add_argument("--note", metavar="TEXT", help="why, kept in the job's history")


async def _approve(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        view = await q.approve(run.args.job, caller=caller, note=run.args.note)
    run.emit(view.wire(), f"Job {view.job_id} approved: {view.state}")
    return EXIT_OK


def add_reject(commands: Commands) -> None:
    p = commands.add(
        "reject",
        summary="reject a job pending approval (approvers only)",
        description=(
            "Refuse a job that waits in pending_approval: it is cancelled and never runs.\n"
            "Allowed to auth.approvers (default: the system agents). A job in another state\n"
            "is refused (exit 5). With --json, the job view."
        ),
        examples=["agentq reject j_01J...", 'agentq reject j_01J... --reason "too costly"'],
        handler=_reject,
    )
    _job_argument(p)
    p.add_argument("--reason", metavar="TEXT", help="why, kept in the job's history")


async def _reject(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        view = await q.reject(run.args.job, caller=caller, reason=run.args.reason)
    run.emit(view.wire(), f"Job {view.job_id} rejected")
    return EXIT_OK


def add_retry(commands: Commands) -> None:
    p = commands.add(
        "retry",
        summary="re-queue a failed job (system agents only)",
        description=(
            "Re-queue a failed job with a fresh budget of attempts. A job in any other state\n"
            "is refused (exit 5). With --json, the job view."
        ),
        examples=["agentq retry j_01J..."],
        handler=_retry,
    )
    _job_argument(p)


async def _retry(run: Run) -> int:
    caller = run.caller
    async with run.connect() as q:
        view = await q.retry(run.args.job, caller=caller)
    run.emit(view.wire(), f"Job {view.job_id} re-queued for agent {view.target}")
    return EXIT_OK


def add_drain(commands: Commands) -> None:
    p = commands.add(
        "drain",
        summary="cancel every queued and delayed job of an agent (system agents only)",
        description=(
            "Cancel every queued and delayed job of AGENT; active jobs and jobs waiting for\n"
            "dependencies are left alone. Needs --confirm. With --json, {agent, drained,\n"
            "jobIds}."
        ),
        examples=["agentq drain researcher --confirm"],
        handler=_drain,
    )
    p.add_argument("agent", metavar="AGENT", help="the agent whose pending jobs to cancel")
    p.add_argument("--confirm", action="store_true", help="really cancel them")


async def _drain(run: Run) -> int:
    agent: str = run.args.agent
    if not run.args.confirm:
        raise InvalidInput(
            f"drain cancels every queued and delayed job of agent {agent} and needs --confirm;"
            f" nothing was changed. To go ahead, run: {PROG} drain {agent} --confirm",
            path="confirm",
        )
    caller = run.caller
    async with run.connect() as q:
        drained = await q.drain(agent, caller=caller)
    run.emit(drained.wire(), f"Drained {drained.drained} jobs from agent {drained.agent}")
    return EXIT_OK


