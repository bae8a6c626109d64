"""Commands that run things or check the deployment: worker, run, mcp, demo,
projections rebuild, audit verify, config validate and schema."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agentq import _render as render
from agentq.cli._base import EXIT_FAILED, EXIT_OK, Commands, Run, agent_id
from agentq.schemas.errors import InvalidInput, Unauthorized

if TYPE_CHECKING:  # each handler imports what it runs: the parser alone needs none of it
    from agentq._runner import WorkerSpec
    from agentq.client import Client
    from agentq.consumers.handlers import Handler
    from agentq.consumers.worker import Ended
    from agentq.schemas.config import AgentConfig, Config


def _handler_of(kind: str, value: str) -> Handler:
    from agentq.consumers.handlers import exec_handler, http_handler, python_handler

    if kind == "exec":
        return exec_handler(value)
    if kind == "http":
        return http_handler(value)
    # MODULE:FUNC: modules next to where agentq runs are importable, as with `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return python_handler(value)
    except (ValueError, ImportError) as exc:
        raise InvalidInput(f"--handler {value}: {exc}", path="handler") from exc


def metrics_address(value: str) -> str:
    """``--metrics-port``'s argument: PORT or HOST:PORT (argparse type)."""
    import argparse

    from agentq.consumers.metrics import parse_address

    try:
        parse_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_metrics_port(parser: Any) -> None:
    """The ``--metrics-port`` flag of ``worker``, ``run`` (and ``dashboard``)."""
    parser.add_argument(
        "--metrics-port", metavar="[HOST:]PORT", type=metrics_address, default=None,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to "
             "127.0.0.1; 0.0.0.0:PORT for every interface)")


@contextlib.asynccontextmanager
async def metrics_served(q: Client, run: Run) -> AsyncIterator[None]:
    """Serve ``/metrics`` while the block runs, when ``--metrics-port`` was given.
    A port that cannot be listened on is a usage error (exit 2)."""
    import asyncio

    from agentq.consumers.metrics import parse_address, serve

    address = getattr(run.args, "metrics_port", None)
    if address is None:
        yield
        return
    host, port = parse_address(address)
    try:
        server = serve(q.redis, q.keys, host, port)
    except OSError as exc:
        raise InvalidInput(f"--metrics-port {address}: cannot listen there "
                           f"({exc.strerror or exc}); choose another port",
                           path="metrics-port") from exc
    run.note(f"metrics at http://{address_text(server.host, server.port)}/metrics")
    try:
        yield
    finally:
        await asyncio.to_thread(server.close)


def address_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _run_until_signalled(q: Client, workers: list[WorkerSpec], run: Run) -> int:
    import asyncio

    runner = q.runner(workers)
    if not getattr(run.args, "quiet", False):
        runner.on_ended = lambda ended: run.note(_ended_line(ended))
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            run.note("stopping: no new jobs; running ones may finish (signal again to stop now)")
            runner.stop()
        else:
            run.note("stopping now: running jobs are handed back to the queue")
            runner.stop(now=True)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    names = ", ".join(w.agent for w in workers) or "no workers"
    run.note(f"running ({names}) and the background consumers; Ctrl-C or SIGTERM stops, "
             "letting running jobs finish")
    started = time.monotonic()
    async with metrics_served(q, run):
        await runner.run()
    run.note(_summary_line(runner.ended, time.monotonic() - started))
    return EXIT_OK


def _ended_line(ended: Ended) -> str:
    """One line per attempt that ended: id, outcome, duration, attempt."""
    line = f"job {ended.job_id} {ended.outcome} in {ended.seconds:.2f}s (attempt {ended.attempt})"
    if ended.detail and ended.outcome in ("failed", "retrying", "refused"):
        first = ended.detail.strip().splitlines()[-1] if ended.detail.strip() else ""
        line += f": {first[:120]}"
    return line


def _summary_line(ended: dict[str, int], seconds: float) -> str:
    total = sum(ended.values())
    parts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(ended.items()))
    return f"stopped after {seconds:.1f}s: {total} jobs ended" + (f" ({parts})" if parts else "")


