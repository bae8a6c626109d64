"""Black-box tests of the ``agentq`` command line, run as subprocesses against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import agentq
from agentq import _render as render
from agentq import embedded
from agentq.schemas.config import Config

Result = subprocess.CompletedProcess[str]

# SPEC's "Job fields", every one present in a job view.
JOB_FIELDS = {
    "jobId", "target", "dispatchedBy", "task", "label", "project", "state", "attempt",
    "maxAttempts", "priority", "model", "thinking", "timeoutSeconds", "dependsOn",
    "waitingForDependencies", "dependencies", "onDependencyFailure", "result", "error",
    "progress", "createdAt", "queuedAt", "startedAt", "finishedAt", "runAt", "idempotencyKey",
    "parentJobId", "depth", "announce", "sessionKey", "origin", "metadata",
}
EVENT_FIELDS = {"eventId", "type", "jobId", "agent", "at", "actor", "v", "data"}
# A well-formed job id (for agent "a") that no test ever creates.
MISSING_JOB = "j_01ARZ3NDEKTSV4RRFFQ69G5FAV.a"


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AGENTQ_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], stdin: str = "", cwd: str | None = None) -> Result:
    return subprocess.run(
        [sys.executable, "-m", "agentq.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


class Cli:
    """Runs ``agentq`` on the test server with a key prefix of its own."""

    def __init__(self, redis_url: str, env: dict[str, str]) -> None:
        self.redis_url = redis_url
        self.env = env

    def __call__(
        self, *args: str, stdin: str = "", env: dict[str, str] | None = None, redis: bool = True
    ) -> Result:
        # The global --redis goes after the command: it must be accepted there too.
        argv = [*args, "--redis", self.redis_url] if redis else list(args)
        return _run(argv, {**self.env, **(env or {})}, stdin)

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self(*args, **kwargs)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def dispatch(self, *args: str, **kwargs: Any) -> dict[str, Any]:
        view: dict[str, Any] = self.json("dispatch", *args, **kwargs)
        return view


@pytest.fixture
def cli(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    """The CLI on a fresh key prefix, agents a and b known, the rate limit off."""
    return cli_on_a_fresh_prefix(redis_url, make_config)


def cli_on_a_fresh_prefix(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    """What the ``cli`` fixture gives, for other test modules' fixtures."""
    config = make_config()
    env = _clean_env(
        AGENTQ_KEY_PREFIX=config.key_prefix,
        AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0",
    )

    async def register() -> None:
        # Through the API, not two more subprocesses: `agents add` has tests of its own.
        async with agentq.connect(redis_url, config) as q:
            for agent in ("a", "b"):
                await q.add_agent(agent)

    asyncio.run(register())
    return Cli(redis_url, env)


def _error(result: Result) -> dict[str, str]:
    body = json.loads(result.stdout)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    error: dict[str, str] = body["error"]
    return error


# -- agents ------------------------------------------------------------------


def test_agents_add_list_remove(cli: Cli) -> None:
    added = cli.ok("agents", "add", "planner", "--allow", "a", "--allow", "b")
    assert added.stdout.strip() == "Agent planner added; it may dispatch to: a, b"
    assert cli.json("agents", "add", "c") == {"agent": "c", "allowAgents": ["*"]}

    listed = cli.ok("agents", "list").stdout.splitlines()
    assert listed[0].split() == ["AGENT", "MAY", "DISPATCH", "TO"]
    assert [line.split()[0] for line in listed[1:]] == ["a", "b", "c", "planner"]
    assert "planner  a, b" in listed[4]
    assert cli.json("agents", "list") == {
        "agents": {
            "a": {"allowAgents": ["*"]},
            "b": {"allowAgents": ["*"]},
            "c": {"allowAgents": ["*"]},
            "planner": {"allowAgents": ["a", "b"]},
        }
    }

    assert cli.ok("agents", "remove", "c").stdout.strip() == "Agent c removed"
    assert cli.json("agents", "remove", "planner") == {"agent": "planner", "removed": True}
    again = cli("agents", "remove", "planner", "--json")
    assert again.returncode == 3
    assert _error(again) == {"code": "unknown_agent",
                             "message": "Unknown agent: planner; nothing was removed"}
    assert set(cli.json("agents", "list")["agents"]) == {"a", "b"}


