"""``agentq archive run``: one archiving pass over every partition, now."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentq.cli._base import EXIT_FAILED, EXIT_OK, Commands, Run, agent_id
from agentq.schemas.errors import InvalidInput, Unauthorized, Unavailable

if TYPE_CHECKING:  # imported by the handler: the parser alone needs none of it
    from agentq.consumers.archiver import PassOutcome


def add_archive(commands: Commands) -> None:
    group = commands.group(
        "archive", summary="archive events and remove old jobs from Redis",
        description=(
            "The archive (retention.archive) holds every event; Redis holds the jobs that\n"
            "ended within retention.jobsSeconds, and those still running. Every worker\n"
            "and run process archives in the background; this does it now."
        ),
    )
    p = group.add(
        "run", summary="archive and trim every partition once, now",
        description=(
            "Archive each agent's events that every consumer group has handled, then\n"
            "remove from Redis the jobs that ended more than retention.jobsSeconds ago\n"
            "(with their log entries, once archived). Progress goes to standard error,\n"
            "a summary to standard output; with --json, {archive, agents, events,\n"
            "segments, removed, trimmed, busy, heldBack} (system agents only).\n\n"
            "exit codes: 0 done; 1 some agent was left (its archive disagrees with\n"
            "Redis, or another process held it past the wait): see heldBack and busy;\n"
            "2 retention.archive is not set; 4 not a system agent; 6 Redis or the\n"
            "archive cannot be reached."
        ),
        examples=["agentq archive run", "agentq archive run --agent researcher --json"],
        handler=_archive_run,
    )
    p.add_argument("--agent", metavar="A", action="append", type=agent_id,
                   help="only A's partition (repeatable)")


async def _archive_run(run: Run) -> int:
    from agentq.config import redis_configured, with_embedded_archive
    from agentq.consumers.archiver import Archiver
    from agentq.eventlog.archive import ArchiveError, open_archive
    from agentq.eventlog.registry import all_partitions

    async with run.connect() as q:
        who = q.caller_or_operator(run.caller)
        if not q.config.is_system(who):
            raise Unauthorized("Unauthorized: archive run requires a system agent.")
        config = q.config
        if not redis_configured(config):  # the embedded server: its default archive
            config = with_embedded_archive(config, run.environ)
        url = config.retention.archive
        if url is None:
            raise InvalidInput(
                "retention.archive is not set: there is nowhere to archive to; set it to "
                "file://PATH or s3://BUCKET/PREFIX (AGENTQ_RETENTION__ARCHIVE)",
                path="retention.archive")
        agents = run.args.agent or await all_partitions(q.redis, q.keys)
        try:
            archive = open_archive(url, q.keys.prefix)
            archiver = Archiver(q.redis, q.redis, q.keys, archive, config.retention)

            def progress(outcome: PassOutcome) -> None:
                run.note(_progress_line(outcome))

            totals = await archiver.archive_all(agents, progress)
        except ArchiveError as exc:
            raise Unavailable(f"the archive at {url}: {exc}") from exc
    data = {"archive": url, "agents": totals.agents, "events": totals.events,
            "segments": totals.segments, "removed": totals.removed, "trimmed": totals.trimmed,
            "busy": totals.busy, "heldBack": totals.held_back}
    text = (f"Archived {totals.events} events of {totals.agents} agents to {url} in "
            f"{totals.segments} segments; removed {totals.removed} ended jobs and "
            f"{totals.trimmed} log entries from Redis")
    for agent in totals.busy:
        text += f"\n{agent}: left: another process is archiving it"
    for agent, why in totals.held_back.items():
        text += f"\n{agent}: {why}"
    run.emit(data, text)
    return EXIT_FAILED if totals.busy or totals.stuck else EXIT_OK


def _progress_line(outcome: PassOutcome) -> str:
    if outcome.busy:
        return f"{outcome.agent}: another process is archiving it"
    line = (f"{outcome.agent}: {outcome.events} events archived"
            f" (to {outcome.archived_to or 'nothing yet'}), {outcome.removed} jobs removed,"
            f" {outcome.trimmed} log entries trimmed")
    if outcome.more:
        line += "; more follows"
    return line