def add_worker(commands: Commands) -> None:
    p = commands.add(
        "worker",
        summary="run an agent's jobs",
        description=(
            "Run AGENT's jobs, up to --concurrency at once, with one handler:\n"
            "  --exec CMD      a shell command: the task on standard input, AGENTQ_JOB_ID,\n"
            "                  AGENTQ_TARGET, AGENTQ_DISPATCHED_BY, AGENTQ_ATTEMPT and\n"
            "                  AGENTQ_JOB_FILE (a file holding the job as JSON) in its\n"
            "                  environment, and AGENTQ_JOB_JSON (the same JSON) when under\n"
            "                  64 KiB; exit 0 completes the job with standard output;\n"
            "                  `::progress N msg` on standard error reports progress\n"
            "  --http URL      POST the job as JSON; a 2xx answer completes it\n"
            "  --handler M:F   call a Python function (sync or async) with the job\n"
            "The process also runs the background consumers (delayed jobs, stall recovery,\n"
            "dependency gates, views, alerts). It prints a line per ended job (id, outcome,\n"
            "duration, attempt; --quiet silences them) and a summary when it stops.\n"
            "SIGTERM or Ctrl-C stops taking jobs and lets running ones finish within\n"
            "workers.shutdownGraceSeconds; jobs still running then, or at a second signal,\n"
            "are handed back to the queue without using up an attempt."
        ),
        examples=['agentq worker researcher --exec "python research.py"',
                  "agentq worker writer --http http://127.0.0.1:8080/jobs --concurrency 4",
                  "agentq worker planner --handler myagents:plan",
                  "agentq worker researcher --exec ./research.sh --metrics-port 9464"],
        handler=_worker,
    )
    p.add_argument("agent", metavar="AGENT", type=agent_id, help="the agent whose jobs to run")
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--exec", metavar="CMD", help="shell command per job")
    kind.add_argument("--http", metavar="URL", help="URL to POST each job to")
    kind.add_argument("--handler", dest="python_handler", metavar="MODULE:FUNC",
                      help="Python function per job")
    p.add_argument("--concurrency", metavar="N", type=int, default=None,
                   help="jobs at once (default: agents.AGENT.concurrency, else 1)")
    p.add_argument("--quiet", action="store_true",
                   help="no line per ended job (the summary at exit stays)")
    add_metrics_port(p)


async def _worker(run: Run) -> int:
    from agentq._runner import WorkerSpec

    args = run.args
    if args.concurrency is not None and not 1 <= args.concurrency <= 1000:
        raise InvalidInput("--concurrency must be from 1 to 1000", path="concurrency")
    if args.exec:
        handler = _handler_of("exec", args.exec)
    elif args.http:
        handler = _handler_of("http", args.http)
    else:
        handler = _handler_of("python", args.python_handler)
    async with run.connect() as q:
        return await _run_until_signalled(q, [WorkerSpec(args.agent, handler, args.concurrency)],
                                          run)


def add_run(commands: Commands) -> None:
    p = commands.add(
        "run",
        summary="run the background consumers and the configured workers",
        description=(
            "Run, until stopped, the background consumers (delayed jobs, stall recovery,\n"
            "dependency gates, views, dead-letter alerts) and a worker for every agent of\n"
            "the config that declares a handler (agents.<id>.handler: exec, http or python)."
        ),
        examples=["agentq run --config agentq.toml",
                  "agentq run --config agentq.toml --metrics-port 0.0.0.0:9464"],
        handler=_run,
    )
    add_metrics_port(p)


def _configured_handler(agent: str, conf: AgentConfig) -> Handler | None:
    from agentq.schemas.config import ExecHandler, HttpHandler

    spec = conf.handler
    if spec is None:
        return None
    if isinstance(spec, ExecHandler):
        return _handler_of("exec", spec.exec)
    if isinstance(spec, HttpHandler):
        return _handler_of("http", spec.http)
    return _handler_of("python", spec.python)


async def _run(run: Run) -> int:
    from agentq._runner import WorkerSpec

    async with run.connect() as q:
        workers = []
        for agent, conf in sorted(q.config.agents.items()):
            handler = _configured_handler(agent, conf)
            if handler is not None:
                workers.append(WorkerSpec(agent, handler, conf.concurrency))
        return await _run_until_signalled(q, workers, run)


