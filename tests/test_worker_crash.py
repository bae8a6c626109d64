"""Workers that die, are killed or are told to stop, as real processes on a real Redis.

Each worker here is ``tests/worker_proc.py`` run as a subprocess (the CLI's
SIGTERM handling is not built yet): it prints ``READY`` once it takes jobs,
``STOPPING`` when SIGTERM arrives and ``STOPPED`` before it exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

import agentq
from agentq.consumers.handlers import Job
from agentq.eventlog.scripts import Refusal
from agentq.schemas._base import iso_to_micros
from agentq.schemas.config import Config
from agentq.schemas.events import StoredEvent
from agentq.schemas.job import TERMINAL_STATES

ROOT = Path(__file__).resolve().parent.parent
WORKER_PROC = Path(__file__).resolve().parent / "worker_proc.py"
AGENT = "w"
NO_RATE_LIMIT = {"dispatchesPerMinute": 0, "maxQueueDepth": 0}


# -- helpers ---------------------------------------------------------------


class WorkerProcess:
    """A worker subprocess; its stdout lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    async def expect(self, prefix: str, timeout: float = 15) -> str:
        """The first stdout line starting with ``prefix``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or (self._reader.done() and self.proc.returncode is not None):
                pytest.fail(
                    f"no {prefix!r} line from the worker; stdout={self.lines!r} "
                    f"rc={self.proc.returncode} stderr={self.stderr()[-2000:]}"
                )
            self._new_line.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), timeout=min(left, 0.2))

    async def ready(self) -> str:
        """Wait for READY; returns the worker id."""
        return (await self.expect("READY ")).split(" ", 1)[1]

    async def close(self) -> None:
        """Make sure the process is gone and reaped (SIGTERM, then SIGKILL)."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=5)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def spawn(
    redis_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[WorkerProcess]]]:
    """Start worker subprocesses; every one is stopped and reaped afterwards."""
    started: list[WorkerProcess] = []

    async def start(config: Config, kind: str, arg: str, concurrency: int = 1) -> WorkerProcess:
        stderr_path = tmp_path / f"worker{len(started)}.stderr"
        config_json = config.model_dump_json(by_alias=True, exclude_none=True)
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(WORKER_PROC),
                redis_url,
                config_json,
                AGENT,
                kind,
                arg,
                str(concurrency),
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        worker = WorkerProcess(proc, stderr_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.close()


@asynccontextmanager
async def in_process_worker(q: agentq.Client, handler: Callable[[Job], Any]) -> AsyncIterator[Any]:
    run = q.worker(AGENT, handler, concurrency=1)
    task = asyncio.create_task(run.run())
    try:
        yield run
    finally:
        run.stop()
        await asyncio.wait_for(task, timeout=10)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.02)


def of_type(events: list[StoredEvent], kind: str) -> list[StoredEvent]:
    return [e for e in events if e.type == kind]


# -- tests -----------------------------------------------------------------


async def test_sigkilled_worker_job_is_reclaimed_and_late_answer_refused(
    worker_client: Callable[..., Awaitable[agentq.Client]],
    spawn: Callable[..., Awaitable[WorkerProcess]],
) -> None:
    # The killed process served the partition's stall recovery too: another takes
    # it over once the dead one's heartbeat deadline has passed.
    q = await worker_client(
        jobs={"leaseSeconds": 1, "backoffBaseSeconds": 0.05, "backoffMaxSeconds": 0.1},
        workers={"shutdownGraceSeconds": 1, "heartbeatTimeoutSeconds": 2},
    )
    dead = await spawn(q.config, "python", "worker_proc:sleep_long")
    dead_id = await dead.ready()
    job = await q.dispatch(AGENT, "survive a crash", max_attempts=3)

    async def active() -> bool:
        view = await q.status(job.job_id)
        return view.state == "active" and view.attempt == 1

    await until(active, what="the first worker to start the job")
    dead.proc.kill()  # SIGKILL: no goodbye, the lease is left to expire
    assert await asyncio.wait_for(dead.proc.wait(), 5) == -signal.SIGKILL

    async with in_process_worker(q, lambda j: f"finished {j.task}"):
        view, timed_out = await q.wait(job.job_id, timeout=15)
    assert not timed_out, view
    assert view.state == "completed"
    assert view.result == "finished survive a crash"
    assert view.attempt == 2

    events = await q.history(job.job_id)
    started = of_type(events, "JobStarted")
    assert [e.data["attempt"] for e in started] == [1, 2]
    assert started[0].data["workerId"] == dead_id
    (stalled,) = of_type(events, "JobStalled")
    assert stalled.data["attempt"] == 1
    assert stalled.data.get("workerId") == dead_id
    # Reclaimed only once the lease ran out (it was at least 1 s from the start).
    lease_us = int(q.config.jobs.lease_seconds * 1_000_000)
    assert iso_to_micros(stalled.at) - iso_to_micros(started[0].at) >= lease_us
    (completed,) = of_type(events, "JobCompleted")
    assert completed.data["attempt"] == 2
    assert of_type(events, "JobFailed") == []
    types = [e.type for e in events]
    assert types.index("JobStalled") < types.index("JobCompleted")

    # The dead attempt answers late: refused by the log, and nothing changes.
    part = q.partition(AGENT)
    log_length = await q.redis.xlen(part.log)
    record = await q.redis.hgetall(part.job(job.job_id))
    late = await q.scripts.complete(part, "dead", [(job.job_id, 1, b'"late"')])
    assert late == [Refusal("invalid_state", ("completed", "2"))]
    assert await q.redis.xlen(part.log) == log_length
    assert await q.redis.hgetall(part.job(job.job_id)) == record
    assert await q.history(job.job_id) == events
    after = await q.status(job.job_id)
    assert after.state == "completed"
    assert after.result == "finished survive a crash"


