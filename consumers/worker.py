"""A worker: runs one agent's jobs, up to ``concurrency`` at once.

One script call takes ready jobs (high priority first) and starts them; when
there are none the worker blocks on the ready streams. Finished attempts are
completed in batches by one script call. Leases are renewed while jobs run;
a renewal that finds the attempt is no longer current (the job was cancelled
or reclaimed) stops the handler. The attempt number fences every write, so a
late answer from a dead attempt is refused by the log itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentq.consumers.handlers import Handler, Job
from agentq.consumers.waiting import until_stopped
from agentq.eventlog.keys import Keys
from agentq.eventlog.reader import with_dependencies
from agentq.eventlog.records import to_view
from agentq.eventlog.scripts import Backoff, Refusal, Scripts, StartedJob, ensure_work_groups
from agentq.schemas.job import JobView

log = structlog.get_logger("agentq.worker")

_BLOCK_MS = 5_000
# Waiting for Redis to come back: the first pause, doubled up to the last.
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0
# What a call to an unreachable (or restarting) server raises.
UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, OSError)


@dataclass(frozen=True)
class WorkerSettings:
    agent: str
    concurrency: int = 1
    lease_ms: int = 60_000
    backoff: Backoff = field(default_factory=lambda: Backoff(5_000, 300_000))
    heartbeat_timeout: float = 30.0
    shutdown_grace: float = 30.0


def new_worker_id(agent: str) -> str:
    return f"{agent}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    task: asyncio.Task[None]
    attempt: int
    lost: bool = False  # the attempt stopped being the job's current one


class Worker:
    """Runs one agent's jobs until :meth:`stop` (or the ``stop`` event) is set."""

    def __init__(
        self,
        redis: Redis,
        blocking: Redis,
        keys: Keys,
        settings: WorkerSettings,
        handler: Handler,
        worker_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.scripts = Scripts(redis)
        self.settings = settings
        self.keys = keys
        self.part = keys.partition(settings.agent)
        self.handler = handler
        self.worker_id = worker_id or new_worker_id(settings.agent)
        self._running: dict[str, _Running] = {}
        self._stopping = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._finished: list[tuple[str, int, bytes, asyncio.Future[Refusal | None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        # The take loop is blocked on the ready streams: a new entry wakes it,
        # so a completion need not look for the next job itself.
        self._idle = False

    def stop(self) -> None:
        """Stop taking jobs; running ones finish (within the grace period)."""
        self._stopping.set()

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Take and run jobs until stopped; then let running jobs finish."""
        await ensure_work_groups(self.redis, self.part)
        await self._heartbeat()
        keepalive = asyncio.create_task(self._keepalive())
        watcher = asyncio.create_task(self._watch(stop)) if stop else None
        try:
            await self._take_loop()
            await self._drain_running()
        finally:
            keepalive.cancel()
            if watcher:
                watcher.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
            with contextlib.suppress(*UNREACHABLE):
                await self.redis.zrem(self.part.workers, self.worker_id)

    async def _watch(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.stop()

    # -- taking jobs -------------------------------------------------------

    async def _take_loop(self) -> None:
        """Take jobs until stopped. When Redis cannot be reached the loop waits and
        tries again (the worker outlives a server restart); running jobs go on."""
        pause = _RETRY_FIRST
        while not self._stopping.is_set():
            try:
                await self._take_once()
                pause = _RETRY_FIRST
            except UNREACHABLE as exc:
                log.warning("redis unavailable; taking jobs again shortly", error=str(exc),
                            retry_in=pause)
                await until_stopped(asyncio.sleep(pause), self._stopping)
                pause = min(pause * 2, _RETRY_MAX)
                with contextlib.suppress(*UNREACHABLE):
                    # The server may have come back without its data.
                    await ensure_work_groups(self.redis, self.part)

    async def _take_once(self) -> None:
        """Take what there is room and work for, or wait for either."""
        free = self.settings.concurrency - len(self._running)
        if free <= 0:
            await until_stopped(self._slot_freed.wait(), self._stopping)
            self._slot_freed.clear()
            return
        jobs, tails = await self.scripts.start(
            self.part, self.worker_id, self.settings.lease_ms, free
        )
        for started in jobs:
            self._launch(started)
        if len(jobs) < free:
            # The streams were read to their ends: block from there. Asking
            # again first would only find them empty, at the cost of a call.
            self._idle = True
            try:
                # The jobs just launched go first: a quick one's completion
                # is sent before the blocking read.
                await asyncio.sleep(0)
                await until_stopped(self._wait_for_ready(tails), self._stopping)
            finally:
                self._idle = False

    async def _wait_for_ready(self, tails: dict[str, str]) -> None:
        await self.blocking.xread(tails, count=1, block=_BLOCK_MS)  # type: ignore[arg-type]

    def _launch(self, started: StartedJob) -> None:
        attempt = int(started.record["attempt"])
        task = asyncio.create_task(self._prepare_and_run(started.job_id, started.record))
        self._running[started.job_id] = _Running(task, attempt)

    async def _prepare_and_run(self, job_id: str, record: dict[str, str]) -> None:
        attempt = int(record["attempt"])
        view: JobView | None = None
        if '"dependsOn"' in record["spec"]:
            # A released dependent's handler receives its dependencies' results.
            try:
                view = await with_dependencies(
                    self.redis, self.keys, to_view(job_id, record, with_session_key=True))
            except Exception as exc:
                # The job stays active under its lease; stall recovery gives it back.
                log.warning("could not read the job's dependencies", job_id=job_id,
                            error=str(exc))
                self._running.pop(job_id, None)
                self._slot_freed.set()
                return

        async def report(percent: float, message: str | None) -> None:
            payload = {"percent": percent} | ({"message": message} if message else {})
            await self.scripts.progress(
                self.part, self.worker_id, job_id, attempt, orjson.dumps(payload)
            )

        await self._run_one(Job(report, view=view, job_id=job_id, record=record))

    # -- running one job ---------------------------------------------------

    async def _run_one(self, job: Job) -> None:
        job_id, attempt = job.id, job.attempt
        timeout = job.timeout_seconds or None
        try:
            async with asyncio.timeout(timeout) as deadline:
                result = self.handler(job)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    result = await result
            payload = orjson.dumps(result)
        except TimeoutError as exc:
            error = "timeout" if deadline.expired() else (str(exc) or "TimeoutError")
            await self._record_outcome(self._fail(job_id, attempt, error), job_id, attempt)
        except asyncio.CancelledError:
            running = self._running.get(job_id)
            if running is None or not running.lost:
                raise
            log.info("attempt stopped", job_id=job_id, attempt=attempt,
                     reason="cancelled or reclaimed")
        except Exception as exc:  # the handler's failure is the attempt's failure
            await self._record_outcome(self._fail(job_id, attempt, str(exc) or type(exc).__name__),
                                       job_id, attempt)
        else:
            await self._record_outcome(self._complete(job_id, attempt, payload), job_id, attempt)
        finally:
            self._running.pop(job_id, None)
            self._slot_freed.set()

    @staticmethod
    async def _record_outcome(recording: Awaitable[None], job_id: str, attempt: int) -> None:
        """Record an attempt's outcome; when Redis cannot be reached the outcome is
        lost, the job stays active under its lease, and stall recovery runs it again."""
        try:
            await recording
        except UNREACHABLE as exc:
            log.warning("could not record the attempt's outcome; it will run again once its "
                        "lease expires", job_id=job_id, attempt=attempt, error=str(exc))

    async def _fail(self, job_id: str, attempt: int, error: str) -> None:
        outcome = await self.scripts.fail(
            self.part, self.worker_id, job_id, attempt, error, self.settings.backoff
        )
        if isinstance(outcome, Refusal):
            log.warning("failure refused", job_id=job_id, attempt=attempt,
                        state=outcome.details[0] if outcome.details else None)

    async def _complete(self, job_id: str, attempt: int, payload: bytes) -> None:
        """Queue the completion; completions that arrive together go in one script call."""
        future: asyncio.Future[Refusal | None] = asyncio.get_running_loop().create_future()
        self._finished.append((job_id, attempt, payload, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        refusal = await future
        if refusal is not None:
            log.warning("completion refused", job_id=job_id, attempt=attempt,
                        state=refusal.details[0] if refusal.details else None)

    async def _flush(self) -> None:
        """Complete what has finished and, in the same round trip, take new jobs
        for the slots those completions free."""
        while self._finished:
            batch, self._finished = self._finished, []
            calls = [Scripts.complete_call(self.part, self.worker_id,
                                           [(j, a, p) for j, a, p, _ in batch])]
            free = self.settings.concurrency - len(self._running) + len(batch)
            if free > 0 and not self._idle and not self._stopping.is_set():
                calls.append(Scripts.start_call(self.part, self.worker_id,
                                                self.settings.lease_ms, free))
            try:
                replies = await self.scripts.call_many(calls)
            except BaseException as exc:
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                raise
            outcomes = Scripts.complete_outcome(replies[0])
            for (*_, future), outcome in zip(batch, outcomes, strict=True):
                if not future.done():  # its job's task may have been cancelled meanwhile
                    future.set_result(outcome)
            if len(replies) > 1:
                started, _ = Scripts.start_outcome(self.part, replies[1])
                for job in started:
                    self._launch(job)

    # -- leases and presence ----------------------------------------------

    async def _heartbeat(self) -> None:
        deadline_ms = int((time.time() + self.settings.heartbeat_timeout) * 1000)
        await self.redis.zadd(self.part.workers, {self.worker_id: deadline_ms})

    async def _keepalive(self) -> None:
        interval = min(self.settings.lease_ms / 3000, self.settings.heartbeat_timeout / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat()
                held = [(job_id, r.attempt) for job_id, r in self._running.items()]
                current = await self.scripts.renew(self.part, self.settings.lease_ms, held) \
                    if held else []
            except UNREACHABLE as exc:
                log.warning("redis unavailable; could not renew leases", error=str(exc))
                continue
            for (job_id, _), still in zip(held, current, strict=True):
                running = self._running.get(job_id)
                if not still and running is not None:
                    running.lost = True
                    running.task.cancel()

    async def _drain_running(self) -> None:
        """Let running jobs finish within the grace period; fail what is left."""
        tasks = [r.task for r in self._running.values()]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
        for job_id, running in list(self._running.items()):
            if running.task in late:
                running.lost = True
                running.task.cancel()
                await asyncio.gather(running.task, return_exceptions=True)
                await self._fail(job_id, running.attempt, "worker stopped before the job ended")