def test_bad_agent_id_is_invalid_input(cli: Cli) -> None:
    added = cli("agents", "add", "Bad!", "--json")
    assert added.returncode == 2
    assert _error(added)["code"] == "invalid_input"
    assert "Bad!" in added.stderr

    dispatched = cli("dispatch", "Not-Lower", "hello", "--json")
    assert dispatched.returncode == 2
    error = _error(dispatched)
    assert error["code"] == "invalid_input"
    assert "TARGET" in error["message"]
    assert "Not-Lower" in error["message"]

    caller = cli("--as", "NO SPACES", "status", MISSING_JOB, "--json")
    assert caller.returncode == 2
    assert _error(caller)["code"] == "invalid_input"


# -- dispatch ----------------------------------------------------------------


def test_dispatch_human_and_json(cli: Cli) -> None:
    human = cli.ok("dispatch", "a", "summarise the report")
    match = re.fullmatch(r"Job (j_\S+) dispatched to agent a: queued\n", human.stdout)
    assert match, human.stdout
    assert cli.json("status", match.group(1))["task"] == "summarise the report"

    view = cli.dispatch("b", "write it up", "--label", "draft", "--priority", "high",
                        "--max-attempts", "5", "--timeout", "30", "--project", "blog",
                        "--model", "m1", "--thinking", "low", "--idempotency-key", "k1",
                        "--session-key", "s1", "--on-dependency-failure", "ignore",
                        "--announce")
    assert set(view) == JOB_FIELDS
    assert view["jobId"].startswith("j_")
    assert (view["target"], view["dispatchedBy"], view["state"]) == ("b", "main", "queued")
    assert (view["label"], view["priority"], view["maxAttempts"]) == ("draft", "high", 5)
    assert (view["timeoutSeconds"], view["project"], view["model"]) == (30, "blog", "m1")
    assert (view["thinking"], view["idempotencyKey"], view["sessionKey"]) == ("low", "k1", "s1")
    assert view["onDependencyFailure"] == "ignore"
    assert view["announce"] is True
    assert view["attempt"] == 0

    repeat = cli.dispatch("b", "write it up", "--idempotency-key", "k1")
    assert repeat["jobId"] == view["jobId"]


def test_dispatch_reads_stdin_and_builds_metadata_origin_and_parent(cli: Cli) -> None:
    view = cli.dispatch("a", "-", "--meta", "ticket=OPS-12", "--meta", "n=2",
                        "--meta", "ticket=OPS-13", "--meta", "eq=a=b",
                        "--origin", '{"channel": "slack", "threadId": "t1"}',
                        stdin="line one\nline two\n")
    assert view["task"] == "line one\nline two"
    assert view["metadata"] == {"ticket": "OPS-13", "n": "2", "eq": "a=b"}
    assert view["origin"] == {"channel": "slack", "threadId": "t1"}
    assert view["parentJobId"] is None

    child = cli.dispatch("b", "sub-task", env={"AGENTQ_JOB_ID": view["jobId"]})
    assert child["parentJobId"] == view["jobId"]
    assert child["depth"] == 1

    orphan = cli("dispatch", "b", "sub-task", "--json",
                 env={"AGENTQ_JOB_ID": MISSING_JOB})
    assert orphan.returncode == 3
    assert _error(orphan)["code"] == "not_found"

    bad_meta = cli("dispatch", "a", "x", "--meta", "novalue", "--json")
    assert bad_meta.returncode == 2
    assert "KEY=VALUE" in _error(bad_meta)["message"]
    bad_origin = cli("dispatch", "a", "x", "--origin", "[1, 2]", "--json")
    assert bad_origin.returncode == 2
    assert _error(bad_origin)["code"] == "invalid_input"


