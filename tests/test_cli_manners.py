"""The command line's manners (issue 12): what a newcomer meets in the first hour.

Black-box: ``agentq`` runs as a subprocess against the real server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from test_cli import (
    MISSING_JOB,
    Cli,
    Result,
    _clean_env,
    _error,
    _run,
    cli_on_a_fresh_prefix,
    short_home,
)

import agentq
from agentq import embedded
from agentq.eventlog.scripts import Backoff, ensure_work_groups
from agentq.schemas.config import Config


@pytest.fixture
def cli(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    """The CLI on a fresh key prefix, agents a and b known, the rate limit off."""
    return cli_on_a_fresh_prefix(redis_url, make_config)


# -- output into a closed pipe ------------------------------------------------


def _into_closed_pipe(cli: Cli, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``agentq ARGS`` with standard output a pipe nobody reads (``| head -1`` once
    head has exited): the reading end is closed before the process starts."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "agentq.cli", *args, "--redis", cli.redis_url],
            stdout=write_end, stderr=subprocess.PIPE, env=cli.env, timeout=60, check=False,
        )
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_ends_quietly(cli: Cli) -> None:
    job_id = cli.dispatch("a", "a job to look at")["jobId"]
    for args in (["list"], ["replay"], ["history", job_id], ["status", job_id]):
        result = _into_closed_pipe(cli, *args)
        assert result.stderr == b"", (args, result.stderr.decode())
        assert result.returncode == 141, (args, result.returncode)


# -- usage errors name the flag ----------------------------------------------


def _usage_error(result: Result, flag: str) -> str:
    """A usage error (exit 2, ``invalid_input``) whose message names ``flag``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    message = _error(result)["message"]
    assert flag in message, (flag, message)
    assert flag in result.stderr, (flag, result.stderr)
    return message


def test_bad_flags_are_usage_errors_naming_the_flag(cli: Cli) -> None:
    port = cli("list", "--redis", "redis://127.0.0.1:99999/0", "--json", redis=False)
    _usage_error(port, "--redis")
    for timeout in ("601", "1e9", "nan"):
        _usage_error(cli("wait", MISSING_JOB, "--timeout", timeout, "--json"), "--timeout")
    delay = _usage_error(cli("dispatch", "a", "x", "--delay", "-1", "--json"), "--delay")
    assert "delaySeconds" not in delay
    _usage_error(cli("dispatch", "a", "x", "--max-attempts", "21", "--json"), "--max-attempts")
    _usage_error(cli("list", "--limit", "0", "--json"), "--limit")
    _usage_error(cli("list", "--cursor", "garbage", "--json"), "--cursor")
    _usage_error(cli("activity", "NOPE", "--json"), "AGENT")
    # Nothing was dispatched by the refused commands.
    assert cli.json("list")["count"] == 0


def test_a_bad_redis_url_from_the_environment_names_its_variable(cli: Cli) -> None:
    env = {"AGENTQ_REDIS_URL": "redis://127.0.0.1:99999/0"}
    result = cli("agents", "list", "--json", env=env, redis=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "AGENTQ_REDIS_URL" in _error(result)["message"]


# -- messages that say what to do next ---------------------------------------


def test_unknown_agent_says_how_to_register_it(cli: Cli) -> None:
    human = cli("dispatch", "nobody", "hello")
    assert human.returncode == 3
    assert "Unknown target agent: nobody" in human.stderr
    assert "register it with: agentq agents add nobody" in human.stderr
    # The tool's JSON message stays SPEC's.
    as_json = cli("dispatch", "nobody", "hello", "--json")
    assert _error(as_json) == {"code": "unknown_agent", "message": "Unknown target agent: nobody"}


def test_removing_an_unknown_agent_does_not_call_it_a_target(cli: Cli) -> None:
    result = cli("agents", "remove", "nobody", "--json")
    assert result.returncode == 3
    error = _error(result)
    assert error["code"] == "unknown_agent"
    assert "target" not in error["message"].lower()
    assert "nobody" in error["message"]
    assert "agentq agents list" in result.stderr


def test_status_of_something_that_is_no_job_id_says_so(cli: Cli) -> None:
    result = cli("status", "not a job id")
    assert result.returncode == 3
    assert "Job not a job id not found" not in result.stderr
    assert "'not a job id' is not a job id" in result.stderr
    assert "j_" in result.stderr  # what one looks like
    # A well-formed id that does not exist is SPEC's plain not found.
    missing = cli("status", MISSING_JOB)
    assert missing.returncode == 3
    assert f"Job {MISSING_JOB} not found" in missing.stderr


def test_config_file_of_unknown_kind_names_the_known_extensions(cli: Cli,
                                                               tmp_path: Path) -> None:
    conf = tmp_path / "agentq.conf"
    conf.write_text("keyPrefix = 'x'\n")
    result = cli("--config", str(conf), "agents", "list", "--json")
    assert result.returncode == 2
    message = _error(result)["message"]
    assert "Expecting value" not in message
    assert ".conf" in message
    for known in (".toml", ".yaml", ".yml", ".json"):
        assert known in message, message
    validated = cli("config", "validate", str(conf), redis=False)
    assert validated.returncode == 2
    assert ".toml" in validated.stderr


def test_rate_limit_refusal_names_the_setting(cli: Cli) -> None:
    env = {"AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE": "1"}
    cli.ok("dispatch", "a", "one", "--as", "b", env=env)
    refused = cli("dispatch", "a", "two", "--as", "b", env=env)
    assert refused.returncode == 5
    assert "Rate limit exceeded: 1/1 dispatches this minute" in refused.stderr
    assert "rateLimit.dispatchesPerMinute" in refused.stderr
    assert "AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE" in refused.stderr
    as_json = cli("dispatch", "a", "two", "--as", "b", "--json", env=env)
    assert _error(as_json) == {"code": "rate_limited",
                               "message": "Rate limit exceeded: 1/1 dispatches this minute"}


def test_worker_refuses_a_bad_agent_id_before_its_banner(cli: Cli) -> None:
    result = cli("worker", "NewAgent", "--exec", "cat")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "NewAgent" in result.stderr
    assert "running" not in result.stderr
    assert "Traceback" not in result.stderr


# -- the embedded server says when it starts ---------------------------------


def test_starting_the_embedded_server_is_said_on_stderr() -> None:
    env = _clean_env()
    with short_home() as data, short_home() as elsewhere:
        env_home = {**env, "AGENTQ_HOME": str(data)}
        first = _run(["agents", "list", "--json"], env_home, cwd=str(data))
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout) == {"agents": {}}
        assert "started" in first.stderr and str(data.resolve()) in first.stderr, first.stderr
        assert "agentq server stop" in first.stderr
        again = _run(["agents", "list"], env_home, cwd=str(data))
        assert again.returncode == 0
        assert again.stderr == ""

        # From another directory without AGENTQ_HOME: a second server, and it says so.
        other = _run(["status", MISSING_JOB], env, cwd=str(elsewhere))
        try:
            assert other.returncode == 3
            assert str((elsewhere / ".agentq").resolve()) in other.stderr, other.stderr
            assert "AGENTQ_HOME" in other.stderr  # the hint after "not found"
        finally:
            embedded.stop_server(elsewhere / ".agentq")


