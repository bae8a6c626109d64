"""Human-readable output for the CLI: aligned tables, key/value blocks and times.

Everything here returns text and prints nothing; ``--json`` output never comes
through this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line imports this module before it knows its command
    from agentq.schemas.events import StoredEvent
    from agentq.schemas.job import JobView

__all__ = [
    "agents_table",
    "attempts",
    "compact",
    "counted",
    "event_details",
    "events_table",
    "job_block",
    "job_line",
    "key_values",
    "parse_time",
    "relative_time",
    "shorten",
    "table",
    "time_and_age",
]

_GAP = "  "
_MIN_LAST_COLUMN = 24


def parse_time(iso: str) -> datetime:
    """An ISO-8601 time from a view or event as an aware UTC datetime (naive means UTC)."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def relative_time(moment: datetime, now: datetime | None = None) -> str:
    """``5s ago``, ``in 2m``, ``3h ago``, ``just now``: the coarsest unit that is not zero."""
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    size = abs(seconds)
    if size < 1:
        return "just now"
    for unit, length in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if size >= length:
            amount = f"{int(size // length)}{unit}"
            break
    return f"{amount} ago" if seconds > 0 else f"in {amount}"


def time_and_age(iso: str | None, now: datetime | None = None) -> str:
    """``2024-05-01 12:03:04 UTC (5s ago)``; empty for None."""
    if not iso:
        return ""
    moment = parse_time(iso)
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({relative_time(moment, now)})"


def _event_time(iso: str) -> str:
    moment = parse_time(iso)
    return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d}"