def add_mcp(commands: Commands) -> None:
    p = commands.add(
        "mcp",
        summary="serve the tools over MCP (stdio, or HTTP with tokens)",
        description=(
            "Serve the eight agent tools over MCP: queue_dispatch, queue_status, queue_list,\n"
            "queue_activity, queue_wait, queue_history, queue_approve and queue_reject.\n"
            "--agent AGENT: on standard input and output, every call acting as AGENT; point\n"
            "a local MCP client (an agent runtime) at this command.\n"
            "--http [HOST:]PORT: over Streamable HTTP at http://HOST:PORT/mcp (HOST defaults\n"
            "to 127.0.0.1); every request carries Authorization: Bearer TOKEN (see `agentq\n"
            "tokens add`) and acts as the token's agent; without a valid token: HTTP 401.\n"
            "Put it behind a TLS reverse proxy to serve it beyond this machine."
        ),
        examples=["agentq mcp --agent planner", "agentq mcp --http 8765",
                  "agentq mcp --http 0.0.0.0:8765   # every interface: put TLS in front"],
        handler=_mcp,
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--agent", metavar="AGENT", type=agent_id,
                     help="serve over stdio; the caller of every tool")
    how.add_argument("--http", metavar="[HOST:]PORT",
                     help="serve over HTTP; each request's caller is its token's agent")


async def _mcp(run: Run) -> int:
    # The MCP SDK is loaded only for this command.
    if run.args.http is not None:
        from agentq.mcp.http import parse_address, serve_http

        host, port = parse_address(run.args.http)
        async with run.connect() as q:
            await serve_http(q, host, port)
        return EXIT_OK
    from agentq.mcp_server import serve

    async with run.connect() as q:
        await serve(q, run.args.agent)
    return EXIT_OK


def add_demo(commands: Commands) -> None:
    commands.add(
        "demo",
        summary="a self-contained walk-through on the embedded Redis",
        description=(
            "Register a planner, a researcher and a writer, run their workers in this\n"
            "process, dispatch a small graph (a plan fanning out to two research jobs whose\n"
            "results feed a writer), show every event as it happens, then the results and\n"
            "the audit history of one job."
        ),
        examples=["agentq demo"],
        handler=_demo,
    )


async def _demo(run: Run) -> int:
    from agentq.demo import run_demo

    config = run.config()
    return await run_demo(config, run.redis_url(config))


def add_projections(commands: Commands) -> None:
    group = commands.group(
        "projections", summary="the views derived from the log",
        description="Manage the list and activity views, which are functions of the log.",
    )
    group.add(
        "rebuild", summary="rebuild every view from the log",
        description="Drop every view and apply the whole log again (system agents only).",
        examples=["agentq projections rebuild"], handler=_rebuild,
    )


async def _rebuild(run: Run) -> int:
    from agentq.eventlog.registry import all_partitions
    from agentq.projections.rebuild import rebuild

    async with run.connect() as q:
        who = q.caller_or_operator(run.caller)
        if not q.config.is_system(who):
            raise Unauthorized("Unauthorized: projections rebuild requires a system agent.")
        agents = await all_partitions(q.redis, q.keys)

        def progress(agent: str, applied: int) -> None:
            run.note(f"{agent}: {render.counted(applied, 'event')} applied")

        total = await rebuild(q.redis, [q.partition(a) for a in agents], progress)
    run.emit({"agents": len(agents), "events": total},
             f"Rebuilt the views of {len(agents)} agents from {total} events")
    return EXIT_OK


def add_audit(commands: Commands) -> None:
    group = commands.group(
        "audit", summary="check the state against the log",
        description="Re-derive state from the log and compare it with what Redis holds.",
    )
    p = group.add(
        "verify", summary="re-derive every job from the log and compare",
        description=(
            "Re-derive every job's state from the log and compare it with the state\n"
            "records, the per-state counts and the views. Each difference is printed;\n"
            "exit 1 when there is any. With --json, {ok, differences}.\n"
            "--archive also checks the archive's hash chains: a segment edited, removed,\n"
            "reordered or added is named (exit 1); exit 2 when no archive is configured."
        ),
        examples=["agentq audit verify", "agentq audit verify --archive",
                  "agentq audit verify --json"], handler=_verify,
    )
    p.add_argument("--archive", action="store_true",
                   help="also check every archived segment against its partition's hash chain")