# -- history and status read in full -----------------------------------------


def test_history_is_not_cut_when_piped(cli: Cli) -> None:
    task = "a long task " + "word " * 60 + "the end"
    view = cli.dispatch("a", task)
    lines = cli.ok("history", view["jobId"]).stdout.splitlines()
    assert lines[1].endswith("the end\""), lines[1]
    assert " ".join(task.split()) in lines[1]


async def test_status_shows_the_attempt_within_its_budget(q: agentq.Client) -> None:
    job = await q.dispatch("a", "fails once", max_attempts=1)
    part = q.partition("a")
    await ensure_work_groups(q.redis, part)
    backoff = Backoff.of(q.config.jobs)
    (started,), _ = await q.scripts.start(part, "tester", 60_000, 1)
    assert await q.scripts.fail(part, "tester", job.job_id, 1, "broke", backoff) == "failed"
    await q.retry(job.job_id)
    (started,), _ = await q.scripts.start(part, "tester", 60_000, 1)
    assert int(started.record["attempt"]) == 2

    env = _clean_env(AGENTQ_KEY_PREFIX=q.keys.prefix)
    assert q.target is not None
    result = _run(["status", job.job_id, "--redis", q.target.url], env)
    assert result.returncode == 0, result.stderr
    pairs = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert pairs["attempt"].startswith("1 of 1"), pairs["attempt"]
    assert "2 of 1" not in result.stdout
    as_json = json.loads(_run(["status", job.job_id, "--json", "--redis", q.target.url],
                              env).stdout)
    assert (as_json["attempt"], as_json["maxAttempts"]) == (2, 1)  # SPEC's fields unchanged


# -- announce -----------------------------------------------------------------


async def test_announce_of_a_string_result_is_not_quoted(q: agentq.Client) -> None:
    from agentq.consumers.gates import Gates

    plain = await q.dispatch("b", "say done", caller="a", announce=True)
    structured = await q.dispatch("b", "say more", caller="a", announce=True)
    part = q.partition("b")
    await ensure_work_groups(q.redis, part)
    started, _ = await q.scripts.start(part, "tester", 60_000, 2)
    results = {plain.job_id: "done", structured.job_id: {"k": "v", "n": 1}}
    await q.scripts.complete(part, "tester", [
        (s.job_id, int(s.record["attempt"]), orjson.dumps(results[s.job_id])) for s in started])
    gates = Gates(q.redis, q.open_blocking(), q.keys, consumer="tester")
    while await gates.process_once(50):
        pass
    tasks = {}
    for view in (await q.list(agent="a")).jobs:
        full = await q.status(view.job_id)
        tasks[full.metadata["announceFor"]] = full.task
    assert tasks[plain.job_id] == f"Job {plain.job_id} completed: done"
    assert tasks[structured.job_id] == f'Job {structured.job_id} completed: {{"k":"v","n":1}}'
