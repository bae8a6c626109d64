"""The three handler kinds (SPEC "Workers and handlers"), each run by a real
in-process worker against a real Redis: exec (stdin, environment, stdout,
stderr, progress, timeout and process-group kill), http and python."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import agentq
from agentq.consumers.handlers import Handler, exec_handler, http_handler, python_handler
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from agentq.schemas.events import StoredEvent
from agentq.schemas.job import JobView

AGENT = "w"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}
PY = shlex.quote(sys.executable)


@pytest.fixture
async def q(redis_url: str, make_config: Callable[..., Config]) -> AsyncIterator[agentq.Client]:
    """A client on a fresh prefix: agent ``w`` known, one attempt per job by default."""
    config = make_config(
        rateLimit=NO_RATE_LIMIT,
        jobs={
            "maxAttempts": 1,
            "leaseSeconds": 3,
            "backoffBaseSeconds": 0.05,
            "backoffMaxSeconds": 0.1,
        },
        workers={"shutdownGraceSeconds": 2},
    )
    async with agentq.connect(redis_url, config) as client:
        await client.add_agent(AGENT)
        yield client


@asynccontextmanager
async def worker(q: agentq.Client, handler: Handler, concurrency: int = 1) -> AsyncIterator[Any]:
    """An in-process worker (with the scheduler and reclaimer) while the block runs."""
    run = q.worker(AGENT, handler, concurrency=concurrency)
    task = asyncio.create_task(run.run())
    try:
        yield run
    finally:
        run.stop()
        await asyncio.wait_for(task, timeout=10)


async def run_job(
    q: agentq.Client, handler: Handler, task: str = "the task", **fields: Any
) -> JobView:
    """Dispatch one job, run it with ``handler``, return its terminal view."""
    job = await q.dispatch(AGENT, task, caller="planner", **fields)
    async with worker(q, handler):
        view, timed_out = await q.wait(job.job_id, timeout=15)
    assert not timed_out, view
    return view


def events_of(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.type == kind]


# -- exec ------------------------------------------------------------------


async def test_exec_gets_task_on_stdin_and_job_in_environment(q: agentq.Client) -> None:
    await q.add_agent("planner")
    script = (
        "import json, os, sys; "
        "names = ['AGENTQ_JOB_ID', 'AGENTQ_TARGET', 'AGENTQ_DISPATCHED_BY', 'AGENTQ_ATTEMPT', "
        "'AGENTQ_JOB_JSON']; "
        "env = {n: os.environ.get(n) for n in names}; "
        "print(json.dumps({'stdin': sys.stdin.read(), 'env': env}))"
    )
    task = "line one\nline two with 'quotes' and $dollars"
    view = await run_job(
        q,
        exec_handler(f"{PY} -c {shlex.quote(script)}"),
        task,
        label="env check",
        metadata={"k": "v"},
    )
    assert view.state == "completed", view
    seen = json.loads(view.result)
    assert seen["stdin"] == task
    env = seen["env"]
    assert env["AGENTQ_JOB_ID"] == view.job_id
    assert env["AGENTQ_TARGET"] == AGENT
    assert env["AGENTQ_DISPATCHED_BY"] == "planner"
    assert env["AGENTQ_ATTEMPT"] == "1"
    job_json = json.loads(env["AGENTQ_JOB_JSON"])
    assert job_json["jobId"] == view.job_id
    assert job_json["task"] == task
    assert job_json["target"] == AGENT
    assert job_json["dispatchedBy"] == "planner"
    assert job_json["state"] == "active"
    assert job_json["attempt"] == 1
    assert job_json["label"] == "env check"
    assert job_json["metadata"] == {"k": "v"}


async def test_exec_result_is_trimmed_stdout(q: agentq.Client) -> None:
    view = await run_job(q, exec_handler("cat >/dev/null; printf '\\n  the answer: 42  \\n\\n'"))
    assert view.state == "completed", view
    assert view.result == "the answer: 42"
    (completed,) = events_of(await q.history(view.job_id), "JobCompleted")
    assert completed.data["result"] == "the answer: 42"


async def test_exec_nonzero_exit_fails_with_stderr_tail(q: agentq.Client) -> None:
    # 400 lines of noise, then the line that matters: the error is the tail.
    command = (
        'for i in $(seq 1 400); do echo "noise line $i of the log" >&2; done; '
        "echo 'fatal: the last word' >&2; echo 'partial output'; exit 3"
    )
    view = await run_job(q, exec_handler(command))
    assert view.state == "failed", view
    assert view.error is not None
    assert view.error.endswith("fatal: the last word")
    assert "noise line 1 of" not in view.error  # the head is cut, the tail kept
    assert view.result is None
    (failed,) = events_of(await q.history(view.job_id), "JobFailed")
    assert failed.data["reason"] == "attempts_exhausted"
    assert failed.data["error"] == view.error


async def test_exec_nonzero_exit_with_attempts_left_is_retried(q: agentq.Client) -> None:
    # Fails on attempt 1, succeeds on attempt 2 (AGENTQ_ATTEMPT tells them apart).
    command = 'if [ "$AGENTQ_ATTEMPT" = 1 ]; then echo "first try broke" >&2; exit 1; fi; echo ok'
    view = await run_job(q, exec_handler(command), max_attempts=2)
    assert view.state == "completed", view
    assert view.result == "ok"
    assert view.attempt == 2
    (failed,) = events_of(await q.history(view.job_id), "JobAttemptFailed")
    assert failed.data["error"] == "first try broke"


async def test_exec_progress_lines_show_in_status_while_running(q: agentq.Client) -> None:
    command = "echo '::progress 40 halfway' >&2; sleep 1; echo finished"
    job = await q.dispatch(AGENT, "slow")
    seen: list[Any] = []
    async with worker(q, exec_handler(command)):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            view = await q.status(job.job_id)
            if view.progress is not None:
                seen.append((view.state, view.progress))
                break
            await asyncio.sleep(0.02)
        final, timed_out = await q.wait(job.job_id, timeout=10)
    assert seen, "progress never showed in status"
    state, progress = seen[0]
    assert state == "active"
    assert progress.percent == 40
    assert progress.message == "halfway"
    assert not timed_out
    assert final.state == "completed"
    assert final.result == "finished"
    (event,) = events_of(await q.history(job.job_id), "JobProgress")
    assert event.data["percent"] == 40
    assert event.data["message"] == "halfway"
    assert event.data["attempt"] == 1


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process from /proc; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[2])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z"


async def test_exec_timeout_fails_with_timeout_and_kills_process_group(
    q: agentq.Client, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    # The shell records itself, starts a child shell (which records itself and
    # starts a grandchild sleep) and a sleep of its own; all wait 60 s.
    command = (
        f"echo $$ >> {pids}; "
        f"sh -c 'echo $$ >> {pids}; sleep 60 & echo $! >> {pids}; wait' & "
        f"sleep 60 & echo $! >> {pids}; wait"
    )
    started = time.monotonic()
    view = await run_job(q, exec_handler(command), timeout_seconds=1)
    took = time.monotonic() - started
    assert view.state == "failed", view
    assert view.error == "timeout"
    assert took < 8
    (failed,) = events_of(await q.history(view.job_id), "JobFailed")
    assert failed.data["error"] == "timeout"

    recorded = [int(line) for line in pids.read_text().split()]
    assert len(recorded) == 4, recorded  # shell, child shell, grandchild, the shell's sleep
    deadline = time.monotonic() + 3
    while (alive := [pid for pid in recorded if _alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert alive == [], f"processes of the timed-out job still alive: {alive}"
    group = recorded[0]  # the shell leads the job's process group (a session of its own)
    members = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and (stat := _proc_stat(int(entry.name))) is not None
        and stat[1] == group
        and stat[0] != "Z"
    ]
    assert members == [], f"processes left in the job's group {group}: {members}"


# -- http ------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, dict(self.headers), json.loads(body)))
                if self.path == "/ok":
                    self._answer(200, b'{"answer": 42, "list": [1, 2]}', "application/json")
                elif self.path == "/text":
                    self._answer(201, b"plain words", "text/plain")
                else:
                    self._answer(500, b"upstream exploded", "text/plain")

            def _answer(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )


@pytest.fixture
def http_server() -> Iterator[_Server]:
    server = _Server()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(5)


async def test_http_2xx_json_body_completes_with_it(q: agentq.Client, http_server: _Server) -> None:
    view = await run_job(q, http_handler(f"{http_server.url}/ok"), "call me", label="web")
    assert view.state == "completed", view
    assert view.result == {"answer": 42, "list": [1, 2]}
    ((path, headers, body),) = http_server.received
    assert path == "/ok"
    assert headers["Content-Type"] == "application/json"
    assert body["jobId"] == view.job_id
    assert body["task"] == "call me"
    assert body["target"] == AGENT
    assert body["label"] == "web"
    assert body["state"] == "active"
    assert body["attempt"] == 1


async def test_http_2xx_text_body_is_the_result(q: agentq.Client, http_server: _Server) -> None:
    view = await run_job(q, http_handler(f"{http_server.url}/text"))
    assert view.state == "completed", view
    assert view.result == "plain words"


async def test_http_500_fails_the_attempt_with_the_status(
    q: agentq.Client, http_server: _Server
) -> None:
    view = await run_job(q, http_handler(f"{http_server.url}/boom"), max_attempts=2)
    assert view.state == "failed", view
    assert "500" in (view.error or "")
    events = await q.history(view.job_id)
    (attempt_failed,) = events_of(events, "JobAttemptFailed")
    assert "500" in attempt_failed.data["error"]
    (failed,) = events_of(events, "JobFailed")
    assert "500" in failed.data["error"]
    assert len(http_server.received) == 2  # both attempts posted


# -- python ----------------------------------------------------------------


async def test_python_sync_handler_result(q: agentq.Client) -> None:
    view = await run_job(q, python_handler("worker_proc:sync_upper"), "shout this")
    assert view.state == "completed", view
    assert view.result == "SHOUT THIS"


async def test_python_async_handler_result_and_progress(q: agentq.Client) -> None:
    view = await run_job(q, python_handler("worker_proc:async_info"), "describe")
    assert view.state == "completed", view
    assert view.result == {"id": view.job_id, "task": "describe", "attempt": 1}
    (progress,) = events_of(await q.history(view.job_id), "JobProgress")
    assert progress.data["percent"] == 50
    assert progress.data["message"] == "half"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("worker_proc:sync_raises", "sync handler refused boom"),
        ("worker_proc:async_raises", "async handler broke"),
    ],
)
async def test_python_exception_fails_attempt_with_its_message(
    q: agentq.Client, spec: str, message: str
) -> None:
    view = await run_job(q, python_handler(spec), "boom", max_attempts=2)
    assert view.state == "failed", view
    assert view.error == message
    assert view.attempt == 2
    events = await q.history(view.job_id)
    (attempt_failed,) = events_of(events, "JobAttemptFailed")
    assert attempt_failed.data["error"] == message
    assert attempt_failed.data["attempt"] == 1
    (failed,) = events_of(events, "JobFailed")
    assert failed.data == {**failed.data, "error": message, "reason": "attempts_exhausted"}


async def test_plain_functions_sync_and_async(q: agentq.Client) -> None:
    """``q.worker`` takes plain functions too (``wrap``)."""
    view = await run_job(q, lambda job: {"len": len(job.task)}, "12345")
    assert view.result == {"len": 5}

    async def echo(job: Any) -> str:
        return f"{job.id}:{job.attempt}"

    view = await run_job(q, echo)
    assert view.result == f"{view.job_id}:1"


def test_python_handler_spec_errors() -> None:
    with pytest.raises(ValueError, match="MODULE:FUNC"):
        python_handler("no_colon_here")
    with pytest.raises(ValueError, match="not a function"):
        python_handler("worker_proc:no_such_function")


# -- a big task under exec (issue 11 item 10) -------------------------------------


async def test_exec_job_file_always_and_json_variable_only_when_small(q: agentq.Client) -> None:
    """A 50,000-character task of 3-byte characters is 150 KB of JSON: more than
    Linux allows in one environment string. The job is in AGENTQ_JOB_FILE always;
    AGENTQ_JOB_JSON is set only while under 64 KiB. The file is gone afterwards."""
    script = (
        "import json, os, sys; "
        "path = os.environ['AGENTQ_JOB_FILE']; job = json.load(open(path, encoding='utf-8')); "
        "inline = os.environ.get('AGENTQ_JOB_JSON'); "
        "print(json.dumps({'path': path, 'len': len(job['task']), 'id': job['jobId'], "
        "'inline': None if inline is None else json.loads(inline) == job, "
        "'stdin': len(sys.stdin.read())}))"
    )
    handler = exec_handler(f"{PY} -c {shlex.quote(script)}")
    big = await run_job(q, handler, "€" * 50_000)
    assert big.state == "completed", big
    seen = json.loads(big.result)
    assert seen["len"] == 50_000 and seen["stdin"] == 50_000 and seen["id"] == big.job_id
    assert seen["inline"] is None  # too big for the environment: left out
    assert not Path(seen["path"]).exists()

    small = await run_job(q, handler, "short task")
    seen = json.loads(small.result)
    assert seen["len"] == len("short task") and seen["inline"] is True
    assert not Path(seen["path"]).exists()


# -- progress coalesced (issue 11 item 20) -----------------------------------------


async def test_exec_progress_flood_is_coalesced_and_the_last_is_kept(q: agentq.Client) -> None:
    command = "for i in $(seq 1 100); do echo \"::progress $i step $i\" >&2; done; echo done"
    view = await run_job(q, exec_handler(command))
    assert view.state == "completed", view
    events = events_of(await q.history(view.job_id), "JobProgress")
    assert [e.data["percent"] for e in events] == [1, 100]
    assert events[-1].data["message"] == "step 100"
    assert view.progress is not None and view.progress.percent == 100


async def test_progress_is_sent_at_most_once_a_second(q: agentq.Client) -> None:
    async def reporter(job: Any) -> str:
        for i in range(1, 111):
            await job.progress(min(100, i), None)
            await asyncio.sleep(0.02)
        return "reported"

    view = await run_job(q, reporter)
    events = events_of(await q.history(view.job_id), "JobProgress")
    times = [iso_to_micros(e.at) for e in events]
    assert 3 <= len(events) <= 4, [e.data for e in events]
    # One a second; the last report waiting goes out before the outcome, at once.
    assert all(b - a >= 950_000 for a, b in itertools.pairwise(times[:-1])), times
    assert events[-1].data["percent"] == 100


# -- handlers that outlive their timeout, and no silent queueing (item 13) ---------


def _thread_pool_size() -> int:
    """The default executor's size (what asyncio.to_thread would have used)."""
    return min(32, (os.cpu_count() or 1) + 4)