async def _verify(run: Run) -> int:
    from agentq.eventlog.registry import all_partitions
    from agentq.projections.audit import Progress, verify
    from agentq.projections.ticker import Ticker

    def progress(at: Progress) -> None:
        line = (f"{at.agent}: {render.counted(at.events, 'event')} read, "
                f"{render.counted(at.compared, 'job')} compared")
        if at.set_aside and not at.log_read:
            line += f", {render.counted(at.set_aside, 'event')} set aside to compare after the log"
        run.note(line)

    ticker = Ticker()

    def checked(agent: str, done: int, total: int) -> None:
        if done == total or ticker.due():
            run.note(f"{agent}: {done:,} of {render.counted(total, 'archive segment')} checked")

    async with run.connect() as q:
        agents = await all_partitions(q.redis, q.keys)
        # The chains first: the jobs are re-derived from the archive too, which
        # is not to be read once it is known to be damaged.
        problems = await q.verify_archive(checked) if run.args.archive else []
        if problems:
            problems.append("the jobs were not compared with their events: the archive "
                            "they are read from is damaged")
        else:
            problems = await verify(q.redis, [q.partition(a) for a in agents], q.archive,
                                    progress)
    text = "\n".join(problems) if problems else f"OK: {len(agents)} agents agree with the log"
    run.emit({"ok": not problems, "differences": problems}, text)
    return EXIT_FAILED if problems else EXIT_OK


def add_config(commands: Commands) -> None:
    group = commands.group(
        "config", summary="check a config file, or print its schema",
        description="The config: one TOML, YAML or JSON file; AGENTQ_… variables; flags.",
    )
    p = group.add(
        "validate", summary="check a config file",
        description=(
            "Check FILE (or --config / $AGENTQ_CONFIG) with the environment applied; each\n"
            "bad field is named by its path. Exit 0 when valid, 2 when not."
        ),
        examples=["agentq config validate agentq.toml"], handler=_validate,
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="the config file")
    group.add(
        "schema", summary="print the config's JSON Schema",
        description="The JSON Schema of the config file (also in schemas/json/config.json).",
        examples=["agentq config schema > agentq.schema.json"], handler=_schema,
    )


async def _validate(run: Run) -> int:
    from agentq import config as config_loading

    path = run.args.file or run.args.config or run.environ.get("AGENTQ_CONFIG")
    if not path:
        raise InvalidInput("no config file: give FILE, --config or AGENTQ_CONFIG", path="file")
    config = config_loading.load_config(path, environ=run.environ)
    data: dict[str, Any] = {"ok": True, "file": str(path), "config": config.wire()}
    run.emit(data, f"{path}: valid")
    for note in _retention_notes(config, run.environ):
        run.note(f"note: {note}")
    return EXIT_OK


def _retention_notes(config: Config, environ: dict[str, str]) -> list[str]:
    """What the config means for how long things stay in Redis, when a user may
    not expect it."""
    from agentq.config import redis_configured, with_embedded_archive

    notes = []
    if not redis_configured(config):
        if config.retention.archive is None:
            notes.append("on the embedded Redis, events are archived under "
                         f"{with_embedded_archive(config, environ).retention.archive}")
    elif config.retention.archive is None:
        return ["retention.archive is not set: nothing ever leaves Redis (every event and "
                "every ended job is kept, and memory grows with them); set it to "
                "file://PATH or s3://BUCKET/PREFIX to archive events and remove jobs "
                "retention.jobsSeconds after they end"]
    if config.retention.jobs_seconds == 0:
        notes.append("retention.jobsSeconds is 0: events are archived, but nothing is "
                     "removed from Redis")
    return notes


async def _schema(run: Run) -> int:
    from agentq.schemas.config import Config

    schema = Config.model_json_schema(by_alias=True)
    run.out.write(json.dumps(schema, indent=2, sort_keys=True) + "\n")
    return EXIT_OK
