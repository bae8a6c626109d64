"""Handlers: what runs a job. A handler takes a :class:`Job` and returns its
result; raising :class:`AttemptFailed` (or any exception) fails the attempt."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import inspect
import os
import re
import signal
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import httpx2
import orjson
import structlog

from agentq.eventlog import tracing
from agentq.eventlog.records import to_view
from agentq.schemas.job import JobView

ERROR_TAIL_CHARS = 2000
# AGENTQ_JOB_JSON is set only below this size: Linux refuses one environment
# string over 128 KiB ("Argument list too long"); AGENTQ_JOB_FILE always works.
JOB_JSON_ENV_LIMIT = 64 * 1024

log = structlog.get_logger("agentq.worker")
_PROGRESS = re.compile(r"^::progress\s+(\d+(?:\.\d+)?)(?:\s+(.*))?$")


class AttemptFailed(Exception):
    """The attempt failed; the message becomes the job's ``error``."""


ProgressReporter = Callable[[float, str | None], Awaitable[None]]


class Job:
    """A job as a handler sees it: the whole view (sessionKey and dependency
    results included) and a way to report progress.

    The view is built from the state record when first asked for: a handler
    that needs only the task or the id does not pay for it.
    """

    def __init__(
        self,
        report: ProgressReporter,
        *,
        view: JobView | None = None,
        job_id: str | None = None,
        record: Mapping[str, str] | None = None,
    ) -> None:
        if view is None and (job_id is None or record is None):
            raise ValueError("a Job needs its view, or its id and state record")
        self.report = report
        self._view = view
        self._job_id = job_id or (view.job_id if view else "")
        self._record = record
        self._spec: dict[str, Any] | None = None

    @property
    def view(self) -> JobView:
        if self._view is None:
            assert self._record is not None
            # Handlers act for the system: they see the whole job.
            self._view = to_view(self._job_id, self._record, with_session_key=True)
        return self._view

    @property
    def spec(self) -> dict[str, Any]:
        """The job's dispatch fields as stored (camelCase, defaults left out)."""
        if self._spec is None:
            self._spec = (orjson.loads(self._record["spec"]) if self._record is not None
                          else self.view.wire())
        return self._spec

    @property
    def id(self) -> str:
        return self._job_id

    @property
    def task(self) -> str:
        return str(self.spec["task"])

    @property
    def attempt(self) -> int:
        if self._record is not None:
            return int(self._record["attempt"])
        return self.view.attempt

    @property
    def timeout_seconds(self) -> float:
        return float(self.spec.get("timeoutSeconds") or 0)

    async def progress(self, percent: float, message: str | None = None) -> None:
        """Report progress (0 to 100); it shows in the job's status."""
        await self.report(percent, message)


Handler = Callable[[Job], Any]
"""A handler: called with the Job; returns the result or an awaitable of it."""


def _tail(text: str) -> str:
    return text[-ERROR_TAIL_CHARS:].strip()


def exec_handler(command: str) -> Handler:
    """Run ``command`` through the shell: task on stdin, SPEC's variables in the
    environment (the job's JSON in the file named by AGENTQ_JOB_FILE, and in
    AGENTQ_JOB_JSON too when under 64 KiB; TRACEPARENT when the job has a
    trace), stdout (trimmed) as the result,
    stderr's tail as the error.
    ``::progress N [message]`` lines on stderr report progress. When the
    attempt is cancelled (timeout, or the job was cancelled) the whole
    process group is killed."""

    async def run(job: Job) -> Any:
        view = job.view
        job_json = orjson.dumps(view.wire())
        with _job_file(job_json) as job_file:
            env = {
                **os.environ,
                "AGENTQ_JOB_ID": view.job_id,
                "AGENTQ_TARGET": view.target,
                "AGENTQ_DISPATCHED_BY": view.dispatched_by,
                "AGENTQ_ATTEMPT": str(view.attempt),
                "AGENTQ_JOB_FILE": job_file,
            }
            if len(job_json) < JOB_JSON_ENV_LIMIT:
                env["AGENTQ_JOB_JSON"] = job_json.decode()
            # The attempt's trace (W3C traceparent): a dispatch from the command continues it.
            env.pop("TRACEPARENT", None)
            if traceparent := tracing.handler_traceparent(job.spec.get("traceparent")):
                env["TRACEPARENT"] = traceparent
            return await _run_command(command, job, env)

    return run


