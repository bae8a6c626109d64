"""Black-box tests of the ``agentq`` commands tests/test_cli.py leaves out: list,
activity, replay, projections rebuild, audit verify, config, worker, run, mcp
--help and more usage errors. Each runs as a subprocess against the real server
on a key prefix of its own; setup that is not under test goes through the Python
API, and independent commands run side by side to keep the suite quick."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _backends import sync_client

import agentq
from agentq.eventlog.keys import Keys
from agentq.schemas.config import Config

Result = subprocess.CompletedProcess[str]

JOB_FIELDS = {
    "jobId", "target", "dispatchedBy", "task", "label", "project", "state", "attempt",
    "maxAttempts", "priority", "model", "thinking", "timeoutSeconds", "dependsOn",
    "waitingForDependencies", "dependencies", "onDependencyFailure", "result", "error",
    "progress", "createdAt", "queuedAt", "startedAt", "finishedAt", "runAt", "idempotencyKey",
    "parentJobId", "depth", "announce", "sessionKey", "origin", "metadata",
}
EVENT_FIELDS = {"eventId", "type", "jobId", "agent", "at", "actor", "v", "data"}
ACTIVITY_FIELDS = {"status", "queued", "delayed", "waitingDependencies", "active", "completed",
                   "failed", "currentJobs", "lastActivityAt", "workers"}
PYTHON = [sys.executable, "-m", "agentq.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any AGENTQ_ setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTQ_")}
    env.update(extra)
    return env


class Cli:
    """Runs ``agentq`` on the test server with a key prefix of its own."""

    def __init__(self, redis_url: str, config: Config, env: dict[str, str]) -> None:
        self.redis_url = redis_url
        self.config = config
        self.env = env

    def argv(self, args: Sequence[str], redis: bool = True) -> list[str]:
        return [*PYTHON, *args, *(["--redis", self.redis_url] if redis else [])]

    def __call__(self, *args: str, redis: bool = True, env: dict[str, str] | None = None,
                 timeout: float = 60) -> Result:
        return subprocess.run(self.argv(args, redis), capture_output=True, text=True,
                              env={**self.env, **(env or {})}, timeout=timeout, check=False)

    def many(self, *commands: Sequence[str], redis: bool = True) -> list[Result]:
        """Independent commands, run side by side; results in order."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(lambda args: self(*args, redis=redis), commands))

    def ok(self, *args: str, **kwargs: Any) -> Result:
        result = self(*args, **kwargs)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        return result

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.ok(*args, "--json", **kwargs).stdout)

    def popen(self, *args: str, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running command; its standard error goes to ``log``."""
        with open(log, "wb") as err:
            return subprocess.Popen(self.argv(args), env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)

    def api(self, work: Callable[[agentq.Client], Any]) -> Any:
        """Run ``work(client)`` through the Python API on the same prefix."""

        async def run() -> Any:
            async with agentq.connect(self.redis_url, self.config) as q:
                return await work(q)

        return asyncio.run(run())


@pytest.fixture
def cli(redis_url: str, make_config: Callable[..., Config]) -> Cli:
    """The CLI on a fresh key prefix, the rate limit off."""
    config = make_config(rateLimit={"dispatchesPerMinute": 0})
    env = _clean_env(AGENTQ_KEY_PREFIX=config.key_prefix,
                     AGENTQ_RATE_LIMIT__DISPATCHES_PER_MINUTE="0")
    return Cli(redis_url, config, env)


def _error(result: Result, code: str, exit_code: int) -> str:
    """The error object of a ``--json`` failure; its message."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    body = json.loads(result.stdout)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    message: str = body["error"]["message"]
    return message


def _ids(page: dict[str, Any]) -> list[str]:
    return [job["jobId"] for job in page["jobs"]]


def _stop(process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> int:
    """SIGTERM ``process`` (by its pid) and return its exit code."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        raise AssertionError(f"did not stop on SIGTERM:\n{log.read_text()}") from None


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Background processes a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


# -- list ---------------------------------------------------------------------


def test_list_filters_pages_and_views(cli: Cli) -> None:
    long_task = "x" * 200

    async def setup(q: agentq.Client) -> list[str]:
        for agent in ("a", "b", "c"):
            await q.add_agent(agent)
        j1 = await q.dispatch("a", "first")
        j2 = await q.dispatch("a", long_task)
        j3 = await q.dispatch("b", "from a", caller="a")
        j4 = await q.dispatch("b", "from a again", caller="a")
        await q.cancel(j1.job_id)
        return [j.job_id for j in (j1, j2, j3, j4)]

    j1, j2, j3, j4 = cli.api(setup)
    everything, by_agent, by_dispatcher, by_state, page1, as_b1, as_c, human = cli.many(
        ["list", "--json"],
        ["list", "--agent", "a", "--json"],
        ["list", "--dispatched-by", "a", "--json"],
        ["list", "--agent", "a", "--state", "queued", "--state", "cancelled", "--json"],
        ["list", "--limit", "3", "--json"],
        ["list", "--as", "b", "--limit", "1", "--json"],
        ["list", "--as", "c"],
        ["list", "--limit", "2"],
    )
    for result in (everything, by_agent, by_dispatcher, by_state, page1, as_b1, as_c, human):
        assert result.returncode == 0, result.stderr

    page = json.loads(everything.stdout)
    assert set(page) == {"jobs", "count", "nextCursor"}
    assert _ids(page) == [j4, j3, j2, j1]  # newest first
    assert (page["count"], page["nextCursor"]) == (4, None)
    assert all(set(job) == JOB_FIELDS for job in page["jobs"])
    assert page["jobs"][2]["task"] == long_task[:80]  # the task cut to 80 characters
    assert page["jobs"][3]["state"] == "cancelled"

    assert _ids(json.loads(by_agent.stdout)) == [j2, j1]
    assert _ids(json.loads(by_dispatcher.stdout)) == [j4, j3]
    assert _ids(json.loads(by_state.stdout)) == [j2, j1]

    first = json.loads(page1.stdout)
    assert (_ids(first), first["count"]) == ([j4, j3, j2], 3)
    assert first["nextCursor"]
    # A non-system caller sees only its own jobs; the limit holds after that filter.
    b_first = json.loads(as_b1.stdout)
    assert (_ids(b_first), b_first["count"]) == ([j4], 1)
    assert b_first["nextCursor"]
    assert as_c.stdout.strip() == "No jobs."

    lines = human.stdout.splitlines()
    assert lines[0].split() == ["JOB", "TARGET", "FROM", "STATE", "CREATED", "TASK"]
    assert lines[1].split()[:4] == [j4, "b", "a", "queued"]
    assert lines[2].split()[:4] == [j3, "b", "a", "queued"]
    assert lines[1].index(" b ") == lines[2].index(" b ") == lines[0].index("TARGET") - 1
    assert lines[-1].startswith("more: agentq list ... --cursor j_")

    second, b_second = cli.many(
        ["list", "--limit", "3", "--cursor", first["nextCursor"], "--json"],
        ["list", "--as", "b", "--limit", "1", "--cursor", b_first["nextCursor"], "--json"],
    )
    last = json.loads(second.stdout)
    assert (_ids(last), last["count"], last["nextCursor"]) == ([j1], 1, None)
    b_last = json.loads(b_second.stdout)
    assert _ids(b_last) == [j3]  # no job skipped or repeated, none of the others shown


# -- activity -------------------------------------------------------------------


def test_activity_table_and_json(cli: Cli) -> None:
    async def setup(q: agentq.Client) -> None:
        await q.add_agent("a")
        await q.add_agent("b")
        await q.add_agent("c", ["a"])
        await q.dispatch("a", "one")
        await q.dispatch("a", "two")
        await q.dispatch("b", "later", delay_seconds=600)

    cli.api(setup)
    everything, only_a, as_c, human = cli.many(
        ["activity", "--json"],
        ["activity", "a", "--json"],
        ["activity", "--as", "c", "--json"],
        ["activity"],
    )
    for result in (everything, only_a, as_c, human):
        assert result.returncode == 0, result.stderr

    activity = json.loads(everything.stdout)
    assert set(activity) == {"agents", "summary"}
    assert set(activity["agents"]) == {"a", "b", "c"}
    a, b = activity["agents"]["a"], activity["agents"]["b"]
    assert set(a) == ACTIVITY_FIELDS
    assert (a["status"], a["workers"], a["queued"], a["active"]) == ("offline", 0, 2, 0)
    assert (b["queued"], b["delayed"], b["currentJobs"]) == (0, 1, [])
    assert activity["summary"]["queued"] == 2
    assert activity["summary"]["delayed"] == 1
    assert activity["summary"]["offline"] == 3

    assert set(json.loads(only_a.stdout)["agents"]) == {"a"}
    # c may dispatch only to a: it sees itself and a.
    assert set(json.loads(as_c.stdout)["agents"]) == {"a", "c"}

    lines = human.stdout.splitlines()
    assert lines[0].split() == ["AGENT", "STATUS", "WORKERS", "QUEUED", "DELAYED", "WAITING",
                                "ACTIVE", "DONE", "FAILED", "RUNNING", "NOW"]
    assert lines[1].split() == ["a", "offline", "0", "2", "0", "0", "0", "0", "0"]
    assert lines[2].split() == ["b", "offline", "0", "0", "1", "0", "0", "0", "0"]


def test_activity_with_no_agents(cli: Cli) -> None:
    empty = cli.ok("activity")
    assert empty.stdout.strip() == "No agents are known yet."


# -- replay ---------------------------------------------------------------------


def _lines(result: Result) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.both_backends
def test_replay_streams_events_as_json_lines_with_filters(cli: Cli) -> None:
    async def setup(q: agentq.Client) -> tuple[str, str]:
        await q.add_agent("a")
        await q.add_agent("b")
        first = await q.dispatch("a", "first")
        await asyncio.sleep(0.01)
        second = await q.dispatch("b", "second", caller="a")
        await asyncio.sleep(0.01)
        await q.cancel(first.job_id)
        return first.job_id, second.job_id

    j1, j2 = cli.api(setup)
    everything = _lines(cli("replay"))
    assert all(set(event) == EVENT_FIELDS for event in everything)
    assert [(e["type"], e["jobId"], e["agent"]) for e in everything] == [
        ("JobDispatched", j1, "a"), ("JobDispatched", j2, "b"), ("JobCancelled", j1, "a"),
    ]
    times = [e["at"] for e in everything]
    assert times == sorted(times)
    assert everything[1]["actor"] == "a"
    assert everything[1]["data"]["task"] == "second"
    t1, t2, t3 = times

    only_a, both, job, since, until = cli.many(
        ["replay", "--agent", "a"],
        ["replay", "--agent", "b", "--agent", "a", "--json"],
        ["replay", "--job", j1],
        ["replay", "--since", t2],
        ["replay", "--until", t3, "--since", t2.replace("Z", "+00:00")],
    )
    assert [e["eventId"] for e in _lines(only_a)] == [everything[0]["eventId"],
                                                      everything[2]["eventId"]]
    assert _lines(both) == everything  # merged by time; --json changes nothing
    assert [(e["type"], e["jobId"]) for e in _lines(job)] == [
        ("JobDispatched", j1), ("JobCancelled", j1)]
    assert [e["at"] for e in _lines(since)] == [t2, t3]  # --since is inclusive
    assert [e["at"] for e in _lines(until)] == [t2]  # --until is exclusive
    assert t1 < t2


# -- projections rebuild, audit verify ------------------------------------------------


@pytest.mark.both_backends
def test_projections_rebuild_and_audit_verify(cli: Cli) -> None:
    async def setup(q: agentq.Client) -> list[str]:
        await q.add_agent("a")
        await q.add_agent("b")
        jobs = [await q.dispatch("a", "one"), await q.dispatch("b", "two")]
        await q.cancel(jobs[0].job_id)
        return [j.job_id for j in jobs]

    j1, j2 = cli.api(setup)
    refused, rebuilt = cli.many(
        ["--as", "someagent", "projections", "rebuild", "--json"],
        ["projections", "rebuild"],
    )
    message = _error(refused, "unauthorized", 4)
    assert message == "Unauthorized: projections rebuild requires a system agent."
    assert message in refused.stderr
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == "Rebuilt the views of 2 agents from 3 events"
    assert cli.json("projections", "rebuild") == {"agents": 2, "events": 3}

    # The rebuilt views answer as before; the log and the views agree.
    page = cli.api(lambda q: q.list())
    assert [(j.job_id, j.state) for j in page.jobs] == [(j2, "queued"), (j1, "cancelled")]
    verified, verified_json = cli.many(["audit", "verify"], ["audit", "verify", "--json"])
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() == "OK: 2 agents agree with the log"
    assert json.loads(verified_json.stdout) == {"ok": True, "differences": []}
    # How far each agent's audit went, on standard error (not with --json).
    assert verified.stderr.splitlines() == [
        "a: 2 events read, 1 job compared", "b: 1 event read, 1 job compared"]
    assert verified_json.stderr == ""
    assert rebuilt.stderr.splitlines() == ["a: 2 events applied", "b: 1 event applied"]

    # A state record that disagrees with the log is named, and the exit code is 1.
    client = sync_client(cli.redis_url, decode_responses=True)
    try:
        record = Keys(cli.config.key_prefix).partition("b").job(j2)
        assert client.hget(record, "state") == "queued"
        client.hset(record, "state", "completed")
    finally:
        client.close()
    broken = cli("audit", "verify", "--json")
    assert broken.returncode == 1
    body = json.loads(broken.stdout)
    assert body["ok"] is False
    assert any(j2 in line and "state" in line for line in body["differences"]), body


# -- worker, run --------------------------------------------------------------------

HANDLER = r"""
read -r task
case "$task" in
  flaky)
    if [ "$AGENTQ_ATTEMPT" = 1 ]; then echo "boom on the first try" >&2; exit 3; fi ;;
  slow)
    sleep 1.5 ;;
  hello)
    echo "::progress 50 halfway" >&2 ;;