async def test_http_handlers_run_all_at_once_and_abort_at_the_deadline(
    q: agentq.Client,
) -> None:
    """More concurrent requests than a default thread pool has threads all reach
    the server together; a request past the job's timeout is aborted then (the
    server sees the client go away) and the attempt fails with "timeout"."""
    n = _thread_pool_size() + 2
    barrier = threading.Barrier(n, timeout=8)
    hung_up, slow_arrived = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if body["task"] == "slow":
                slow_arrived.set()
                self.connection.settimeout(10)
                if self.connection.recv(1) == b"":  # blocks until the client hangs up
                    hung_up.set()
                return
            barrier.wait()
            answer = json.dumps({"ok": body["task"]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        jobs = [await q.dispatch(AGENT, f"t{i}") for i in range(n)]
        slow = await q.dispatch(AGENT, "slow", timeout_seconds=2)
        async with worker(q, http_handler(url), concurrency=n + 1):
            views = [(await q.wait(j.job_id, timeout=15))[0] for j in jobs]
            asked = time.monotonic()
            slow_view, _ = await q.wait(slow.job_id, timeout=15)
            waited = time.monotonic() - asked
            assert slow_arrived.is_set(), "the slow request never reached the server"
            assert await asyncio.to_thread(hung_up.wait, 5), "the request was never aborted"
        assert [v.result for v in views] == [{"ok": f"t{i}"} for i in range(n)]
        assert (slow_view.state, slow_view.error) == ("failed", "timeout")
        assert waited < 4
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def test_sync_handlers_get_a_thread_each_and_a_timeout_frees_the_slot(
    q: agentq.Client, caplog: pytest.LogCaptureFixture
) -> None:
    n = _thread_pool_size() + 2
    barrier = threading.Barrier(n, timeout=8)
    release = threading.Event()

    def handler(job: Any) -> str:
        if job.task == "stuck":
            release.wait(10)  # ignores its timeout: Python cannot stop a thread
            return "too late"
        barrier.wait()
        return job.task

    try:
        stuck = await q.dispatch(AGENT, "stuck", timeout_seconds=0.5)
        async with worker(q, handler, concurrency=n):
            view, _ = await q.wait(stuck.job_id, timeout=10)
            assert (view.state, view.error) == ("failed", "timeout")
            # Its slot is free again though its thread runs on: n jobs run together.
            jobs = [await q.dispatch(AGENT, f"t{i}") for i in range(n)]
            views = [(await q.wait(j.job_id, timeout=15))[0] for j in jobs]
        assert [v.result for v in views] == [f"t{i}" for i in range(n)]
    finally:
        release.set()
