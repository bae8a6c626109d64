"""What every command shares: the invocation (:class:`Run`), the global flags,
the registry commands add themselves to, and small argument types."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from agentq.client import Client, connect
from agentq.config import load_config
from agentq.schemas.config import Config
from agentq.schemas.errors import InvalidInput
from agentq.schemas.job import AGENT_ID_RE

PROG = "agentq"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
# Between polls, `wait` shows how the job is doing; the client itself wakes on
# the job's terminal event, so this only bounds how stale the progress line is.
_PROGRESS_EVERY = 1.0
_URL_SCHEMES = ("redis://", "rediss://", "unix://")


class UsageError(Exception):
    """The command line itself is wrong; reported like argparse does, with exit 2."""

    def __init__(
        self,
        message: str,
        parser: argparse.ArgumentParser | None = None,
        *,
        full_help: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.parser = parser
        self.full_help = full_help


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting, so ``--json`` can report usage errors."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self)


@dataclass
class Run:
    """One invocation: its parsed arguments, where output goes, and how to reach agentq."""

    args: argparse.Namespace
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def json(self) -> bool:
        return bool(self.args.json)

    @property
    def caller(self) -> str | None:
        """``--as``, else ``AGENTQ_AGENT``; None acts as the operator."""
        agent: str | None = self.args.as_agent or self.environ.get("AGENTQ_AGENT") or None
        if agent is not None and not AGENT_ID_RE.match(agent):
            raise InvalidInput(
                f"Invalid agent id for --as: {agent!r}: use ^[a-z0-9][a-z0-9_-]{{0,63}}$",
                path="as",
            )
        return agent

    def config(self) -> Config:
        """The effective config: ``--redis`` over the environment over ``--config``'s file."""
        flags: dict[str, Any] = {}
        if self.args.redis:
            flags["redis"] = {"url": self.args.redis}
        return load_config(self.args.config, environ=self.environ, flags=flags)

    def connect(self) -> Client:
        config = self.config()
        url = config.redis.url
        if url is not None and not url.startswith(_URL_SCHEMES):
            raise InvalidInput(
                f"Invalid Redis URL {url!r}: it must start with one of "
                f"{', '.join(_URL_SCHEMES)}, e.g. redis://127.0.0.1:6379/0",
                path="redis.url",
            )
        return connect(None, config)

    def emit(self, data: object, text: str) -> None:
        """Print ``data`` as JSON with ``--json``, else ``text``."""
        if self.json:
            print_json(data, self.out)
        elif text:
            print(text, file=self.out)

    def note(self, text: str) -> None:
        """A line for the human watching, on standard error (never with ``--json``)."""
        if not self.json:
            print(text, file=self.err, flush=True)


Handler = Callable[[Run], Coroutine[Any, Any, int]]


def print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


# -- building the parser -----------------------------------------------------


def _global_flags(*, top: bool) -> _Parser:
    """The flags every command accepts, before or after its name.

    Below the top level they default to SUPPRESS, so that a flag given before
    the command is not reset by the subcommand's own default.
    """
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("global options")

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    group.add_argument(
        "--config", metavar="FILE", default=default(None),
        help="config file (TOML, YAML or JSON); default: $AGENTQ_CONFIG",
    )
    group.add_argument(
        "--redis", metavar="URL", default=default(None),
        help="Redis URL, e.g. redis://127.0.0.1:6379/0; default: $AGENTQ_REDIS_URL, then the "
        "config, then an embedded server in $AGENTQ_HOME (./.agentq)",
    )
    group.add_argument(
        "--as", dest="as_agent", metavar="AGENT", default=default(None),
        help="act as this agent; default: $AGENTQ_AGENT, else the operator "
        "(the first of auth.systemAgents)",
    )
    group.add_argument(
        "--json", action="store_true", default=default(False),
        help="print exactly the tool's JSON (errors as {\"error\": {code, message}})",
    )
    return parent


def examples_text(lines: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class Commands:
    """Where commands register: wraps argparse's subparsers with the global flags,
    a description, examples and a handler."""

    def __init__(self, action: argparse._SubParsersAction[_Parser]) -> None:
        self._action = action

    def add(
        self,
        name: str,
        *,
        summary: str,
        description: str,
        examples: Sequence[str] = (),
        handler: Handler | None = None,
    ) -> _Parser:
        """A parser for ``name``; its arguments are the caller's to add."""
        parser = self._action.add_parser(
            name,
            help=summary,
            description=description,
            epilog=examples_text(examples) if examples else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[_global_flags(top=False)],
        )
        parser.set_defaults(handler=handler, command_parser=parser)
        return parser

    def group(
        self, name: str, *, summary: str, description: str, examples: Sequence[str] = ()
    ) -> Commands:
        """A command with subcommands of its own (``agents list``, ``server stop``)."""
        parser = self.add(name, summary=summary, description=description, examples=examples)
        action = parser.add_subparsers(
            title="commands", metavar="COMMAND", dest=f"{name}_command"
        )
        return Commands(action)



def meta_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"channel\": \"slack\"}'")
    return value


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