async def test_sigterm_lets_running_job_finish_and_takes_no_new_job(
    worker_client: Callable[..., Awaitable[agentq.Client]],
    spawn: Callable[..., Awaitable[WorkerProcess]],
) -> None:
    grace = 6.0
    q = await worker_client(jobs={"leaseSeconds": 2}, workers={"shutdownGraceSeconds": grace})
    # Concurrency 2: the worker has a free slot when the second job arrives.
    worker = await spawn(q.config, "python", "worker_proc:sleep_briefly", concurrency=2)
    worker_id = await worker.ready()
    first = await q.dispatch(AGENT, "first")

    async def first_active() -> bool:
        return (await q.status(first.job_id)).state == "active"

    await until(first_active, what="the worker to start the first job")
    signalled = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    await worker.expect("STOPPING")
    second = await q.dispatch(AGENT, "second")

    code = await asyncio.wait_for(worker.proc.wait(), timeout=grace + 5)
    took = time.monotonic() - signalled
    assert code == 0, worker.stderr()[-2000:]
    assert took < grace, f"the worker took {took:.2f}s to stop (grace {grace}s)"
    await worker.expect("STOPPED")

    done = await q.status(first.job_id)
    assert done.state == "completed", done
    assert done.result == "done first"
    assert done.attempt == 1
    left = await q.status(second.job_id)
    assert left.state == "queued", left
    assert left.attempt == 0
    # JobDispatched carries the starting state (docs/architecture.md): nothing after it.
    assert [e.type for e in await q.history(second.job_id)] == ["JobDispatched"]
    assert await q.redis.zscore(q.partition(AGENT).workers, worker_id) is None


async def test_poison_job_fails_after_its_attempts_when_workers_keep_dying(
    worker_client: Callable[..., Awaitable[agentq.Client]],
    spawn: Callable[..., Awaitable[WorkerProcess]],
) -> None:
    # Each dead process served the stall recovery: the next one takes it over once
    # the dead one's heartbeat deadline has passed.
    q = await worker_client(
        jobs={"leaseSeconds": 1, "backoffBaseSeconds": 0.05, "backoffMaxSeconds": 0.1},
        workers={"shutdownGraceSeconds": 1, "heartbeatTimeoutSeconds": 2},
    )
    job = await q.dispatch(AGENT, "poison", max_attempts=2)

    # A supervisor's loop: whenever the worker process is gone, start another.
    current: WorkerProcess | None = None
    spawned = 0
    deadline = time.monotonic() + 25
    while (view := await q.status(job.job_id)).state not in TERMINAL_STATES:
        assert time.monotonic() < deadline, f"the poison job never ended: {view}"
        if current is None or current.proc.returncode is not None:
            if current is not None:
                assert current.proc.returncode == 1, current.stderr()[-2000:]
            current = await spawn(q.config, "python", "worker_proc:die")
            spawned += 1
        await asyncio.sleep(0.05)
    assert current is not None
    await current.close()

    assert view.state == "failed"
    assert view.attempt == 2
    events = await q.history(job.job_id)
    assert [e.data["attempt"] for e in of_type(events, "JobStarted")] == [1, 2]
    (stalled,) = of_type(events, "JobStalled")
    assert stalled.data["attempt"] == 1
    (failed,) = of_type(events, "JobFailed")
    assert failed.data["reason"] == "lease_expired"
    assert failed.data["attempt"] == 2
    assert of_type(events, "JobCompleted") == []
    assert events[-1].type == "JobFailed"
    assert spawned >= 3  # two died on it, a third reclaimed it the last time