@contextlib.contextmanager
def _job_file(job_json: bytes) -> Iterator[str]:
    """A private file holding the job's JSON while its command runs; removed after."""
    fd, path = tempfile.mkstemp(prefix="agentq-job-", suffix=".json")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(job_json)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _run_command(command: str, job: Job, env: dict[str, str]) -> Any:
    view = job.view
    proc = await asyncio.create_subprocess_shell(
        command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    stderr_lines: list[str] = []

    async def feed() -> None:
        assert proc.stdin
        try:
            proc.stdin.write(view.task.encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read its input; that is its business
        finally:
            proc.stdin.close()

    async def watch_stderr() -> None:
        assert proc.stderr
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            match = _PROGRESS.match(line.strip())
            if match:
                percent = min(100.0, float(match.group(1)))
                await job.progress(percent, match.group(2))
            else:
                stderr_lines.append(line)
                del stderr_lines[:-200]

    try:
        _, stdout, _ = await asyncio.gather(feed(), proc.stdout.read(), watch_stderr())
        code = await proc.wait()
    except BaseException:
        _kill_group(proc.pid)
        await proc.wait()
        raise
    if code != 0:
        detail = _tail("\n".join(stderr_lines)) or f"exit code {code}"
        raise AttemptFailed(detail)
    return stdout.decode(errors="replace").strip()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def http_handler(url: str, timeout: float = 300.0) -> Handler:
    """POST the job view as JSON to ``url``; a 2xx answer completes the job with its
    body (JSON when it parses, else text); anything else fails the attempt. The
    request is asynchronous: at the job's timeout (or a cancel) it is aborted."""

    async def run(job: Job) -> Any:
        seconds = job.view.timeout_seconds or timeout
        body = orjson.dumps(job.view.wire())
        headers = {"Content-Type": "application/json"}
        if traceparent := tracing.handler_traceparent(job.spec.get("traceparent")):
            headers["traceparent"] = traceparent  # the attempt's trace, as W3C says
        try:
            async with httpx2.AsyncClient(timeout=seconds) as client:
                response = await client.post(url, content=body, headers=headers)
        except httpx2.HTTPError as exc:
            raise AttemptFailed(f"POST {url} failed: {exc or type(exc).__name__}") from exc
        if not 200 <= response.status_code < 300:
            raise AttemptFailed(_tail(f"HTTP {response.status_code}: {response.text}"))
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return response.content.decode(errors="replace")

    return run


def python_handler(spec: str) -> Handler:
    """``MODULE:FUNC``: call the function with the Job; sync functions run in a
    thread of their own so they do not stall the worker."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"handler {spec!r} is not MODULE:FUNC")
    func = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(func):
        raise ValueError(f"{spec!r}: {func_name} is not a function of {module_name}")
    return wrap(func)


def wrap(func: Callable[[Job], Any]) -> Handler:
    """A handler from a plain sync or async function. A sync function runs in a
    thread of its own (never a shared pool, where jobs would queue unseen behind
    each other); if it returns an awaitable (a lambda calling an async function,
    say), that is awaited on the event loop. When the attempt ends first (its
    timeout, a cancel) the job's slot is freed at once; Python cannot stop a
    thread, so the function runs on to its end, with a warning, and its result
    is dropped."""
    if inspect.iscoroutinefunction(func):
        return func

    async def run(job: Job) -> Any:
        result = await _in_own_thread(func, job)
        if inspect.isawaitable(result):
            result = await result
        return result

    return run


async def _in_own_thread(func: Callable[[Job], Any], job: Job) -> Any:
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if outcome.done():
            return
        if error is not None:
            outcome.set_exception(error)
        else:
            outcome.set_result(result)

    def call() -> None:
        try:
            result = context.run(func, job)
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=call, name=f"agentq-job-{job.id}", daemon=True)
    thread.start()
    try:
        return await outcome
    except asyncio.CancelledError:
        if thread.is_alive():
            log.warning("the attempt ended but its sync handler's thread runs on "
                        "(Python cannot stop a thread); its result will be dropped",
                        job_id=job.id, thread=thread.name)
        raise