def test_dispatch_delay_and_depends_on(cli: Cli) -> None:
    delayed = cli.dispatch("a", "later", "--delay", "60")
    assert delayed["state"] == "delayed"
    run_at = render.parse_time(delayed["runAt"])
    created = render.parse_time(delayed["createdAt"])
    assert timedelta(seconds=59) <= run_at - created <= timedelta(seconds=61)
    human = cli.ok("dispatch", "a", "later", "--delay", "60").stdout
    assert re.fullmatch(r"Job j_\S+ dispatched to agent a: delayed until .* \(in \d+s\)\n", human)

    first = cli.dispatch("a", "first")
    second = cli.dispatch("b", "second", "--depends-on", first["jobId"])
    assert second["state"] == "waiting_dependencies"
    assert second["dependsOn"] == [first["jobId"]]
    assert second["waitingForDependencies"] is True
    status = cli.json("status", second["jobId"])
    assert status["dependencies"][first["jobId"]]["state"] == "queued"
    block = cli.ok("status", second["jobId"]).stdout
    assert re.search(rf"^depends on +{re.escape(first['jobId'])} \(queued\)$", block, re.M)

    missing = cli("dispatch", "b", "second", "--depends-on", MISSING_JOB, "--json")
    assert missing.returncode == 3
    assert _error(missing) == {"code": "not_found",
                               "message": f"Dependency job {MISSING_JOB} not found"}


def test_unknown_target_exits_3(cli: Cli) -> None:
    result = cli("dispatch", "nobody", "hello", "--json")
    assert result.returncode == 3
    assert _error(result) == {"code": "unknown_agent", "message": "Unknown target agent: nobody"}
    human = cli("dispatch", "nobody", "hello")
    assert human.returncode == 3
    assert human.stdout == ""
    assert "Unknown target agent: nobody" in human.stderr


def test_caller_from_as_flag_and_environment(cli: Cli) -> None:
    by_a = cli.dispatch("b", "from a", "--as", "a")
    assert by_a["dispatchedBy"] == "a"
    by_env = cli.dispatch("a", "from b", env={"AGENTQ_AGENT": "b"})
    assert by_env["dispatchedBy"] == "b"
    cli.ok("agents", "add", "c")
    stranger = cli("status", by_a["jobId"], "--as", "c", "--json")
    assert stranger.returncode == 4
    assert _error(stranger)["code"] == "unauthorized"


# -- status, history ----------------------------------------------------------


def test_status_is_an_aligned_block(cli: Cli) -> None:
    view = cli.dispatch("a", "look at this", "--label", "look", "--meta", "k=v")
    lines = cli.ok("status", view["jobId"]).stdout.splitlines()
    pairs = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    assert pairs["job"] == view["jobId"]
    assert pairs["state"] == "queued"
    assert pairs["attempt"] == "0 of 3"
    assert pairs["label"] == "look"
    assert pairs["metadata"] == '{"k":"v"}'
    assert pairs["task"] == "look at this"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(.*\)", pairs["created"])
    columns = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(columns) == 1, lines

    # Global flags are accepted before the command as well as after it.
    before = _run(["--json", "--redis", cli.redis_url, "status", view["jobId"]], cli.env)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == cli.json("status", view["jobId"])


def test_status_of_unknown_job_exits_3(cli: Cli) -> None:
    result = cli("status", MISSING_JOB, "--json")
    assert result.returncode == 3
    assert _error(result) == {"code": "not_found", "message": f"Job {MISSING_JOB} not found"}
    assert cli("status", "not-a-job-id").returncode == 3


def test_history_table_and_json(cli: Cli) -> None:
    view = cli.dispatch("a", "watch me")
    cli.ok("cancel", view["jobId"])
    events = cli.json("history", view["jobId"])
    assert isinstance(events, list)
    assert [e["type"] for e in events] == ["JobDispatched", "JobCancelled"]
    assert all(set(e) == EVENT_FIELDS for e in events)
    assert {e["jobId"] for e in events} == {view["jobId"]}
    assert events[1]["data"] == {"fromState": "queued", "reason": "cancel"}

    lines = cli.ok("history", view["jobId"]).stdout.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "EVENT", "ACTOR", "DETAILS"]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  JobDispatched  main   "
                    r"state=queued task=\"watch me\"$", lines[1])
    assert lines[2].endswith("JobCancelled   main   fromState=queued reason=cancel")


# -- wait, cancel, retry, drain ----------------------------------------------


def test_wait_times_out_with_124(cli: Cli) -> None:
    view = cli.dispatch("a", "nobody runs this")
    result = cli("wait", view["jobId"], "--timeout", "1", "--json")
    assert result.returncode == 124
    waited = json.loads(result.stdout)
    assert set(waited) == JOB_FIELDS | {"timedOut"}
    assert waited["timedOut"] is True
    assert waited["state"] == "queued"

    human = cli("wait", view["jobId"], "--timeout", "1")
    assert human.returncode == 124
    assert "timed out after 1s" in human.stderr
    assert re.search(r"^state +queued$", human.stdout, re.M)