def counted(n: int, noun: str) -> str:
    """``n`` of ``noun``, with thousands separated: "1 event", "2,000 events"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def shorten(text: str, width: int) -> str:
    """``text`` on one line, cut to at most ``width`` characters, ending in ``...`` when cut."""
    flat = " ".join(text.split())
    if len(flat) <= width:
        return flat
    return flat[: max(width - 3, 0)] + "..."


def compact(value: Any) -> str:
    """A value for a human: strings as they are, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, width: int | None = None
) -> str:
    """Columns aligned on the widest cell, two spaces apart.

    The last column is not padded. With a ``width`` (a terminal's), it is cut so
    that each line fits without going below a readable minimum; with None (output
    to a pipe or a file) nothing is cut.
    """
    body = [[cell.replace("\n", " ") for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    lead = sum(widths[:-1]) + len(_GAP) * (len(headers) - 1)
    room = max(width - lead, _MIN_LAST_COLUMN) if width is not None else None
    lines = []
    for row in [list(headers), *body]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        last = " ".join(row[-1].split())
        cells.append(last if room is None else shorten(last, room))
        lines.append(_GAP.join(cells).rstrip())
    return "\n".join(lines)


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """``key  value`` lines with the values aligned; a value's extra lines are indented
    under its first. Pairs with an empty value are left out."""
    shown = [(key, value) for key, value in pairs if value != ""]
    if not shown:
        return ""
    indent = max(len(key) for key, _ in shown) + len(_GAP)
    lines = []
    for key, value in shown:
        first, *rest = value.splitlines() or [""]
        lines.append(f"{key.ljust(indent)}{first}".rstrip())
        lines.extend(f"{' ' * indent}{line}".rstrip() for line in rest)
    return "\n".join(lines)


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _dependencies(view: JobView) -> str:
    lines = []
    for dep in view.depends_on:
        known = view.dependencies.get(dep)
        lines.append(f"{dep} ({known.state})" if known else dep)
    return "\n".join(lines)


def _progress(view: JobView) -> str:
    if view.progress is None:
        return ""
    text = f"{view.progress.percent:g}%"
    return f"{text} {view.progress.message}" if view.progress.message else text


def attempts(view: JobView, budget_from: int = 0) -> str:
    """``2 of 3``: the attempt within its budget of ``maxAttempts``. After a retry
    (the budget began at attempt ``budget_from``) the count since dispatch follows."""
    text = f"{view.attempt - budget_from} of {view.max_attempts}"
    if budget_from:
        text += f" ({view.attempt} since dispatch; retried)"
    return text


def job_block(view: JobView, now: datetime | None = None, *, budget_from: int = 0) -> str:
    """The job as an aligned key/value block, empty fields left out, the task last.
    ``budget_from``: see :func:`attempts`."""
    result = "" if view.result is None else compact(view.result)
    pairs = [
        ("job", view.job_id),
        ("state", view.state),
        ("target", view.target),
        ("dispatched by", view.dispatched_by),
        ("attempt", attempts(view, budget_from)),
        ("priority", view.priority),
        ("label", view.label or ""),
        ("project", view.project or ""),
        ("model", view.model or ""),
        ("thinking", view.thinking or ""),
        ("timeout", _seconds(view.timeout_seconds) if view.timeout_seconds else ""),
        ("depends on", _dependencies(view)),
        ("on dep. failure", "ignore" if view.on_dependency_failure == "ignore" else ""),
        ("progress", _progress(view)),
        ("result", result),
        ("error", view.error or ""),
        ("created", time_and_age(view.created_at, now)),
        ("queued", time_and_age(view.queued_at, now)),
        ("run at", time_and_age(view.run_at, now)),
        ("started", time_and_age(view.started_at, now)),
        ("finished", time_and_age(view.finished_at, now)),
        ("idempotency key", view.idempotency_key or ""),
        ("parent job", view.parent_job_id or ""),
        ("depth", str(view.depth) if view.depth else ""),
        ("announce", "yes" if view.announce else ""),
        ("session key", view.session_key or ""),
        ("origin", compact(view.origin) if view.origin else ""),
        ("metadata", compact(view.metadata) if view.metadata else ""),
        ("task", view.task),
    ]
    return key_values(pairs)


def job_line(view: JobView, *, budget_from: int = 0) -> str:
    """One line on where a job stands: state, attempt and progress."""
    parts: list[str] = [view.state]
    if view.attempt:
        parts.append(f"attempt {attempts(view, budget_from)}")
    progress = _progress(view)
    if progress:
        parts.append(progress)
    return f"Job {view.job_id}: " + ", ".join(parts)


# Which data fields say the most about each event type, in the order shown.
_DETAIL_KEYS: Mapping[str, tuple[str, ...]] = {
    "JobDispatched": ("state", "priority", "dependsOn", "runAt", "task"),
    "JobStarted": ("attempt", "workerId"),
    "JobCompleted": ("attempt", "result"),
    "JobAttemptFailed": ("attempt", "state", "runAt", "error"),
    "JobStalled": ("attempt", "released", "state", "runAt", "workerId"),
    "JobFailed": ("attempt", "reason", "error"),
    "JobCancelled": ("fromState", "reason", "cascade", "parentJobId"),
    "JobApproved": ("state", "runAt", "note"),
    "JobRejected": ("reason",),
    "DependencyResolved": ("dependencyId", "state", "error"),
}


def event_details(event: StoredEvent) -> str:
    """The event's data as ``key=value`` pairs, the telling fields first."""
    data = event.data
    keys = _DETAIL_KEYS.get(event.type, tuple(data))
    parts = []
    for key in keys:
        value = data.get(key)
        if value is None or value == [] or (key == "priority" and value == "normal"):
            continue
        text = compact(value)
        if key == "task":
            text = json.dumps(" ".join(text.split()), ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def events_table(events: Sequence[StoredEvent], *, width: int | None = None) -> str:
    """A job's history as a table: time (UTC, milliseconds), type, actor, details."""
    rows = [(_event_time(e.at), e.type, e.actor, event_details(e)) for e in events]
    return table(("TIME (UTC)", "EVENT", "ACTOR", "DETAILS"), rows, width=width)


def agents_table(agents: Mapping[str, Sequence[str]], *, width: int | None = None) -> str:
    """Known agents and whom each may dispatch to."""
    rows = [(agent, ", ".join(allow)) for agent, allow in sorted(agents.items())]
    return table(("AGENT", "MAY DISPATCH TO"), rows, width=width)


def jobs_table(views: Sequence[JobView], *, width: int | None = None) -> str:
    """Jobs one per line: id, target, dispatcher, state, age, task."""
    rows = [
        [v.job_id, v.target, v.dispatched_by, v.state, time_and_age(v.created_at), v.task]
        for v in views
    ]
    return table(["JOB", "TARGET", "FROM", "STATE", "CREATED", "TASK"], rows, width=width)


def activity_table(activity: Mapping[str, Any], *, width: int | None = None) -> str:
    """Agents one per line: status, workers, counts per state, what runs now."""
    rows = []
    for agent, a in activity["agents"].items():
        current = ", ".join(j["label"] or j["task"] for j in a["currentJobs"])
        rows.append([
            agent, a["status"], str(a["workers"]), str(a["queued"]), str(a["delayed"]),
            str(a["waitingDependencies"]), str(a["active"]), str(a["completed"]),
            str(a["failed"]), current,
        ])
    headers = ["AGENT", "STATUS", "WORKERS", "QUEUED", "DELAYED", "WAITING", "ACTIVE",
               "DONE", "FAILED", "RUNNING NOW"]
    return table(headers, rows, width=width)
