"""The ``agentq`` command line.

Each command is one ``add_<name>`` function that declares its parser and names
its handler, listed once in :data:`COMMANDS`. A handler is ``async (Run) -> int``
and returns the exit code; it raises :class:`AgentqError` for refusals, which
:func:`main` turns into SPEC's exit code, a message on standard error and, with
``--json``, the error object on standard output.

Nothing heavy is imported before the command is known: the command modules import
Redis, the pydantic models and the rest inside their handlers, so that
``agentq --help`` and usage errors stay quick (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from agentq.cli._advice import explain
from agentq.cli._base import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    Commands,
    Handler,
    Run,
    UsageError,
    _global_flags,
    _Parser,
    examples_text,
    print_json,
)
from agentq.cli.admin import add_agents, add_server
from agentq.cli.archive import add_archive
from agentq.cli.dashboard import add_dashboard
from agentq.cli.jobs import (
    add_approve,
    add_cancel,
    add_dispatch,
    add_drain,
    add_history,
    add_reject,
    add_retry,
    add_status,
    add_wait,
)
from agentq.cli.operate import (
    add_audit,
    add_config,
    add_demo,
    add_mcp,
    add_projections,
    add_run,
    add_worker,
)
from agentq.cli.reads import add_activity, add_list, add_replay
from agentq.cli.schedules import add_schedule
from agentq.cli.tokens import add_tokens
from agentq.schemas.errors import AgentqError, InvalidInput, Unavailable

__all__ = ["COMMANDS", "Run", "build_parser", "main"]


def build_parser() -> _Parser:
    """The whole ``agentq`` parser, every command in :data:`COMMANDS` registered."""
    parser = _Parser(
        prog=PROG,
        description=(
            "agentq: a job orchestrator for AI agents, event-sourced on Redis Streams.\n\n"
            "Agents dispatch tasks to other agents; workers run them; every change is an\n"
            "event in an append-only log. Without --redis (or a configured Redis), agentq\n"
            "starts an embedded Redis in $AGENTQ_HOME (default ./.agentq) and reuses it\n"
            "until `agentq server stop`."
        ),
        epilog=examples_text([
            "agentq agents add researcher          # make an agent known",
            'agentq dispatch researcher "summarise the report"',
            "agentq status j_01J...                # where a job stands",
            "agentq wait j_01J... --timeout 120    # block until it ends",
            "agentq history j_01J...               # every event of the job",
            "agentq COMMAND --help                 # more on one command",
        ]) + (
            "\n\nexit codes: 0 ok; 1 job failed or cancelled (wait); 2 invalid input or usage;"
            "\n3 not found or unknown agent; 4 unauthorized or forbidden; 5 rate limited,"
            "\nqueue full or invalid state; 6 Redis unavailable; 124 wait timed out."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_flags(top=True)],
    )
    parser.set_defaults(handler=None, command_parser=parser)
    action = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    commands = Commands(action)
    for register in COMMANDS:
        register(commands)
    return parser



# Every command, in the order `agentq --help` lists them. A new command is one
# `add_<name>(commands)` function and one entry here.
COMMANDS: tuple[Callable[[Commands], None], ...] = (
    add_dispatch,
    add_status,
    add_list,
    add_activity,
    add_history,
    add_wait,
    add_cancel,
    add_approve,
    add_reject,
    add_retry,
    add_drain,
    add_schedule,
    add_worker,
    add_run,
    add_replay,
    add_projections,
    add_audit,
    add_archive,
    add_config,
    add_agents,
    add_server,
    add_mcp,
    add_tokens,
    add_dashboard,
    add_demo,
)


# -- running -----------------------------------------------------------------


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was given, for errors raised before parsing finished."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def _report(
    error: AgentqError, want_json: bool, out: TextIO, err: TextIO, run: Run | None = None
) -> int:
    headline, hints = explain(error, run)
    print(f"{PROG}: {headline}", file=err)
    for hint in hints:
        print(f"{PROG}: {hint}", file=err)
    if want_json:
        print_json(error.to_json(), out)
    return error.exit_code


def _report_usage(error: UsageError, want_json: bool, out: TextIO, err: TextIO) -> int:
    parser = error.parser
    if parser is not None:
        err.write(parser.format_help() if error.full_help else parser.format_usage())
    prog = parser.prog if parser is not None else PROG
    print(f"{prog}: error: {error.message}", file=err)
    if want_json:
        print_json(InvalidInput(error.message).to_json(), out)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``agentq`` command; returns its exit code (SPEC's table).

    When whoever reads standard output stops reading (``agentq list | head -1``),
    the command ends quietly with 141, as a process killed by SIGPIPE would.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout
    try:
        code = _run_command(arguments, out, sys.stderr)
        out.flush()
    except BrokenPipeError:
        _discard_output(out)
        return EXIT_BROKEN_PIPE
    return code


def _discard_output(out: TextIO) -> None:
    """Point standard output at /dev/null, so that nothing left in its buffer fails
    again (and is reported) when the interpreter flushes it on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass  # not a real file (a test's StringIO): nothing to flush later


def _run_command(arguments: list[str], out: TextIO, err: TextIO) -> int:
    want_json = _wants_json(arguments)
    parser = build_parser()
    run: Run | None = None
    try:
        args = parser.parse_args(arguments)
        handler: Handler | None = args.handler
        if handler is None:
            # `agentq` or `agentq agents` alone: show what there is to run.
            command_parser: argparse.ArgumentParser = args.command_parser
            raise UsageError("a command is required", command_parser, full_help=True)
        run = Run(args, out, err)
        return _execute(handler, run)
    except UsageError as exc:
        return _report_usage(exc, want_json, out, err)
    except AgentqError as exc:
        return _report(exc, want_json, out, err, run)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return EXIT_INTERRUPTED
    except Exception as exc:
        refusal = _unavailable(exc)
        if refusal is None:
            raise
        return _report(refusal, want_json, out, err)


def _execute(handler: Handler, run: Run) -> int:
    """Run a command's handler: only now are asyncio and the logging set up."""
    import asyncio

    import structlog

    # Standard output carries results, --json and the MCP protocol: logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    return asyncio.run(handler(run))


def _unavailable(exc: Exception) -> Unavailable | None:
    """What to report for an error of Redis or of the embedded server; None for others.

    Imported here, not at the top: a handler that raised one has loaded them already.
    """
    from redis.exceptions import RedisClusterException, RedisError

    from agentq import embedded

    if isinstance(exc, embedded.EmbeddedServerError):
        return Unavailable(f"the embedded Redis server: {exc}")
    if isinstance(exc, RedisClusterException):
        return Unavailable(f"the Redis Cluster refused the command: {exc}")
    if isinstance(exc, RedisError):
        # The client wraps connection failures; anything else Redis refuses (a bad
        # password, a db index out of range) still means agentq cannot use it.
        return Unavailable(f"Redis refused the command: {exc}")
    return None


if __name__ == "__main__":
    raise SystemExit(main())