def test_wait_for_unknown_job_exits_3(cli: Cli) -> None:
    result = cli("wait", MISSING_JOB, "--timeout", "1", "--json")
    assert result.returncode == 3
    assert _error(result)["code"] == "not_found"


def test_wait_for_cancelled_job_exits_1(cli: Cli) -> None:
    view = cli.dispatch("a", "never mind")
    cli.ok("cancel", view["jobId"])
    result = cli("wait", view["jobId"], "--json")
    assert result.returncode == 1
    waited = json.loads(result.stdout)
    assert (waited["state"], waited["timedOut"]) == ("cancelled", False)


def test_cancel(cli: Cli) -> None:
    view = cli.dispatch("a", "stop me")
    result = cli.ok("cancel", view["jobId"])
    assert result.stdout.strip() == f"Job {view['jobId']} cancelled"
    assert cli.json("status", view["jobId"])["state"] == "cancelled"

    again = cli("cancel", view["jobId"], "--json")
    assert again.returncode == 5
    assert _error(again)["code"] == "invalid_state"

    other = cli.dispatch("b", "stop me too")
    assert cli.json("cancel", other["jobId"])["state"] == "cancelled"


def test_retry_of_a_job_that_did_not_fail_is_refused(cli: Cli) -> None:
    view = cli.dispatch("a", "fine so far")
    result = cli("retry", view["jobId"])
    assert result.returncode == 5
    assert "queued" in result.stderr
    as_json = cli("retry", view["jobId"], "--json")
    assert as_json.returncode == 5
    error = _error(as_json)
    assert error["code"] == "invalid_state"
    assert "queued" in error["message"]
    assert cli.json("status", view["jobId"])["state"] == "queued"


def test_drain_needs_confirm(cli: Cli) -> None:
    queued = cli.dispatch("a", "one")
    delayed = cli.dispatch("a", "two", "--delay", "600")
    waiting = cli.dispatch("a", "three", "--depends-on", queued["jobId"])

    refused = cli("drain", "a")
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert "agentq drain a --confirm" in refused.stderr
    refused_json = cli("drain", "a", "--json")
    assert refused_json.returncode == 2
    assert _error(refused_json)["code"] == "invalid_input"
    assert cli.json("status", queued["jobId"])["state"] == "queued"
    assert cli.json("status", delayed["jobId"])["state"] == "delayed"

    drained = cli.ok("drain", "a", "--confirm")
    assert drained.stdout.strip() == "Drained 2 jobs from agent a"
    assert cli.json("status", queued["jobId"])["state"] == "cancelled"
    assert cli.json("status", delayed["jobId"])["state"] == "cancelled"
    assert cli.json("status", waiting["jobId"])["state"] == "waiting_dependencies"

    on_b = cli.dispatch("b", "four")
    assert cli.json("drain", "b", "--confirm") == {
        "agent": "b", "drained": 1, "jobIds": [on_b["jobId"]]
    }
    assert cli.json("drain", "b", "--confirm") == {"agent": "b", "drained": 0, "jobIds": []}

    unknown = cli("drain", "nobody", "--confirm", "--json")
    assert unknown.returncode == 3
    assert _error(unknown)["code"] == "unknown_agent"


# -- errors and help ---------------------------------------------------------


def test_closed_port_is_unavailable(cli: Cli) -> None:
    args = ["status", MISSING_JOB, "--redis", "redis://127.0.0.1:1"]
    result = cli(*args, "--json", redis=False)
    assert result.returncode == 6
    error = _error(result)
    assert error["code"] == "unavailable"
    assert "127.0.0.1:1" in error["message"]
    assert cli("agents", "list", "--redis", "redis://127.0.0.1:1", redis=False).returncode == 6

    no_scheme = cli("agents", "list", "--redis", "127.0.0.1:6379", "--json", redis=False)
    assert no_scheme.returncode == 2
    assert "redis://" in _error(no_scheme)["message"]


