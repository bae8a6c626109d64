"""What every command shares: the invocation (:class:`Run`), the global flags,
the registry commands add themselves to, and small argument types."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar
from urllib.parse import parse_qs, urlsplit

from agentq.schemas.errors import InvalidInput
from agentq.schemas.words import AGENT_ID_PATTERN, AGENT_ID_RE

if TYPE_CHECKING:  # imported where used: the parser alone needs none of them
    from pydantic import BaseModel

    from agentq import embedded
    from agentq.client import Client
    from agentq.schemas.config import Config

PROG = "agentq"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
# What a shell reports for a process killed by SIGPIPE: the reader of our output left.
EXIT_BROKEN_PIPE = 141
# Between polls, `wait` shows how the job is doing; the client itself wakes on
# the job's terminal event, so this only bounds how stale the progress line is.
_PROGRESS_EVERY = 1.0
_URL_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


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
        if agent is not None and not AGENT_ID_RE.fullmatch(agent):
            raise InvalidInput(
                f"Invalid agent id for --as: {agent!r}: use ^[a-z0-9][a-z0-9_-]{{0,63}}$",
                path="as",
            )
        return agent

    def config(self) -> Config:
        """The effective config: ``--redis`` over the environment over ``--config``'s file."""
        from agentq.config import load_config

        flags: dict[str, Any] = {}
        if self.args.redis:
            flags["redis"] = {"url": self.args.redis}
        return load_config(self.args.config, environ=self.environ, flags=flags)

    # Set when this invocation started the embedded server (and said so).
    started_server: embedded.EmbeddedServer | None = field(default=None, init=False)

    @property
    def width(self) -> int | None:
        """Columns to fit tables in: the terminal's, or None (no cutting) when
        standard output is a pipe or a file."""
        return shutil.get_terminal_size().columns if self.out.isatty() else None

    def redis_url(self, config: Config) -> str | None:
        """The URL to connect to; None lets the client use the configured server.

        Starts the embedded server when nothing is configured, and says so on
        standard error when this command is the one that started it: a command
        run from another directory gets another, empty, data directory.
        """
        url = config.redis.url
        if url is not None:
            problem = redis_url_problem(url)
            if problem is not None:
                where = "AGENTQ_REDIS_URL" if self.environ.get("AGENTQ_REDIS_URL") else "redis.url"
                raise InvalidInput(f"{where}: {problem}", path="redis.url")
            return None
        from agentq import embedded
        from agentq.config import redis_configured

        if redis_configured(config):
            return None
        home = embedded.home_dir(self.environ)
        if embedded.server_status(home) is not None:
            return None
        server = embedded.ensure_server(home)
        self.started_server = server
        print(f"{PROG}: started an embedded Redis server with its data in {server.home}; "
              f"it keeps running until: {PROG} server stop", file=self.err, flush=True)
        return server.url

    def connect(self) -> Client:
        from agentq.client import connect

        config = self.config()
        return connect(self.redis_url(config), config)

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
        "--redis", metavar="URL", default=default(None), type=redis_url,
        help="Redis URL, e.g. redis://127.0.0.1:6379/0, or redis+cluster://HOST:PORT (any node "
        "of a Redis Cluster); default: $AGENTQ_REDIS_URL, then the config, then an embedded "
        "server in $AGENTQ_HOME (./.agentq)",
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


def seconds_between(low: float, high: float) -> Callable[[str], float]:
    """An argument type: a number of seconds from ``low`` to ``high``."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(
                f"must be from {low:g} to {high:g} seconds, got {text}")
        return value

    return seconds


def agent_id(text: str) -> str:
    """An argument type: an agent id, refused (not rewritten) when malformed."""
    if not AGENT_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"not an agent id: {text!r} (lower case, {AGENT_ID_PATTERN})")
    return text


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, or None when it can be used."""
    if not url.startswith(_URL_SCHEMES):
        return (f"invalid Redis URL {url!r}: it must start with one of "
                f"{', '.join(_URL_SCHEMES)}, e.g. redis://127.0.0.1:6379/0")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 -- reading it checks it: "Port out of range 0-65535"
    except ValueError as exc:
        return f"invalid Redis URL {url!r}: {exc}"
    db = parse_qs(parts.query).get("db", ["0"])[0]
    if not db.isdigit():
        return f"invalid Redis URL {url!r}: db must be a number, got {db!r}"
    if parts.scheme.endswith("+cluster"):
        if not parts.hostname:
            return f"invalid Redis URL {url!r}: name a node of the cluster, e.g. " \
                   "redis+cluster://127.0.0.1:7000"
        path_db = parts.path.strip("/") or "0"
        if path_db != "0" or db != "0":
            return f"invalid Redis URL {url!r}: a Redis Cluster has only database 0"
    return None


def redis_url(text: str) -> str:
    """The ``--redis`` argument type."""
    problem = redis_url_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


M = TypeVar("M", bound="BaseModel")


def tool_input(
    run: Run, model: type[M], raw: Mapping[str, Any], flags: Mapping[str, str]
) -> M:
    """A tool's input built from the command line, validated before anything is sent.

    A bad value is a usage error naming the flag it came from (``flags`` maps
    the model's field names to the command's flags and arguments), not the
    tool's own field name.
    """
    from pydantic import ValidationError

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        value = error.get("input")
        if error.get("ctx", {}).get("pattern") == AGENT_ID_PATTERN:
            reason = f"not an agent id: {value!r} (lower case, {AGENT_ID_PATTERN})"
        else:
            reason = str(error["msg"]).removeprefix("Value error, ")
            if isinstance(value, (int, float)):
                reason += f", got {value:g}"
        message = f"argument {flags.get(name, name)}: {reason}"
        raise UsageError(message, run.args.command_parser) from exc


@contextmanager
def flags_named(run: Run, flags: Mapping[str, str]) -> Iterator[None]:
    """Report an input the tool refuses past :func:`tool_input` (a check that
    needs more than the model, like a cursor's shape) as a usage error naming the
    flag, when the refusal's path is one of ``flags``' fields."""
    try:
        yield
    except InvalidInput as exc:
        flag = flags.get(exc.path or "") or flags.get(snake_case(exc.path or ""))
        if flag is None:
            raise
        raise UsageError(f"argument {flag}: {exc.message}", run.args.command_parser) from exc


def snake_case(camel: str) -> str:
    """``dispatchesPerMinute`` -> ``dispatches_per_minute``."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


