"""A worker: runs one agent's jobs, up to ``concurrency`` at once.

One script call takes ready jobs (high priority first) and starts them; when
there are none the worker blocks on the ready streams. Finished attempts are
completed in batches by one script call. Leases are renewed while jobs run;
a renewal that finds the attempt is no longer current (the job was cancelled
or reclaimed) stops the handler, and a cancel notice (pub/sub) asks for that
check at once. The attempt number fences every write, so a late answer from a
dead attempt is refused by the log itself.

An outcome is never dropped: while Redis cannot be reached it is kept and sent
again, and the job keeps its slot and its lease meanwhile. A stopping worker
hands the jobs it could not finish back to the queue without charging them
an attempt.

On a Redis Cluster, a node's failover or a slot being moved is ridden out by
the client; what outlasts it (and any cluster error) is treated like a lost
connection: the take loop waits and starts again, outcomes are sent again.
With ``redis.waitReplicas``, an outcome stands once ``WAIT`` confirms it; one
that fewer replicas confirmed is sent again (see :meth:`Worker._until_confirmed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from agentq.consumers import metrics
from agentq.consumers.handlers import Handler, Job
from agentq.consumers.notices import CancelNotices
from agentq.consumers.progress import ProgressReports
from agentq.consumers.waiting import until_stopped
from agentq.eventlog import tracing
from agentq.eventlog.keys import Keys
from agentq.eventlog.reader import with_dependencies
from agentq.eventlog.records import to_view
from agentq.eventlog.scripts import (
    Backoff,
    Confirm,
    NotConfirmed,
    Refusal,
    ScriptCall,
    Scripts,
    StartedJob,
    ensure_work_groups,
)
from agentq.schemas.job import JobView

log = structlog.get_logger("agentq.worker")
# What a handler runs in when its job is not traced (nothing to make current).
_UNTRACED = contextlib.nullcontext()

_BLOCK_MS = 5_000
# Waiting for Redis to come back: the first pause, doubled up to the last.
_RETRY_FIRST, _RETRY_MAX = 0.1, 2.0
# What a call to an unreachable (or restarting) server raises; on a cluster also
# what it raises while it cannot route a command (RedisClusterException is no
# RedisError): the issue saw 47 of 50 jobs stay active for want of this.
UNREACHABLE: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
# Error replies of a cluster that is changing (a failover, a slot on the move):
# the command did not run, so they are tried again like a lost connection.
_CLUSTER_CHANGING = (ClusterDownError, TryAgainError, AskError)
# An error reply (out of memory, a read-only replica during a failover, a script
# error) is tried this many times before an outcome is given up: the job then
# stays active without renewals, and stall recovery runs it again.
_ERROR_REPLY_TRIES = 10


def _try_again(exc: BaseException, tries: int) -> bool:
    """Whether an outcome that failed with ``exc`` (after ``tries`` tries) is sent again:
    always while Redis cannot be reached, a few times for an error reply."""
    return not isinstance(exc, ResponseError) or isinstance(exc, _CLUSTER_CHANGING) \
        or tries < _ERROR_REPLY_TRIES

T = TypeVar("T")

Outcome = Literal["completed", "failed", "retrying", "timeout", "cancelled", "released", "refused"]
# The outcomes of an attempt that ran to its end here: agentq_job_run_seconds.
_RUN_OUTCOMES = frozenset({"completed", "failed", "retrying", "timeout"})


@dataclass(frozen=True)
class WorkerSettings:
    agent: str
    concurrency: int = 1
    lease_ms: int = 60_000
    backoff: Backoff = field(default_factory=lambda: Backoff(5_000, 300_000))
    heartbeat_timeout: float = 30.0
    shutdown_grace: float = 30.0
    # redis.waitReplicas: outcomes are confirmed on replicas (None: they are not).
    confirm: Confirm | None = None


@dataclass(frozen=True, slots=True)
class Ended:
    """One attempt this worker ran, as it ended: for the log line of each job."""

    job_id: str
    outcome: Outcome
    seconds: float
    attempt: int
    detail: str | None = None


def new_worker_id(agent: str) -> str:
    return f"{agent}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class _Running:
    task: asyncio.Task[None]
    attempt: int
    started: float = field(default_factory=time.monotonic)
    # Why the worker stopped the attempt: "lost" (it stopped being the job's
    # current one: cancelled or reclaimed) or "released" (the worker stops).
    stopped: Literal["lost", "released"] | None = None
    handler_done: bool = False
    span: Any = None  # the attempt's trace span, when tracing is on (eventlog/tracing.py)


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
        on_ended: Callable[[Ended], None] | None = None,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.scripts = Scripts(redis, settings.confirm)
        self.settings = settings
        self.keys = keys
        self.part = keys.partition(settings.agent)
        self.handler = handler
        self.worker_id = worker_id or new_worker_id(settings.agent)
        self.on_ended = on_ended
        self.ended: dict[str, int] = {}  # outcome -> attempts that ended so
        self._running: dict[str, _Running] = {}
        # Slots promised to a start call in flight: counted as taken, so the take
        # loop and a completion batch never start more than the free slots.
        self._reserved = 0
        self._tracer: Any = None  # tracing.tracer(), as of the last batch taken
        self._stopping = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._finished: list[tuple[str, int, bytes, asyncio.Future[Refusal | None]]] = []
        # Completions made but not yet confirmed on enough replicas: (job id,
        # attempt) -> what the first send answered, which stands.
        self._unconfirmed: dict[tuple[str, int], Refusal | None] = {}
        self._flushing: asyncio.Task[None] | None = None
        # The take loop is blocked on the ready streams: a new entry wakes it,
        # so a completion need not look for the next job itself.
        self._idle = False
        self.notices: CancelNotices | None = None  # while running

    def stop(self, *, now: bool = False) -> None:
        """Stop taking jobs; running ones finish within the grace period. With
        ``now`` (or when called a second time with ``now``) running handlers are
        stopped at once and their jobs handed back."""
        self._stopping.set()
        if now:
            self._stop_now.set()

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Take and run jobs until stopped; then let running jobs finish."""
        await ensure_work_groups(self.redis, self.part)
        await self.scripts.heartbeat(self.part, self.worker_id,
                                     int(self.settings.heartbeat_timeout * 1000))
        self.notices = notices = CancelNotices(self.blocking, self.part.cancel_notices,
                                               self._check_now, self._check_all)
        helpers = [asyncio.create_task(self._keepalive()), asyncio.create_task(notices.run())]
        if stop:
            helpers.append(asyncio.create_task(self._watch(stop)))
        try:
            # Listening before the first job starts: its cancel must not go unheard.
            # Bounded: without pub/sub the lease renewal still finds cancels.
            await until_stopped(notices.subscribed.wait(), self._stopping, timeout=2)
            await self._take_loop()
            await self._finish_running()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._flushing is not None:
                self._flushing.cancel()
                await asyncio.gather(self._flushing, return_exceptions=True)
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

    def _free_slots(self) -> int:
        return self.settings.concurrency - len(self._running) - self._reserved

    async def _take_once(self) -> None:
        """Take what there is room and work for, or wait for either."""
        free = self._free_slots()
        if free <= 0:
            self._slot_freed.clear()
            await until_stopped(self._slot_freed.wait(), self._stopping)
            return
        self._reserved += free
        try:
            jobs, tails = await self.scripts.start(
                self.part, self.worker_id, self.settings.lease_ms, free
            )
            # Whether to trace, asked once a batch (the provider is the application's).
            self._tracer = tracing.tracer()
            for started in jobs:
                self._launch(started)
        finally:
            self._reserved -= free
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
        if (observed := metrics.current()) is not None:
            record = started.record
            observed.observe_start(self.settings.agent, int(record.get("queuedAt") or 0)
                                   or int(record["startedAt"]), int(record["startedAt"]))
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

        async def send(percent: float, message: str | None) -> None:
            payload = {"percent": percent} | ({"message": message} if message else {})
            await self.scripts.progress(
                self.part, self.worker_id, job_id, attempt, orjson.dumps(payload)
            )

        progress = ProgressReports(send)
        job = Job(progress.report, view=view, job_id=job_id, record=record)
        await self._run_one(job, progress)

    # -- running one job ---------------------------------------------------

    async def _run_one(self, job: Job, progress: ProgressReports) -> None:
        job_id, attempt = job.id, job.attempt
        timeout = job.timeout_seconds or None
        running = self._running.get(job_id)
        span = None
        if running is not None and self._tracer is not None:
            span = running.span = tracing.start_process(
                self.settings.agent, job_id, attempt, job.spec.get("traceparent"),
                self.worker_id)
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    # The handler continues the job's trace (when there is one).
                    with tracing.current(span) if span is not None else _UNTRACED:
                        result = self.handler(job)
                        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                            result = await result
                payload = orjson.dumps(result)
            except TimeoutError as exc:
                error = "timeout" if deadline.expired() else (str(exc) or "TimeoutError")
                await self._after_handler(progress, running)
                await self._fail(job_id, attempt, error, "timeout" if error == "timeout" else None)
            except asyncio.CancelledError:
                progress.discard_timer()
                if running is None or running.stopped is None:
                    raise
                self._ended(job_id, "cancelled" if running.stopped == "lost" else "released",
                            attempt)
            except Exception as exc:  # the handler's failure is the attempt's failure
                await self._after_handler(progress, running)
                await self._fail(job_id, attempt, str(exc) or type(exc).__name__)
            else:
                await self._after_handler(progress, running)
                await self._complete(job_id, attempt, payload)
        except Exception as exc:
            # Recording the outcome failed for a reason other than reaching Redis
            # (those are retried): the job stays active under its lease, and stall
            # recovery runs it again once the lease expires.
            log.error("could not record the attempt's outcome", job_id=job_id,
                      attempt=attempt, error=str(exc) or type(exc).__name__)
        finally:
            if span is not None:
                tracing.end_process(span, "unrecorded")  # no outcome ended it (see _ended)
            self._running.pop(job_id, None)
            self._slot_freed.set()

    @staticmethod
    async def _after_handler(progress: ProgressReports, running: _Running | None) -> None:
        if running is not None:
            running.handler_done = True
        await progress.flush()  # the last progress report goes before the outcome

    def _ended(
        self, job_id: str, outcome: Outcome, attempt: int, detail: str | None = None
    ) -> None:
        running = self._running.get(job_id)
        seconds = time.monotonic() - running.started if running else 0.0
        self.ended[outcome] = self.ended.get(outcome, 0) + 1
        if outcome in _RUN_OUTCOMES and (observed := metrics.current()) is not None:
            observed.observe_run(self.settings.agent, seconds)
        if running is not None and running.span is not None:
            tracing.end_process(running.span, outcome, detail)
        if self.on_ended is not None:
            self.on_ended(Ended(job_id, outcome, seconds, attempt, detail))

    async def _until_recorded(self, send: Callable[[], Awaitable[T]], job_id: str,
                              attempt: int) -> T:
        """Send an outcome until Redis takes it. Meanwhile the job keeps its slot and
        its lease (renewed by the keepalive), so nobody else runs it."""
        pause, tries = _RETRY_FIRST, 0
        while True:
            try:
                return await send()
            except UNREACHABLE as exc:
                tries += 1
                if not _try_again(exc, tries):
                    raise
                log.warning("could not record the attempt's outcome yet; trying again",
                            job_id=job_id, attempt=attempt, error=str(exc), retry_in=pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX)

    async def _until_confirmed(self, calls: list[ScriptCall], short: NotConfirmed,
                               job_ids: list[str]) -> None:
        """After an outcome that fewer replicas than ``redis.waitReplicas`` confirmed:
        send ``calls`` (the same outcome) again, with a heartbeat after them, until
        a send is confirmed.

        The first send was made: the job's state is written on the master, and
        what it answered stands. Sending the outcome again is harmless: the
        script refuses an attempt no longer active, leaving the first write; and
        if a failover lost that write, the second makes it again on the new
        master. The heartbeat is a write after the outcome, so the WAIT after it
        covers the outcome even when the script wrote nothing (a replica applies
        its master's writes in order). The job keeps its slot, and its lease is
        renewed, until then.
        """
        pause = _RETRY_FIRST
        while True:
            log.warning("outcome not confirmed by enough replicas; sending it again",
                        jobs=job_ids, confirmed=short.confirmed, wanted=short.wanted,
                        retry_in=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _RETRY_MAX)
            try:
                await self.scripts.call_many([*calls, self._heartbeat_call()])
                return
            except NotConfirmed as again:
                short = again
            except UNREACHABLE as exc:
                log.warning("could not send the outcome again yet", jobs=job_ids,
                            error=str(exc))

    async def _fail(self, job_id: str, attempt: int, error: str,
                    outcome: Outcome | None = None) -> None:
        def call() -> ScriptCall:
            return Scripts.fail_call(self.part, self.worker_id, job_id, attempt, error,
                                     self.settings.backoff)

        async def send() -> Refusal | str:
            (reply,) = await self.scripts.call_many([call()])
            return Scripts.fail_outcome(reply)

        try:
            reply = await self._until_recorded(send, job_id, attempt)
        except NotConfirmed as short:
            reply = Scripts.fail_outcome(short.replies[0])
            await self._until_confirmed([call()], short, [job_id])
        if isinstance(reply, Refusal):
            log.warning("failure refused", job_id=job_id, attempt=attempt,
                        state=reply.details[0] if reply.details else None)
            self._ended(job_id, "refused", attempt, error)
            return
        ended: Outcome = "failed" if reply == "failed" else "retrying"
        self._ended(job_id, outcome or ended, attempt, error)

    async def _complete(self, job_id: str, attempt: int, payload: bytes) -> None:
        """Queue the completion; completions that arrive together go in one script call."""
        future: asyncio.Future[Refusal | None] = asyncio.get_running_loop().create_future()
        self._finished.append((job_id, attempt, payload, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        refusal = await future
        if refusal is not None and not _already_recorded(refusal, attempt):
            log.warning("completion refused", job_id=job_id, attempt=attempt,
                        state=refusal.details[0] if refusal.details else None)
            self._ended(job_id, "refused", attempt)
            return
        self._ended(job_id, "completed", attempt)

    async def _flush(self) -> None:
        """Complete what has finished and, in the same round trip, take new jobs
        for the slots those completions free. A batch that cannot be sent stays
        queued, with whatever finished meanwhile, and is sent again."""
        pause, tries = _RETRY_FIRST, 0
        confirming = False  # the last send was made, but too few replicas confirmed it
        while self._finished:
            batch = list(self._finished)
            calls = [Scripts.complete_call(self.part, self.worker_id,
                                           [(j, a, p) for j, a, p, _ in batch])]
            # The batch's handlers have ended: their slots go to the jobs started here.
            freed = sum(1 for j, a, _, _ in batch
                        if (r := self._running.get(j)) is not None and r.attempt == a)
            free = self._free_slots() + freed
            # After a failed try the batch goes alone: a failing start (its streams
            # lost with the server's data, say) must not hold completions back.
            take = tries == 0 and not confirming and free > 0 and not self._idle \
                and not self._stopping.is_set()
            if take:
                calls.append(Scripts.start_call(self.part, self.worker_id,
                                                self.settings.lease_ms, free))
                self._reserved += free
            if confirming:
                # A write after the outcomes, so that the WAIT covers them even where
                # the script, sent again, refuses and writes nothing.
                calls.append(self._heartbeat_call())
            short: NotConfirmed | None = None
            try:
                try:
                    replies = await self.scripts.call_many(calls)
                except NotConfirmed as exc:
                    # Made, but too few replicas confirmed: see _until_confirmed.
                    replies, short = exc.replies, exc
            except Exception as exc:
                tries += 1
                if isinstance(exc, UNREACHABLE) and _try_again(exc, tries):
                    log.warning("could not record completions yet; trying again",
                                jobs=len(batch), error=str(exc), retry_in=pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _RETRY_MAX)
                    continue
                # Given up: the batch's jobs learn of it and log it; they stay active
                # without renewals, and stall recovery runs them again.
                tries = 0
                del self._finished[: len(batch)]
                for job_id, attempt, _, future in batch:
                    self._unconfirmed.pop((job_id, attempt), None)
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                if take:
                    self._reserved -= free
            outcomes = Scripts.complete_outcome(replies[0])
            if take:
                started, _ = Scripts.start_outcome(self.part, replies[1])
                for job in started:
                    self._launch(job)
            if short is not None:
                # The batch stays queued (with whatever finishes meanwhile) and is
                # sent again, as _until_confirmed says; what this send answered stands.
                for (job_id, attempt, _, _), outcome in zip(batch, outcomes, strict=True):
                    self._unconfirmed.setdefault((job_id, attempt), outcome)
                log.warning("completions not confirmed by enough replicas; sending them again",
                            jobs=[j for j, *_ in batch], confirmed=short.confirmed,
                            wanted=short.wanted, retry_in=pause)
                confirming = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX)
                continue
            pause, tries, confirming = _RETRY_FIRST, 0, False
            del self._finished[: len(batch)]
            for (job_id, attempt, _, future), outcome in zip(batch, outcomes, strict=True):
                first = self._unconfirmed.pop((job_id, attempt), outcome)
                if not future.done():  # its job's task may have been cancelled meanwhile
                    future.set_result(first)

    # -- leases, presence and cancels ----------------------------------------

    def _heartbeat_call(self) -> ScriptCall:
        return Scripts.heartbeat_call(self.part, self.worker_id,
                                      int(self.settings.heartbeat_timeout * 1000))

    async def _keepalive(self) -> None:
        interval = min(self.settings.lease_ms / 3000, self.settings.heartbeat_timeout / 3)
        while True:
            await asyncio.sleep(interval)
            await self._renew(heartbeat=True)

    async def _renew(self, *, heartbeat: bool, only: str | None = None) -> None:
        """Renew the leases of running attempts (one, with ``only``) and stop those
        that are no longer current; with ``heartbeat``, say the worker is alive."""
        held = [(job_id, r.attempt) for job_id, r in self._running.items()
                if only is None or job_id == only]
        calls = [self._heartbeat_call()] if heartbeat else []
        if held:
            calls.append(Scripts.renew_call(self.part, self.settings.lease_ms, held))
        if not calls:
            return
        try:
            replies = await self.scripts.call_many(calls)
        except UNREACHABLE as exc:
            log.warning("redis unavailable; could not renew leases", error=str(exc))
            return
        current = replies[-1] if held else []
        for (job_id, attempt), still in zip(held, current, strict=True):
            running = self._running.get(job_id)
            if not still and running is not None and running.attempt == attempt \
                    and running.stopped is None and not running.handler_done:
                running.stopped = "lost"
                running.task.cancel()

    async def _check_now(self, job_id: str) -> None:
        """A cancel notice named ``job_id``: if this worker runs it, check at once."""
        if job_id in self._running:
            await self._renew(heartbeat=False, only=job_id)

    async def _check_all(self) -> None:
        await self._renew(heartbeat=False)

    # -- stopping ----------------------------------------------------------

    async def _finish_running(self) -> None:
        """Let running jobs finish within the grace period (or until told to stop
        now); hand back to the queue those whose handler is still running."""
        tasks = [r.task for r in self._running.values()]
        if tasks:
            waiting = asyncio.ensure_future(asyncio.wait(tasks))
            await until_stopped(waiting, self._stop_now, timeout=self.settings.shutdown_grace)
        if not self._running:
            return
        late = list(self._running.items())
        for _, running in late:
            running.stopped = "released"
            running.task.cancel()
        await asyncio.gather(*(r.task for _, r in late), return_exceptions=True)
        held = [(job_id, r.attempt) for job_id, r in late]
        try:
            released = await self.scripts.release(self.part, self.worker_id, held)
        except UNREACHABLE as exc:
            log.warning("could not hand back unfinished jobs; they run again once their "
                        "leases expire", jobs=[j for j, _ in held], error=str(exc))
            return
        log.info("handed back unfinished jobs", jobs=released)


def _already_recorded(refusal: Refusal, attempt: int) -> bool:
    """A completion refused because it was already recorded: an earlier send
    reached the server though its reply was lost (only this attempt completes)."""
    details = refusal.details
    return len(details) >= 2 and details[0] == "completed" and details[1] == str(attempt)