def test_usage_errors_exit_2_with_json_error(cli: Cli) -> None:
    unknown_flag = cli("status", MISSING_JOB, "--bogus", "--json")
    assert unknown_flag.returncode == 2
    assert _error(unknown_flag)["code"] == "invalid_input"
    assert "--bogus" in unknown_flag.stderr

    missing = cli("dispatch", "a")
    assert missing.returncode == 2
    assert "usage: agentq dispatch" in missing.stderr
    assert missing.stdout == ""

    not_a_number = cli("wait", MISSING_JOB, "--timeout", "soon", "--json")
    assert not_a_number.returncode == 2
    assert _error(not_a_number)["code"] == "invalid_input"

    nothing = cli(redis=False)
    assert nothing.returncode == 2
    assert "dispatch" in nothing.stderr

    unknown_command = cli("frobnicate", "--json", redis=False)
    assert unknown_command.returncode == 2
    assert _error(unknown_command)["code"] == "invalid_input"


def test_help(cli: Cli) -> None:
    top = cli.ok("--help", redis=False).stdout
    for command in ("dispatch", "status", "history", "wait", "cancel", "retry", "drain",
                    "agents", "server"):
        assert re.search(rf"^    {command} ", top, re.M), command
    assert "examples:" in top
    for words in (["dispatch"], ["wait"], ["agents", "add"], ["server", "status"]):
        page = cli.ok(*words, "--help", redis=False).stdout
        assert "examples:" in page
        assert "--json" in page


# -- the embedded server -----------------------------------------------------


@contextmanager
def short_home() -> Iterator[Path]:
    """A new data directory; its embedded server, if one started, is stopped after."""
    # A short path: the server's unix socket lives in it.
    home = Path(tempfile.mkdtemp(prefix="aq", dir="/tmp"))
    try:
        yield home
    finally:
        embedded.stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def agentq_home() -> Iterator[Path]:
    with short_home() as home:
        yield home


def test_embedded_server_by_default(agentq_home: Path) -> None:
    env = _clean_env(AGENTQ_HOME=str(agentq_home))

    def agentq(*args: str) -> Result:
        return _run(list(args), env, cwd=str(agentq_home))

    assert agentq("server", "status").returncode == 1
    assert agentq("agents", "add", "a").returncode == 0
    dispatched = agentq("dispatch", "a", "hello", "--json")
    assert dispatched.returncode == 0, dispatched.stderr
    job_id = json.loads(dispatched.stdout)["jobId"]
    status = agentq("status", job_id)
    assert status.returncode == 0, status.stderr
    assert re.search(r"^state +queued$", status.stdout, re.M)
    history = agentq("history", job_id, "--json")
    assert [e["type"] for e in json.loads(history.stdout)] == ["JobDispatched"]

    running = agentq("server", "status", "--json")
    assert running.returncode == 0
    info = json.loads(running.stdout)
    assert info["running"] is True
    assert info["home"] == str(agentq_home.resolve())
    assert agentq("server", "status").returncode == 0

    stopped = agentq("server", "stop", "--json")
    assert stopped.returncode == 0
    assert json.loads(stopped.stdout) == {"stopped": True, "home": str(agentq_home.resolve())}
    assert agentq("server", "status").returncode == 1
    assert agentq("server", "stop").returncode == 0

    # The data outlives the server: the next command starts it again and finds the job.
    again = agentq("status", job_id, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["task"] == "hello"


# -- rendering ---------------------------------------------------------------


def test_relative_times() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert render.relative_time(now - timedelta(seconds=5), now) == "5s ago"
    assert render.relative_time(now + timedelta(minutes=2, seconds=5), now) == "in 2m"
    assert render.relative_time(now - timedelta(days=3, hours=1), now) == "3d ago"
    assert render.relative_time(now, now) == "just now"
    assert render.time_and_age("2024-05-01T11:00:00.000000Z", now) == (
        "2024-05-01 11:00:00 UTC (1h ago)"
    )
    assert render.time_and_age(None, now) == ""


def test_table_aligns_and_cuts_the_last_column() -> None:
    text = render.table(("A", "LONGER"), [("xyz", "1"), ("q", "x" * 100)], width=40)
    assert text.splitlines() == [
        "A    LONGER",
        "xyz  1",
        "q    " + "x" * 32 + "...",
    ]
    assert render.key_values([("k", "v"), ("empty", ""), ("long key", "a\nb")]) == (
        "k         v\nlong key  a\n          b"
    )