esac
by="$AGENTQ_DISPATCHED_BY"
echo "$AGENTQ_TARGET did: $task (job $AGENTQ_JOB_ID, attempt $AGENTQ_ATTEMPT, by $by)"
"""


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_exec_handler_retry_and_sigterm(
    cli: Cli, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    script = tmp_path / "handler.sh"
    script.write_text(HANDLER)

    async def setup(q: agentq.Client) -> tuple[str, str]:
        await q.add_agent("a")
        hello = await q.dispatch("a", "hello", caller="a")
        flaky = await q.dispatch("a", "flaky", max_attempts=1)
        return hello.job_id, flaky.job_id

    hello, flaky = cli.api(setup)
    log = tmp_path / "worker.log"
    worker = cli.popen("worker", "a", "--exec", f"sh {script}", "--concurrency", "2", log=log)
    processes.append(worker)

    done, failed = cli.many(
        ["wait", hello, "--timeout", "30", "--json"],
        ["wait", flaky, "--timeout", "30", "--json"],
    )
    assert done.returncode == 0, (done.stdout, done.stderr, log.read_text())
    view = json.loads(done.stdout)
    assert (view["state"], view["timedOut"], view["attempt"]) == ("completed", False, 1)
    assert view["result"] == f"a did: hello (job {hello}, attempt 1, by a)"
    events = cli.api(lambda q: q.history(hello))
    progress = [e.data for e in events if e.type == "JobProgress"]
    assert progress and progress[0]["percent"] == 50 and progress[0]["message"] == "halfway"

    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    failed_view = json.loads(failed.stdout)
    assert failed_view["state"] == "failed"
    assert "boom on the first try" in failed_view["error"]

    # While it runs, the worker is live; retry gives the failed job another attempt.
    activity, retried = cli.many(["activity", "a", "--json"], ["retry", flaky])
    live = json.loads(activity.stdout)["agents"]["a"]
    assert live["workers"] == 1
    assert live["status"] in ("idle", "working")
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout.strip() == f"Job {flaky} re-queued for agent a"
    again, _ = cli.api(lambda q: q.wait(flaky, timeout=30))
    assert again.result == f"a did: flaky (job {flaky}, attempt 2, by main)"

    # SIGTERM: no new jobs, the running one finishes, exit 0.
    slow = cli.api(lambda q: q.dispatch("a", "slow")).job_id
    _wait_for(lambda: cli.api(lambda q: q.status(slow)).state == "active", 15,
              "the slow job to start")
    assert _stop(worker, log) == 0, log.read_text()
    assert "stopped" in log.read_text()
    assert cli.api(lambda q: q.status(slow)).state == "completed"
    after = cli.api(lambda q: q.activity(["a"]))["agents"]["a"]
    assert (after["status"], after["workers"]) == ("offline", 0)


def test_worker_python_handler(
    cli: Cli, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """``worker AGENT --handler MODULE:FUNC``; modules next to where agentq runs import."""
    (tmp_path / "aq_test_handlers.py").write_text(
        "def shout(job):\n    return job.task.upper()\n"
    )

    async def setup(q: agentq.Client) -> str:
        await q.add_agent("a")
        return (await q.dispatch("a", "quiet please")).job_id

    job_id = cli.api(setup)
    log = tmp_path / "worker.log"
    worker = cli.popen("worker", "a", "--handler", "aq_test_handlers:shout", log=log,
                       cwd=tmp_path)
    processes.append(worker)
    _wait_for(lambda: worker.poll() is not None
              or cli.api(lambda q: q.status(job_id)).state == "completed", 20,
              "the job to complete")
    assert worker.poll() is None, f"the worker exited {worker.returncode}:\n{log.read_text()}"
    assert cli.api(lambda q: q.status(job_id)).result == "QUIET PLEASE"
    assert _stop(worker, log) == 0, log.read_text()


@pytest.mark.both_backends
def test_run_starts_the_workers_of_the_config(
    cli: Cli, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    config = tmp_path / "agentq.toml"
    config.write_text(
        '[agents.shouter]\nhandler = { exec = "tr a-z A-Z" }\nconcurrency = 2\n\n'
        '[agents.quiet]\nallowAgents = ["shouter"]\n'
    )
    log = tmp_path / "run.log"
    runner = cli.popen("run", "--config", str(config), log=log)
    processes.append(runner)
    # The dispatching process reads the same config: both agents are known to it.
    job = cli.json("dispatch", "shouter", "make some noise", "--as", "quiet",
                   "--config", str(config))
    waited = cli("wait", job["jobId"], "--timeout", "30", "--json")
    assert waited.returncode == 0, (waited.stdout, waited.stderr, log.read_text())
    view = json.loads(waited.stdout)
    assert (view["state"], view["result"]) == ("completed", "MAKE SOME NOISE")

    activity = cli.api(lambda q: q.activity())["agents"]
    assert activity["shouter"]["workers"] == 1
    assert (activity["quiet"]["workers"], activity["quiet"]["status"]) == (0, "offline")

    assert _stop(runner, log) == 0, log.read_text()


# -- mcp --help, usage errors ----------------------------------------------------------


def test_mcp_help_and_usage(cli: Cli) -> None:
    helped, no_agent = cli.many(["mcp", "--help"], ["mcp", "--json"], redis=False)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: agentq mcp")
    assert "--agent AGENT" in helped.stdout
    for tool in ("queue_dispatch", "queue_status", "queue_list", "queue_activity",
                 "queue_wait", "queue_history", "queue_approve", "queue_reject"):
        assert tool in helped.stdout
    assert "examples:" in helped.stdout
    assert "--agent" in _error(no_agent, "invalid_input", 2)
    assert "usage: agentq mcp" in no_agent.stderr


def test_usage_errors_with_json(cli: Cli) -> None:
    """Usage errors and invalid input, each with the error object on standard output
    and exit 2; none of them needs Redis to get that far."""
    commands: dict[str, list[str]] = {
        "limit 0": ["list", "--limit", "0", "--json"],
        "state": ["list", "--state", "bogus", "--json"],
        "cursor": ["list", "--cursor", "nonsense", "--json"],
        "since": ["replay", "--since", "yesterday", "--json"],
        "job": ["replay", "--job", "not-a-job", "--json"],
        "no subcommand": ["projections", "--json"],
        "no handler": ["worker", "a", "--json"],
        "concurrency": ["worker", "a", "--exec", "true", "--concurrency", "0", "--json"],
    }
    results = dict(zip(commands, cli.many(*commands.values()), strict=True))
    messages = {name: _error(result, "invalid_input", 2) for name, result in results.items()}
    for name, result in results.items():
        assert messages[name] in result.stderr, name  # the human-readable line too
    assert "limit" in messages["limit 0"]
    assert "bogus" in messages["state"]
    assert "cursor" in messages["cursor"].lower()
    assert "--since" in messages["since"]
    assert "--job" in messages["job"]
    assert "a command is required" in messages["no subcommand"]
    assert "usage: agentq worker" in results["no handler"].stderr
    assert "concurrency" in messages["concurrency"]
